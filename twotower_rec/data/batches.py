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
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from twotower_rec.data.prepared import CSR, PreparedData
from twotower_rec.data.query_inputs import gather_ranges, query_inputs, readonly_tensor
from twotower_rec.data.splits import TRAIN


class _TensorFields:
    """``to``, ``pin_memory`` and ``record_stream`` over every tensor and KJT field of a batch
    dataclass (plain ints stay as they are): what TorchRec's train pipeline calls on a batch."""

    def _tensors(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if isinstance(getattr(self, f.name), (torch.Tensor, KeyedJaggedTensor))}

    def _map(self, fn):
        return replace(self, **{name: fn(value) for name, value in self._tensors().items()})

    def to(self, device: torch.device, non_blocking: bool = False):
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self):
        """The same batch in page-locked host memory, so its copy to a GPU can be asynchronous."""
        return self._map(lambda t: t.pin_memory())

    def record_stream(self, stream) -> None:
        """Keep the tensors alive for ``stream`` (TorchRec's train pipeline copies on a side stream)."""
        for value in self._tensors().values():
            value.record_stream(stream)


@dataclass
class Batch(_TensorFields, Pipelineable):
    """One training or scoring batch.

    Args:
        query_features: KJT over ``FeatureSpec.query_keys``, ``B`` rows.
        item_features: KJT over ``FeatureSpec.item_keys``, ``B`` rows.
        item_dense: ``[B, Dd]`` float32.
        labels: ``[B]`` float32 (the rating).
        item_ids: ``[B]`` int64 item codes of the positives (for masking and logQ).
    """

    query_features: KeyedJaggedTensor
    item_features: KeyedJaggedTensor
    item_dense: torch.Tensor
    labels: torch.Tensor
    item_ids: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class WindowBatch(_TensorFields, Pipelineable):
    """One training batch of windows (``task: next_item``): this rank's share.

    ``B`` windows on this rank, ``P`` their positions (targets), ``C`` = ``U' + M'`` this rank's
    candidates: its slice of the global batch's deduplicated targets (``U'``, padded with the
    OOV code 0 so every rank holds as many), then its share of the uniform negatives (``M'``).

    Args:
        query_features: KJT over ``FeatureSpec.query_keys``, ``B`` rows; ``history`` holds each
            window's input items, oldest first.
        item_features: KJT over ``FeatureSpec.item_keys``, ``C`` rows (the candidates).
        item_dense: ``[C, Dd]`` float32.
        item_ids: ``[C]`` int64 item codes of the candidates.
        target_index: ``[P]`` int64: each scored position's target among the global batch's
            deduplicated targets (every rank's slices in rank order), windows in order,
            positions oldest first.
        first_position: ``[B]`` int64: each window's first scored position (the ones before it are
            context only; ``next_item.window_context``).
        window_items: ``[B, U]`` bool: which of the global batch's ``U`` deduplicated targets (every
            rank's slices, padding included) are items of each window.
        num_targets: ``U'``: how many of the ``C`` candidates are targets (the rest: uniform).
        global_positions: ``P`` summed over every rank: the loss is a mean over them.
    """

    query_features: KeyedJaggedTensor
    item_features: KeyedJaggedTensor
    item_dense: torch.Tensor
    item_ids: torch.Tensor
    target_index: torch.Tensor
    first_position: torch.Tensor
    window_items: torch.Tensor
    num_targets: int
    global_positions: int

    def __len__(self) -> int:
        return int(self.target_index.shape[0])


def _gather_csr(column: CSR, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = column.offsets[rows]
    lengths = column.offsets[rows + 1] - starts
    return gather_ranges(column.values, starts, lengths), lengths


def _kjt(keys: list[str], values: list[np.ndarray], lengths: list[np.ndarray]) -> KeyedJaggedTensor:
    # length_per_key counted here, on the host: TorchRec's input distribution (and re-keying)
    # reads it from the KJT instead of summing the lengths on the device (a host sync)
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.concatenate(values).astype(np.int64, copy=False)),
        lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32, copy=False)),
        length_per_key=[int(np.sum(n)) for n in lengths],
    )


class Batcher:
    """Turns row indices of a :class:`PreparedData` into :class:`Batch` objects."""

    def __init__(self, data: PreparedData) -> None:
        """Keep ``data`` and views of its memory-mapped interaction columns (not copies).

        Args:
            data: the prepared cache whose interaction rows the batches are built from.
        """
        self.data = data
        self.spec = data.spec
        # Views of the memory-mapped columns, not copies (the maps are C-contiguous already): a
        # process holds the pages its batches touch.
        self.item = np.ascontiguousarray(data.item)
        self.user = np.ascontiguousarray(data.user)
        self.rating = np.ascontiguousarray(data.rating)
        self.user_offsets = data.user_offsets
        self.item_sequence = readonly_tensor(self.item)  # the users' item sequences, back to back

    def query_features(self, user: np.ndarray, position: np.ndarray) -> KeyedJaggedTensor:
        """Query KJT for user codes ``[B]`` as of row ``position[b]`` of that user's sequence.

        The query sees only the user's items strictly before ``position`` (see
        :func:`twotower_rec.data.query_inputs.query_inputs`); ``position`` = the user's end offset
        gives the query after all data.

        Args:
            user: ``[B]`` user codes (1-based).
            position: ``[B]`` int64 row indices into the interaction columns (rows of the whole
                table, not positions within the user's run): the query reads the user's items from
                the user's first row up to, not including, this row.
        """
        return self._query_kjt(user, self.item_sequence, self.user_offsets[user - 1], position)

    def training_query_features(self, rows: np.ndarray) -> KeyedJaggedTensor:
        """Query KJT for training rows ``[B]`` whose features hold only the user's earlier
        *training* events: under a random or temporal split a validation or test event can
        come before a training row, and a held-out item must not be a training input. Under
        leave-last-out (training events first) this is :meth:`query_features`.

        Args:
            rows: ``[B]`` int64 indices of training rows of the interaction columns; each gives the
                query's user and where its history ends.
        """
        user = self.user[rows]
        if self.training_events is None:
            return self.query_features(user, rows)
        sequence, before = self.training_events
        return self._query_kjt(user, sequence, before[self.user_offsets[user - 1]], before[rows])

    def _query_kjt(self, user: np.ndarray, sequence: torch.Tensor, starts: np.ndarray,
                   ends: np.ndarray) -> KeyedJaggedTensor:
        values, lengths = query_inputs(self.spec.query_keys, user, sequence, starts, ends, self.spec.history_length,
                                       self.data.user_features)
        return KeyedJaggedTensor(keys=self.spec.query_keys, values=torch.cat(values),
                                 lengths=torch.cat(lengths).int(), length_per_key=[int(v.numel()) for v in values])

    @functools.cached_property
    def training_events(self) -> tuple[torch.Tensor, np.ndarray] | None:
        """(the training events' items back to back, ``[R + 1]`` the number of training events
        before each row); None when every user's training events precede its other events.
        One scan of the split column (seconds at 1e8 rows: BENCHMARKS.md, "Scale"): the task reads
        it when the trainer counts its examples (``EventTask.training_examples``), as start-up."""
        is_train = np.asarray(self.data.split) == TRAIN
        later = np.flatnonzero(is_train[1:] & ~is_train[:-1]) + 1  # a training row after a held-out one
        if not (self.user[later] == self.user[later - 1]).any():
            return None
        return torch.from_numpy(self.item[is_train]), np.concatenate([[0], np.cumsum(is_train)])

    @functools.cached_property
    def training_sequences(self) -> tuple[np.ndarray, np.ndarray]:
        """(every user's *training* events' items back to back, oldest first ``[S]``; ``[U + 1]``
        offsets of each user's run in it). Validation and test events are left out, wherever
        the split put them."""
        is_train = np.asarray(self.data.split) == TRAIN
        counts = np.bincount(self.user[is_train] - 1, minlength=self.spec.num_users)
        return self.item[is_train], np.concatenate([[0], np.cumsum(counts)])

    def training_windows(self, length: int, kind: str, context: int = 0) -> np.ndarray:
        """``[W, 4]`` windows ``(user, start, end, skip)`` over :attr:`training_sequences`: window
        items ``[start, end)``, at most ``length + 1`` of them and at least 2; the first ``end -
        start - 1`` are the inputs (position t's target is item t + 1) and the last ``end - start
        - 1 - skip`` are the targets scored (the first ``skip`` positions are context only).
        ``kind`` last: each user's last window. tiled: windows cut back from the end every
        ``length - context`` items, so every item after a user's first is a target once; in a
        window that does not start at the user's first item the first ``context`` positions are
        context, so each of its targets is scored with at least ``context`` earlier items
        (``context`` 0: windows overlapping by one item, none skipped).

        Args:
            length: the most input positions of a window (``features.history_length``): a window
                holds at most ``length + 1`` items.
            kind: ``"last"`` (one window per user, every position scored) or ``"tiled"``.
            context: ``tiled`` only: the positions at the start of a window (one that does not start
                at the user's first item) that are context, not scored; less than ``length``.
                Default 0: every window's positions are scored.
        """
        _, offsets = self.training_sequences
        begin, end = offsets[:-1], offsets[1:]
        user = np.arange(1, self.spec.num_users + 1)
        targets = np.maximum(end - begin - 1, 0)
        stride = length - context
        count = (np.minimum(targets, 1) if kind == "last" else -(-targets // stride)).astype(np.int64)
        window_user = np.repeat(user, count)
        back = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)  # 0 = the last window
        window_begin = np.repeat(begin, count)
        window_end = np.repeat(end, count) - back * stride
        window_start = np.maximum(window_begin, window_end - length - 1)
        skip = np.zeros_like(window_start)  # last: every position is scored
        if kind == "tiled":  # the first target: the window's first item after its stride's start
            skip = np.maximum(window_begin + 1, window_end - stride) - (window_start + 1)
        return np.stack([window_user, window_start, window_end, skip], axis=1).astype(np.int64)

    def window_batch(self, windows: np.ndarray, rank: int, world_size: int,
                       negatives: np.ndarray | None = None) -> WindowBatch:
        """Rank ``rank``'s :class:`WindowBatch` of the global batch's ``windows`` ``[G, 4]``
        (its contiguous slice of ``G / world_size`` windows) with its share ``negatives`` of
        the uniform negatives. Every rank computes the global batch's deduplicated targets, so
        the candidates gathered from all ranks are the same at any world size.

        Args:
            windows: ``[G, 4]`` int64 windows ``(user, start, end, skip)`` of the global batch, rows
                of :meth:`training_windows`; ``G`` a multiple of ``world_size``.
            rank: this rank's index, in ``[0, world_size)``: which slice of the windows and of the
                deduplicated targets it takes.
            world_size: the number of ranks the global batch is split over.
            negatives: ``[M']`` item codes of this rank's uniform negatives, appended to its
                candidates after the targets; None or empty: no negatives.
        """
        sequence, _ = self.training_sequences
        start, end, skip = windows[:, 1], windows[:, 2], windows[:, 3]
        targets = gather_ranges(sequence, start + 1 + skip, end - start - 1 - skip)
        unique = np.unique(targets)
        per_rank = -(-unique.size // world_size)
        padded = np.concatenate([unique, np.zeros(per_rank * world_size - unique.size, dtype=unique.dtype)])
        per_window = windows.shape[0] // world_size
        local = windows[rank * per_window:(rank + 1) * per_window]
        local_start, local_end, local_skip = local[:, 1], local[:, 2], local[:, 3]
        local_targets = gather_ranges(sequence, local_start + 1 + local_skip, local_end - local_start - 1 - local_skip)
        candidates = padded[rank * per_rank:(rank + 1) * per_rank]
        window_items = self._window_items(sequence, local, unique, per_rank * world_size)
        if negatives is not None and len(negatives):
            candidates = np.concatenate([candidates, np.asarray(negatives, dtype=candidates.dtype)])
        item_kjt, dense = self.item_features(candidates)
        return WindowBatch(
            query_features=self._query_kjt(local[:, 0], torch.from_numpy(sequence), local_start, local_end - 1),
            item_features=item_kjt,
            item_dense=dense,
            item_ids=torch.from_numpy(candidates.astype(np.int64)),
            target_index=torch.from_numpy(np.searchsorted(unique, local_targets).astype(np.int64)),
            first_position=torch.from_numpy(local_skip.astype(np.int64)),
            window_items=torch.from_numpy(window_items),
            num_targets=per_rank,
            global_positions=int(targets.size),
        )

    @staticmethod
    def _window_items(sequence: np.ndarray, windows: np.ndarray, unique: np.ndarray,
                      width: int) -> np.ndarray:
        """``[B, width]`` bool: which of the sorted ``unique`` targets each of ``windows`` ``[B, 4]``
        holds, as an input or a target."""
        start, end = windows[:, 1], windows[:, 2]
        items = gather_ranges(sequence, start, end - start)
        window = np.repeat(np.arange(windows.shape[0]), end - start)
        index = np.minimum(np.searchsorted(unique, items), unique.size - 1)
        found = unique[index] == items
        held = np.zeros((windows.shape[0], width), dtype=bool)
        held[window[found], index[found]] = True
        return held

    def item_features(self, item: np.ndarray) -> tuple[KeyedJaggedTensor, torch.Tensor]:
        """Item KJT and ``[B, Dd]`` dense features for item codes ``[B]``.

        Args:
            item: ``[B]`` int64 item codes (0: the OOV item); a code may repeat.
        """
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

        Args:
            rows: ``[B]`` indices of rows of the interaction columns.
            extra_items: ``[M]`` item codes appended after the positives; None or empty: none.
            training: whether the queries see only earlier training events (for training rows);
                False: every earlier event (for evaluation rows).
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
