"""``task: pointwise``: one example per training interaction, scored on its own.

``pointwise.objective: bce`` labels a pair ``rating >= pointwise.rating_threshold`` (with
``negative_ratio`` uniform items per positive labelled 0) and trains binary cross-entropy;
``mse`` regresses the rating. Both score a pair ``scale * cos(query, item) + bias`` with the
two scalars of :class:`PointwiseHead`. Validation and ``evaluate`` add AUROC, accuracy, F1 and
BCE, or RMSE (``evaluation/pointwise.py``) to the ranking metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from twotower_rec.data.splits import TRAIN
from twotower_rec.errors import ConfigError, check_choice
from twotower_rec.losses.pointwise import OBJECTIVES, pointwise_loss
from twotower_rec.tasks.base import EventTask

if TYPE_CHECKING:
    from twotower_rec.config import Config


@dataclass
class PointwiseOptions:
    """``pointwise``: the objective and its labels."""

    objective: str = "bce"
    """The objective: bce (label = rating >= rating_threshold) | mse (rating regression)."""
    rating_threshold: float = 4.0
    """bce: the label of a pair is rating >= this."""
    negative_ratio: int = 0
    """bce: sampled (uniform) negatives with label 0 per positive."""


class PointwiseHead(nn.Module):
    """A pair's pointwise score ``scale * (query . item) + bias``: a logit (bce) or a rating (mse).
    ``score(query [B, D], item [B, D]) -> [B]``."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(5.0))
        self.bias = nn.Parameter(torch.tensor(0.0))

    def score(self, query: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """The scores of the pairs (query row b, item row b).

        Args:
            query: ``[B, D]`` query embeddings.
            item: ``[B, D]`` item embeddings.

        Returns:
            ``[B]`` logits (bce) or ratings (mse).
        """
        return self.scale * (query * item).sum(dim=-1) + self.bias

    def serving_info(self) -> dict:
        """What an export's manifest records of it (a served score is computed from these)."""
        return {"scale": float(self.scale), "bias": float(self.bias)}


class PointwiseTask(EventTask):
    """BCE or MSE on single pairs; see the module docstring."""

    name = "pointwise"
    section = "pointwise"
    Options = PointwiseOptions

    @classmethod
    def check_options(cls, cfg: Config) -> None:
        options = cfg.pointwise
        check_choice("pointwise.objective", options.objective, OBJECTIVES)
        if options.negative_ratio < 0:
            raise ConfigError(f"pointwise.negative_ratio: must be >= 0, got {options.negative_ratio}")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        options = cfg.pointwise
        if options.negative_ratio and options.objective != "bce":
            raise ConfigError(f"pointwise.negative_ratio={options.negative_ratio} labels sampled items 0: it needs "
                              "pointwise.objective=bce (mse regresses ratings, which sampled items do not have)")

    @classmethod
    def metrics(cls, cfg: Config) -> tuple[str, ...]:
        return ("auroc", "accuracy", "neg_bce") if cfg.pointwise.objective == "bce" else ("neg_rmse",)

    def check_data(self, data, env) -> None:
        if not data.has_ratings:
            raise ConfigError(f"task=pointwise learns from ratings, but {data.spec.source} has no rating column "
                              "(data.rating_column), so every rating is 1.0: add one, or train with task=retrieval")

    def head(self) -> nn.Module:
        return PointwiseHead()

    def init_head(self, model, data) -> None:
        if self.options.objective == "mse":  # start from the mean training rating, not from 0
            with torch.no_grad():
                model.head.bias.fill_(float(np.asarray(data.rating)[data.rows(TRAIN)].mean()))
                model.head.scale.fill_(1.0)

    def negatives_per_batch(self) -> int:
        return self.options.negative_ratio * self.cfg.train.batch_size

    def loss(self, model, query, item, batch):
        return pointwise_loss(model.module.head.score, query, item, batch.labels, self.options.objective,
                              self.options.rating_threshold)

    def pair_metrics(self, model, data, batcher, rows, device=None):
        from twotower_rec.evaluation.pointwise import pointwise_metrics

        return pointwise_metrics(model, batcher, rows, self.options.objective, self.options.rating_threshold,
                                 device=device)

    def describe_pairs(self, metrics: dict[str, float]) -> str:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.startswith("neg_") and k != "pairs")
        return f"pointwise ({self.options.objective}): {shown}"
