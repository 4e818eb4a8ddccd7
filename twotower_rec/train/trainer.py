"""The training loop: batches -> sharded TwoTower -> in-batch softmax -> fused + dense step.

Each global batch of ``train.batch_size`` rows is cut into ``world_size`` contiguous slices,
one per rank, so the examples and their order do not depend on the number of processes; with
``loss.global_negatives`` every rank scores its queries against the whole global batch's items,
so N processes compute what one process computes.

Writes ``<out_dir>/checkpoint`` (weights best on validation, for evaluate and export),
``<out_dir>/last`` (weights, optimizer state, RNG, step and data position, every
``train.checkpoint_every_steps`` and at the end, for ``train --resume``) and
``<out_dir>/train_metrics.json``.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed import DistributedModelParallel
from tqdm import tqdm

from twotower_rec import losses
from twotower_rec.config import Config, ConfigError, EvalConfig, to_dict
from twotower_rec.data.batches import Batch, Batcher
from twotower_rec.data.prepared import PreparedData
from twotower_rec.data.splits import TRAIN, VALIDATION
from twotower_rec.distributed import sharding
from twotower_rec.distributed.env import DistEnv, seed_everything
from twotower_rec.evaluation import evaluate
from twotower_rec.model.two_tower import TwoTower
from twotower_rec.train import checkpoint


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    validation: list[dict]
    checkpoint: Path
    examples_per_second: float


def build_model(cfg: Config, data: PreparedData, env: DistEnv) -> DistributedModelParallel:
    """TwoTower with tables on meta, sharded and materialised; same seed on every rank."""
    seed_everything(cfg.train.seed, env.rank)
    model = TwoTower(data.spec, cfg.model)
    return sharding.shard_model(model, env, cfg.sharding, cfg.train)


def towers(model: DistributedModelParallel):
    """(encode_query, encode_items) of a DMP-wrapped TwoTower."""
    inner = model.module
    return inner.encode_query, inner.encode_items


def global_batches(num_rows: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffled row positions cut into full global batches (a last partial one is dropped
    unless it is the only one, so every rank always gets a slice of the same size)."""
    order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    count = max(1, num_rows // batch_size)
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(count)]


def local_slice(rows: np.ndarray, env: DistEnv) -> np.ndarray:
    per_rank = rows.size // env.world_size
    return rows[env.rank * per_rank:(env.rank + 1) * per_rank]


def _autocast(cfg: Config, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.bf16 else nullcontext()


def forward_loss(model: DistributedModelParallel, batch: Batch, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, its detached value) for this rank's slice of a global batch;
    the ``(losses, output)`` pair TorchRec's train pipelines expect from a forward."""
    with _autocast(cfg, batch.item_ids.device):
        query, item = model(batch)
    query, item = query.float(), item.float()  # the loss in float32 either way
    item_ids, offset = batch.item_ids, 0
    if cfg.loss.global_negatives:
        item, item_ids, offset = losses.gather_candidates(item, item_ids)
    loss = losses.in_batch_softmax(query, item, cfg.loss.temperature, item_ids, offset)
    return loss, loss.detach()


def global_loss(local: torch.Tensor) -> float:
    """The mean over ranks of each rank's loss: the global batch's loss."""
    value = local.detach().float().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def train_step(model: DistributedModelParallel, optimizer, batch: Batch, cfg: Config) -> float:
    """One step on this rank's slice of a global batch; returns the global batch's mean loss."""
    loss, value = forward_loss(model, batch, cfg)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return global_loss(value)


class _Stepper:
    """Runs training steps either one by one or through TorchRec's ``TrainPipelineSparseDist``,
    which overlaps the copy of batch i+2 to the device and the id all-to-all of batch i+1 with
    the forward and backward of batch i. The pipeline reads batches ahead of the step count,
    which stays the data position: a resumed run restarts from the first batch not trained."""

    def __init__(self, model, optimizer, cfg: Config, env: DistEnv, batches) -> None:
        self.model, self.optimizer, self.cfg, self.batches, self.device = model, optimizer, cfg, batches, env.device
        use = cfg.train.pipeline == "always" or (cfg.train.pipeline == "auto" and env.device.type == "cuda")
        self.pipeline = None
        if use:
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            self.pipeline = TrainPipelineSparseDist(model, optimizer, env.device, execute_all_batches=True,
                                                    custom_model_fwd=lambda b: forward_loss(model, b, cfg))

    def step(self) -> float:
        if self.pipeline is None:
            return train_step(self.model, self.optimizer, next(self.batches).to(self.device), self.cfg)
        value = self.pipeline.progress(self.batches)
        return global_loss(value)

    def pause(self) -> None:
        """Before the model is used outside the pipeline (validation, checkpoints, the end)."""
        if self.pipeline is not None:
            self.pipeline.detach()


@dataclass
class TrainerState:
    """What, beside weights and optimizer state, ``--resume`` needs to continue exactly."""

    step: int = 0
    epoch: int = 0  # the position of the next global batch: (epoch, batch)
    batch: int = 0
    examples: int = 0
    losses: list[float] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    best: float = float("-inf")
    best_step: int = 0
    stale: int = 0
    stopped_early: bool = False


# Config sections that must not change between a run and its resumption.
_RESUME_FIXED = ("features", "model", "loss", "train.batch_size", "train.seed", "train.sparse_optimizer",
                 "train.dense_lr", "train.sparse_lr", "data.cache_dir")


def _check_resumable(saved: dict, cfg: Config) -> None:
    current = to_dict(cfg)
    for key in _RESUME_FIXED:
        a, b = saved, current
        for part in key.split("."):
            a, b = a.get(part), b.get(part)
        if a != b:
            raise checkpoint.CheckpointError(
                f"--resume: {key} was {a} in the checkpoint and is {b} now; resume with the same value "
                f"(epochs, max_steps, validation and checkpoint settings may change)")


def validate(model: DistributedModelParallel, data: PreparedData, batcher: Batcher, cfg: Config) -> dict:
    model.eval()
    eval_cfg = EvalConfig(ks=[10, 50], filter_seen=cfg.eval.filter_seen, user_chunk=cfg.eval.user_chunk,
                          max_users=cfg.train.val_max_users)
    encode_query, encode_items = towers(model)
    result = evaluate(encode_query, encode_items, data, batcher, eval_cfg, VALIDATION, seed=cfg.train.seed,
                      with_popularity=False)["model"]
    model.train()
    return result


def train(cfg: Config, env: DistEnv, resume: str | Path | None = None) -> TrainResult:
    """Train; with ``resume`` (a checkpoint written with optimizer state, e.g. ``<out_dir>/last``)
    continue from its step and data position, at this or any other world size."""
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    data = PreparedData(cfg.data.cache_dir)
    batcher = Batcher(data)
    train_rows = data.rows(TRAIN)
    if cfg.train.batch_size % env.world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the world size "
                          f"{env.world_size}: the global batch is cut into one equal slice per process")
    if train_rows.size < env.world_size:
        raise ConfigError(f"only {train_rows.size} training rows for {env.world_size} processes")
    model = build_model(cfg, data, env)
    optimizer = sharding.build_optimizer(model, cfg.train)
    if env.is_main:
        print(sharding.describe_plan(model), file=sys.stderr, flush=True)

    out_dir = Path(cfg.train.out_dir)
    path, last_path = out_dir / "checkpoint", out_dir / "last"
    state = TrainerState()
    if resume is not None:
        meta = checkpoint.read_meta(resume)
        _check_resumable(meta["config"], cfg)
        sharding.init_optimizer_state(optimizer, model)
        meta = checkpoint.load_for_resume(resume, model, optimizer, data.spec)
        state = TrainerState(**meta["trainer"])
        if env.is_main:
            print(f"resumed from {checkpoint.resolve(resume)} at step {state.step} (written by "
                  f"{meta['world_size']} process(es), now {env.world_size})", file=sys.stderr, flush=True)

    batches_per_epoch = len(global_batches(train_rows.size, cfg.train.batch_size, cfg.train.seed, 0))
    total_steps = batches_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    progress = tqdm(total=total_steps, initial=min(state.step, total_steps), desc="train", unit="step",
                    disable=not (env.is_main and cfg.train.progress), file=sys.stderr, mininterval=1.0,
                    dynamic_ncols=True)
    metric = cfg.train.select_metric
    started, examples_here = time.perf_counter(), 0

    def validate_and_keep_best() -> None:
        """Validate; save the weights if they improved; set ``stopped_early`` when patience runs out."""
        state.validation.append({"step": state.step, **validate(model, data, batcher, cfg)})
        value = state.validation[-1][metric]
        improved = value > state.best
        if improved:
            state.best, state.best_step, state.stale = value, state.step, 0
            checkpoint.save(path, model, cfg, data.spec, state.step, {"validation": state.validation[-1]})
        else:
            state.stale += 1
        if env.is_main:
            progress.write(f"step {state.step}: validation recall@10 {state.validation[-1]['recall@10']:.4f} "
                           f"ndcg@10 {state.validation[-1]['ndcg@10']:.4f}" + ("  (best: checkpoint saved)" if improved else ""))
        patience = cfg.train.early_stopping_patience
        state.stopped_early = bool(patience) and state.stale >= patience

    def save_last() -> None:
        checkpoint.save(last_path, model, cfg, data.spec, state.step, optimizer=optimizer,
                        trainer_state=asdict(state))

    def local_batches(epoch: int, index: int):
        """This rank's slices of the global batches from (epoch, index) on."""
        for e in range(epoch, cfg.train.epochs):
            for rows in global_batches(train_rows.size, cfg.train.batch_size, cfg.train.seed, e)[index:]:
                yield batcher.batch(train_rows[local_slice(rows, env)])  # on the CPU
            index = 0

    stepper = _Stepper(model, optimizer, cfg, env, local_batches(state.epoch, state.batch))
    model.train()
    while state.step < total_steps and not state.stopped_early and state.epoch < cfg.train.epochs:
        loss = stepper.step()
        state.step += 1
        state.examples += cfg.train.batch_size
        examples_here += cfg.train.batch_size
        state.losses.append(loss)
        state.batch += 1
        end_of_epoch = state.batch == batches_per_epoch
        if end_of_epoch:
            state.epoch, state.batch = state.epoch + 1, 0
        if state.step % cfg.train.log_every_steps == 0 or state.step == total_steps:
            rate = examples_here / max(time.perf_counter() - started, 1e-9)
            progress.set_postfix(loss=f"{loss:.4f}", ex_s=f"{rate:,.0f}", refresh=False)
        progress.update(1)
        if state.step < total_steps:
            every = cfg.train.val_every_steps
            validating = (every and state.step % every == 0) or (not every and end_of_epoch)
            saving = cfg.train.checkpoint_every_steps and state.step % cfg.train.checkpoint_every_steps == 0
            if validating or saving:
                stepper.pause()
            if validating:
                validate_and_keep_best()
            if saving:
                save_last()
    stepper.pause()
    progress.close()
    rate = examples_here / max(time.perf_counter() - started, 1e-9)
    if not state.validation or state.validation[-1]["step"] != state.step:
        validate_and_keep_best()
    save_last()
    metrics = {"steps": state.step, "final_loss": state.losses[-1] if state.losses else None,
               "examples_per_second": rate, "world_size": env.world_size, "best_step": state.best_step,
               f"best_validation_{metric}": state.best, "stopped_early": state.stopped_early,
               "validation": state.validation}
    if env.is_main:
        (out_dir / "train_metrics.json").write_text(json.dumps({**metrics, "losses": state.losses}, indent=2))
        final = f"{metrics['final_loss']:.4f}" if state.losses else "n/a"
        print(f"train: {state.step} steps, {rate:,.0f} examples/s, final loss {final}, "
              f"best validation {metric} {state.best:.4f} at step {state.best_step}"
              f"{' (stopped early)' if state.stopped_early else ''}; checkpoint {path}", file=sys.stderr)
    return TrainResult(state.step, state.losses, state.validation, path, rate)
