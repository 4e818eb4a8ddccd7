"""Exact top-K over a catalog by chunked matrix product, with per-query exclusions.

Shared by evaluation and serving; depends on torch only. Shapes: ``Q`` queries, ``N`` catalog
rows, ``D`` dim. Memory is bounded by ``chunk * N`` scores at a time, and by ``max_scores``
whatever the chunk: at 10^6 items a chunk of 1,024 queries would be 4 GB of scores.
"""

from __future__ import annotations

import numpy as np
import torch


def chunked_topk(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    exclude_offsets: np.ndarray | None = None,
    exclude_values: np.ndarray | None = None,
    chunk: int = 1024,
    invalid_columns: torch.Tensor | None = None,
    max_scores: int = 1 << 26,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` columns of ``queries @ items.T`` ``[Q, N]`` -> (scores ``[Q, k]``, indices ``[Q, k]``).

    Args:
        queries: ``[Q, D]`` query vectors.
        items: ``[N, D]`` catalog rows.
        k: columns per query; clipped to ``N``.
        exclude_offsets, exclude_values: CSR of columns to drop per query (items already seen): query ``q``'s are
            ``exclude_values[exclude_offsets[q]:exclude_offsets[q + 1]]``, ``exclude_offsets`` ``[Q + 1]``;
            ``None``: drop none.
        chunk: queries scored at a time.
        invalid_columns: ``[N]`` bool mask of columns dropped for every query (the out-of-vocabulary row).
        max_scores: the most scores held at once; lowers ``chunk`` on a large catalog (same result).

    Returns:
        Scores and column indices, best first. A dropped column scores ``-inf``: it is listed only when fewer
        than ``k`` columns are left.
    """
    k = min(k, items.shape[0])
    chunk = max(1, min(chunk, max_scores // max(items.shape[0], 1)))  # rows are independent: same result
    all_scores, all_indices = [], []
    for begin in range(0, queries.shape[0], chunk):
        end = min(begin + chunk, queries.shape[0])
        scores = queries[begin:end] @ items.t()
        if invalid_columns is not None:
            scores[:, invalid_columns] = float("-inf")
        if exclude_offsets is not None and exclude_values is not None:
            lo, hi = int(exclude_offsets[begin]), int(exclude_offsets[end])
            counts = np.diff(exclude_offsets[begin:end + 1])
            rows = np.repeat(np.arange(end - begin), counts)
            columns = torch.from_numpy(np.asarray(exclude_values[lo:hi], dtype=np.int64))
            scores[torch.from_numpy(rows), columns] = float("-inf")
        top = torch.topk(scores, k, dim=1, sorted=True)
        all_scores.append(top.values)
        all_indices.append(top.indices)
    if not all_scores:
        return queries.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(all_scores), torch.cat(all_indices)
