"""What the softmax tasks (retrieval, next_item) share: the shared ``loss`` section's checks,
the learned temperature head, and the loss state (logQ frequencies, the streaming estimator)
kept across steps. Not a task itself (no ``name``)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from twotower_rec.losses.softmax import LossContext, positives_per_step
from twotower_rec.tasks.base import Task, check_uniform_share

if TYPE_CHECKING:
    from twotower_rec.data.prepared import PreparedData
    from twotower_rec.distributed.env import DistEnv


class LearnedTemperature(nn.Module):
    """``loss.learn_temperature``: the softmax temperature as a trained parameter (its log),
    kept within [0.01, 1]. ``forward() -> ()`` scalar tensor."""

    def __init__(self, start: float) -> None:
        """Args:
            start: the temperature to start from (``loss.temperature``).
        """
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(float(np.log(start))))

    def forward(self) -> torch.Tensor:
        return self.log_temperature.clamp(float(np.log(0.01)), 0.0).exp()


class SoftmaxTask(Task):
    """A task trained with the sampled softmax of the shared ``loss`` section."""

    reads = ("loss",)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.ctx: LossContext | None = None  # made by start()

    def check_data(self, data: PreparedData, env: DistEnv) -> None:
        check_uniform_share(self.cfg.loss.uniform_negatives, env.world_size)

    def head(self) -> nn.Module | None:
        return LearnedTemperature(self.cfg.loss.temperature) if self.cfg.loss.learn_temperature else None

    def temperature(self, model: nn.Module) -> torch.Tensor | float:
        """The softmax temperature: the learned one (``model``'s head) or ``loss.temperature``.

        Args:
            model: the (DMP-wrapped) model, for its head (``model.module.head``).

        Returns:
            A ``()`` tensor when learned (the loss's gradient reaches it), else a float.
        """
        if self.cfg.loss.learn_temperature:
            return model.module.head()
        return self.cfg.loss.temperature

    def negatives_per_batch(self) -> int:
        return self.cfg.loss.uniform_negatives

    def start(self, data: PreparedData, env: DistEnv, step: int, state: dict | None = None) -> None:
        positives = positives_per_step(self.cfg.loss, self.cfg.train.batch_size, env.world_size)
        self.ctx = LossContext(self.cfg.loss, data.item_counts(), positives, env.device)
        self.ctx.step = step
        if state and state.get("streaming") is not None and self.ctx.streaming is not None:
            self.ctx.streaming.load_state_dict(state["streaming"])

    def state_dict(self) -> dict:
        streaming = self.ctx.streaming if self.ctx is not None else None
        return {"streaming": streaming.state_dict()} if streaming is not None else {}

    def train_summary(self, model: nn.Module) -> dict:
        if not self.cfg.loss.learn_temperature:
            return {}
        return {"learned_temperature": float(model.module.head())}


def note(message: str, env: DistEnv) -> None:
    """One line on stderr from rank 0.

    Args:
        message: the line.
        env: the process group (its rank).
    """
    if env.is_main:
        print(message, file=sys.stderr, flush=True)
