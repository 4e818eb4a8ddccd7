"""The dense optimizer beside the fused table optimizer, and the dense learning-rate schedule.

Table optimizers are fused into the backward pass: they are attached to the tables before
sharding, in :func:`twotower_rec.distributed.sharding.shard_model`, because TorchRec's
sharders build them into the sharded kernels. Here the dense layers get AdamW, stepped
together with the fused one through a ``CombinedOptimizer``.
"""

from __future__ import annotations

import numpy as np
import torch
from torchrec.distributed import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from twotower_rec.config import TrainConfig


def dense_adamw(params, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the dense layers (``train.weight_decay``; 0 = Adam), as one fused kernel over
    all of them: on a CPU torch's default is a loop over the parameters, several small ops
    each, much slower for these models (docs/benchmarks-history.md, "The dense optimizer as one fused kernel").

    Args:
        params: the dense parameters.
        train: the ``train`` section (``dense_lr``, ``weight_decay``).
    """
    return torch.optim.AdamW(params, lr=train.dense_lr, weight_decay=train.weight_decay, fused=True)


def build_optimizer(model: DistributedModelParallel, train: TrainConfig) -> CombinedOptimizer:
    """The fused table optimizer and :func:`dense_adamw` over dense parameters, stepped together.

    Args:
        model: the sharded model, its table optimizer fused in (:func:`~twotower_rec.distributed.sharding.shard_model`).
        train: the ``train`` section.
    """
    dense = dict(in_backward_optimizer_filter(model.named_parameters()))
    dense_optimizer = KeyedOptimizerWrapper(dense, lambda params: dense_adamw(params, train))
    return CombinedOptimizer([model.fused_optimizer, dense_optimizer])


def set_dense_lr(optimizer: CombinedOptimizer, model: DistributedModelParallel, lr: float) -> None:
    """Set the dense layers' learning rate (the schedule; table learning rates stay fixed).

    Args:
        optimizer: the combined optimizer (:func:`build_optimizer`).
        model: the sharded model, whose fused table optimizer is left alone.
        lr: the dense learning rate.
    """
    for _, part in optimizer.optimizers:
        if part is not model.fused_optimizer:
            for group in part.param_groups:
                group["lr"] = lr


def init_optimizer_state(optimizer: CombinedOptimizer, model: DistributedModelParallel) -> None:
    """Create the dense optimizer's lazy state (a step with zero gradients) so a checkpoint's
    state can be loaded into it in place; the fused table optimizer's state always exists.

    Args:
        optimizer: the combined optimizer (:func:`build_optimizer`).
        model: the sharded model, whose fused table optimizer is left alone.
    """
    for _, part in optimizer.optimizers:
        if part is not model.fused_optimizer:
            part.init_state()


def lr_factor(step: int, total: int, train: TrainConfig) -> float:
    """Dense learning-rate multiplier at ``step`` (0-based): linear warm-up, then constant or
    cosine decay to 0 at the last step.

    Args:
        step: the step about to run, from 0.
        total: the run's steps: the cosine reaches 0 at the last.
        train: the ``train`` section (``warmup_steps``, ``lr_schedule``).
    """
    warmup = train.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if train.lr_schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + float(np.cos(np.pi * min(progress, 1.0))))
    return 1.0
