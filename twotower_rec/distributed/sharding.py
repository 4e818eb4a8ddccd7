"""TorchRec's planner, sharders, fused table optimizers and the DistributedModelParallel wrap.

The model is built with its tables on ``meta``; :func:`shard_model` attaches the fused
(in-backward) table optimizer, plans placements under ``ShardingConfig`` constraints and
returns the DMP-wrapped model with materialised tables. One path for one process or many.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import zlib
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode
from torch import nn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import CacheParams
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from twotower_rec.distributed.env import DistEnv, collective_device
from twotower_rec.errors import ConfigError, closest

if TYPE_CHECKING:
    from twotower_rec.config import ShardingConfig, TrainConfig

# The planner and sharders log warnings meant for TorchRec developers on every start.
for _name in ("torchrec.distributed.planner", "torchrec.distributed.utils", "root"):
    logging.getLogger(_name).setLevel(logging.ERROR)

_TABLE_OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    "rowwise_adagrad": (RowWiseAdagrad, {"eps": 1e-8}),
    "adagrad": (torch.optim.Adagrad, {"eps": 1e-8}),
    "sgd": (torch.optim.SGD, {}),
    "adam": (torch.optim.Adam, {"eps": 1e-8}),  # fbgemm runs fused Adam on CUDA only
}

# Table rows are initialised in blocks of this many rows, each from its own seeded generator,
# so a row's initial value does not depend on which rank holds it.
_INIT_BLOCK_ROWS = 1 << 16


class _ConfiguredTypes:
    """Offers exactly the configured sharding types, on any device.

    The stock sharders hide ``row_wise`` on CPU although gloo runs it (see ENVIRONMENT.md);
    the constraints below still decide what the planner may choose.
    """

    def __init__(self, sharding_types: list[str]) -> None:
        super().__init__()
        self._types = list(sharding_types)

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return list(self._types)


class ConfiguredBagSharder(_ConfiguredTypes, EmbeddingBagCollectionSharder):
    """Pooled EmbeddingBagCollections: the towers' tables."""


class ConfiguredCollectionSharder(_ConfiguredTypes, EmbeddingCollectionSharder):
    """Unpooled EmbeddingCollections: the transformer and causal encoders' history table. TorchRec
    shards these data-parallel, table-, column- or row-wise only: ``table_row_wise`` is offered
    as ``row_wise`` (:func:`collection_sharding_types`)."""

    def __init__(self, sharding_types: list[str]) -> None:
        """Args:
            sharding_types: ``sharding.sharding_types``, as configured.
        """
        super().__init__(collection_sharding_types(sharding_types))


# What TorchRec's EmbeddingCollection sharding cannot do, and what it does instead.
_COLLECTION_SHARDING = {"table_row_wise": "row_wise"}


def collection_sharding_types(sharding_types: list[str]) -> list[str]:
    """The sharding types an EmbeddingCollection's table may take: ``sharding_types`` with
    ``table_row_wise`` (which TorchRec shards for pooled collections only) as ``row_wise``.

    Args:
        sharding_types: the configured types, in order.
    """
    return list(dict.fromkeys(_COLLECTION_SHARDING.get(t, t) for t in sharding_types))


def _embedding_collections(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))}


def _table_configs(collection: nn.Module) -> list:
    if isinstance(collection, EmbeddingBagCollection):
        return collection.embedding_bag_configs()
    return collection.embedding_configs()


def _table_weight(collection: nn.Module, name: str) -> nn.Parameter:
    tables = collection.embedding_bags if isinstance(collection, EmbeddingBagCollection) else collection.embeddings
    return tables[name].weight


def _check_table_weight_decay(collections: dict[str, nn.Module], train: TrainConfig, env: DistEnv) -> None:
    configs = {c.name: (c, isinstance(m, EmbeddingBagCollection))
               for m in collections.values() for c in _table_configs(m)}
    for table, decay in train.table_weight_decay.items():
        if table not in configs:
            raise ConfigError(f"train.table_weight_decay: no table '{table}'; the tables are {sorted(configs)}"
                              f"{closest(table, sorted(configs))}")
        config, pooled = configs[table]
        if decay > 0 and pooled and env.device.type == "cpu" and len(config.feature_names) < 2:
            raise ConfigError(
                f"train.table_weight_decay.{table}: on CPU fbgemm's row-wise Adagrad ignores weight decay for "
                f"a pooled table read by one feature ({config.feature_names[0]}); it applies it to tables read "
                "by two or more (e.g. t_history with features.recent_items > 0) and to every table on CUDA")


# Per optimizer, the table learning rate ``train.sparse_lr: null`` (the default) stands for: Adagrad's step
# shrinks with the accumulated squared gradients and wants a large base rate; Adam's does not.
SPARSE_LR_DEFAULTS = {"rowwise_adagrad": 0.05, "adagrad": 0.05, "sgd": 0.05, "adam": 1e-3}


def sparse_lr(train: TrainConfig) -> float:
    """The table learning rate: ``train.sparse_lr``, or the optimizer's default when it is null.

    Args:
        train: the ``train`` section (``sparse_lr``, ``sparse_optimizer``).
    """
    return SPARSE_LR_DEFAULTS[train.sparse_optimizer] if train.sparse_lr is None else train.sparse_lr


def _attach_table_optimizer(collections: dict[str, nn.Module], train: TrainConfig, env: DistEnv) -> None:
    """The fused (in-backward) optimizer of every table, as ``train`` configures it."""
    if train.sparse_optimizer == "adam" and env.device.type != "cuda":
        raise ConfigError("train.sparse_optimizer=adam: fbgemm runs fused Adam for tables on CUDA only; "
                          "on CPU use rowwise_adagrad (the default), adagrad or sgd")
    optimizer_cls, defaults = _TABLE_OPTIMIZERS[train.sparse_optimizer]
    _check_table_weight_decay(collections, train, env)
    for collection in collections.values():
        for config in _table_configs(collection):
            kwargs = {"lr": sparse_lr(train), **defaults}
            decay = train.table_weight_decay.get(config.name, 0.0)
            if decay > 0:
                # fbgemm's fused parameters: L2 adds decay * row to the row's gradient, and to
                # the squared gradient Adagrad accumulates, for each row the batch touches.
                kwargs.update(weight_decay=decay, weight_decay_mode=WeightDecayMode.L2)
            apply_optimizer_in_backward(optimizer_cls, [_table_weight(collection, config.name)], kwargs)


def host_memory() -> int:
    """This host's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _topology(env: DistEnv) -> Topology:
    """The machine as the planner should see it: ranks per host (so ``table_row_wise`` keeps a
    table's shards within a host), each rank's share of the host's memory (TorchRec assumes
    128 GB a rank, which a UVM plan on an 8-GPU node would over-commit) and, on CUDA, the GPU's
    real memory (TorchRec assumes 32 GB).

    Args:
        env: the process group (world size, ranks per host, device).
    """
    kwargs: dict[str, Any] = {"local_world_size": env.local_world_size,
                              "ddr_cap": host_memory() // max(env.local_world_size, 1)}
    if env.device.type == "cuda":
        kwargs["hbm_cap"] = torch.cuda.get_device_properties(env.device).total_memory
    return Topology(world_size=env.world_size, compute_device=env.device.type, **kwargs)


def _constraints(collections: dict[str, nn.Module], sharding: ShardingConfig) -> dict[str, ParameterConstraints]:
    kernel = EmbeddingComputeKernel(sharding.compute_kernel)
    # fused_uvm_caching keeps the whole table in host memory (UVM) and a cache of its hottest
    # rows, cache_load_factor of the rows, on the GPU: for tables larger than GPU memory.
    cache = CacheParams(load_factor=sharding.cache_load_factor) if kernel.value == "fused_uvm_caching" else None
    def types(collection: nn.Module) -> list[str]:
        if isinstance(collection, EmbeddingCollection):
            return collection_sharding_types(sharding.sharding_types)
        return list(sharding.sharding_types)

    return {config.name: ParameterConstraints(sharding_types=types(collection), compute_kernels=[kernel.value],
                                              cache_params=cache)
            for collection in collections.values() for config in _table_configs(collection)}


def shard_model(model: nn.Module, env: DistEnv, sharding: ShardingConfig, train: TrainConfig,
                training: bool = True) -> DistributedModelParallel:
    """Fused table optimizer + planned sharding + DMP.

    ``training=False`` (evaluation, export) attaches plain SGD instead of the configured table
    optimizer: its state is never used there, and a checkpoint trained with a CUDA-only
    optimizer setting (fused Adam, decay on a one-feature table) loads on any machine.

    Args:
        model: the unsharded model, its tables on ``meta``.
        env: this process's rank, device and world.
        sharding: the ``sharding`` section: the sharding types the planner may choose, the compute kernel.
        train: the ``train`` section: the table optimizer and its settings, and the seed of the tables' init.
        training: ``False`` attaches plain SGD instead of the configured table optimizer (see above).

    Returns:
        The DMP-wrapped model, its tables initialised by :func:`init_tables`.
    """
    if sharding.compute_kernel == "fused_uvm_caching" and env.device.type != "cuda":
        raise ConfigError("sharding.compute_kernel=fused_uvm_caching keeps tables in CUDA unified memory: "
                          "CUDA only; on CPU use fused (the default)")
    collections = _embedding_collections(model)
    _attach_table_optimizer(collections, train if training else dataclasses.replace(
        train, sparse_optimizer="sgd", sparse_lr=None, table_weight_decay={}), env)
    sharders = [ConfiguredBagSharder(sharding.sharding_types), ConfiguredCollectionSharder(sharding.sharding_types)]
    # the per-rank batch: the planner's cost estimates assume 512 otherwise
    planner = EmbeddingShardingPlanner(topology=_topology(env), batch_size=max(1, train.batch_size // env.world_size),
                                       constraints=_constraints(collections, sharding))
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    # TorchRec divides table gradients by the world size on their way back to the shards
    # (comm_ops.GRADIENT_DIVISION, on by default) as DDP averages dense ones: with the global
    # negatives of the loss, N processes take the step one process takes on the global batch.
    wrapped = DistributedModelParallel(module=model, device=env.device, plan=plan, sharders=sharders,
                                       data_parallel_wrapper=DenseLayersWrapper())
    init_tables(wrapped, train.seed)
    return wrapped


class DenseLayersWrapper(DefaultDataParallelWrapper):
    """TorchRec's default for the dense layers (DistributedDataParallel) with two or more
    processes. One process has nothing to average, and DDP's per-step bookkeeping cost a measurable
    share of a step on 2 CPU cores (benchmarks/profile_step.py): its dense layers are only moved to the device, as
    DDP's wrapping would. State-dict keys are the same either way (DMP strips DDP's prefix)."""

    def wrap(self, dmp: DistributedModelParallel, env, device: torch.device) -> None:
        """Wrap ``dmp``'s dense layers in DDP with two or more processes; with one, move them to ``device``.

        Args:
            dmp: the model being wrapped.
            env: TorchRec's sharding environment (its ``world_size``).
            device: this rank's device.
        """
        if env.world_size > 1:
            super().wrap(dmp, env, device)
        else:
            dmp._dmp_wrapped_module.to(device)


# The history encoders' tables (TwoTower.history) are seeded by the paths they had before the
# encoder was given to TwoTower as a module, so their initial values (and every result) stay
# those of earlier versions.
_SEED_PATHS = {("history", "embeddings"): ["sequence", "embeddings"], ("history", "items"): ["causal_items"]}


def _table_key(state_key: str) -> str:
    """A table's seed key: its state-dict key without DMP's wrapper prefixes (the same at any
    world size), history tables under their earlier paths (:data:`_SEED_PATHS`)."""
    parts = [p for p in state_key.split(".") if p not in ("module", "_dmp_wrapped_module")]
    for i in range(len(parts) - 1):
        if (parts[i], parts[i + 1]) in _SEED_PATHS:
            parts[i:i + 2] = _SEED_PATHS[(parts[i], parts[i + 1])]
            break
    return ".".join(parts)


@torch.no_grad()
def init_tables(model: nn.Module, seed: int) -> None:
    """Initialise every embedding table U(-1/sqrt(rows), 1/sqrt(rows)) (TorchRec's default range),
    row block by row block from generators seeded by (seed, table, block).

    Each rank fills only the rows and columns of its own shards, and every placement (one
    process, table-, row- or column-wise over N) starts from the same tables, which is what
    lets N-process training reproduce one-process training.

    Args:
        model: the model, sharded (DMP) or not; its tables are filled in place.
        seed: the run's seed (``train.seed``).
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    for key, value in model.state_dict().items():
        is_table = "embedding_bags." in key or ".embeddings." in key  # an EmbeddingBagCollection or EmbeddingCollection
        if not is_table or not key.endswith(".weight"):
            continue
        rows, cols = value.size(0), value.size(1)
        bound = rows ** -0.5
        table_seed = zlib.crc32(_table_key(key).encode())
        if isinstance(value, ShardedTensor):
            pieces = [(s.tensor, s.metadata.shard_offsets, s.metadata.shard_sizes) for s in value.local_shards()]
        else:
            pieces = [(value, [0, 0], [rows, cols])]
        for tensor, (row0, col0), (n_rows, n_cols) in pieces:
            for block in range(row0 // _INIT_BLOCK_ROWS, (row0 + n_rows - 1) // _INIT_BLOCK_ROWS + 1):
                start = block * _INIT_BLOCK_ROWS
                stop = min(start + _INIT_BLOCK_ROWS, rows)
                gen = torch.Generator().manual_seed((seed * 1_000_003 + table_seed) * 65_537 + block)
                values = torch.rand(stop - start, cols, generator=gen).mul_(2 * bound).sub_(bound)
                lo, hi = max(start, row0), min(stop, row0 + n_rows)
                tensor[lo - row0:hi - row0].copy_(values[lo - start:hi - start, col0:col0 + n_cols])


def describe_plan(model: DistributedModelParallel, sharding: ShardingConfig | None = None) -> str:
    """One line per table: sharding type, compute kernel, ranks; and where an EmbeddingCollection's
    table could not take a configured type, which one it was offered instead.

    Args:
        model: the DMP-wrapped model whose plan to describe.
        sharding: the ``sharding`` section it was planned under (for the note), or None.
    """
    lines = []
    for module_path, module_plan in model.plan.plan.items():
        for table, spec in module_plan.items():  # type: ignore[union-attr]
            ranks = sorted({r for r in (spec.ranks or [])})
            lines.append(f"  {module_path}.{table}: {spec.sharding_type} / {spec.compute_kernel} on ranks {ranks}")
    from torchrec.distributed.embedding import ShardedEmbeddingCollection

    unpooled = [table for path, m in model.module.named_modules()
                if isinstance(m, (EmbeddingCollection, ShardedEmbeddingCollection))
                for table in model.plan.plan.get(path, {})]
    mapped = [t for t in (sharding.sharding_types if sharding else []) if t in _COLLECTION_SHARDING]
    if unpooled and mapped:
        names = ", ".join(unpooled)
        lines += [f"  note: TorchRec shards an EmbeddingCollection ({names}) with no {t}; it was offered "
                  f"{_COLLECTION_SHARDING[t]} instead" for t in mapped]
    return "sharding plan:\n" + "\n".join(lines)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copies of every tensor, on every rank (a collective: all ranks call it).
    Every rank then holds every table whole: for tests and small models; ``export`` reads the
    checkpoint's files on one process instead (``api.export``).

    Args:
        model: the model, its tables sharded tensors or plain ones.

    Returns:
        Its state dict's keys, each with the whole tensor on the CPU.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    device = collective_device()  # NCCL gathers and broadcasts CUDA tensors only
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype, device=device) if dist.get_rank() == 0 else None
            value.gather(dst=0, out=full)
            if dist.get_world_size() > 1:
                full = full if full is not None else torch.empty(value.size(), dtype=value.dtype, device=device)
                dist.broadcast(full, src=0)
            out[key] = full.cpu()
        elif isinstance(value, DTensor):
            out[key] = value.full_tensor().cpu()
        else:
            out[key] = value.detach().cpu()
    return out
