"""Checkpoints: ``torch.distributed.checkpoint`` of the (sharded) model and optimizers, plus ``meta.json``.

A checkpoint directory holds DCP shards, ``meta.json`` (config, feature-spec fingerprint,
step, trainer state, package and library versions) and, for a resumable checkpoint, one RNG
file per rank. DCP stores every table by its global offsets, so a checkpoint written by N
processes loads into M (any sharding).

Crash safety: every rank writes into one folder beside ``<dir>``; ``meta.json`` is written
last; rank 0 then swaps it in (``twotower_rec/atomic.py``). Killed at any moment (even
SIGKILL), :func:`resolve` finds a complete checkpoint: it finishes or rolls back a swap that
was interrupted between its two renames.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.distributed import DistributedModelParallel

from twotower_rec import atomic, versions
from twotower_rec.config import Config, from_dict, to_dict
from twotower_rec.data.features import FeatureSpec
from twotower_rec.data.prepared import PreparedData
from twotower_rec.distributed.env import DistEnv, barrier, seed_rank_streams, world
from twotower_rec.errors import CheckpointError, ConfigError
from twotower_rec.model.factory import build_model
from twotower_rec.tasks import TASKS, make_task

META = "meta.json"
FORMAT_VERSION = 1


def rng_state() -> dict:
    import random

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None}


def set_rng_state(state: dict) -> None:
    """Restore the torch, numpy, random and (when CUDA is in use) this GPU's generators.

    Args:
        state: what :func:`rng_state` returned.
    """
    import random

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    # This rank's own GPU only (saved by the rank that used it): a node with fewer GPUs, or a
    # resume onto another number of them, has no "every GPU" to restore.
    cuda = state.get("cuda")
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(cuda)


def save(path: str | Path, model: torch.nn.Module, cfg: Config, spec: FeatureSpec, step: int,
         metrics: dict | None = None, optimizer=None, trainer_state: dict | None = None,
         extra: dict | None = None) -> Path:
    """Collective: every rank calls it. With ``optimizer`` the checkpoint can be resumed from:
    it also holds the optimizer state, every rank's RNG state and ``trainer_state``.

    Args:
        path: the checkpoint folder; a checkpoint already there is replaced atomically.
        model: the (sharded) model whose weights to save.
        cfg: the run's config, saved in meta.json.
        spec: the feature spec, whose fingerprint meta.json records.
        step: the step the weights are of.
        metrics: recorded in meta.json (e.g. the validation that selected the weights).
        optimizer: the optimizer, whose state makes the checkpoint resumable; None: weights only.
        trainer_state: the trainer's position and history (``TrainerState`` as a dict), in meta.json.
        extra: this rank's part of the task's state (e.g. the loss's frequency estimator), saved beside its RNG
            state; only with ``optimizer``.

    Returns:
        ``path``.
    """
    path = Path(path)
    rank, world_size = world()
    tmp = _shared_folder(path, rank)
    state = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    dcp.save(state, checkpoint_id=str(tmp))
    if optimizer is not None:
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save({"rng": rng_state(), "extra": extra or {}}, tmp / "rng" / f"rank{rank}.pt")
    barrier()
    if rank == 0:
        atomic.fault("shards_written")
        meta = {"format_version": FORMAT_VERSION, "step": step, "world_size": world_size, "config": to_dict(cfg),
                "feature_spec_fingerprint": spec.fingerprint(), "versions": versions(), "metrics": metrics or {},
                "resumable": optimizer is not None, "trainer": trainer_state or {}}
        (tmp / META).write_text(json.dumps(meta, indent=2))
        atomic.swap_in(tmp, path)
    barrier()
    return path


def _shared_folder(path: Path, rank: int) -> Path:
    """The folder every rank writes the new checkpoint into: rank 0 makes it, all learn its name."""
    name = [str(atomic.new_folder(path)) if rank == 0 else ""]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def resolve(path: str | Path) -> Path:
    """The complete checkpoint at ``path``, after finishing or rolling back a save killed
    between its two renames; ``path.old`` for such a save by an earlier version.

    Args:
        path: the checkpoint folder (it may hold no checkpoint: then ``path`` is returned as it is).
    """
    path = Path(path)
    atomic.recover(path)
    if (path / META).is_file():
        return path
    legacy = path.with_name(f"{path.name}.old")
    if (legacy / META).is_file():
        return legacy
    return path


def read_meta(path: str | Path) -> dict:
    """meta.json of the (complete) checkpoint at ``path``.

    Args:
        path: the checkpoint folder (:func:`resolve` finds the complete one).
    """
    return _meta_at(resolve(path))


def _meta_at(path: Path) -> dict:
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (missing {META}): run `twotower-rec train` first")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return meta


def config_of(path: str | Path) -> Config:
    """The config a checkpoint was trained with (so evaluation rebuilds the same model).

    Args:
        path: the checkpoint folder.
    """
    try:
        return from_dict(read_meta(path)["config"])
    except ConfigError as err:
        raise CheckpointError(f"{Path(path) / META}: its config does not fit this version of twotower_rec "
                              f"({err}); re-train") from None


def _check_spec(path: Path, meta: dict, spec: FeatureSpec) -> None:
    if meta["feature_spec_fingerprint"] != spec.fingerprint():
        raise CheckpointError(
            f"{path} was trained on different prepared data (feature spec {meta['feature_spec_fingerprint']}, "
            f"data has {spec.fingerprint()}): re-run train, or point data.cache_dir at the data it was trained on")


def load(path: str | Path, model: torch.nn.Module, spec: FeatureSpec) -> dict:
    """Load model weights into the (sharded) ``model`` in place; returns meta.json (with
    ``path``, the checkpoint folder read). Without a process group (an unsharded model in one
    process) the checkpoint is read by this process alone, whatever world size wrote it.

    Args:
        path: the checkpoint folder.
        model: the model to load into, built from the checkpoint's config: sharded, or plain.
        spec: the data's feature spec; it must be the one the checkpoint was trained on.
    """
    return _load(path, model, spec)


def load_for_resume(path: str | Path, model: torch.nn.Module, optimizer, spec: FeatureSpec, cfg: Config) -> dict:
    """Model, optimizer state and this rank's RNG state from a resumable checkpoint, written at
    any world size, after checking ``cfg`` may continue it (:func:`check_resumable`). Returns
    meta.json (its ``trainer`` entry holds the step and data position; ``extra``, the task's saved state).

    Args:
        path: the resumable checkpoint folder (e.g. ``<out_dir>/last``).
        model: the model to load into.
        optimizer: the optimizer to load into, its state already initialised.
        spec: the data's feature spec; it must be the one the checkpoint was trained on.
        cfg: the config of the run that continues.
    """
    meta = _load(path, model, spec, optimizer, cfg)
    # The same world size continues each rank's random stream; another gets rank 0's.
    rank, world_size = world()
    rng = Path(meta["path"]) / "rng" / f"rank{rank}.pt"
    own = meta.get("world_size") == world_size and rng.is_file()
    if not own:
        rng = Path(meta["path"]) / "rng" / "rank0.pt"
    saved = torch.load(rng, weights_only=False)
    set_rng_state(saved["rng"])
    if not own:  # rank 0's stream, continued by every rank: fork it, as at the start of a run
        seed_rank_streams(cfg.train.seed + meta["step"], rank)
    meta["extra"] = saved.get("extra", {})
    return meta


def _load(path: str | Path, model: torch.nn.Module, spec: FeatureSpec, optimizer=None,
          cfg: Config | None = None) -> dict:
    """Weights (and with ``optimizer`` its state) from the checkpoint at ``path``, in place."""
    path = resolve(path)
    meta = _meta_at(path)
    _check_spec(path, meta, spec)
    state = {"model": model.state_dict()}
    if optimizer is not None:
        if not meta.get("resumable"):
            raise CheckpointError(f"{path} holds weights only (no optimizer state): resume from <out_dir>/last")
        check_resumable(meta["config"], cfg)
        state["optim"] = optimizer.state_dict()
    dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    meta["path"] = str(path)
    return meta


class Trained(NamedTuple):
    """A checkpoint loaded for evaluation or export."""

    model: DistributedModelParallel
    data: PreparedData
    meta: dict
    cfg: Config  # the config it was trained with (data.cache_dir: the data it is used with now)


def load_trained(path: str | Path, cache_dir: str | Path, env: DistEnv) -> Trained:
    """The checkpoint at ``path`` rebuilt from its own model config, on the prepared data at
    ``cache_dir`` (which must be the data it was trained on), sharded, in eval mode.

    Args:
        path: the checkpoint folder.
        cache_dir: the prepared data's folder.
        env: the process group.
    """
    trained_cfg = config_of(path)
    trained_cfg.data.cache_dir = str(cache_dir)
    data = PreparedData(cache_dir)
    model = build_model(trained_cfg, make_task(trained_cfg), data, env, training=False)
    meta = load(path, model, data.spec)
    model.eval()
    return Trained(model, data, meta, trained_cfg)


# Config sections that must not change between a run and its resumption.
# (and every task's own section: check_resumable adds them)
_RESUME_FIXED = ("task", "features", "model", "loss", "train.batch_size", "train.seed", "train.sparse_optimizer",
                 "train.dense_lr", "train.sparse_lr", "train.weight_decay", "train.table_weight_decay",
                 "train.warmup_steps", "train.lr_schedule", "data.cache_dir")


def check_resumable(saved: dict, cfg: Config) -> None:
    """Refuse to resume under a config that changed what the saved run trains.

    Args:
        saved: the checkpoint's config as a dict (meta.json's ``config``).
        cfg: the config of the run that continues.

    Raises:
        CheckpointError: naming the first option that differs.
    """
    current = to_dict(cfg)
    for key in _RESUME_FIXED + tuple(t.section for t in TASKS.values() if t.section):
        a, b = saved, current
        for part in key.split("."):
            a, b = a.get(part), b.get(part)
        if isinstance(a, dict) and isinstance(b, dict) and a != b:  # name the option, not the section
            key, a, b = next((f"{key}.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
                             if a.get(k) != b.get(k))
        if a != b:
            raise CheckpointError(
                f"--resume: {key} was {a} in the checkpoint and is {b} now; resume with the same value "
                f"(epochs, max_steps, validation and checkpoint settings may change)")
