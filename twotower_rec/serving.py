"""Load an export directory and answer top-K queries. Knows nothing of training or TorchRec.

Example::

    model = ExportedModel.load("runs/demo/export")
    model.recommend_user("42", k=10)          # [Recommendation(item='1234', score=0.83, title='...'), ...]
    model.recommend_new_user(liked=["1", "50"], features={"gender": "F"}, k=10)   # cold start
    model.recommend_user("42", k=10, ann=True)  # through the faiss index (items.faiss)

Loading checks the export against its manifest: format version, metric, dims, dtype, every
listed file present with the size it was written with (so a truncated copy is refused), and
the ANN index's size and dimension.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from twotower_rec.data.features import HISTORY, recent_position
from twotower_rec.errors import TwoTowerError
from twotower_rec.retrieval import chunked_topk

EXPORT_FORMAT_VERSION = 2
REQUIRED_FILES = ("manifest.json", "item_embeddings.npy", "item_ids.npy", "query_tower.pt", "users.npz")
METRIC = "inner_product"


class ExportError(TwoTowerError):
    """An export is missing, incomplete or inconsistent, or a request cannot be answered."""


class UnknownUserError(ExportError):
    """A raw user id that is not in the export (HTTP 404 rather than 400)."""


@dataclass
class Recommendation:
    item: str
    score: float
    title: str = ""
    genres: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _raw_key(value) -> str:
    return str(value.item() if isinstance(value, np.generic) else value)


def _check_manifest(directory: Path, manifest: dict) -> None:
    where = directory / "manifest.json"
    if manifest.get("format_version") != EXPORT_FORMAT_VERSION:
        raise ExportError(f"{where}: format version {manifest.get('format_version')}, this package reads "
                          f"{EXPORT_FORMAT_VERSION}: export again with this version")
    if manifest.get("metric") != METRIC:
        raise ExportError(f"{where}: metric {manifest.get('metric')!r}, this package scores by {METRIC!r}")
    for key in ("embedding_dim", "num_items", "query_features", "history_length", "files"):
        if key not in manifest:
            raise ExportError(f"{where}: no '{key}' entry; not an export of this package")
    for name, info in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ExportError(f"{directory} is not a complete export: {name} is missing")
        if path.stat().st_size != info.get("bytes"):
            raise ExportError(f"{path}: {path.stat().st_size} bytes, the manifest says {info.get('bytes')}: "
                              f"the file is truncated or was replaced; export again")


class ExportedModel:
    def __init__(self, directory: Path, manifest: dict, item_embeddings: np.ndarray, item_ids: np.ndarray,
                 items: pd.DataFrame, query_tower: torch.jit.ScriptModule, users: dict[str, np.ndarray],
                 index=None) -> None:
        self.directory = directory
        self.manifest = manifest
        self.item_embeddings = torch.from_numpy(np.ascontiguousarray(item_embeddings, dtype=np.float32))
        self.item_ids = item_ids
        self.item_row = {_raw_key(i): r for r, i in enumerate(item_ids)}
        n = item_ids.shape[0]
        self.titles = items["title"].fillna("").astype(str).tolist() if "title" in items.columns else [""] * n
        self.genres = items["genres"].fillna("").astype(str).tolist() if "genres" in items.columns else [""] * n
        self.query_tower = query_tower
        self.users = users
        self.user_row = {_raw_key(u): i for i, u in enumerate(users["raw_user_ids"])}
        self.index = index

    @classmethod
    def load(cls, directory: str | Path) -> "ExportedModel":
        directory = Path(directory)
        if not directory.is_dir():
            raise ExportError(f"export directory not found: {directory}")
        missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
        if missing:
            raise ExportError(f"{directory} is not a complete export: missing {', '.join(missing)}")
        try:
            manifest = json.loads((directory / "manifest.json").read_text())
        except json.JSONDecodeError as err:
            raise ExportError(f"{directory / 'manifest.json'}: not valid JSON (line {err.lineno}: {err.msg})") from None
        _check_manifest(directory, manifest)
        try:
            item_embeddings = np.load(directory / "item_embeddings.npy", allow_pickle=False)
            item_ids = np.load(directory / "item_ids.npy", allow_pickle=True)
            users = dict(np.load(directory / "users.npz", allow_pickle=True))
        except (ValueError, OSError, EOFError) as err:
            raise ExportError(f"{directory}: cannot read export arrays ({err})") from None
        if item_embeddings.ndim != 2 or item_embeddings.shape[1] != manifest["embedding_dim"]:
            raise ExportError(f"{directory / 'item_embeddings.npy'}: shape {item_embeddings.shape} does not match "
                              f"manifest embedding_dim {manifest['embedding_dim']}")
        if str(item_embeddings.dtype) != manifest.get("embedding_dtype", "float32"):
            raise ExportError(f"{directory / 'item_embeddings.npy'}: dtype {item_embeddings.dtype}, manifest says "
                              f"{manifest.get('embedding_dtype')}")
        if item_embeddings.shape[0] != item_ids.shape[0] or item_ids.shape[0] != manifest["num_items"]:
            raise ExportError(f"{directory}: {item_embeddings.shape[0]} embeddings, {item_ids.shape[0]} item ids, "
                              f"manifest says {manifest['num_items']} items")
        items = pd.DataFrame()
        if (directory / "items.parquet").is_file():
            items = pd.read_parquet(directory / "items.parquet")
            if len(items) != item_ids.shape[0]:
                raise ExportError(f"{directory / 'items.parquet'}: {len(items)} rows for {item_ids.shape[0]} items")
        try:
            query_tower = torch.jit.load(str(directory / "query_tower.pt"), map_location="cpu").eval()
        except RuntimeError as err:
            raise ExportError(f"{directory / 'query_tower.pt'}: cannot load TorchScript module "
                              f"({str(err).splitlines()[0]})") from None
        index = None
        info = manifest.get("ann")
        if info:
            from twotower_rec import ann

            index = ann.read(directory / info["file"], info.get("params"))
            if index.ntotal != manifest["num_items"] or index.d != manifest["embedding_dim"]:
                raise ExportError(f"{directory / info['file']}: {index.ntotal} vectors of dim {index.d}, manifest "
                                  f"says {manifest['num_items']} of dim {manifest['embedding_dim']}")
        return cls(directory, manifest, item_embeddings, item_ids, items, query_tower, users, index)

    def user_query(self, raw_user_ids: list) -> tuple[list[torch.Tensor], list[torch.Tensor], np.ndarray, np.ndarray]:
        """Query-tower inputs for known users after all their interactions, and their seen items (CSR)."""
        rows = []
        for raw in raw_user_ids:
            key = _raw_key(raw)
            if key not in self.user_row:
                raise UnknownUserError(f"unknown user '{key}': not among the {len(self.user_row)} users of this export")
            rows.append(self.user_row[key])
        rows = np.asarray(rows, dtype=np.int64)
        code = rows + 1
        offsets, history = self.users["history_offsets"], self.users["history_items"]
        start, end = offsets[code - 1], offsets[code]
        n = int(self.manifest["history_length"])
        values, lengths = [], []
        for name in self.manifest["query_features"]:
            if name == "user_id":
                values.append(torch.from_numpy(code))
                lengths.append(torch.ones(code.size, dtype=torch.long))
            elif name == HISTORY:
                count = np.minimum(end - start, n)
                values.append(torch.from_numpy(np.concatenate([history[e - c:e] for e, c in zip(end, count)]).astype(np.int64)))
                lengths.append(torch.from_numpy(count.astype(np.int64)))
            elif recent_position(name):  # the m-th last item, 0 when there are fewer
                m = recent_position(name)
                values.append(torch.from_numpy(np.where(end - m >= start, history[np.maximum(end - m, 0)], 0)
                                               .astype(np.int64)))
                lengths.append(torch.ones(code.size, dtype=torch.long))
            else:
                values.append(torch.from_numpy(self.users[f"feature_{name}"][code].astype(np.int64)))
                lengths.append(torch.ones(code.size, dtype=torch.long))
        seen_lengths = end - start
        seen_offsets = np.concatenate([[0], np.cumsum(seen_lengths)])
        seen = np.concatenate([history[s:e] for s, e in zip(start, end)]) if code.size else np.zeros(0, np.int64)
        return values, lengths, seen_offsets, seen

    def _top_k(self, query: torch.Tensor, k: int, seen_offsets: np.ndarray, seen_rows: np.ndarray,
               ann: bool) -> list[list[Recommendation]]:
        """Top-``k`` catalog rows per query, never a row in that query's CSR ``seen_rows``."""
        if k <= 0:
            raise ExportError(f"k must be a positive integer, got {k}")
        if ann:
            if self.index is None:
                raise ExportError(f"{self.directory} has no ANN index (exported with export.ann=none)")
            return self._top_k_ann(query, k, seen_offsets, seen_rows)
        scores, indices = chunked_topk(query, self.item_embeddings, k, seen_offsets, seen_rows)
        return [[self._recommendation(i, s) for s, i in zip(row_s, row_i) if s != float("-inf")]
                for row_s, row_i in zip(scores.tolist(), indices.tolist())]

    def _top_k_ann(self, query: torch.Tensor, k: int, seen_offsets: np.ndarray, seen_rows: np.ndarray):
        from twotower_rec import ann

        most_seen = int(np.diff(seen_offsets).max()) if seen_offsets.size > 1 else 0
        scores, rows = ann.search(self.index, query.numpy(), k + most_seen)
        out = []
        for q, (row_s, row_i) in enumerate(zip(scores.tolist(), rows.tolist())):
            seen = set(seen_rows[seen_offsets[q]:seen_offsets[q + 1]].tolist())
            kept = [(s, i) for s, i in zip(row_s, row_i) if i >= 0 and i not in seen][:k]
            out.append([self._recommendation(i, s) for s, i in kept])
        return out

    def _recommendation(self, row: int, score: float) -> Recommendation:
        return Recommendation(_raw_key(self.item_ids[row]), float(score), self.titles[row], self.genres[row])

    @torch.no_grad()
    def recommend_users(self, raw_user_ids: list, k: int = 10, exclude_seen: bool = True,
                        ann: bool = False) -> list[list[Recommendation]]:
        """Top-``k`` items for each known user, after everything they interacted with."""
        if k <= 0:
            raise ExportError(f"k must be a positive integer, got {k}")
        values, lengths, seen_offsets, seen = self.user_query(raw_user_ids)
        query = self.query_tower(values, lengths)
        # Export rows are item codes - 1; code 0 (unknown) in the history is never a catalog row.
        seen_rows = seen - 1
        keep = seen_rows >= 0
        per_query = np.repeat(np.arange(len(raw_user_ids)), np.diff(seen_offsets))[keep]
        seen_offsets = np.concatenate([[0], np.cumsum(np.bincount(per_query, minlength=len(raw_user_ids)))])
        seen_rows = seen_rows[keep]
        if not exclude_seen:
            seen_offsets, seen_rows = np.zeros(len(raw_user_ids) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return self._top_k(query, k, seen_offsets, seen_rows, ann)

    def recommend_user(self, raw_user_id, k: int = 10, exclude_seen: bool = True,
                       ann: bool = False) -> list[Recommendation]:
        return self.recommend_users([raw_user_id], k, exclude_seen, ann)[0]

    @torch.no_grad()
    def encode_new_users(self, rows: list[dict]) -> torch.Tensor:
        """Query embeddings of users given by raw values: each row ``{"liked": [item ids, oldest
        first], "features": {name: value}}``, optionally with ``"user"`` (a known raw id)."""
        names = self.manifest["query_features"]
        features: dict[str, list[list[str]]] = {}
        for name in names:
            if name == HISTORY or recent_position(name):  # recent_m: derived from the history
                features[name] = [[_raw_key(i) for i in row.get("liked", [])] for row in rows]
            elif name == "user_id":
                features[name] = [[_raw_key(row["user"])] if row.get("user") is not None else [] for row in rows]
            else:
                features[name] = [[_raw_key(row["features"][name])] if name in row.get("features", {}) else []
                                  for row in rows]
        for row in rows:
            unknown = sorted(set(row.get("features", {})) - set(names))
            if unknown:
                raise ExportError(f"unknown feature(s) {unknown}: this model's query features are {names}")
        return self.query_tower.encode_raw(features)

    def recommend_new_user(self, liked: list | None = None, features: dict | None = None, k: int = 10,
                           exclude_liked: bool = True, ann: bool = False) -> list[Recommendation]:
        """Cold start: top-``k`` items for a user not in the export, from side features and the
        raw ids of items they liked (oldest first); unknown item ids are ignored."""
        liked = [_raw_key(i) for i in (liked or [])]
        if not liked and not features:
            raise ExportError("a new user needs liked items or side features (or both)")
        query = self.encode_new_users([{"liked": liked, "features": features or {}}])
        rows = np.asarray(sorted({self.item_row[i] for i in liked if i in self.item_row}), dtype=np.int64)
        if not exclude_liked:
            rows = rows[:0]
        return self._top_k(query, k, np.asarray([0, rows.size]), rows, ann)[0]
