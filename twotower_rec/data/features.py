"""FeatureSpec: the only place feature names, vocabularies and embedding tables are defined.

Every categorical feature is encoded to an index in ``[0, num_embeddings)`` where ``0`` is the
out-of-vocabulary bucket and ``1..n`` are the values seen in *training* rows (so validation
and test never leak into a vocabulary). Each feature has its own table ``t_<feature>``.

Query tower features: the user's side features (``user_id``, ``gender``, ...) and
``history``, a bag of the item ids the user interacted with strictly before the event.
Item tower features: ``item_id``, ``genres`` (multi-hot), ``year`` (5-year bucket), plus dense
``year_norm``.
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
    """``recent_m`` -> m (1 = the last item before the event); 0 for any other feature."""
    return int(name[len(RECENT):]) if name.startswith(RECENT) and name[len(RECENT):].isdigit() else 0


@dataclass
class Feature:
    """One sparse feature and its table. ``pooling`` is how a bag of ids becomes one vector."""

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
    """What crosses from ``prepare`` to training, export and serving (as feature_spec.json)."""

    query_features: list[Feature]
    item_features: list[Feature]
    item_dense: list[str]
    history_length: int
    num_users: int
    num_items: int
    # Small categorical vocabularies: feature -> raw values in index order (index = position + 1).
    vocabularies: dict[str, list] = field(default_factory=dict)
    source: str = ""

    @property
    def query_keys(self) -> list[str]:
        return [f.name for f in self.query_features]

    @property
    def item_keys(self) -> list[str]:
        return [f.name for f in self.item_features]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=_json_default)

    @classmethod
    def from_json(cls, text: str) -> "FeatureSpec":
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
    """Distinct training values in first-seen order; index position + 1 is the encoded id."""
    return pd.Index(pd.unique(train_values.dropna()))


def encode(values, vocabulary: pd.Index) -> np.ndarray:
    """Raw values -> int64 ids, ``OOV`` (0) for values not in ``vocabulary``. Vectorized."""
    return (vocabulary.get_indexer(pd.Index(values)) + 1).astype(np.int64)


def year_bucket(year: np.ndarray) -> np.ndarray:
    """5-year buckets (1993 -> 1990); unknown years (< 0) stay -1."""
    year = np.asarray(year, dtype=np.int64)
    return np.where(year >= 0, (year // 5) * 5, -1)
