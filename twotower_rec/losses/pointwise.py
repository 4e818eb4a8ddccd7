"""Pointwise objectives on the same towers: BCE on ``rating >= threshold`` and rating MSE.

Users compare retrieval models against these. A pair's score is
``scale * cos(query, item) + bias`` (two learned scalars of :class:`TwoTower`): a logit for
BCE, a predicted rating for MSE. With ``loss.negative_ratio`` r, BCE also sees r items drawn
uniformly from the catalog per positive, labelled 0, paired with the batch's queries in turn.
Shapes: ``B`` rows, ``D`` embedding dim, ``M`` sampled negatives. Their metrics are in
:mod:`twotower_rec.evaluation.pointwise`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from twotower_rec.config import LossConfig


def targets(ratings: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """``[B]`` ratings -> ``[B]`` labels (bce: 1.0 at or above the threshold) or the ratings (mse)."""
    if cfg.name == "bce":
        return (ratings >= cfg.rating_threshold).float()
    return ratings.float()


def loss(scores: torch.Tensor, target: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """Mean BCE of ``[N]`` logits, or mean squared error of ``[N]`` predicted ratings."""
    if cfg.name == "bce":
        return F.binary_cross_entropy_with_logits(scores, target)
    return F.mse_loss(scores, target)


def pointwise_loss(model, query: torch.Tensor, item: torch.Tensor, ratings: torch.Tensor,
                   cfg: LossConfig) -> torch.Tensor:
    """``query`` ``[B, D]``; ``item`` ``[B + M, D]``: the B positives, then (bce) the sampled
    negatives, each paired with the batch's queries in turn and labelled 0."""
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
