"""Ranking metrics of a held-out item in ranked lists, and the table ``evaluate`` prints.

Shapes: ``Q`` queries, ``K`` ranked items per query. With one held-out item per query,
Recall@K equals HR@K; MRR is computed over the top ``K`` (0 beyond it).
"""

from __future__ import annotations

import torch


def ranking_metrics(top_items: torch.Tensor, targets: torch.Tensor, ks: list[int]) -> dict[str, float]:
    """``top_items`` ``[Q, K]`` ranked item codes, ``targets`` ``[Q]`` -> Recall/HR/NDCG@k and MRR.

    Args:
        top_items: ``[Q, K]`` ranked item codes per query, best first (``-1`` pads short lists).
        targets: ``[Q]`` the held-out item code of each query.
        ks: the cut-offs ``k``.

    Returns:
        Means over the queries: ``recall@k``, ``hr@k`` and ``ndcg@k`` for each ``k`` in ``ks``, and ``mrr``.
    """
    if top_items.shape[0] == 0:
        raise ValueError("no queries to evaluate")
    hit = top_items == targets.unsqueeze(1)  # [Q, K]; at most one True per row
    found = hit.any(dim=1)
    miss = max([top_items.shape[1], *ks])  # beyond every cut-off, even when the list is short
    rank = torch.where(found, hit.float().argmax(dim=1), torch.full_like(targets, miss))
    metrics: dict[str, float] = {}
    for k in ks:
        within = (rank < k).float()
        metrics[f"recall@{k}"] = within.mean().item()
        metrics[f"hr@{k}"] = within.mean().item()
        metrics[f"ndcg@{k}"] = (within / torch.log2(rank.float() + 2.0)).mean().item()
    reciprocal = torch.where(found, 1.0 / (rank.float() + 1.0), torch.zeros_like(rank, dtype=torch.float))
    metrics["mrr"] = reciprocal.mean().item()
    return metrics


def format_table(results: dict[str, dict[str, float]], ks: list[int]) -> str:
    """Models as rows, metrics as columns.

    Args:
        results: model name -> its metrics: ``recall@k`` and ``ndcg@k`` for each ``k`` in ``ks``, and ``mrr``.
        ks: the cut-offs shown.

    Returns:
        The table as text: a header line, a rule, one line per model.
    """
    columns = [f"{m}@{k}" for m in ("recall", "ndcg") for k in ks] + ["mrr"]
    header = f"{'model':<12}" + "".join(f"{c:>11}" for c in columns)
    lines = [header, "-" * len(header)]
    for name, metrics in results.items():
        lines.append(f"{name:<12}" + "".join(f"{metrics[c]:>11.4f}" for c in columns))
    return "\n".join(lines)
