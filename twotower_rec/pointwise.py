"""Pointwise objectives on the same towers: BCE on ``rating >= threshold`` and rating MSE.

Users compare retrieval models against these. A pair's score is
``scale * cos(query, item) + bias`` (two learned scalars of :class:`TwoTower`): a logit for
BCE, a predicted rating for MSE. With ``loss.negative_ratio`` r, BCE also sees r items drawn
uniformly from the catalog per positive, labelled 0, paired with the batch's queries in turn.
Metrics come from torchmetrics: AUROC, accuracy, F1 (at probability 0.5) and BCE for ``bce``;
RMSE for ``mse``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC, BinaryF1Score
from torchmetrics.regression import MeanSquaredError

from twotower_rec.config import Config


def targets(ratings: torch.Tensor, cfg: Config) -> torch.Tensor:
    if cfg.loss.name == "bce":
        return (ratings >= cfg.loss.rating_threshold).float()
    return ratings.float()


def loss(scores: torch.Tensor, target: torch.Tensor, cfg: Config) -> torch.Tensor:
    if cfg.loss.name == "bce":
        return F.binary_cross_entropy_with_logits(scores, target)
    return F.mse_loss(scores, target)


def forward_loss(model, query: torch.Tensor, item: torch.Tensor, ratings: torch.Tensor,
                 cfg: Config) -> torch.Tensor:
    """``item`` holds the B positives, then (bce) the sampled negatives."""
    head = model.module if hasattr(model, "module") else model
    rows = query.shape[0]
    scores = head.score(query, item[:rows])
    target = targets(ratings[:rows], cfg)
    negatives = item[rows:]
    if negatives.shape[0]:
        paired = query[torch.arange(negatives.shape[0], device=query.device) % rows]
        scores = torch.cat([scores, head.score(paired, negatives)])
        target = torch.cat([target, torch.zeros(negatives.shape[0], device=target.device)])
    return loss(scores, target, cfg)


@torch.no_grad()
def evaluate(model, data, batcher, rows: np.ndarray, cfg: Config, device=None, chunk: int = 4096) -> dict:
    """Pointwise metrics of the (query, positive item) pairs at ``rows`` (every rank scores all
    of them, so nothing is synchronised)."""
    head = model.module if hasattr(model, "module") else model
    if cfg.loss.name == "bce":
        metrics = {"auroc": BinaryAUROC(sync_on_compute=False), "accuracy": BinaryAccuracy(sync_on_compute=False),
                   "f1": BinaryF1Score(sync_on_compute=False)}
    else:
        metrics = {"rmse": MeanSquaredError(squared=False, sync_on_compute=False)}
    total, count = 0.0, 0
    for begin in range(0, rows.size, chunk):
        batch = batcher.batch(rows[begin:begin + chunk])
        if device is not None:
            batch = batch.to(device)
        query = head.encode_query(batch.query_features).float()
        item = head.encode_items(batch.item_features, batch.item_dense).float()
        scores = head.score(query, item).cpu()
        target = targets(batch.labels.cpu(), cfg)
        total += float(loss(scores, target, cfg)) * scores.numel()
        count += scores.numel()
        for name, metric in metrics.items():
            if name == "rmse":
                metric.update(scores, target)
            else:
                metric.update(torch.sigmoid(scores), target.long())
    out = {name: float(metric.compute()) for name, metric in metrics.items()}
    if cfg.loss.name == "bce":
        out["bce"] = total / max(count, 1)
        out["neg_bce"] = -out["bce"]
    else:
        out["neg_rmse"] = -out["rmse"]
    out["pairs"] = float(count)
    return out
