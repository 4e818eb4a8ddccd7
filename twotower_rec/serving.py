"""Load an export directory and answer top-K queries. Knows nothing of training or TorchRec.

Example::

    model = ExportedModel.load("runs/demo/export")
    model.recommend_user("42", k=10)   # [Recommendation(item='1234', score=0.83, title='...'), ...]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from twotower_rec.errors import TwoTowerError
from twotower_rec.retrieval import chunked_topk

EXPORT_FORMAT_VERSION = 1
REQUIRED_FILES = ("manifest.json", "item_embeddings.npy", "item_ids.npy", "query_tower.pt", "users.npz")


class ExportError(TwoTowerError):
    """An export is missing, incomplete or inconsistent, or a request cannot be answered."""


@dataclass
class Recommendation:
    item: str
    score: float
    title: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _raw_key(value) -> str:
    return str(value.item() if isinstance(value, np.generic) else value)


class ExportedModel:
    def __init__(self, directory: Path, manifest: dict, item_embeddings: np.ndarray, item_ids: np.ndarray,
                 titles: list[str], query_tower: torch.jit.ScriptModule, users: dict[str, np.ndarray]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.item_embeddings = torch.from_numpy(item_embeddings)
        self.item_ids = item_ids
        self.titles = titles
        self.query_tower = query_tower
        self.users = users
        self.user_row = {_raw_key(u): i for i, u in enumerate(users["raw_user_ids"])}

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
        if manifest.get("format_version") != EXPORT_FORMAT_VERSION:
            raise ExportError(f"{directory / 'manifest.json'}: format version {manifest.get('format_version')}, "
                              f"this package reads {EXPORT_FORMAT_VERSION}")
        try:
            item_embeddings = np.load(directory / "item_embeddings.npy", allow_pickle=False)
            item_ids = np.load(directory / "item_ids.npy", allow_pickle=True)
            users = dict(np.load(directory / "users.npz", allow_pickle=True))
        except (ValueError, OSError, EOFError) as err:
            raise ExportError(f"{directory}: cannot read export arrays ({err})") from None
        if item_embeddings.ndim != 2 or item_embeddings.shape[1] != manifest.get("embedding_dim"):
            raise ExportError(f"{directory / 'item_embeddings.npy'}: shape {item_embeddings.shape} does not match "
                              f"manifest embedding_dim {manifest.get('embedding_dim')}")
        if item_embeddings.shape[0] != item_ids.shape[0] or item_ids.shape[0] != manifest.get("num_items"):
            raise ExportError(f"{directory}: {item_embeddings.shape[0]} embeddings, {item_ids.shape[0]} item ids, "
                              f"manifest says {manifest.get('num_items')} items")
        titles = [""] * item_ids.shape[0]
        if (directory / "items.parquet").is_file():
            meta = pd.read_parquet(directory / "items.parquet")
            if "title" in meta.columns and len(meta) == item_ids.shape[0]:
                titles = meta["title"].fillna("").astype(str).tolist()
        try:
            query_tower = torch.jit.load(str(directory / "query_tower.pt"), map_location="cpu").eval()
        except RuntimeError as err:
            raise ExportError(f"{directory / 'query_tower.pt'}: cannot load TorchScript module "
                              f"({str(err).splitlines()[0]})") from None
        return cls(directory, manifest, item_embeddings, item_ids, titles, query_tower, users)

    def user_query(self, raw_user_ids: list) -> tuple[list[torch.Tensor], list[torch.Tensor], np.ndarray, np.ndarray]:
        """Query-tower inputs for known users after all their interactions, and their seen items (CSR)."""
        rows = []
        for raw in raw_user_ids:
            key = _raw_key(raw)
            if key not in self.user_row:
                raise ExportError(f"unknown user '{key}': not among the {len(self.user_row)} users of this export")
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
            elif name == "history":
                count = np.minimum(end - start, n)
                values.append(torch.from_numpy(np.concatenate([history[e - c:e] for e, c in zip(end, count)]).astype(np.int64)))
                lengths.append(torch.from_numpy(count.astype(np.int64)))
            else:
                values.append(torch.from_numpy(self.users[f"feature_{name}"][code].astype(np.int64)))
                lengths.append(torch.ones(code.size, dtype=torch.long))
        seen_lengths = end - start
        seen_offsets = np.concatenate([[0], np.cumsum(seen_lengths)])
        seen = np.concatenate([history[s:e] for s, e in zip(start, end)]) if code.size else np.zeros(0, np.int64)
        return values, lengths, seen_offsets, seen

    @torch.no_grad()
    def recommend_users(self, raw_user_ids: list, k: int = 10, exclude_seen: bool = True) -> list[list[Recommendation]]:
        """Top-``k`` items for each known user, after everything they interacted with."""
        if k <= 0:
            raise ExportError(f"k must be positive, got {k}")
        values, lengths, seen_offsets, seen = self.user_query(raw_user_ids)
        query = self.query_tower(values, lengths)
        # Export rows are item codes - 1; code 0 (unknown) in the history is never a catalog row.
        seen_rows = seen - 1
        keep = seen_rows >= 0
        if exclude_seen:
            per_query = np.repeat(np.arange(len(raw_user_ids)), np.diff(seen_offsets))[keep]
            seen_offsets = np.concatenate([[0], np.cumsum(np.bincount(per_query, minlength=len(raw_user_ids)))])
            seen_rows = seen_rows[keep]
        scores, indices = chunked_topk(query, self.item_embeddings, k,
                                       seen_offsets if exclude_seen else None,
                                       seen_rows if exclude_seen else None)
        out = []
        for row_scores, row_indices in zip(scores.tolist(), indices.tolist()):
            out.append([Recommendation(_raw_key(self.item_ids[i]), float(s), self.titles[i])
                        for s, i in zip(row_scores, row_indices) if s != float("-inf")])
        return out

    def recommend_user(self, raw_user_id, k: int = 10, exclude_seen: bool = True) -> list[Recommendation]:
        return self.recommend_users([raw_user_id], k, exclude_seen)[0]
