"""Which training rows each rank reads at each step, the same at any number of processes.

Each epoch shuffles the training rows with a generator seeded by (``train.seed``, epoch) and
cuts them into full global batches; each global batch is cut into ``world_size`` contiguous
slices, one per rank, so the examples and their order do not depend on the number of
processes. Uniform negatives of a global batch are drawn from (seed, epoch, batch) and sliced
the same way.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from twotower_rec.data.batches import Batch, Batcher
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
    negatives) from batch ``index`` of ``epoch`` on, built on the CPU."""
    for e in range(epoch, epochs):
        batches = global_batches(train_rows.size, batch_size, seed, e)
        for i in range(index, len(batches)):
            negatives = None
            if num_negatives:
                draw = np.random.default_rng([seed, e, i, 7])
                negatives = local_slice(draw.integers(1, batcher.spec.num_items + 1, num_negatives), env)
            yield batcher.batch(train_rows[local_slice(batches[i], env)], negatives, training=True)
        index = 0
