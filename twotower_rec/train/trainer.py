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
from torch.profiler import record_function
from torchrec.distributed import DistributedModelParallel
from tqdm import tqdm

from twotower_rec import losses, pointwise
from twotower_rec.config import Config, ConfigError, EvalConfig, to_dict
from twotower_rec.data.batches import Batch, Batcher
from twotower_rec.data.features import FeatureSpec
from twotower_rec.data.prepared import PreparedData
from twotower_rec.data.splits import TRAIN, VALIDATION
from twotower_rec.distributed import sharding
from twotower_rec.distributed.env import DistEnv, seed_everything
from twotower_rec.evaluation import evaluate
from twotower_rec.model.ensemble import Ensemble
from twotower_rec.model.two_tower import TwoTower
from twotower_rec.train import checkpoint


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    validation: list[dict]
    checkpoint: Path
    examples_per_second: float


def new_model(cfg: Config, spec: FeatureSpec, device: torch.device | None = None) -> TwoTower | Ensemble:
    """The unsharded model of ``cfg``: a TwoTower, or an Ensemble of ``model.members`` of them
    (tables on ``meta`` unless ``device`` is given)."""
    def member() -> TwoTower:
        return TwoTower(spec, cfg.model, device, pointwise_head=cfg.loss.name != "in_batch_softmax",
                        learned_temperature=cfg.loss.temperature if cfg.loss.learn_temperature else None)

    if cfg.model.members > 1:
        return Ensemble([member() for _ in range(cfg.model.members)])
    return member()


def build_model(cfg: Config, data: PreparedData, env: DistEnv) -> DistributedModelParallel:
    """The model with tables on meta, sharded and materialised; same seed on every rank."""
    seed_everything(cfg.train.seed, env.rank)
    model = new_model(cfg, data.spec)
    if cfg.loss.name == "mse":  # start from the mean training rating, not from 0
        with torch.no_grad():
            model.score_bias.fill_(float(np.asarray(data.rating)[data.rows(TRAIN)].mean()))
            model.score_scale.fill_(1.0)
    return sharding.shard_model(model, env, cfg.sharding, cfg.train)


def towers(model: DistributedModelParallel):
    """(encode_query, encode_items) of a DMP-wrapped TwoTower or Ensemble."""
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


class LossContext:
    """What the loss needs beyond one batch: logQ frequencies and the catalog size.

    logQ subtracts log(expected number of times a candidate is among the candidates): for an
    in-batch candidate j that is ``global_batch * q(j)``, q from training counts or from the
    streaming estimator; for a uniform negative ``uniform_negatives / num_items``.
    """

    def __init__(self, cfg: Config, data: PreparedData, device: torch.device) -> None:
        self.cfg, self.num_items, self.step = cfg, data.spec.num_items, 0
        counts = data.item_counts().astype(np.float64)
        q = counts / max(counts.sum(), 1.0)
        q[q == 0] = 1.0 / max(counts.sum(), 1.0)  # never a positive; keep the log finite
        self.log_q = torch.from_numpy(np.log(q * cfg.train.batch_size)).float().to(device)
        self.streaming = (losses.StreamingFrequency(cfg.loss.streaming_hash_size, cfg.loss.streaming_alpha)
                          if cfg.loss.logq == "streaming" else None)

    def candidate_log_q(self, positive_ids: torch.Tensor, num_uniform: int) -> torch.Tensor | None:
        logq = self.cfg.loss.logq
        if logq == "none":
            return None
        if logq == "counts":
            in_batch = self.log_q[positive_ids]
        else:
            self.streaming.update(positive_ids, self.step)
            in_batch = torch.log(self.streaming.probability(positive_ids).float() * positive_ids.numel())
        uniform = torch.full((num_uniform,), float(np.log(max(num_uniform, 1) / self.num_items)),
                             device=in_batch.device)
        log_q = torch.cat([in_batch, uniform])
        weight = self.cfg.loss.logq_weight
        return log_q if weight == 1.0 else log_q * weight


def forward_loss(model: DistributedModelParallel, batch: Batch, cfg: Config,
                 ctx: LossContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, its detached value) for this rank's slice of a global batch;
    the ``(losses, output)`` pair TorchRec's train pipelines expect from a forward.

    The item side holds this rank's positives, then its share of the uniform negatives.
    """
    ctx.step += 1
    with _autocast(cfg, batch.item_ids.device):
        query, item = model(batch)
    query, item = query.float(), item.float()  # the loss in float32 either way
    if cfg.loss.name != "in_batch_softmax":
        loss = pointwise.forward_loss(model, query, item, batch.labels, cfg)
        return loss, loss.detach()
    rows = query.shape[0]
    positives, positive_ids = item[:rows], batch.item_ids[:rows]
    negatives, negative_ids = item[rows:], batch.item_ids[rows:]
    offset = 0
    if cfg.loss.global_negatives:
        positives, positive_ids, offset = losses.gather_candidates(positives, positive_ids)
        if negatives.shape[0]:
            negatives, negative_ids, _ = losses.gather_candidates(negatives, negative_ids)
    candidates = torch.cat([positives, negatives])
    candidate_ids = torch.cat([positive_ids, negative_ids])
    log_q = ctx.candidate_log_q(positive_ids, negatives.shape[0])
    temperature = model.module.temperature() if cfg.loss.learn_temperature else cfg.loss.temperature
    loss = losses.in_batch_softmax(query, candidates, temperature,
                                   candidate_ids if cfg.loss.mask_accidental_hits else None, offset, log_q)
    return loss, loss.detach()


def lr_factor(step: int, total: int, cfg: Config) -> float:
    """Dense learning-rate multiplier at ``step`` (0-based): linear warm-up, then constant or
    cosine decay to 0 at the last step."""
    warmup = cfg.train.warmup_steps
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.train.lr_schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + float(np.cos(np.pi * min(progress, 1.0))))
    return 1.0


def global_loss(local: torch.Tensor) -> float:
    """The mean over ranks of each rank's loss: the global batch's loss."""
    value = local.detach().float().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def train_step(model: DistributedModelParallel, optimizer, batch: Batch, cfg: Config, ctx: LossContext) -> float:
    """One step on this rank's slice of a global batch; returns the global batch's mean loss."""
    with record_function("## forward + loss ##"):
        loss, value = forward_loss(model, batch, cfg, ctx)
    with record_function("## backward (fused table update) ##"):
        loss.backward()
    with record_function("## dense optimizer ##"):
        optimizer.step()
        optimizer.zero_grad()
    return global_loss(value)


class _Stepper:
    """Runs training steps either one by one or through TorchRec's ``TrainPipelineSparseDist``,
    which overlaps the copy of batch i+2 to the device and the id all-to-all of batch i+1 with
    the forward and backward of batch i. The pipeline reads batches ahead of the step count,
    which stays the data position: a resumed run restarts from the first batch not trained."""

    def __init__(self, model, optimizer, cfg: Config, env: DistEnv, batches, ctx: LossContext) -> None:
        self.model, self.optimizer, self.cfg, self.batches, self.device = model, optimizer, cfg, batches, env.device
        self.ctx = ctx
        use = cfg.train.pipeline == "always" or (cfg.train.pipeline == "auto" and env.device.type == "cuda")
        self.pipeline = None
        if use:
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            self.pipeline = TrainPipelineSparseDist(model, optimizer, env.device, execute_all_batches=True,
                                                    custom_model_fwd=lambda b: forward_loss(model, b, cfg, ctx))

    def step(self) -> float:
        if self.pipeline is None:
            return train_step(self.model, self.optimizer, next(self.batches).to(self.device), self.cfg, self.ctx)
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
                 "train.dense_lr", "train.sparse_lr", "train.weight_decay", "train.table_weight_decay",
                 "train.warmup_steps", "train.lr_schedule", "data.cache_dir")


def check_resumable(saved: dict, cfg: Config) -> None:
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
    device = next(m.weight.device for m in model.module.modules() if isinstance(m, torch.nn.Linear))
    result = evaluate(encode_query, encode_items, data, batcher, eval_cfg, VALIDATION, seed=cfg.train.seed,
                      with_popularity=False, device=device)["model"]
    if cfg.loss.name != "in_batch_softmax":
        result.update(pointwise.evaluate(model, data, batcher, data.rows(VALIDATION), cfg, device=device))
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
    streaming_state = None
    if resume is not None:
        meta = checkpoint.read_meta(resume)
        check_resumable(meta["config"], cfg)
        sharding.init_optimizer_state(optimizer, model)
        meta = checkpoint.load_for_resume(resume, model, optimizer, data.spec)
        state = TrainerState(**meta["trainer"])
        streaming_state = meta["extra"].get("streaming")
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
                           f"ndcg@10 {state.validation[-1]['ndcg@10']:.4f}"
                           + (f" {metric} {value:.4f}" if metric not in ("recall@10", "ndcg@10") else "")
                           + ("  (best: checkpoint saved)" if improved else ""))
        patience = cfg.train.early_stopping_patience
        state.stopped_early = bool(patience) and state.stale >= patience

    def save_last() -> None:
        extra = {"streaming": ctx.streaming.state_dict()} if ctx.streaming is not None else {}
        checkpoint.save(last_path, model, cfg, data.spec, state.step, optimizer=optimizer,
                        trainer_state=asdict(state), extra=extra)

    num_negatives = (cfg.loss.uniform_negatives if cfg.loss.name == "in_batch_softmax"
                     else cfg.loss.negative_ratio * cfg.train.batch_size if cfg.loss.name == "bce" else 0)

    def local_batches(epoch: int, index: int):
        """This rank's slices of the global batches (and of their uniform negatives) from
        (epoch, index) on; the negatives of a global batch do not depend on the world size."""
        for e in range(epoch, cfg.train.epochs):
            batches = global_batches(train_rows.size, cfg.train.batch_size, cfg.train.seed, e)
            for i in range(index, len(batches)):
                negatives = None
                if num_negatives:
                    draw = np.random.default_rng([cfg.train.seed, e, i, 7])
                    negatives = local_slice(draw.integers(1, data.spec.num_items + 1, num_negatives), env)
                yield batcher.batch(train_rows[local_slice(batches[i], env)], negatives)  # on the CPU
            index = 0

    ctx = LossContext(cfg, data, env.device)
    ctx.step = state.step
    if streaming_state is not None and ctx.streaming is not None:
        ctx.streaming.load_state_dict(streaming_state)
    stepper = _Stepper(model, optimizer, cfg, env, local_batches(state.epoch, state.batch), ctx)
    model.train()
    while state.step < total_steps and not state.stopped_early and state.epoch < cfg.train.epochs:
        sharding.set_dense_lr(optimizer, model, cfg.train.dense_lr * lr_factor(state.step, total_steps, cfg))
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
    if cfg.loss.learn_temperature:
        metrics["learned_temperature"] = float(model.module.temperature())
    if env.is_main:
        (out_dir / "train_metrics.json").write_text(json.dumps({**metrics, "losses": state.losses}, indent=2))
        final = f"{metrics['final_loss']:.4f}" if state.losses else "n/a"
        print(f"train: {state.step} steps, {rate:,.0f} examples/s, final loss {final}, "
              f"best validation {metric} {state.best:.4f} at step {state.best_step}"
              f"{' (stopped early)' if state.stopped_early else ''}; checkpoint {path}", file=sys.stderr)
    return TrainResult(state.step, state.losses, state.validation, path, rate)
