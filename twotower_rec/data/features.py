"""FeatureSpec: the only place feature names, vocabularies and embedding tables are defined.

Every categorical feature is encoded to an index in ``[0, num_embeddings)`` where ``0`` is the
out-of-vocabulary bucket and ``1..n`` are the values seen in *training* rows (so validation
and test never leak into a vocabulary). Each feature has its own table ``t_<feature>``.

Query tower features: the user's side features (``user_id``, ``gender``, ...) and
``history``, a bag of the item ids the user interacted with strictly before the event.
Item tower features: ``item_id``, ``genres`` (multi-hot), ``year`` (5-year bucket), plus dense
``year_norm``.

Hashed ids (``data.hash_buckets``): ``user_id`` or ``item_id`` may instead map a raw id to
row ``1 + hash(id) % n`` of an ``n + 1``-row table (:func:`hash_rows`), with no vocabulary:
an id never seen in training still gets a row, and distinct ids may share one. The hash is
of the id's text (``str(id)``), so the served TorchScript tower computes the same row from
the raw string.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

OOV = 0
HISTORY = "history"
RECENT = "recent_"  # recent_1 .. recent_k: the k most recent items before the event, one feature each


def recent_position(name: str) -> int:
    """``recent_m`` -> m (1 = the last item before the event); 0 for any other feature.

    Args:
        name: a feature name.
    """
    return int(name[len(RECENT):]) if name.startswith(RECENT) and name[len(RECENT):].isdigit() else 0


@dataclass
class Feature:
    """One sparse feature and its table. ``pooling`` is how a bag of ids becomes one vector.

    Args:
        name: the feature's key in the KJTs (``user_id``, ``history``, ``recent_1``, ``genres``, ...).
        tower: ``"query"`` or ``"item"``.
        num_embeddings: rows of its table: the vocabulary's size + 1 (row 0: OOV), or the number of
            hash buckets + 1 for a hashed id.
        pooling: ``"sum"`` or ``"mean"``.
        table: the table's name; empty: ``t_<name>``. Features that name the same table share it.
    """

    name: str
    tower: str  # "query" | "item"
    num_embeddings: int
    pooling: str = "sum"  # "sum" | "mean"
    table: str = ""

    def __post_init__(self) -> None:
        if not self.table:
            self.table = f"t_{self.name}"


@dataclass
class FeatureSpec:
    """What crosses from ``prepare`` to training, export and serving (as feature_spec.json).

    Args:
        query_features, item_features: each tower's sparse features, in KJT key order.
        item_dense: the names of the dense item features (the ``Dd`` columns of ``items/dense.npy``).
        history_length: the most items in the ``history`` bag (``features.history_length``).
        num_users: ``U``, the users (codes 1..U).
        num_items: ``V``, the items with training events (codes 1..V).
        vocabularies: small categorical vocabularies: feature -> raw values in index order
            (index = position + 1).
        source: the name of the data the cache was prepared from (``RawData.name``).
        hashed: hashed id features -> their number of buckets (``data.hash_buckets``); empty: none.
    """

    query_features: list[Feature]
    item_features: list[Feature]
    item_dense: list[str]
    history_length: int
    num_users: int
    num_items: int
    # Small categorical vocabularies: feature -> raw values in index order (index = position + 1).
    vocabularies: dict[str, list] = field(default_factory=dict)
    source: str = ""
    hashed: dict[str, int] = field(default_factory=dict)  # hashed id features -> buckets (``data.hash_buckets``)

    @property
    def query_keys(self) -> list[str]:
        return [f.name for f in self.query_features]

    @property
    def item_keys(self) -> list[str]:
        return [f.name for f in self.item_features]

    def to_json(self) -> str:
        data = asdict(self)
        if not data["hashed"]:  # specs without hashed ids read (and fingerprint) as before
            del data["hashed"]
        return json.dumps(data, indent=2, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> "FeatureSpec":
        """The spec that :meth:`to_json` wrote as ``text``.

        Args:
            text: the contents of a ``feature_spec.json``.
        """
        data = json.loads(text)
        data["query_features"] = [Feature(**f) for f in data["query_features"]]
        data["item_features"] = [Feature(**f) for f in data["item_features"]]
        return cls(**data)

    def fingerprint(self) -> str:
        """Changes whenever a vocabulary or table shape changes: checkpoints and exports check it."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to feature_spec.json")


def build_vocabulary(train_values: pd.Series) -> pd.Index:
    """Distinct training values in first-seen order; index position + 1 is the encoded id.

    Args:
        train_values: one feature's values on the training rows; missing values are left out.
    """
    return pd.Index(pd.unique(train_values.dropna()))


def encode(values, vocabulary: pd.Index) -> np.ndarray:
    """Raw values -> int64 ids, ``OOV`` (0) for values not in ``vocabulary``. Vectorized.

    Args:
        values: ``[N]`` raw values of one feature.
        vocabulary: that feature's vocabulary (:func:`build_vocabulary`).
    """
    return (vocabulary.get_indexer(pd.Index(values)) + 1).astype(np.int64)


def year_bucket(year: np.ndarray) -> np.ndarray:
    """5-year buckets (1993 -> 1990); unknown years (< 0) stay -1.

    Args:
        year: ``[N]`` years, negative where unknown.
    """
    year = np.asarray(year, dtype=np.int64)
    return np.where(year >= 0, (year // 5) * 5, -1)


def _mul32(a: int, b: int) -> int:
    """``a * b mod 2**32`` for ``a, b < 2**32`` without passing 2**63 (TorchScript ints are int64)."""
    return (a * (b & 0xFFFF) + (((a * (b >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def fnv1a_finish(h: int) -> int:
    """MurmurHash3's finaliser on a 32-bit FNV-1a state: consecutive ids spread over all rows.

    Args:
        h: the 32-bit FNV-1a hash of an id's UTF-8 bytes.

    Returns:
        The finalised 32-bit hash; the id's row is ``1 + hash % buckets``.
    """
    h ^= h >> 16
    h = _mul32(h, 0x85EBCA6B)
    h ^= h >> 13
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash_rows(ids, buckets: int, chunk: int = 1 << 20) -> np.ndarray:
    """``[N]`` int64 rows ``1 + hash(str(id)) % buckets`` of raw ids (row 0 stays the unknown
    value): 32-bit FNV-1a over the UTF-8 bytes of the id's text, then :func:`fnv1a_finish`,
    vectorized over chunks of ids. Serving calls it on raw ids (``serving/query_inputs.py``); the
    deprecated TorchScript tower computes the same per id (``export/query_encoder.py``, ``hash_row``).

    Args:
        ids: ``[N]`` raw ids: integers, or values whose ``str`` is the id's text.
        buckets: the number of hashed rows (the table has ``buckets + 1``).
        chunk: how many ids are hashed at once; it bounds the memory of the byte matrix of a
            chunk (its ids times the longest id's bytes).
    """
    ids = np.asarray(ids)
    out = np.empty(ids.size, dtype=np.int64)
    for lo in range(0, ids.size, chunk):
        part = ids[lo:lo + chunk]
        text = (part.astype("S") if part.dtype.kind in "iu"
                else np.array([str(v).encode("utf-8") for v in part], dtype="S"))
        text = np.ascontiguousarray(text.astype(f"S{max(1, text.dtype.itemsize)}"))
        width = text.dtype.itemsize
        points = text.view(np.uint8).reshape(part.size, width).astype(np.uint64)
        length = np.char.str_len(text)
        h = np.full(part.size, 2166136261, dtype=np.uint64)
        for j in range(width):
            active = j < length
            h = np.where(active, ((h ^ points[:, j]) * np.uint64(16777619)) & np.uint64(0xFFFFFFFF), h)
        h ^= h >> np.uint64(16)
        h = _mul32_array(h, 0x85EBCA6B)
        h ^= h >> np.uint64(13)
        h = _mul32_array(h, 0xC2B2AE35)
        h ^= h >> np.uint64(16)
        out[lo:lo + part.size] = (h % np.uint64(buckets)).astype(np.int64) + 1
    return out


def _mul32_array(a: np.ndarray, b: int) -> np.ndarray:
    low, high = np.uint64(b & 0xFFFF), np.uint64(b >> 16)
    return (a * low + (((a * high) & np.uint64(0xFFFF)) << np.uint64(16))) & np.uint64(0xFFFFFFFF)


def collisions(rows: np.ndarray, buckets: int) -> dict:
    """How hashing ``ids`` into ``rows`` went: ids, buckets, ids sharing their row with another, and that rate.

    Args:
        rows: ``[N]`` the hashed row of each distinct id (:func:`hash_rows`).
        buckets: the number of hashed rows.

    Returns:
        ``buckets``, ``ids`` (``N``), ``rows_used``, ``colliding_ids`` and ``collision_rate``
        (``colliding_ids / N``, rounded to 6 places).
    """
    counts = np.bincount(rows, minlength=buckets + 1)
    colliding = int(counts[counts > 1].sum())
    return {"buckets": int(buckets), "ids": int(rows.size), "rows_used": int((counts > 0).sum()),
            "colliding_ids": colliding, "collision_rate": round(colliding / max(rows.size, 1), 6)}
