"""Which examples each rank reads at each step, the same at any number of processes.

Each epoch shuffles the task's training examples (rows, or windows of users' sequences) with a
generator seeded by (``train.seed``, epoch) and cuts them into full global batches; the task
turns a global batch into this rank's batch (a contiguous slice of it, or its share of the
whole), so the examples and their order do not depend on the number of processes. Uniform
negatives of a global batch are drawn from (seed, epoch, batch) and sliced the same way.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from twotower_rec.distributed.collect import local_slice
from twotower_rec.distributed.env import DistEnv

if TYPE_CHECKING:
    from twotower_rec.config import TrainConfig


def global_batches(num_rows: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffled row positions cut into full global batches (a last partial one is dropped
    unless it is the only one, so every rank always gets a slice of the same size).

    Args:
        num_rows: the examples an epoch shuffles.
        batch_size: ``G``, examples a global batch.
        seed: ``train.seed``.
        epoch: the epoch, from 0: with ``seed``, the shuffle's seed.

    Returns:
        :func:`num_global_batches` arrays of ``[G]`` positions in ``[0, num_rows)`` (one shorter one when
        ``num_rows < G``).
    """
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    count = num_global_batches(num_rows, batch_size)
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(count)]


def num_global_batches(num_rows: int, batch_size: int) -> int:
    """How many global batches an epoch has (what ``len(global_batches(...))`` is, without the shuffle).

    Args:
        num_rows: the examples an epoch shuffles.
        batch_size: examples a global batch.
    """
    return max(1, num_rows // batch_size)


def local_batches(make_batch: Callable[[np.ndarray, np.ndarray | None], Any], num_examples: int, batch_size: int,
                  epochs: int, seed: int, num_negatives: int, num_items: int, env: DistEnv, epoch: int = 0,
                  index: int = 0) -> Iterator[Any]:
    """This rank's batches from batch ``index`` of ``epoch`` on.

    The first epoch's shuffle is made here, when the iterator is made (start-up work), not when
    the first batch is asked for.

    Args:
        make_batch: ``(global batch's example positions [G], this rank's negatives [M'] or
            None) -> batch`` (the task's :meth:`~twotower_rec.tasks.base.Task.batch`).
        num_examples: the examples an epoch shuffles.
        batch_size: ``G``, examples a global batch.
        epochs: epochs in all.
        seed: ``train.seed``.
        num_negatives: uniform negatives a global batch (item codes in ``[1, num_items]``).
        num_items: the catalog's size.
        env: the process group.
        epoch, index: the first batch to yield (the saved data position).
    """
    first = global_batches(num_examples, batch_size, seed, epoch) if epoch < epochs else []
    return _local_batches(make_batch, num_examples, first, batch_size, epochs, seed, num_negatives, num_items, env,
                          epoch, index)


def _local_batches(make_batch, num_examples: int, first: list[np.ndarray], batch_size: int, epochs: int, seed: int,
                   num_negatives: int, num_items: int, env: DistEnv, epoch: int, index: int) -> Iterator[Any]:
    for e in range(epoch, epochs):
        batches = first if e == epoch else global_batches(num_examples, batch_size, seed, e)
        for i in range(index, len(batches)):
            negatives = None
            if num_negatives:
                draw = np.random.default_rng([seed, e, i, 7])
                negatives = local_slice(draw.integers(1, num_items + 1, num_negatives), env.rank, env.world_size)
            yield make_batch(batches[i], negatives)
        index = 0


def prefetch_depth(train: TrainConfig, device: torch.device) -> int:
    """How many batches :class:`BatchesAhead` builds ahead: ``train.prefetch_batches``, or when
    it is null 2 with CUDA and 0 on a CPU, where the thread competes with the step for the cores
    and the GIL (docs/benchmarks-history.md, "Batches built ahead on a CPU").

    Args:
        train: the ``train`` section (``prefetch_batches``).
        device: this rank's device.
    """
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

    def __init__(self, batches: Iterator[Any], depth: int, pin_memory: bool = False) -> None:
        """Start the thread.

        Args:
            batches: the batches to build, in order (e.g. :func:`local_batches`).
            depth: the most batches built and not yet taken, >= 1 (:func:`prefetch_depth`).
            pin_memory: call each batch's ``pin_memory()`` in the thread (with CUDA).
        """
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

    def _fill(self, batches: Iterator[Any], pin_memory: bool) -> None:
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

    def __next__(self) -> Any:
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
