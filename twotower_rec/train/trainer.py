"""The training loop: batches -> sharded TwoTower -> in-batch softmax -> fused + dense step.

Each global batch of ``train.batch_size`` rows is cut into ``world_size`` contiguous slices,
one per rank, so the examples and their order do not depend on the number of processes.
Writes ``<out_dir>/checkpoint`` (DCP + meta.json) and ``<out_dir>/train_metrics.json``.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchrec.distributed import DistributedModelParallel
from tqdm import tqdm

from twotower_rec import losses
from twotower_rec.config import Config, EvalConfig
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


def train_step(model: DistributedModelParallel, optimizer, batch: Batch, cfg: Config) -> float:
    query, item = model(batch)
    loss = losses.in_batch_softmax(query, item, cfg.loss.temperature, batch.item_ids)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


def validate(model: DistributedModelParallel, data: PreparedData, batcher: Batcher, cfg: Config) -> dict:
    model.eval()
    eval_cfg = EvalConfig(ks=[10, 50], filter_seen=cfg.eval.filter_seen, user_chunk=cfg.eval.user_chunk,
                          max_users=cfg.train.val_max_users)
    encode_query, encode_items = towers(model)
    result = evaluate(encode_query, encode_items, data, batcher, eval_cfg, VALIDATION, seed=cfg.train.seed,
                      with_popularity=False)["model"]
    model.train()
    return result


def train(cfg: Config, env: DistEnv) -> TrainResult:
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    data = PreparedData(cfg.data.cache_dir)
    batcher = Batcher(data)
    train_rows = data.rows(TRAIN)
    if cfg.train.batch_size % env.world_size:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by the world size {env.world_size}")
    if train_rows.size < env.world_size:
        raise ValueError(f"only {train_rows.size} training rows for {env.world_size} processes")
    model = build_model(cfg, data, env)
    optimizer = sharding.build_optimizer(model, cfg.train)
    if env.is_main:
        print(sharding.describe_plan(model), file=sys.stderr, flush=True)

    steps_per_epoch = len(global_batches(train_rows.size, cfg.train.batch_size, cfg.train.seed, 0))
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    progress = tqdm(total=total_steps, desc="train", unit="step", disable=not (env.is_main and cfg.train.progress),
                    file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    step, losses_seen, validation = 0, [], []
    best, best_step, stale = float("-inf"), 0, 0
    out_dir = Path(cfg.train.out_dir)
    path = out_dir / "checkpoint"
    metric = cfg.train.select_metric
    examples, started = 0, time.perf_counter()

    def validate_and_keep_best() -> bool:
        """Validate; save the checkpoint if it improved. True when early stopping says stop."""
        nonlocal best, best_step, stale
        validation.append({"step": step, **validate(model, data, batcher, cfg)})
        value = validation[-1][metric]
        improved = value > best
        if improved:
            best, best_step, stale = value, step, 0
            checkpoint.save(path, model, cfg, data.spec, step, {"validation": validation[-1]})
        else:
            stale += 1
        if env.is_main:
            progress.write(f"step {step}: validation recall@10 {validation[-1]['recall@10']:.4f} "
                           f"ndcg@10 {validation[-1]['ndcg@10']:.4f}" + ("  (best: checkpoint saved)" if improved else ""))
        return bool(cfg.train.early_stopping_patience) and stale >= cfg.train.early_stopping_patience

    model.train()
    stopped_early = False
    for epoch in range(cfg.train.epochs):
        for rows in global_batches(train_rows.size, cfg.train.batch_size, cfg.train.seed, epoch):
            if step >= total_steps or stopped_early:
                break
            batch = batcher.batch(train_rows[local_slice(rows, env)]).to(env.device)
            loss = train_step(model, optimizer, batch, cfg)
            step += 1
            examples += rows.size
            losses_seen.append(loss)
            if step % cfg.train.log_every_steps == 0 or step == total_steps:
                rate = examples / max(time.perf_counter() - started, 1e-9)
                progress.set_postfix(loss=f"{loss:.4f}", ex_s=f"{rate:,.0f}", refresh=False)
            progress.update(1)
            if cfg.train.val_every_steps and step % cfg.train.val_every_steps == 0 and step < total_steps:
                stopped_early = validate_and_keep_best()
        if not cfg.train.val_every_steps and step < total_steps and not stopped_early:
            stopped_early = validate_and_keep_best()  # once per epoch
        if step >= total_steps or stopped_early:
            break
    progress.close()
    rate = examples / max(time.perf_counter() - started, 1e-9)
    if not validation or validation[-1]["step"] != step:
        validate_and_keep_best()
    metrics = {"steps": step, "final_loss": losses_seen[-1] if losses_seen else None,
               "examples_per_second": rate, "best_step": best_step, f"best_validation_{metric}": best,
               "stopped_early": stopped_early, "validation": validation}
    if env.is_main:
        (out_dir / "train_metrics.json").write_text(json.dumps({**metrics, "losses": losses_seen}, indent=2))
        print(f"train: {step} steps, {rate:,.0f} examples/s, final loss {metrics['final_loss']:.4f}, "
              f"best validation {metric} {best:.4f} at step {best_step}"
              f"{' (stopped early)' if stopped_early else ''}; checkpoint {path}", file=sys.stderr)
    return TrainResult(step, losses_seen, validation, path, rate)
