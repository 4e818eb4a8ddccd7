"""The model of a config: built unsharded (:func:`new_model`) or sharded and ready to train or
evaluate (:func:`build_model`).

``new_model`` is plain model code: tables on ``meta`` (or on ``device``), no distributed code.
``build_model`` is the one place a model meets the process group: it seeds, builds, and hands
the model to :func:`twotower_rec.distributed.sharding.shard_model`, which plans the tables,
wraps the model in DistributedModelParallel and materialises them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torchrec.distributed import DistributedModelParallel

from twotower_rec.config import Config, LossConfig, ModelConfig
from twotower_rec.data.features import FeatureSpec
from twotower_rec.data.prepared import PreparedData
from twotower_rec.data.splits import TRAIN
from twotower_rec.distributed import sharding
from twotower_rec.distributed.env import DistEnv, seed_everything, seed_rank_streams
from twotower_rec.model.ensemble import Ensemble
from twotower_rec.model.two_tower import TwoTower


def new_model(model_cfg: ModelConfig, loss_cfg: LossConfig, spec: FeatureSpec,
              device: torch.device | None = None) -> TwoTower | Ensemble:
    """The unsharded model: a TwoTower, or an Ensemble of ``model.members`` of them (tables on
    ``meta`` unless ``device`` is given). Pointwise objectives add the score head, and
    ``loss.learn_temperature`` a learned temperature."""
    def member() -> TwoTower:
        return TwoTower(spec, model_cfg, device, pointwise_head=loss_cfg.name != "in_batch_softmax",
                        learned_temperature=loss_cfg.temperature if loss_cfg.learn_temperature else None)

    if model_cfg.members > 1:
        return Ensemble([member() for _ in range(model_cfg.members)])
    return member()


def build_model(cfg: Config, data: PreparedData, env: DistEnv, training: bool = True) -> DistributedModelParallel:
    """The model of ``cfg`` with tables on meta, sharded and materialised; same seed on every rank.
    ``training=False`` (evaluation, export) leaves out the configured table optimizer."""
    seed_everything(cfg.train.seed, env.rank)
    model = new_model(cfg.model, cfg.loss, data.spec)
    if cfg.loss.name == "mse":  # start from the mean training rating, not from 0
        with torch.no_grad():
            model.score_bias.fill_(float(np.asarray(data.rating)[data.rows(TRAIN)].mean()))
            model.score_scale.fill_(1.0)
    wrapped = sharding.shard_model(model, env, cfg.sharding, cfg.train, training=training)
    seed_rank_streams(cfg.train.seed, env.rank)
    return wrapped


def towers(model: DistributedModelParallel) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """(encode_query, encode_items) of a DMP-wrapped TwoTower or Ensemble."""
    inner = model.module
    return inner.encode_query, inner.encode_items
