"""Load an export directory and answer top-K queries. Knows nothing of training or TorchRec.

Example::

    model = ExportedModel.load("runs/demo/export")
    model.recommend_user("42", k=10)          # [Recommendation(item='1234', score=0.83, title='...'), ...]
    model.recommend_new_user(liked=["1", "50"], features={"gender": "F"}, k=10)   # cold start
    model.recommend_user("42", k=10, ann=True)  # through the faiss index (items.faiss)

Loading first finishes or rolls back an export a kill interrupted (``atomic.py``), then checks
it against its manifest: format version, metric, dims, dtype, every listed file present with
the size and SHA-256 it was written with (so a truncated, changed or swapped file is refused,
``manifest.py``), and the ANN index's size and dimension. Arrays are read with
``allow_pickle=False``: an array that needs a pickle is refused, never unpickled; so is a query
tower archive that would need one (``query_tower.py``).

The query tower is ``query_tower.pt2``, a ``torch.export`` program of codes, behind the
pre-processing of raw values (``query_inputs.py``): ``model.query_tower(values, lengths)``
and ``model.query_tower.encode_raw(features)``.

Raw ids are looked up with the one rule of ``data/ids.py``: ``--user 007`` is user ``7`` of an
integer id space, and so is a liked ``"007"`` item.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from twotower_rec import atomic
from twotower_rec.data.features import HISTORY, recent_position
from twotower_rec.data.ids import canonical_id
from twotower_rec.data.query_inputs import query_inputs, ranges_csr
from twotower_rec.errors import ExportError, UnknownUserError
from twotower_rec.evaluation.topk import chunked_topk
from twotower_rec.serving import manifest as export_manifest
from twotower_rec.serving.query_inputs import IdSpace, QueryInputs, raw_key, read_vocabularies
from twotower_rec.serving.query_tower import TOWER_FILE, ServedQueryTower, load_program


@dataclass
class Recommendation:
    """One recommended item: its raw id, score and metadata.

    Args:
        item: the raw item id.
        score: the dot product of the query and item embeddings.
        title: the item's title (``items.parquet``); empty where the export has none.
        genres: the item's genres, likewise.
    """

    item: str
    score: float
    title: str = ""
    genres: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class ExportedModel:
    def __init__(self, directory: Path, manifest: dict, item_embeddings: np.ndarray, item_ids: np.ndarray,
                 items: pd.DataFrame, program: torch.nn.Module, users: dict[str, np.ndarray],
                 index=None, vocabularies: dict | None = None) -> None:
        """Hold an export read from disk; :meth:`load` reads and checks one.

        Args:
            directory: the export directory.
            manifest: its checked ``manifest.json``.
            item_embeddings: ``[N, D]`` item embeddings (scored as float32); row ``r`` is item ``item_ids[r]``.
            item_ids: ``[N]`` raw item ids.
            items: ``items.parquet``: its ``title`` and ``genres`` columns, where present, by row; may be empty.
            program: the query tower's ``torch.export`` program (``query_tower.pt2``, :func:`load_program`).
            users: the arrays of ``users.npz``: ``raw_user_ids``, ``history_offsets``, ``history_items``,
                ``feature_<name>``.
            index: the faiss index over the item embeddings (``items.faiss``); ``None``: exact search only.
            vocabularies: ``vocabularies.json``: side feature -> its known raw values (others are reported).
        """
        self.directory = directory
        self.manifest = manifest
        self.item_embeddings = torch.from_numpy(np.ascontiguousarray(item_embeddings, dtype=np.float32))
        self.item_ids = item_ids
        self.items_space = IdSpace(item_ids)
        self.item_row = self.items_space.row
        n = item_ids.shape[0]
        self.titles = items["title"].fillna("").astype(str).tolist() if "title" in items.columns else [""] * n
        self.genres = items["genres"].fillna("").astype(str).tolist() if "genres" in items.columns else [""] * n
        self.users = users
        self.users_space = IdSpace(users["raw_user_ids"])
        self.user_row = self.users_space.row
        self.history = torch.from_numpy(np.asarray(users["history_items"], dtype=np.int64))
        self.side_features = {name[len("feature_"):]: column for name, column in users.items()
                              if name.startswith("feature_")}
        self.index = index
        self.vocabularies = vocabularies or {}
        # query_tower.pt2's program behind the raw-value pre-processing (query_inputs.py), on these id spaces
        inputs = QueryInputs(manifest["query_features"], manifest["history_length"], self.items_space,
                             self.users_space, self.side_features.get("user_id"), self.vocabularies,
                             manifest.get("hashed", {}))
        self.query_tower = ServedQueryTower(program, inputs)

    @classmethod
    def load(cls, directory: str | Path) -> "ExportedModel":
        """Load and check the export at ``directory`` (see the module docstring).

        Args:
            directory: an export directory that ``export`` wrote.
        """
        directory = Path(directory)
        atomic.recover(directory)  # an export killed between its two renames
        manifest = export_manifest.read(directory)
        item_embeddings, item_ids, users = _read_arrays(directory, manifest)
        items = _read_items(directory, item_ids.shape[0])
        return cls(directory, manifest, item_embeddings, item_ids, items, load_program(directory / TOWER_FILE), users,
                   _read_index(directory, manifest), read_vocabularies(directory))

    def user_query(self, raw_user_ids: list) -> tuple[list[torch.Tensor], list[torch.Tensor], np.ndarray, np.ndarray]:
        """Query-tower inputs for known users after all their interactions, and their seen items (CSR).

        Args:
            raw_user_ids: ``B`` raw ids of users of the export (``UnknownUserError`` for any other).

        Returns:
            ``(values, lengths, seen_offsets, seen)``: the query tower's inputs, one tensor in each list per query
            feature, and the CSR of each user's item codes (``seen_offsets`` ``[B + 1]``; code 0: unknown item).
        """
        rows = []
        for raw in raw_user_ids:
            row = self.users_space.find(raw)
            if row is None:
                raise UnknownUserError(f"unknown user '{raw_key(raw)}': not among the {len(self.user_row)} users "
                                       "of this export")
            rows.append(row)
        code = np.asarray(rows, dtype=np.int64) + 1
        offsets = self.users["history_offsets"]
        start, end = offsets[code - 1], offsets[code]
        values, lengths = query_inputs(self.manifest["query_features"], code, self.history, start, end,
                                       int(self.manifest["history_length"]), self.side_features)
        seen_offsets, seen = ranges_csr(self.users["history_items"], start, end)
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
        """Top-``k`` from the ANN index; a query for which the index returns fewer than ``k``
        unseen items (an HNSW search returns about ``ef`` at most) is answered exactly instead."""
        from twotower_rec.serving import ann

        most_seen = int(np.diff(seen_offsets).max()) if seen_offsets.size > 1 else 0
        scores, rows = ann.search(self.index, query.numpy(), k + most_seen)
        out = []
        for q, (row_s, row_i) in enumerate(zip(scores.tolist(), rows.tolist())):
            seen = set(seen_rows[seen_offsets[q]:seen_offsets[q + 1]].tolist())
            kept = [(s, i) for s, i in zip(row_s, row_i) if i >= 0 and i not in seen][:k]
            if len(kept) < min(k, self.item_embeddings.shape[0] - len(seen)):
                exact = self._top_k(query[q:q + 1], k, np.asarray([0, len(seen)]), np.asarray(sorted(seen)), False)
                out.append(exact[0])
            else:
                out.append([self._recommendation(i, s) for s, i in kept])
        return out

    def _recommendation(self, row: int, score: float) -> Recommendation:
        return Recommendation(raw_key(self.item_ids[row]), float(score), self.titles[row], self.genres[row])

    @torch.no_grad()
    def recommend_users(self, raw_user_ids: list, k: int = 10, exclude_seen: bool = True,
                        ann: bool = False) -> list[list[Recommendation]]:
        """Top-``k`` items for each known user, after everything they interacted with.

        Args:
            raw_user_ids: raw ids of users of the export (``UnknownUserError`` for any other).
            k: items per user.
            exclude_seen: never recommend an item the user interacted with.
            ann: search the faiss index instead of scoring the whole catalog (``ExportError`` without one).
        """
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
        """Top-``k`` items for one known user: :meth:`recommend_users` of a list of one.

        Args:
            raw_user_id: the raw id of a user of the export.
            k: items to return.
            exclude_seen: never recommend an item the user interacted with.
            ann: search the faiss index instead of scoring the whole catalog.
        """
        return self.recommend_users([raw_user_id], k, exclude_seen, ann)[0]

    @torch.no_grad()
    def encode_new_users(self, rows: list[dict]) -> torch.Tensor:
        """Query embeddings ``[len(rows), embedding_dim]`` of users given by raw values.

        Args:
            rows: one dict per user: ``"liked"``, the raw ids of the items they liked, oldest first;
                ``"features"``, ``{name: raw value}`` of side features; optionally ``"user"``, a raw user id
                (one without a code is the new-user bucket).
        """
        names = self.manifest["query_features"]
        features: dict[str, list[list[str]]] = {}
        for name in names:
            if name == HISTORY or recent_position(name):  # recent_m: derived from the history
                features[name] = [[canonical_id(i) for i in row.get("liked", [])] for row in rows]
            elif name == "user_id":
                features[name] = [[canonical_id(row["user"])] if row.get("user") is not None else [] for row in rows]
            else:
                features[name] = [[raw_key(row["features"][name])] if name in row.get("features", {}) else []
                                  for row in rows]
        for row in rows:
            unknown = sorted(set(row.get("features", {})) - set(names))
            if unknown:
                raise ExportError(f"unknown feature(s) {unknown}: this model's query features are {names}")
            _check_feature_types(row.get("features", {}))
        return self.query_tower.encode_raw(features)

    def unknown_items(self, raw_item_ids: list) -> list[str]:
        """The ids of ``raw_item_ids`` that are not in this export's catalog, in their order, as given.

        Args:
            raw_item_ids: raw item ids, looked up under the id rule (``"007"`` is item ``7``).
        """
        return [raw_key(i) for i in raw_item_ids if self.items_space.find(i) is None]

    def unknown_features(self, features: dict) -> dict[str, str]:
        """The side-feature values of ``features`` that training never saw (they read as the unknown
        value), by name, as given; features without a vocabulary (hashed ids) are never unknown.

        Args:
            features: side feature name -> raw value, as :meth:`recommend_new_user` takes them.
        """
        _check_feature_types(features)
        known = {name: {raw_key(v) for v in values} for name, values in self.vocabularies.items()}
        return {name: raw_key(value) for name, value in features.items()
                if name in known and raw_key(value) not in known[name]}

    def recommend_new_user(self, liked: list | None = None, features: dict | None = None, k: int = 10,
                           exclude_liked: bool = True, ann: bool = False) -> list[Recommendation]:
        """Cold start: top-``k`` items for a user not in the export, from side features and liked items.

        Liked ids not in the catalog count as the unknown item (:meth:`unknown_items` names them),
        and side-feature values training never saw as the unknown value (:meth:`unknown_features`);
        none of them known is an error, and so is giving neither liked items nor features, and a
        feature value that is not text or an integer (``true``, ``2.5``, ``null``, a list).

        Args:
            liked: raw ids of the items the user liked, oldest first.
            features: side feature name -> raw value (the values listed in ``vocabularies.json``).
            k: items to return.
            exclude_liked: never recommend a liked item.
            ann: search the faiss index instead of scoring the whole catalog.
        """
        liked = [canonical_id(i) for i in (liked or [])]
        if not liked and not features:
            raise ExportError("a new user needs liked items or side features (or both)")
        query = self.encode_new_users([{"liked": liked, "features": features or {}}])
        unknown = self.unknown_items(liked)
        if liked and len(unknown) == len(liked):
            shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            raise ExportError(f"none of the liked item ids is in this export's catalog of "
                              f"{len(self.item_row)} items: {shown}")
        self._check_some_feature_known(liked, features or {})
        found = (self.items_space.find(i) for i in liked)
        rows = np.asarray(sorted({r for r in found if r is not None}), dtype=np.int64)
        if not exclude_liked:
            rows = rows[:0]
        return self._top_k(query, k, np.asarray([0, rows.size]), rows, ann)[0]


    def _check_some_feature_known(self, liked: list, features: dict) -> None:
        """``ExportError`` for a new user of side features alone, none of whose values is known."""
        unknown = self.unknown_features(features)
        if liked or not features or len(unknown) < len(features):
            return
        name, value = next(iter(unknown.items()))
        known = [raw_key(v) for v in self.vocabularies[name]]
        shown = ", ".join(repr(v) for v in known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
        raise ExportError(f"none of the side-feature values is known to this export (unknown: "
                          f"{', '.join(f'{n}={v}' for n, v in unknown.items())}); '{name}' takes {shown}")


def _check_feature_types(features: dict) -> None:
    """``ExportError`` for a side-feature value that is not text or an integer (booleans are not integers)."""
    for name, value in features.items():
        if isinstance(value, (bool, np.bool_)):
            raise ExportError(f"feature '{name}': {value!r} is true or false, not one of the feature's values "
                              "(give it as text or an integer)")
        if not isinstance(value, (str, int, np.integer)):
            raise ExportError(f"feature '{name}': {value!r} is not a single value (give it as text or an integer)")


def _read_arrays(directory: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Item embeddings, raw item ids and the users' arrays, checked against the manifest."""
    item_embeddings = _load_plain(directory / "item_embeddings.npy")
    item_ids = _load_plain(directory / "item_ids.npy")
    users = _load_plain(directory / "users.npz")
    if item_ids.ndim != 1 or item_ids.dtype.kind not in "iuU":
        raise ExportError(f"{directory / 'item_ids.npy'}: {item_ids.dtype} array of shape {item_ids.shape}, "
                          "expected [N] integer or text ids: export again")
    user_ids = users.get("raw_user_ids")
    if user_ids is None or user_ids.ndim != 1 or user_ids.dtype.kind not in "iuU":
        raise ExportError(f"{directory / 'users.npz'}: no [U] integer or text 'raw_user_ids': export again")
    if item_embeddings.ndim != 2 or item_embeddings.shape[1] != manifest["embedding_dim"]:
        raise ExportError(f"{directory / 'item_embeddings.npy'}: shape {item_embeddings.shape} does not match "
                          f"manifest embedding_dim {manifest['embedding_dim']}")
    if str(item_embeddings.dtype) != manifest.get("embedding_dtype", "float32"):
        raise ExportError(f"{directory / 'item_embeddings.npy'}: dtype {item_embeddings.dtype}, manifest says "
                          f"{manifest.get('embedding_dtype')}")
    if item_embeddings.shape[0] != item_ids.shape[0] or item_ids.shape[0] != manifest["num_items"]:
        raise ExportError(f"{directory}: {item_embeddings.shape[0]} embeddings, {item_ids.shape[0]} item ids, "
                          f"manifest says {manifest['num_items']} items")
    return item_embeddings, item_ids, users


def _load_plain(path: Path):
    """An ``.npy`` array, or the arrays of an ``.npz`` as a dict, read without unpickling anything."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                return {name: arrays[name] for name in arrays.files}
        return np.load(path, allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err):  # an object array: a pickle, which may run any code
            raise ExportError(f"{path}: holds pickled Python objects, which this package does not load (an export "
                              "of an older version, or a changed file): export again with this version") from None
        raise ExportError(f"{path}: cannot read the array ({err})") from None
    except (OSError, EOFError) as err:
        raise ExportError(f"{path}: cannot read the array ({err})") from None


def _read_items(directory: Path, num_items: int) -> pd.DataFrame:
    """Titles and genres for people (``items.parquet``; optional)."""
    if not (directory / "items.parquet").is_file():
        return pd.DataFrame()
    items = pd.read_parquet(directory / "items.parquet")
    if len(items) != num_items:
        raise ExportError(f"{directory / 'items.parquet'}: {len(items)} rows for {num_items} items")
    return items


def _read_index(directory: Path, manifest: dict):
    """The faiss index the manifest names, checked against it; None for an export without one."""
    info = manifest.get("ann")
    if not info:
        return None
    from twotower_rec.serving import ann

    index = ann.read(directory / info["file"], info.get("params"))
    if index.ntotal != manifest["num_items"] or index.d != manifest["embedding_dim"]:
        raise ExportError(f"{directory / info['file']}: {index.ntotal} vectors of dim {index.d}, manifest "
                          f"says {manifest['num_items']} of dim {manifest['embedding_dim']}")
    return index
