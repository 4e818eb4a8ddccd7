"""Split work over ranks and gather the results back (a no-op in a world of one).

Sharded TorchRec modules run collectives in every forward, so every rank must make the same
number of calls: :func:`local_part` pads each rank's share to the same length, and
:func:`gather_parts` drops the padding again after gathering.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from twotower_rec.distributed.env import collective_device, world


def local_part(array: np.ndarray) -> np.ndarray:
    """This rank's contiguous share of ``array``, padded with its first element to ceil(n / world).

    Args:
        array: ``[n, ...]`` the rows to split over the ranks; returned whole in a world of one or when empty.
    """
    rank, size = world()
    if size == 1 or array.size == 0:
        return array
    per = math.ceil(array.shape[0] / size)
    part = array[rank * per:(rank + 1) * per]
    if part.shape[0] < per:
        part = np.concatenate([part, np.repeat(array[:1], per - part.shape[0], axis=0)])
    return part


def local_slice(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous slice of a global batch's ``rows``: ``len(rows) // world_size``
    of them, the same count on every rank (a batch's rows are a multiple of the world size).

    Args:
        rows: ``[n]`` the global batch's rows.
        rank: the rank whose slice to return.
        world_size: the number of ranks.
    """
    per_rank = rows.size // world_size
    return rows[rank * per_rank:(rank + 1) * per_rank]


def gather_parts(local: torch.Tensor, total: int) -> torch.Tensor:
    """Every rank's ``local`` (equal shapes), concatenated in rank order, cut to ``total`` rows,
    on ``local``'s device (the gather itself runs on :func:`collective_device`).

    Args:
        local: this rank's rows, padded as :func:`local_part` pads them.
        total: the rows to keep: the unpadded length of the array :func:`local_part` split.
    """
    _, size = world()
    if size == 1:
        return local[:total]
    moved = local.to(collective_device()).contiguous()
    parts = [torch.empty_like(moved) for _ in range(size)]
    dist.all_gather(parts, moved)
    return torch.cat(parts)[:total].to(local.device)
