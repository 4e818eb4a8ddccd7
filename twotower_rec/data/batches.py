"""The only code that builds KeyedJaggedTensors.

Shapes: ``B`` examples, ``F`` features per tower, ``L`` ids per jagged feature, ``Dd`` dense
item features. A KJT stores every feature's ids back to back, feature-major::

    keys    = ["user_id", "history"]           # B = 2
    lengths = [1, 1,   2, 0]                   # user_id: 1 id each; history: 2 ids, then none
    values  = [7, 9,   3, 5]                   # user 7, user 9, history of row 0 = [3, 5]

Everything is vectorized over the batch with numpy; no Python loop touches a row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from twotower_rec.data.prepared import CSR, PreparedData
from twotower_rec.data.sequences import gather_ranges, query_inputs, readonly_tensor
from twotower_rec.data.splits import TRAIN


@dataclass
class Batch(Pipelineable):
    """One training or scoring batch.

    query_features: KJT over ``FeatureSpec.query_keys``, ``B`` rows.
    item_features:  KJT over ``FeatureSpec.item_keys``, ``B`` rows.
    item_dense:     ``[B, Dd]`` float32.
    labels:         ``[B]`` float32 (the rating).
    item_ids:       ``[B]`` int64 item codes of the positives (for masking and logQ).
    """

    query_features: KeyedJaggedTensor
    item_features: KeyedJaggedTensor
    item_dense: torch.Tensor
    labels: torch.Tensor
    item_ids: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            query_features=self.query_features.to(device, non_blocking=non_blocking),
            item_features=self.item_features.to(device, non_blocking=non_blocking),
            item_dense=self.item_dense.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            item_ids=self.item_ids.to(device, non_blocking=non_blocking),
        )

    def record_stream(self, stream) -> None:
        """Keep the tensors alive for ``stream`` (TorchRec's train pipeline copies on a side stream)."""
        self.query_features.record_stream(stream)
        self.item_features.record_stream(stream)
        for tensor in (self.item_dense, self.labels, self.item_ids):
            tensor.record_stream(stream)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _gather_csr(column: CSR, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = column.offsets[rows]
    lengths = column.offsets[rows + 1] - starts
    return gather_ranges(column.values, starts, lengths), lengths


def _kjt(keys: list[str], values: list[np.ndarray], lengths: list[np.ndarray]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32, copy=False)),
    )


def with_keys(features: KeyedJaggedTensor, keys: list[str]) -> KeyedJaggedTensor:
    """The same rows with exactly ``keys`` in that order; keys ``features`` lacks get no ids.

    Lets a tower's EmbeddingBagCollection, which expects all of its features, be called with
    only some of them (a table shared between towers is looked up once per tower's rows).
    """
    present = features.to_dict()
    rows = features.stride()
    values, lengths = [], []
    for key in keys:
        if key in present:
            values.append(present[key].values())
            lengths.append(present[key].lengths())
        else:
            lengths.append(torch.zeros(rows, dtype=features.lengths().dtype, device=features.device()))
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.cat(values) if values else features.values().new_zeros(0),
        lengths=torch.cat(lengths),
    )


class Batcher:
    """Turns row indices of a :class:`PreparedData` into :class:`Batch` objects."""

    def __init__(self, data: PreparedData) -> None:
        self.data = data
        self.spec = data.spec
        # Hot columns in memory: the cache is memory-mapped, the gathers below are random access.
        self.item = np.ascontiguousarray(data.item)
        self.user = np.ascontiguousarray(data.user)
        self.rating = np.ascontiguousarray(data.rating)
        self.user_offsets = data.user_offsets
        self.item_sequence = readonly_tensor(self.item)  # the users' item sequences, back to back

    def query_features(self, user: np.ndarray, position: np.ndarray) -> KeyedJaggedTensor:
        """Query KJT for user codes ``[B]`` as of row ``position[b]`` of that user's sequence.

        The query sees only the user's items strictly before ``position`` (see
        :func:`twotower_rec.data.sequences.query_inputs`); ``position`` = the user's end offset
        gives the query after all data.
        """
        return self._query_kjt(user, self.item_sequence, self.user_offsets[user - 1], position)

    def training_query_features(self, rows: np.ndarray) -> KeyedJaggedTensor:
        """Query KJT for training rows ``[B]`` whose features hold only the user's earlier
        *training* events: under a random or temporal split a validation or test event can
        come before a training row, and a held-out item must not be a training input. Under
        leave-last-out (training events first) this is :meth:`query_features`."""
        user = self.user[rows]
        if self._training_events is None:
            return self.query_features(user, rows)
        sequence, before = self._training_events
        return self._query_kjt(user, sequence, before[self.user_offsets[user - 1]], before[rows])

    def _query_kjt(self, user: np.ndarray, sequence: torch.Tensor, starts: np.ndarray,
                   ends: np.ndarray) -> KeyedJaggedTensor:
        values, lengths = query_inputs(self.spec.query_keys, user, sequence, starts, ends, self.spec.history_length,
                                       self.data.user_features)
        return KeyedJaggedTensor(keys=self.spec.query_keys, values=torch.cat(values),
                                 lengths=torch.cat(lengths).int())

    @functools.cached_property
    def _training_events(self) -> tuple[torch.Tensor, np.ndarray] | None:
        """(the training events' items back to back, ``[R + 1]`` the number of training events
        before each row); None when every user's training events precede its other events."""
        is_train = np.asarray(self.data.split) == TRAIN
        later = np.flatnonzero(is_train[1:] & ~is_train[:-1]) + 1  # a training row after a held-out one
        if not (self.user[later] == self.user[later - 1]).any():
            return None
        return torch.from_numpy(self.item[is_train]), np.concatenate([[0], np.cumsum(is_train)])

    def item_features(self, item: np.ndarray) -> tuple[KeyedJaggedTensor, torch.Tensor]:
        """Item KJT and ``[B, Dd]`` dense features for item codes ``[B]``."""
        ones = np.ones(item.shape[0], dtype=np.int64)
        values, lengths = [], []
        for name in self.spec.item_keys:
            if name == "item_id" and name not in self.data.item_single:  # hashed: a row by item code
                values.append(item)
                lengths.append(ones)
            elif name in self.data.item_multi:
                v, n = _gather_csr(self.data.item_multi[name], item)
                values.append(v)
                lengths.append(n)
            else:
                values.append(self.data.item_single[name][item])
                lengths.append(ones)
        dense = torch.from_numpy(self.data.item_dense[item])
        return _kjt(self.spec.item_keys, values, lengths), dense

    def batch(self, rows: np.ndarray, extra_items: np.ndarray | None = None, training: bool = False) -> Batch:
        """The batch of interaction rows ``rows`` ``[B]``: query as of each row, its item as positive.

        ``extra_items`` (item codes ``[M]``, e.g. uniform negatives) are appended to the item
        side: the item KJT, dense features and ``item_ids`` then hold ``B + M`` rows, the
        first ``B`` being the positives. ``training`` rows see only earlier training events
        (:meth:`training_query_features`); other rows see every earlier event.
        """
        rows = np.asarray(rows, dtype=np.int64)
        item = self.item[rows]
        if extra_items is not None and len(extra_items):
            item = np.concatenate([item, np.asarray(extra_items, dtype=item.dtype)])
        item_kjt, dense = self.item_features(item)
        return Batch(
            query_features=(self.training_query_features(rows) if training
                            else self.query_features(self.user[rows], rows)),
            item_features=item_kjt,
            item_dense=dense,
            labels=torch.from_numpy(self.rating[rows]),
            item_ids=torch.from_numpy(item),
        )
