"""Classic baselines ranked under the same protocol as the model.

Most-popular is ranked beside the model by :func:`twotower_rec.evaluation.ranking.rank_split`.
Every baseline here learns its item statistics from TRAINING rows only, and scores each
evaluated event from the same input the model's query sees: the user's events strictly before
it (for a leave-last-out test event, the validation item included). Seen items are filtered
and the out-of-vocabulary code never ranks, exactly as in
:func:`twotower_rec.evaluation.ranking.rank_catalog`.

- ``itemknn``: cosine similarity between item columns of the binary user x item training
  matrix; a query scores item j by the sum of j's similarities to its history items.
- ``ease``: Steck 2019, "Embarrassingly Shallow Autoencoders": B = I - P / diag(P) with
  P = (X^T X + lambda I)^-1, diagonal zeroed; score = history . B.
- ``transition``: counts of item i followed by item j in users' time-ordered training
  sequences, row-normalised; a query scores j by sum_m decay^(m-1) T[m-th last item, j]
  over its last ``transition_last`` items.

The item x item matrices are dense ``[V + 1, V + 1]`` float32: fine for MovieLens-sized
catalogs (ml-latest-small: 9k items, 0.3 GB), refused beyond ``MAX_ITEMS``.
"""

from __future__ import annotations

import numpy as np
import torch
from typing import TYPE_CHECKING

from twotower_rec.data.prepared import PreparedData
from twotower_rec.data.query_inputs import gather_ranges
from twotower_rec.data.splits import TRAIN
from twotower_rec.errors import DataError
from twotower_rec.evaluation.ranking import seen_items
from twotower_rec.evaluation.topk import chunked_topk

if TYPE_CHECKING:
    from twotower_rec.config import EvalConfig

NAMES = ("itemknn", "ease", "transition")
MAX_ITEMS = 40_000


def _train_matrix(data: PreparedData) -> torch.Tensor:
    """Binary ``[U + 1, V + 1]`` user x item matrix of training rows (row/column 0 unused)."""
    train = np.asarray(data.split) == TRAIN
    x = torch.zeros(data.spec.num_users + 1, data.spec.num_items + 1)
    users = torch.from_numpy(np.asarray(data.user)[train].astype(np.int64))
    items = torch.from_numpy(np.asarray(data.item)[train].astype(np.int64))
    x[users, items] = 1.0
    x[:, 0] = 0.0
    return x


def item_item(name: str, data: PreparedData, cfg: EvalConfig) -> torch.Tensor:
    """The ``[V + 1, V + 1]`` item-to-item score matrix of a baseline.

    Args:
        name: the baseline, one of ``NAMES``.
        data: the prepared data; only its training rows are used.
        cfg: the ``eval`` section (``ease_lambda`` for ``ease``).
    """
    if data.spec.num_items > MAX_ITEMS:
        raise DataError(f"--baselines builds dense item x item matrices: {data.spec.num_items} items is more than "
                        f"{MAX_ITEMS}")
    if name == "itemknn":
        x = _train_matrix(data)
        gram = x.t() @ x
        norms = gram.diagonal().clamp_min(1e-12).sqrt()
        sim = gram / norms.unsqueeze(0) / norms.unsqueeze(1)
        sim.fill_diagonal_(0.0)
        return sim
    if name == "ease":
        x = _train_matrix(data)
        gram = (x.t() @ x).double()
        gram += cfg.ease_lambda * torch.eye(gram.shape[0], dtype=torch.float64)
        p = torch.linalg.inv(gram)
        b = -p / p.diagonal().unsqueeze(0)
        b.fill_diagonal_(0.0)
        return b.float()
    if name == "transition":
        item = np.asarray(data.item).astype(np.int64)
        user = np.asarray(data.user)
        train = np.asarray(data.split) == TRAIN
        # consecutive training events of the same user (rows are in user, time order)
        idx = np.flatnonzero(train)
        a, b = idx[:-1], idx[1:]
        same = user[a] == user[b]
        counts = torch.zeros(data.spec.num_items + 1, data.spec.num_items + 1)
        counts.index_put_((torch.from_numpy(item[a[same]]), torch.from_numpy(item[b[same]])),
                          torch.ones(int(same.sum())), accumulate=True)
        counts[0] = 0.0
        counts[:, 0] = 0.0
        return counts / counts.sum(dim=1, keepdim=True).clamp_min(1.0)
    raise ValueError(f"unknown baseline {name}")


def _history_weights(name: str, data: PreparedData, user: np.ndarray, position: np.ndarray,
                     cfg: EvalConfig) -> torch.Tensor:
    """``[Q, V + 1]`` weight of each item in each query's history (binary, or decayed recency)."""
    start = data.user_offsets[user - 1]
    lengths = position - start
    if name == "transition":
        lengths = np.minimum(lengths, cfg.transition_last)
    items = gather_ranges(np.asarray(data.item), position - lengths, lengths).astype(np.int64)
    query = np.repeat(np.arange(user.size), lengths)
    if name == "transition":  # m-th last item (m = 0 for the last) weighs decay^m
        within = np.arange(items.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # 0 = oldest kept
        recency = np.repeat(lengths, lengths) - 1 - within
        weights = torch.from_numpy(cfg.transition_decay ** recency.astype(np.float64)).float()
    else:
        weights = torch.ones(items.size)
    h = torch.zeros(user.size, data.spec.num_items + 1)
    h.index_put_((torch.from_numpy(query), torch.from_numpy(items)), weights, accumulate=name == "transition")
    h[:, 0] = 0.0
    return h


def rank_baseline(name: str, data: PreparedData, rows: np.ndarray, cfg: EvalConfig, k: int) -> torch.Tensor:
    """Top-``k`` item codes ``[Q, k]`` of one baseline for the events ``rows`` (-1 pads).

    Args:
        name: the baseline, one of ``NAMES``.
        data: the prepared data.
        rows: ``[Q]`` interaction rows of the evaluated events; each query is its user's events before its row.
        cfg: the ``eval`` section: ``filter_seen``, ``user_chunk`` (queries scored at a time), the baselines' settings.
        k: items per list; clipped to ``[1, V]``.
    """
    user = np.asarray(data.user)[rows]
    seen = seen_items(data, user, rows) if cfg.filter_seen else (None, None)
    invalid = torch.zeros(data.spec.num_items + 1, dtype=torch.bool)
    invalid[0] = True
    k = max(1, min(k, data.spec.num_items))
    matrix = item_item(name, data, cfg)
    parts = []
    for begin in range(0, rows.size, cfg.user_chunk):
        end = min(begin + cfg.user_chunk, rows.size)
        h = _history_weights(name, data, user[begin:end], rows[begin:end], cfg)
        # chunked_topk scores h @ items.T: pass the transposed matrix so the score is h @ matrix.
        offsets, values = seen
        if offsets is not None:
            lo, hi = int(offsets[begin]), int(offsets[end])
            chunk_seen = (offsets[begin:end + 1] - offsets[begin], values[lo:hi])
        else:
            chunk_seen = (None, None)
        scores, top = chunked_topk(h, matrix.t(), k, *chunk_seen, chunk=cfg.user_chunk, invalid_columns=invalid)
        parts.append(top.masked_fill(torch.isneginf(scores), -1))
    return torch.cat(parts)
