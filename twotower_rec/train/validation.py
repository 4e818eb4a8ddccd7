"""Validation during training: full-catalog metrics on a seeded sample of validation events
(and the pointwise metrics of a pointwise objective), the numbers early stopping and the
best checkpoint go by."""

from __future__ import annotations

import torch
from torchrec.distributed import DistributedModelParallel

from twotower_rec.config import EvalConfig, LossConfig, TrainConfig
from twotower_rec.data.batches import Batcher
from twotower_rec.data.prepared import PreparedData
from twotower_rec.data.splits import VALIDATION
from twotower_rec.evaluation.pointwise import pointwise_metrics
from twotower_rec.evaluation.ranking import evaluate
from twotower_rec.model.factory import towers


def validation_config(eval_cfg: EvalConfig, train_cfg: TrainConfig) -> EvalConfig:
    """Recall and NDCG at 10 and 50 over ``train.val_max_users`` sampled events, seen items
    filtered as ``eval.filter_seen`` says."""
    return EvalConfig(ks=[10, 50], filter_seen=eval_cfg.filter_seen, user_chunk=eval_cfg.user_chunk,
                      max_users=train_cfg.val_max_users)


def validate(model: DistributedModelParallel, data: PreparedData, batcher: Batcher, eval_cfg: EvalConfig,
             loss_cfg: LossConfig, seed: int) -> dict:
    """Metrics of the model on the validation split (``eval_cfg`` from :func:`validation_config`);
    leaves the model in training mode."""
    model.eval()
    encode_query, encode_items = towers(model)
    device = next(m.weight.device for m in model.module.modules() if isinstance(m, torch.nn.Linear))
    result = evaluate(encode_query, encode_items, data, batcher, eval_cfg, VALIDATION, seed=seed,
                      with_popularity=False, device=device)["model"]
    if loss_cfg.name != "in_batch_softmax":
        result.update(pointwise_metrics(model, data, batcher, data.rows(VALIDATION), loss_cfg, device=device))
    model.train()
    return result
