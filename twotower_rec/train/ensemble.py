"""Train an ensemble (``model.members`` = K > 1): K ordinary runs, then one model.

Member k is an ordinary training run (``model.members=1``) with seed ``train.seed + k``, in
``<out_dir>/member<k>``: its own initial weights, its own batch order, and its own early
stop on its own validation NDCG@10. Their best checkpoints are then loaded side by side into
one :class:`twotower_rec.model.ensemble.Ensemble`, validated, and saved as
``<out_dir>/checkpoint``, which evaluate, export and recommend read like any other.

``train --resume`` keeps the members that finished with the same config and continues an
unfinished one from its ``last`` checkpoint where that config allows it (as a single run's
``--resume`` would); other members are trained afresh. Without ``--resume`` every member is.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from twotower_rec.config import Config, to_dict
from twotower_rec.data.batches import Batcher
from twotower_rec.data.prepared import PreparedData
from twotower_rec.distributed.env import DistEnv
from twotower_rec.model.factory import build_model
from twotower_rec.tasks import make_task
from twotower_rec.train import checkpoint
from twotower_rec.train.trainer import TrainResult, train
from twotower_rec.train.validation import validate, validation_config


def member_config(cfg: Config, k: int) -> Config:
    """The config of member ``k``: one TwoTower, seed ``train.seed + k``, its own folder.

    Args:
        cfg: the ensemble's config (left unchanged: the member's is a copy).
        k: the member's index, from 0: its seed offset and its folder ``<out_dir>/member<k>``.
    """
    member = copy.deepcopy(cfg)
    member.model.members = 1
    member.train.seed = cfg.train.seed + k
    member.train.out_dir = str(Path(cfg.train.out_dir) / f"member{k}")
    return member


def _finished(member: Config, data: PreparedData) -> bool:
    """Did this member's run finish with exactly this config, on this prepared data?"""
    out = Path(member.train.out_dir)
    if not (out / "train_metrics.json").is_file():
        return False
    try:
        meta = checkpoint.read_meta(out / "checkpoint")
    except checkpoint.CheckpointError:
        return False
    return meta["config"] == to_dict(member) and checkpoint.fits(meta, data)


def _resumable(member: Config, data: PreparedData) -> Path | None:
    """This member's ``last`` checkpoint if it can continue under this config and data, else None."""
    last = Path(member.train.out_dir) / "last"
    try:
        meta = checkpoint.read_meta(last)
        checkpoint.check_resumable(meta["config"], member)
    except checkpoint.CheckpointError:
        return None
    return last if checkpoint.fits(meta, data) else None


def _load_member(model, k: int, path: Path) -> None:
    """Member ``k``'s best weights into the ``members.k.`` part of the (sharded) ensemble, in place."""
    prefix = f"members.{k}."
    state = model.state_dict()
    part = {key.replace(prefix, "", 1): value for key, value in state.items() if prefix in key}
    folder = checkpoint.resolve(path)
    checkpoint.verify(folder)
    checkpoint.read_shards({"model": part}, folder)
    model.load_state_dict(state)


def train_ensemble(cfg: Config, env: DistEnv, resume: bool = False) -> TrainResult:
    """Train ``model.members`` members, then save them side by side as ``<out_dir>/checkpoint``.

    Args:
        cfg: the ensemble's config (``model.members`` > 1).
        env: the process group.
        resume: keep finished members and continue unfinished ones from their ``last``.
    """
    members, metric = cfg.model.members, cfg.train.select_metric
    data = PreparedData(cfg.data.cache_dir)
    results = []
    for k in range(members):
        member = member_config(cfg, k)
        out = Path(member.train.out_dir)
        if resume and _finished(member, data):
            if env.is_main:
                print(f"member {k + 1}/{members}: finished earlier in {out}, kept", file=sys.stderr, flush=True)
            results.append(json.loads((out / "train_metrics.json").read_text()))
            continue
        from_last = _resumable(member, data) if resume else None
        if env.is_main:
            how = f"resumed from {from_last}" if from_last else f"seed {member.train.seed}"
            print(f"member {k + 1}/{members}: {how} -> {out}", file=sys.stderr, flush=True)
        result = train(member, env, resume=from_last)  # rank 0 alone writes train_metrics.json: not read here
        best = max(result.validation, key=lambda v: v[metric])  # the first of equals, as the trainer keeps
        results.append({"steps": result.steps, "examples_per_second": result.examples_per_second,
                        "best_step": best["step"], f"best_validation_{metric}": best[metric]})

    task = make_task(cfg)
    model = build_model(cfg, task, data, env, training=False)  # loaded, validated and saved: never stepped
    for k in range(members):
        _load_member(model, k, Path(member_config(cfg, k).train.out_dir) / "checkpoint")
    validation = validate(model, data, Batcher(data), validation_config(cfg.eval, cfg.train), task,
                          cfg.train.seed)
    out_dir = Path(cfg.train.out_dir)
    path = checkpoint.save(out_dir / "checkpoint", model, cfg, data, 0, {"validation": validation})
    steps = sum(r["steps"] for r in results)
    rate = sum(r["examples_per_second"] for r in results) / members
    metrics = {"members": members, "steps": steps, "examples_per_second": rate, "world_size": env.world_size,
               f"best_validation_{metric}": validation[metric], "validation": [validation],
               "member_runs": [{"seed": cfg.train.seed + k, "steps": r["steps"], "best_step": r["best_step"],
                                f"best_validation_{metric}": r[f"best_validation_{metric}"]}
                               for k, r in enumerate(results)]}
    if env.is_main:
        (out_dir / "train_metrics.json").write_text(json.dumps(metrics, indent=2))
        each = " / ".join(f"{r[f'best_validation_{metric}']:.4f}" for r in results)
        print(f"train: ensemble of {members} members (validation {metric} {each}): validation {metric} "
              f"{validation[metric]:.4f}; checkpoint {path}", file=sys.stderr)
    return TrainResult(steps, [], [validation], path, rate)
