"""Pointwise objectives on the same towers: BCE on ``rating >= threshold`` and rating MSE.

Users compare retrieval models against these. A pair's score is ``scale * cos(query, item) +
bias`` (the pointwise task's head, :class:`twotower_rec.tasks.pointwise.PointwiseHead`): a
logit for BCE, a predicted rating for MSE. With ``pointwise.negative_ratio`` r, BCE also sees r
items drawn uniformly from the catalog per positive, labelled 0, paired with the batch's
queries in turn. Shapes: ``B`` rows, ``D`` embedding dim, ``M`` sampled negatives. Their
metrics are in :mod:`twotower_rec.evaluation.pointwise`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

OBJECTIVES = ("bce", "mse")


def targets(ratings: torch.Tensor, objective: str, threshold: float) -> torch.Tensor:
    """``[B]`` ratings -> ``[B]`` labels (bce: 1.0 at or above ``threshold``) or the ratings (mse).

    Args:
        ratings: ``[B]`` the positives' ratings.
        objective: ``bce`` or ``mse``.
        threshold: bce's label is ``rating >= threshold``; mse ignores it.
    """
    if objective == "bce":
        return (ratings >= threshold).float()
    return ratings.float()


def loss(scores: torch.Tensor, target: torch.Tensor, objective: str) -> torch.Tensor:
    """Mean BCE of ``[N]`` logits, or mean squared error of ``[N]`` predicted ratings.

    Args:
        scores: ``[N]`` the pairs' scores: logits (bce) or predicted ratings (mse).
        target: ``[N]`` their labels (bce) or ratings (mse), as :func:`targets` gives them.
        objective: ``bce`` or ``mse``.
    """
    if objective == "bce":
        return F.binary_cross_entropy_with_logits(scores, target)
    return F.mse_loss(scores, target)


def pointwise_loss(score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], query: torch.Tensor,
                   item: torch.Tensor, ratings: torch.Tensor, objective: str, threshold: float) -> torch.Tensor:
    """The batch's pointwise loss.

    Args:
        score: ``(query [B, D], item [B, D]) -> [B]`` pair scores (the head).
        query: ``[B, D]`` queries.
        item: ``[B + M, D]``: the B positives, then (bce) the sampled negatives, each paired
            with the batch's queries in turn and labelled 0.
        ratings: ``[B]`` the positives' ratings.
        objective: ``bce`` or ``mse``.
        threshold: bce's label is ``rating >= threshold``.
    """
    rows = query.shape[0]
    scores = score(query, item[:rows])
    target = targets(ratings[:rows], objective, threshold)
    negatives = item[rows:]
    if negatives.shape[0]:
        paired = query[torch.arange(negatives.shape[0], device=query.device) % rows]
        scores = torch.cat([scores, score(paired, negatives)])
        target = torch.cat([target, torch.zeros(negatives.shape[0], device=target.device)])
    return loss(scores, target, objective)
