"""The model of a config: built unsharded (:func:`new_model`) or sharded and ready to train or
evaluate (:func:`build_model`).

``new_model`` is plain model code: tables on ``meta`` (or on ``device``), no distributed code;
it picks the history encoder ``model.history_encoder`` names and takes the task's head.
``build_model`` is the one place a model meets the process group: it seeds, builds, and hands
the model to :func:`twotower_rec.distributed.sharding.shard_model`, which plans the tables,
wraps the model in DistributedModelParallel and materialises them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torchrec.distributed import DistributedModelParallel

from twotower_rec.data.features import HISTORY, FeatureSpec
from twotower_rec.distributed import sharding
from twotower_rec.distributed.env import DistEnv, seed_everything, seed_rank_streams
from twotower_rec.model.bag import BagHistory
from twotower_rec.model.causal import CausalHistory
from twotower_rec.model.ensemble import Ensemble
from twotower_rec.model.history import HistoryEncoder
from twotower_rec.model.transformer import TransformerHistory
from twotower_rec.model.two_tower import TwoTower

if TYPE_CHECKING:
    from twotower_rec.config import Config, ModelConfig
    from twotower_rec.data.prepared import PreparedData
    from twotower_rec.tasks import Task

# model.history_encoder -> its class (one file each under model/)
HISTORY_ENCODERS: dict[str, type] = {"bag": BagHistory, "transformer": TransformerHistory, "causal": CausalHistory}


def history_encoder(model_cfg: ModelConfig, spec: FeatureSpec, device: torch.device | None = None) -> HistoryEncoder:
    """The history encoder ``model.history_encoder`` names (the bag when the spec has no history).

    Args:
        model_cfg: the model section.
        spec: the prepared data's features.
        device: where the encoder's tables are built (``meta`` by default).
    """
    if HISTORY not in spec.query_keys:
        return BagHistory()
    return HISTORY_ENCODERS[model_cfg.history_encoder].build(spec, model_cfg, device)


def new_model(model_cfg: ModelConfig, spec: FeatureSpec, task: Task | None = None,
              device: torch.device | None = None) -> TwoTower | Ensemble:
    """The unsharded model.

    Args:
        model_cfg: the model section.
        spec: the prepared data's features.
        task: the run's task: its head and whether the forward gives a query per position;
            None: no head, one query per row (a model to embed with, not to train).
        device: where tables are built (``meta`` by default).

    Returns:
        A TwoTower, or an Ensemble of ``model.members`` of them.
    """
    def member() -> TwoTower:
        return TwoTower(spec, model_cfg, history_encoder(model_cfg, spec, device), task.head() if task else None,
                        device, every_position=task.every_position if task else False)

    if model_cfg.members > 1:
        return Ensemble([member() for _ in range(model_cfg.members)])
    return member()


def build_model(cfg: Config, task: Task, data: PreparedData, env: DistEnv,
                training: bool = True) -> DistributedModelParallel:
    """The model of ``cfg`` with tables on meta, sharded and materialised; same seed on every rank.

    Args:
        cfg: the run's config.
        task: the run's task (its head, started from the data by ``task.init_head``).
        data: the prepared data.
        env: the process group.
        training: False (evaluation, export) leaves out the configured table optimizer.
    """
    seed_everything(cfg.train.seed, env.rank)
    model = new_model(cfg.model, data.spec, task)
    task.init_head(model, data)
    wrapped = sharding.shard_model(model, env, cfg.sharding, cfg.train, training=training)
    seed_rank_streams(cfg.train.seed, env.rank)
    return wrapped


def towers(model: DistributedModelParallel) -> tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]:
    """(encode_query, encode_items) of a DMP-wrapped TwoTower or Ensemble.

    Args:
        model: the model :func:`build_model` returned.
    """
    inner = model.module
    return inner.encode_query, inner.encode_items
