"""Validation during training: full-catalog metrics on a seeded sample of validation events,
and what the task adds (the pointwise metrics of a pointwise objective): the numbers early
stopping and the best checkpoint go by."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torchrec.distributed import DistributedModelParallel

from twotower_rec.config import EvalConfig, TrainConfig
from twotower_rec.data.batches import Batcher
from twotower_rec.data.prepared import PreparedData
from twotower_rec.data.splits import VALIDATION
from twotower_rec.evaluation.ranking import evaluate
from twotower_rec.model.factory import towers

if TYPE_CHECKING:
    from twotower_rec.tasks import Task


def validation_config(eval_cfg: EvalConfig, train_cfg: TrainConfig) -> EvalConfig:
    """Recall and NDCG at 10 and 50 over ``train.val_max_users`` sampled events, seen items
    filtered as ``eval.filter_seen`` says.

    Args:
        eval_cfg: the ``eval`` section (``filter_seen``, ``user_chunk``).
        train_cfg: the ``train`` section (``val_max_users``).
    """
    return EvalConfig(ks=[10, 50], filter_seen=eval_cfg.filter_seen, user_chunk=eval_cfg.user_chunk,
                      max_users=train_cfg.val_max_users)


def validate(model: DistributedModelParallel, data: PreparedData, batcher: Batcher, eval_cfg: EvalConfig,
             task: Task, seed: int) -> dict:
    """Metrics of the model on the validation split; leaves the model in training mode.

    Args:
        model: the sharded model.
        data: the prepared data.
        batcher: builds the queries' and items' batches.
        eval_cfg: from :func:`validation_config`.
        task: the run's task (its :meth:`~twotower_rec.tasks.base.Task.pair_metrics` join the result).
        seed: the seed of the events' sample.
    """
    model.eval()
    encode_query, encode_items = towers(model)
    device = next(m.weight.device for m in model.module.modules() if isinstance(m, torch.nn.Linear))
    result = evaluate(encode_query, encode_items, data, batcher, eval_cfg, VALIDATION, seed=seed,
                      with_popularity=False, device=device)["model"]
    result.update(task.pair_metrics(model, data, batcher, data.rows(VALIDATION), device=device) or {})
    model.train()
    return result
