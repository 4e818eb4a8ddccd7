"""Users' time-ordered item sequences and the query-tower inputs built from them.

This is the one implementation of the query inputs: training and evaluation batches
(:class:`twotower_rec.data.batches.Batcher`), serving known users
(:class:`twotower_rec.serving.exported.ExportedModel`) and the exported TorchScript query
tower (:mod:`twotower_rec.export.query_encoder`, which compiles :func:`last_items` and
:func:`item_before`) all call it, so what the model trains on and what it is served cannot
drift apart. Only torch and numpy are imported here (serving and TorchScript need nothing else).

Shapes: ``B`` queries. A sequence is one flat ``[S]`` int64 tensor of item codes in which query
``b`` reads the items at ``[starts[b], ends[b])``, oldest first: its user's items strictly
before the event (``ends[b]`` is the event's row), or all of them at serving time. Example::

    sequence = torch.tensor([5, 6, 7, 8,   9])         # user 1: rows 0-3, user 2: row 4
    last_items(sequence, torch.tensor([0, 4]), torch.tensor([3, 5]), 2)
    # (tensor([6, 7, 9]), tensor([2, 1])): the last two items before row 3, the one item of user 2
    item_before(sequence, torch.tensor([0, 4]), torch.tensor([3, 5]), 2)
    # tensor([6, 0]): the 2nd-last item; user 2 has only one, so 0 (unknown)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Tuple

import numpy as np
import torch

from twotower_rec.data.features import HISTORY, recent_position


def gather_ranges(source: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenate ``source[s:s + n]`` for each (s, n) without a Python loop.

    Args:
        source: a 1-D array.
        starts: ``[B]`` where each range starts in ``source``.
        lengths: ``[B]`` each range's length.

    Returns:
        ``[sum(lengths)]`` the ranges back to back, in order.
    """
    offsets = np.cumsum(lengths) - lengths  # where each range starts in the output
    return source[np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))]


def ranges_csr(sequence: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``(offsets [B + 1], values)`` of every query's items ``sequence[start:end]`` (what it had seen).

    Args:
        sequence: ``[S]`` the users' items back to back, oldest first.
        starts, ends: ``[B]`` each query's range ``[start, end)`` of ``sequence``.
    """
    lengths = ends - starts
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return offsets, sequence[np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])]


def last_items(sequence: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
               n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each query's last ``n`` items of ``sequence[start:end]``, oldest first: jagged
    ``(values [sum(lengths)], lengths [B])``. TorchScript-compatible.

    Args:
        sequence: ``[S]`` int64 the users' items back to back, oldest first.
        starts, ends: ``[B]`` int64 each query's range ``[start, end)`` of ``sequence``.
        n: the most items a query keeps (``features.history_length``).
    """
    lengths = torch.clamp(ends - starts, min=0, max=n)
    total = int(lengths.sum())
    # output position p of query b (from cumsum[b] - lengths[b] on) reads ends[b] - cumsum[b] + p
    shift = torch.repeat_interleave(ends - torch.cumsum(lengths, 0), lengths, output_size=total)
    return torch.index_select(sequence, 0, shift + torch.arange(total, device=sequence.device)), lengths


def item_before(sequence: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor, m: int) -> torch.Tensor:
    """``[B]`` the ``m``-th last item of ``sequence[start:end]`` (``m`` = 1: the last), 0 (the
    unknown code) when there are fewer than ``m``. TorchScript-compatible.

    Args:
        sequence: ``[S]`` int64 the users' items back to back, oldest first.
        starts, ends: ``[B]`` int64 each query's range ``[start, end)`` of ``sequence``.
        m: which item from the end, 1 or more.
    """
    if sequence.numel() == 0:
        return torch.zeros_like(ends)
    picked = torch.index_select(sequence, 0, torch.clamp(ends - m, min=0))
    return torch.where(ends - m >= starts, picked, torch.zeros_like(picked))


def readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over ``array``'s memory, also when it is a read-only memory map of the prepared
    cache: the query inputs only ever read it, so torch's warning about wrapping a
    non-writable array does not apply.

    Args:
        array: a numpy array, or a memory map of one; the tensor shares its memory.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
        return torch.from_numpy(np.asarray(array))


def query_inputs(names: list[str], user: np.ndarray, sequence: torch.Tensor, starts: np.ndarray,
                 ends: np.ndarray, history_length: int,
                 side_features: Mapping[str, np.ndarray]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per query feature in ``names`` order, ``(values, lengths)`` int64 tensors for ``B`` queries.

    ``user`` ``[B]`` user codes; query ``b`` reads ``sequence[starts[b]:ends[b]]``. ``history``
    is the last ``history_length`` items, ``recent_m`` the m-th last item (0 when there are
    fewer), and any other name a side feature looked up by user code in ``side_features[name]``
    (an array over user codes, row 0 the unknown user; ``user_id`` too, 0 for a user without
    training events).

    Args:
        names: the query features, in order (``FeatureSpec.query_keys``).
        user: ``[B]`` user codes (1-based).
        sequence: ``[S]`` int64 the users' items back to back, oldest first.
        starts, ends: ``[B]`` each query's range ``[start, end)`` of ``sequence``.
        history_length: the most items in ``history``.
        side_features: feature name -> ``[U + 1]`` codes by user code, for every name that is
            neither ``history`` nor ``recent_m``.
    """
    user = np.asarray(user, dtype=np.int64)
    starts_t = torch.from_numpy(np.asarray(starts, dtype=np.int64))
    ends_t = torch.from_numpy(np.asarray(ends, dtype=np.int64))
    ones = torch.ones(user.shape[0], dtype=torch.int64)
    values, lengths = [], []
    for name in names:
        if name == HISTORY:
            value, length = last_items(sequence, starts_t, ends_t, history_length)
        elif recent_position(name):
            value, length = item_before(sequence, starts_t, ends_t, recent_position(name)), ones
        else:
            value, length = torch.from_numpy(np.asarray(side_features[name])[user].astype(np.int64, copy=False)), ones
        values.append(value)
        lengths.append(length)
    return values, lengths
