"""Which training rows each rank reads at each step, the same at any number of processes.

Each epoch shuffles the training rows with a generator seeded by (``train.seed``, epoch) and
cuts them into full global batches; each global batch is cut into ``world_size`` contiguous
slices, one per rank, so the examples and their order do not depend on the number of
processes. Uniform negatives of a global batch are drawn from (seed, epoch, batch) and sliced
the same way. With ``train.examples: sequences`` the rows are windows of users' training
sequences (``Batcher.training_windows``), shuffled and cut the same way.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from twotower_rec.config import TrainConfig
from twotower_rec.data.batches import Batch, Batcher, SequenceBatch
from twotower_rec.distributed.env import DistEnv


def global_batches(num_rows: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffled row positions cut into full global batches (a last partial one is dropped
    unless it is the only one, so every rank always gets a slice of the same size)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    count = num_global_batches(num_rows, batch_size)
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(count)]


def num_global_batches(num_rows: int, batch_size: int) -> int:
    """How many global batches an epoch has (what ``len(global_batches(...))`` is, without the shuffle)."""
    return max(1, num_rows // batch_size)


def local_slice(rows: np.ndarray, env: DistEnv) -> np.ndarray:
    """This rank's contiguous slice of a global batch's ``rows`` (equal for every rank)."""
    per_rank = rows.size // env.world_size
    return rows[env.rank * per_rank:(env.rank + 1) * per_rank]


def local_batches(batcher: Batcher, train_rows: np.ndarray, batch_size: int, epochs: int, seed: int,
                  num_negatives: int, env: DistEnv, epoch: int = 0, index: int = 0) -> Iterator[Batch]:
    """This rank's slices of the global batches (and of their ``num_negatives`` uniform
    negatives) from batch ``index`` of ``epoch`` on, built on the CPU.

    The first epoch's shuffle and the index of which events a training row may see are made
    here, when the iterator is made (start-up work: 5.9 s and 1.3 s for 9e7 of 1.1e8 rows),
    not when the first batch is asked for."""
    first = global_batches(train_rows.size, batch_size, seed, epoch) if epoch < epochs else []
    batcher.training_events  # noqa: B018 (computed and cached now)
    return _local_batches(batcher, train_rows, first, batch_size, epochs, seed, num_negatives, env, epoch, index)


def _local_batches(batcher: Batcher, train_rows: np.ndarray, first: list[np.ndarray], batch_size: int, epochs: int,
                   seed: int, num_negatives: int, env: DistEnv, epoch: int, index: int) -> Iterator[Batch]:
    for e in range(epoch, epochs):
        batches = first if e == epoch else global_batches(train_rows.size, batch_size, seed, e)
        for i in range(index, len(batches)):
            negatives = None
            if num_negatives:
                draw = np.random.default_rng([seed, e, i, 7])
                negatives = local_slice(draw.integers(1, batcher.spec.num_items + 1, num_negatives), env)
            yield batcher.batch(train_rows[local_slice(batches[i], env)], negatives, training=True)
        index = 0


def local_sequence_batches(batcher: Batcher, windows: np.ndarray, batch_size: int, epochs: int, seed: int,
                           num_negatives: int, env: DistEnv, epoch: int = 0,
                           index: int = 0) -> Iterator[SequenceBatch]:
    """This rank's :class:`SequenceBatch` of each global batch of ``windows`` ``[W, 4]`` (and its
    share of the batch's ``num_negatives`` uniform negatives), from batch ``index`` of ``epoch`` on."""
    for e in range(epoch, epochs):
        batches = global_batches(windows.shape[0], batch_size, seed, e)
        for i in range(index, len(batches)):
            negatives = None
            if num_negatives:
                draw = np.random.default_rng([seed, e, i, 7])
                negatives = local_slice(draw.integers(1, batcher.spec.num_items + 1, num_negatives), env)
            yield batcher.sequence_batch(windows[batches[i]], env.rank, env.world_size, negatives)
        index = 0


def prefetch_depth(train: TrainConfig, device: torch.device) -> int:
    """How many batches :class:`BatchesAhead` builds ahead: ``train.prefetch_batches``, or when
    it is null 2 with CUDA and 0 on a CPU, where the thread competes with the step for the cores
    and the GIL (half the examples/s at batch 256 on 2 cores: BENCHMARKS.md)."""
    if train.prefetch_batches is not None:
        return train.prefetch_batches
    return 2 if device.type == "cuda" else 0


class BatchesAhead:
    """Builds the next ``depth`` batches of ``batches`` in a background thread (in pinned memory
    with ``pin_memory``, for asynchronous copies to a GPU) while the current step runs.

    Yields exactly what ``batches`` yields, in order; an exception raised while building a
    batch is raised again here, at the batch it would have been. ``close()`` stops the thread.
    """

    _END = object()

    def __init__(self, batches: Iterator[Batch], depth: int, pin_memory: bool = False) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(batches, pin_memory), daemon=True,
                                        name="twotower-batches")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, batches: Iterator[Batch], pin_memory: bool) -> None:
        try:
            for batch in batches:
                if not self._put(batch.pin_memory() if pin_memory else batch):
                    return
        except BaseException as err:  # handed to the consumer, raised there
            self._put(err)
            return
        self._put(self._END)

    def __iter__(self) -> "BatchesAhead":
        return self

    def __next__(self) -> Batch:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)  # stay exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the thread and wait for it: a daemon thread still inside torch when the
        interpreter exits can abort the process."""
        self._stop.set()
        while True:  # the batch being built, if any, finishes first
            try:
                self._queue.get_nowait()  # make room, so a put in progress returns
            except queue.Empty:
                pass
            self._thread.join(timeout=0.1)
            if not self._thread.is_alive():
                return
