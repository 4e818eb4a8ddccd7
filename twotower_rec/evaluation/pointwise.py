"""Metrics of the pointwise objectives (torchmetrics): AUROC, accuracy, F1 (at probability 0.5)
and BCE for ``bce``; RMSE for ``mse``. Scores come from the pointwise task's head
(``scale * cos + bias``, :mod:`twotower_rec.losses.pointwise`).
"""

from __future__ import annotations

import numpy as np
import torch

from twotower_rec.distributed.collect import gather_parts, local_part
from twotower_rec.losses.pointwise import loss, targets


@torch.no_grad()
def pointwise_metrics(model, batcher, rows: np.ndarray, objective: str, threshold: float, device=None,
                      chunk: int = 4096) -> dict:
    """Pointwise metrics of the (query, positive item) pairs at ``rows``. Under a process group
    each rank scores its share (on its device) and every rank gets the same metrics.

    Args:
        model: a TwoTower (or a DMP wrapping one) whose ``head.score`` scores a pair.
        batcher: builds the pairs' batches.
        rows: ``[R]`` interaction rows.
        objective: ``bce`` or ``mse``.
        threshold: bce's label is ``rating >= threshold``.
        device: where to run the towers.
        chunk: rows scored at a time.

    Returns:
        bce: ``auroc``, ``accuracy``, ``f1``, ``bce``, ``neg_bce``; mse: ``rmse``, ``neg_rmse``;
        and ``pairs``, the number of pairs.
    """
    tower = model.module if hasattr(model, "module") else model
    # each rank scores its share of the pairs, on its device; the scores are gathered, and every
    # rank computes the metrics over them, chunk by chunk as one process would
    local_scores, local_labels = _score_pairs(tower, batcher, local_part(np.asarray(rows)), device, chunk)
    all_scores = gather_parts(local_scores, rows.size).cpu()
    all_labels = gather_parts(local_labels, rows.size).cpu()
    metrics = _metrics(objective)
    total, count = 0.0, 0
    for begin in range(0, rows.size, chunk):
        scores = all_scores[begin:begin + chunk]
        target = targets(all_labels[begin:begin + chunk], objective, threshold)
        total += float(loss(scores, target, objective)) * scores.numel()
        count += scores.numel()
        for name, metric in metrics.items():
            if name == "rmse":
                metric.update(scores, target)
            else:
                metric.update(torch.sigmoid(scores), target.long())
    out = {name: float(metric.compute()) for name, metric in metrics.items()}
    if objective == "bce":
        out["bce"] = total / max(count, 1)
        out["neg_bce"] = -out["bce"]
    else:
        out["neg_rmse"] = -out["rmse"]
    out["pairs"] = float(count)
    return out


def _metrics(objective: str) -> dict:
    """The torchmetrics of ``objective``, not synchronised (every rank holds every score)."""
    from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryF1Score
    from torchmetrics.regression import MeanSquaredError

    if objective == "bce":
        return {"auroc": BinaryAUROC(sync_on_compute=False), "accuracy": BinaryAccuracy(sync_on_compute=False),
                "f1": BinaryF1Score(sync_on_compute=False)}
    return {"rmse": MeanSquaredError(squared=False, sync_on_compute=False)}


def _score_pairs(tower, batcher, rows: np.ndarray, device, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's pair scores and labels at ``rows``, ``chunk`` rows at a time, on ``device``."""
    scored, labelled = [], []
    for begin in range(0, rows.size, chunk):
        batch = batcher.batch(rows[begin:begin + chunk])
        if device is not None:
            batch = batch.to(device)
        query = tower.encode_query(batch.query_features).float()
        item = tower.encode_items(batch.item_features, batch.item_dense).float()
        scored.append(tower.head.score(query, item))
        labelled.append(batch.labels.float())
    if not scored:
        empty = torch.zeros(0, device=device)
        return empty, empty
    return torch.cat(scored), torch.cat(labelled)
