"""Exact top-K over a catalog by chunked matrix product, with per-query exclusions.

Shared by evaluation and serving; depends on torch only. Shapes: ``Q`` queries, ``N`` catalog
rows, ``D`` dim. Memory is bounded by ``chunk * N`` scores at a time, and by ``max_scores``
whatever the chunk: at 10^6 items a chunk of 1,024 queries would be 4 GB of scores. Everything
runs where the tensors are (a GPU's memory in evaluation: the budget is then a share of its free
memory), and no step waits for the device (no host sync) but the ranked lists' copy back.
"""

from __future__ import annotations

import numpy as np
import torch


def score_budget(device: torch.device) -> int:
    """How many float32 scores :func:`chunked_topk` holds at once on ``device``: 2^26 (256 MiB)
    on a CPU; on a GPU a quarter of its free memory (scores, the top-k's workspace and the
    embeddings share it), at least 2^20.

    Args:
        device: where the scores are computed.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1 << 20, free // 16)
    return 1 << 26


def chunked_topk(
    queries: torch.Tensor,
    items: torch.Tensor,
    k: int,
    exclude_offsets: np.ndarray | None = None,
    exclude_values: np.ndarray | torch.Tensor | None = None,
    chunk: int = 1024,
    invalid_columns: torch.Tensor | None = None,
    max_scores: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` columns of ``queries @ items.T`` ``[Q, N]`` -> (scores ``[Q, k]``, indices ``[Q, k]``).

    Args:
        queries: ``[Q, D]`` query vectors.
        items: ``[N, D]`` catalog rows, on the queries' device.
        k: columns per query; clipped to ``N``.
        exclude_offsets, exclude_values: CSR of columns to drop per query (items already seen): query ``q``'s are
            ``exclude_values[exclude_offsets[q]:exclude_offsets[q + 1]]``, ``exclude_offsets`` ``[Q + 1]`` on the
            host; the values are moved to the queries' device once; ``None``: drop none.
        chunk: queries scored at a time.
        invalid_columns: ``[N]`` bool mask of columns dropped for every query (the out-of-vocabulary row).
        max_scores: the most scores held at once; lowers ``chunk`` on a large catalog (same result);
            ``None``: :func:`score_budget` of the device.

    Returns:
        Scores and column indices, best first, on the queries' device. A dropped column scores ``-inf``: it is
        listed only when fewer than ``k`` columns are left.
    """
    device = queries.device
    k = min(k, items.shape[0])
    budget = max_scores if max_scores is not None else score_budget(device)
    chunk = max(1, min(chunk, budget // max(items.shape[0], 1)))  # rows are independent: same result
    values = None
    if exclude_offsets is not None and exclude_values is not None:
        values = torch.as_tensor(np.asarray(exclude_values, dtype=np.int64) if isinstance(exclude_values, np.ndarray)
                                 else exclude_values).to(device)
    invalid = invalid_columns.to(device).unsqueeze(0) if invalid_columns is not None else None
    all_scores, all_indices = [], []
    for begin in range(0, queries.shape[0], chunk):
        end = min(begin + chunk, queries.shape[0])
        scores = queries[begin:end] @ items.t()
        if invalid is not None:
            scores.masked_fill_(invalid, float("-inf"))
        if values is not None:
            lo, hi = int(exclude_offsets[begin]), int(exclude_offsets[end])
            counts = torch.from_numpy(np.diff(exclude_offsets[begin:end + 1]).astype(np.int64)).to(device)
            rows = torch.repeat_interleave(torch.arange(end - begin, device=device), counts, output_size=hi - lo)
            scores[rows, values[lo:hi]] = float("-inf")
        top = torch.topk(scores, k, dim=1, sorted=True)
        all_scores.append(top.values)
        all_indices.append(top.indices)
    if not all_scores:
        return queries.new_zeros(0, k), torch.zeros(0, k, dtype=torch.long, device=device)
    return torch.cat(all_scores), torch.cat(all_indices)
