"""TorchRec's planner, sharders, fused table optimizers and the DistributedModelParallel wrap.

The model is built with its tables on ``meta``; :func:`shard_model` attaches the fused
(in-backward) table optimizer, plans placements under ``ShardingConfig`` constraints and
returns the DMP-wrapped model with materialised tables. One path for one process or many.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from twotower_rec.config import ShardingConfig, TrainConfig
from twotower_rec.distributed.env import DistEnv

# The planner and sharders log warnings meant for TorchRec developers on every start.
for _name in ("torchrec.distributed.planner", "torchrec.distributed.utils", "root"):
    logging.getLogger(_name).setLevel(logging.ERROR)

_TABLE_OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    "rowwise_adagrad": (RowWiseAdagrad, {"eps": 1e-8}),
    "adagrad": (torch.optim.Adagrad, {"eps": 1e-8}),
    "sgd": (torch.optim.SGD, {}),
}


class ConfiguredSharder(EmbeddingBagCollectionSharder):
    """Offers exactly the configured sharding types, on any device.

    The stock sharder hides ``row_wise`` on CPU although gloo runs it (see ENVIRONMENT.md);
    the constraints below still decide what the planner may choose.
    """

    def __init__(self, sharding_types: list[str]) -> None:
        super().__init__()
        self._types = list(sharding_types)

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return list(self._types)


def _embedding_collections(model: nn.Module) -> dict[str, EmbeddingBagCollection]:
    return {name: m for name, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)}


def shard_model(model: nn.Module, env: DistEnv, sharding: ShardingConfig, train: TrainConfig) -> DistributedModelParallel:
    """Fused table optimizer + planned sharding + DMP; rank 0 logs the plan."""
    optimizer_cls, defaults = _TABLE_OPTIMIZERS[train.sparse_optimizer]
    collections = _embedding_collections(model)
    for collection in collections.values():
        apply_optimizer_in_backward(optimizer_cls, collection.parameters(), {"lr": train.sparse_lr, **defaults})

    kernel = (EmbeddingComputeKernel.FUSED if sharding.compute_kernel == "fused" else EmbeddingComputeKernel.DENSE)
    constraints = {
        config.name: ParameterConstraints(sharding_types=list(sharding.sharding_types), compute_kernels=[kernel.value])
        for collection in collections.values()
        for config in collection.embedding_bag_configs()
    }
    topology = Topology(world_size=env.world_size, compute_device=env.device.type)
    sharder = ConfiguredSharder(sharding.sharding_types)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    wrapped = DistributedModelParallel(module=model, device=env.device, plan=plan, sharders=[sharder])
    return wrapped


def describe_plan(model: DistributedModelParallel) -> str:
    """One line per table: sharding type, compute kernel, ranks."""
    lines = []
    for module_path, module_plan in model.plan.plan.items():
        for table, spec in module_plan.items():  # type: ignore[union-attr]
            ranks = sorted({r for r in (spec.ranks or [])})
            lines.append(f"  {module_path}.{table}: {spec.sharding_type} / {spec.compute_kernel} on ranks {ranks}")
    return "sharding plan:\n" + "\n".join(lines)


def build_optimizer(model: DistributedModelParallel, train: TrainConfig) -> CombinedOptimizer:
    """The fused table optimizer and Adam over dense parameters, stepped together."""
    dense = dict(in_backward_optimizer_filter(model.named_parameters()))
    dense_optimizer = KeyedOptimizerWrapper(dense, lambda params: torch.optim.Adam(params, lr=train.dense_lr))
    return CombinedOptimizer([model.fused_optimizer, dense_optimizer])


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copies of every tensor, on every rank (a collective: all ranks call it)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if dist.get_rank() == 0 else None
            value.gather(dst=0, out=full)
            if dist.get_world_size() > 1:
                full = full if full is not None else torch.empty(value.size(), dtype=value.dtype)
                dist.broadcast(full, src=0)
            out[key] = full
        elif isinstance(value, DTensor):
            out[key] = value.full_tensor().cpu()
        else:
            out[key] = value.detach().cpu()
    return out
