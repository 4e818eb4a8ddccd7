"""Checkpoints: ``torch.distributed.checkpoint`` of the (sharded) model plus ``meta.json``.

A checkpoint directory holds DCP shards and ``meta.json`` (config, feature-spec fingerprint,
step, package and library versions). It is written to ``<dir>.tmp-<pid>`` and renamed into
place, so a crash during a save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from twotower_rec import __version__
from twotower_rec.config import Config, ConfigError, from_dict, to_dict
from twotower_rec.data.features import FeatureSpec
from twotower_rec.errors import TwoTowerError

META = "meta.json"
FORMAT_VERSION = 1


class CheckpointError(TwoTowerError):
    """A checkpoint is missing, incomplete or does not match the data it is used with."""


def versions() -> dict[str, str]:
    import torchrec

    return {"twotower_rec": __version__, "torch": torch.__version__,
            "torchrec": getattr(torchrec, "__version__", "unknown")}


def save(path: str | Path, model: torch.nn.Module, cfg: Config, spec: FeatureSpec, step: int,
         metrics: dict | None = None) -> Path:
    """Collective: every rank calls it. Rank 0 writes meta.json and renames into place."""
    path = Path(path)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = path.with_name(f"{path.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp))
    if rank == 0:
        meta = {"format_version": FORMAT_VERSION, "step": step, "config": to_dict(cfg),
                "feature_spec_fingerprint": spec.fingerprint(), "versions": versions(), "metrics": metrics or {}}
        (tmp / META).write_text(json.dumps(meta, indent=2))
        old = path.with_name(f"{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"no checkpoint at {path} (missing {META}): run `twotower-rec train` first")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return meta


def config_of(path: str | Path) -> Config:
    """The config a checkpoint was trained with (so evaluation rebuilds the same model)."""
    try:
        return from_dict(read_meta(path)["config"])
    except ConfigError as err:
        raise CheckpointError(f"{Path(path) / META}: its config does not fit this version of twotower_rec "
                              f"({err}); re-train") from None


def load(path: str | Path, model: torch.nn.Module, spec: FeatureSpec) -> dict:
    """Load model weights into the (sharded) ``model`` in place; returns meta.json."""
    meta = read_meta(path)
    if meta["feature_spec_fingerprint"] != spec.fingerprint():
        raise CheckpointError(
            f"{path} was trained on different prepared data (feature spec {meta['feature_spec_fingerprint']}, "
            f"data has {spec.fingerprint()}): re-run train, or point data.cache_dir at the data it was trained on")
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
    return meta
