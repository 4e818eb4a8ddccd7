"""The training loop: the task's batches -> sharded TwoTower -> the task's loss -> fused +
dense step, with the validation, early-stopping and checkpoint schedule around it.

Each global batch of ``train.batch_size`` examples (``batch_order.py``) is cut by the task into
this rank's batch, so the examples and their order do not depend on the number of processes;
with ``loss.global_negatives`` every rank scores its queries against the whole global batch's
items, so N processes compute what one process computes. What an example is (an interaction,
a window of a user's sequence) is the task's (``twotower_rec/tasks/``).

Writes ``<out_dir>/checkpoint`` (weights best on validation, for evaluate and export),
``<out_dir>/last`` (weights, optimizer state, RNG, step and data position, every
``train.checkpoint_every_steps`` and at the end, for ``train --resume``),
``<out_dir>/train_metrics.json`` and, with ``train.tensorboard``, ``<out_dir>/tensorboard``
(``tensorboard.py``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torchrec.distributed import DistributedModelParallel
from tqdm import tqdm

from twotower_rec.config import Config
from twotower_rec.data.batches import Batcher
from twotower_rec.data.prepared import PreparedData
from twotower_rec.data.splits import TRAIN
from twotower_rec.distributed import sharding
from twotower_rec.distributed.env import DistEnv
from twotower_rec.distributed.threads import apply_thread_count
from twotower_rec.errors import ConfigError, TrainingError
from twotower_rec.model.factory import build_model
from twotower_rec.tasks import Task, make_task
from twotower_rec.train import checkpoint
from twotower_rec.train.batch_order import BatchesAhead, local_batches, num_global_batches, prefetch_depth
from twotower_rec.train.optim import build_optimizer, init_optimizer_state, lr_factor, set_dense_lr
from twotower_rec.train.step import LossLog, Stepper
from twotower_rec.train.tensorboard import NoCurves, open_curves, validation_scalars, writes_curves
from twotower_rec.train.validation import validate, validation_config


@dataclass
class TrainResult:
    """What a training run returns.

    Args:
        steps: the steps trained.
        losses: the global batch's mean loss of every step.
        validation: every validation's metrics, each with its ``step``.
        checkpoint: the checkpoint of the weights best on validation (``<out_dir>/checkpoint``).
        examples_per_second: examples of the global batches trained per second, over the steps this process ran.
    """

    steps: int
    losses: list[float]
    validation: list[dict]
    checkpoint: Path
    examples_per_second: float


@dataclass
class TrainerState:
    """What, beside weights and optimizer state, ``--resume`` needs to continue exactly.

    Args:
        step: the steps done.
        epoch, batch: the position of the next global batch.
        examples: the examples trained on.
        losses: the global batch's mean loss of every step read so far.
        validation: every validation's metrics, each with its ``step``.
        best: the best value of ``train.select_metric`` so far.
        best_step: the step of that validation.
        stale: validations since the last improvement (early stopping's count).
        stopped_early: whether early stopping ended the run.
    """

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


def train(cfg: Config, env: DistEnv, resume: str | Path | None = None) -> TrainResult:
    """Train one model (``model.members`` 1) on ``data.cache_dir``.

    Args:
        cfg: the run's validated config.
        env: the process group (:func:`twotower_rec.distributed.env.init_distributed`).
        resume: a checkpoint written with optimizer state (e.g. ``<out_dir>/last``) to continue
            from its step and data position, at this or any other world size; None: from scratch.
    """
    entered = time.perf_counter()
    threads_why = apply_thread_count(cfg.train.num_threads, env.local_world_size,
                                     prefetch_depth(cfg.train, env.device) > 0)
    use_tf32(cfg.train.tf32, env.device)
    data = PreparedData(cfg.data.cache_dir)
    task = make_task(cfg)
    check_setup(cfg, task, data, env)
    tensorboard = writes_curves(cfg.train.tensorboard, env)  # before the model: a refusal comes at once
    model = build_model(cfg, task, data, env)
    optimizer = build_optimizer(model, cfg.train)
    if env.is_main:
        print(env.describe(threads_why), file=sys.stderr, flush=True)
        print(sharding.describe_plan(model, cfg.sharding), file=sys.stderr, flush=True)
    state, task_state = TrainerState(), None
    if resume is not None:
        state, task_state = _resume(resume, cfg, model, optimizer, data, env)
    return Trainer(cfg, task, env, data, model, optimizer, state, task_state, entered, tensorboard).run()


def use_tf32(enabled: bool, device: torch.device) -> bool:
    """``train.tf32``: float32 matrix products in TF32 on a CUDA device (``"high"`` precision),
    for this process's training; evaluation and export are separate processes at full float32.

    Args:
        enabled: ``train.tf32``.
        device: the run's device; a CPU is left as it is.

    Returns:
        Whether TF32 is now on.
    """
    if not (enabled and device.type == "cuda"):
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def check_setup(cfg: Config, task: Task, data: PreparedData, env: DistEnv) -> None:
    """What the config can only be checked against with the data and the world size (the
    task's own checks included).

    Args:
        cfg: the run's config.
        task: the run's task.
        data: the prepared data.
        env: the process group.

    Raises:
        ConfigError: for the first check that fails.
    """
    data.check_config(cfg)
    world = env.world_size
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the world size "
                          f"{world}: the global batch is cut into one equal slice per process")
    train_rows = data.rows(TRAIN).size
    if train_rows < world:
        raise ConfigError(f"only {train_rows} training rows for {world} processes")
    task.check_data(data, env)


def _resume(resume: str | Path, cfg: Config, model: DistributedModelParallel, optimizer, data: PreparedData,
            env: DistEnv) -> tuple[TrainerState, dict | None]:
    """Weights, optimizer and RNG state from ``resume``, in place; the trainer state and the
    task's saved state (its loss's, e.g. the streaming frequency estimator) to continue from."""
    init_optimizer_state(optimizer, model)
    meta = checkpoint.load_for_resume(resume, model, optimizer, data, cfg)
    if env.is_main:
        print(f"resumed from {meta['path']} at step {meta['trainer']['step']} (written by "
              f"{meta['world_size']} process(es), now {env.world_size})", file=sys.stderr, flush=True)
    return TrainerState(**meta["trainer"]), meta["extra"]


class Trainer:
    """One run of the loop over a built (and possibly resumed) model and optimizer."""

    def __init__(self, cfg: Config, task: Task, env: DistEnv, data: PreparedData, model: DistributedModelParallel,
                 optimizer, state: TrainerState, task_state: dict | None = None, entered: float | None = None,
                 tensorboard: bool = False) -> None:
        """Args:
            cfg: the run's config.
            task: the run's task.
            env: the process group.
            data: the prepared data.
            model: the built (sharded) model.
            optimizer: the combined (fused table + dense) optimizer.
            state: where the run starts: a fresh :class:`TrainerState`, or a resumed one.
            task_state: the task's saved state (its loss's, e.g. the streaming frequency estimator); None: fresh.
            entered: the ``time.perf_counter()`` at which :func:`train` began, for the start-up time; None: not
                measured.
            tensorboard: whether this process writes the TensorBoard curves
                (:func:`~twotower_rec.train.tensorboard.writes_curves`: rank 0 at most).
        """
        self.cfg, self.task, self.env, self.data = cfg, task, env, data
        self.model, self.optimizer, self.state = model, optimizer, state
        self.entered = entered  # when train() began: start-up time is measured from it
        self.batcher = Batcher(data)
        self.num_examples = task.training_examples(self.batcher)
        self.out_dir = Path(cfg.train.out_dir)
        self.best_path, self.last_path = self.out_dir / "checkpoint", self.out_dir / "last"
        self.batches_per_epoch = num_global_batches(self.num_examples, cfg.train.batch_size)
        self.total_steps = self.batches_per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.metric = cfg.train.select_metric
        self.validation_cfg = validation_config(cfg.eval, cfg.train)
        shown = env.is_main and cfg.train.progress
        self.progress = tqdm(total=self.total_steps, initial=min(state.step, self.total_steps), desc="train",
                             unit="step", disable=not (shown and sys.stderr.isatty()), file=sys.stderr,
                             mininterval=1.0, dynamic_ncols=True)
        self.plain_progress = shown and not sys.stderr.isatty()  # a log file: plain lines, not a bar
        self.last_line = time.monotonic()
        task.start(data, env, state.step, task_state)
        self.loss_log = LossLog()
        self.tensorboard = tensorboard
        self.curves = NoCurves()  # run() opens the writer, and closes it however the run ends

    def run(self) -> TrainResult:
        """Steps until the last epoch, ``train.max_steps`` or early stopping; then a last
        validation (unless the last step just had one), ``last`` and ``train_metrics.json``."""
        self.curves = open_curves(self.out_dir, self.tensorboard, self.state.step)
        if self.curves.on:
            print(f"train: TensorBoard curves in {self.curves.folder} (tensorboard --logdir {self.curves.folder})",
                  file=sys.stderr, flush=True)
        try:
            return self._run()
        finally:
            self.curves.close()

    def _run(self) -> TrainResult:
        cfg, state = self.cfg, self.state
        batches = self._batches()
        started, examples_here = time.perf_counter(), 0
        # Loading the cache, building the model and the first epoch's order, before the first step.
        self.startup_seconds = started - self.entered if self.entered is not None else None
        stepper = Stepper(self.model, self.optimizer, self.task, batches, self.env, cfg.train.pipeline, cfg.train.bf16)
        self.model.train()
        try:
            while state.step < self.total_steps and not state.stopped_early and state.epoch < cfg.train.epochs:
                dense_lr = cfg.train.dense_lr * lr_factor(state.step, self.total_steps, cfg.train)
                set_dense_lr(self.optimizer, self.model, dense_lr)
                self.loss_log.add(stepper.step())
                examples = stepper.last_examples
                end_of_epoch = self._advance(examples)
                examples_here += examples
                if state.step % cfg.train.log_every_steps == 0 or state.step == self.total_steps:
                    self._read_losses()
                    rate = examples_here / max(time.perf_counter() - started, 1e-9)
                    self.progress.set_postfix(loss=f"{state.losses[-1]:.4f}", ex_s=f"{rate:,.0f}", refresh=False)
                    self._plain_line(state.losses[-1], rate)
                    self._log_curves(dense_lr, rate)
                self.progress.update(1)
                if state.step < self.total_steps:
                    self._between_steps(stepper, end_of_epoch)
            stepper.pause()
        finally:
            if isinstance(batches, BatchesAhead):
                batches.close()
        self._read_losses()
        self.progress.close()
        rate = examples_here / max(time.perf_counter() - started, 1e-9)
        if not state.validation or state.validation[-1]["step"] != state.step:
            self._validate_and_keep_best()
        self._save_last()
        return self._finish(rate)

    def _batches(self):
        """This rank's batches from the saved data position on (see ``batch_order.py``), built
        ``train.prefetch_batches`` ahead in a background thread."""
        train, task = self.cfg.train, self.task
        batches = local_batches(lambda examples, negatives: task.batch(self.batcher, examples, negatives, self.env),
                                self.num_examples, train.batch_size, train.epochs, train.seed,
                                task.negatives_per_batch(), self.data.spec.num_items, self.env, self.state.epoch,
                                self.state.batch)
        depth = prefetch_depth(train, self.env.device)
        if not depth:
            return batches
        return BatchesAhead(batches, depth, pin_memory=self.env.device.type == "cuda")

    def _read_losses(self) -> None:
        """Move the losses of the steps since the last read from the device into the state, and
        stop the run at the first that is not finite (read here, where the losses reach the host
        anyway: no sync of its own). Every rank reads the same all-reduced values, so all stop."""
        first_step = len(self.state.losses) + 1  # losses[i] is step i + 1's
        losses = self.loss_log.read()
        self.state.losses.extend(losses)
        for i, loss in enumerate(losses):  # every step's: they reach the host together, here
            self.curves.scalars(first_step + i, {"train/loss": loss})
        bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), None)
        if bad is not None:
            self.progress.close()
            kept = (f"; {self.last_path} keeps the last checkpoint saved before it"
                    if (self.last_path / checkpoint.META).is_file() else "")
            raise TrainingError(
                f"train: the loss is {losses[bad]} at step {first_step + bad} ({self.cfg.train.out_dir}): training "
                "diverged. Lower train.dense_lr / train.sparse_lr, or look for huge or infinite values in the data "
                f"(e.g. ratings){kept}")

    def _log_curves(self, dense_lr: float, rate: float) -> None:
        """The curves of a log step beside the loss: learning rates, examples/s and the task's
        summary (a learned temperature), read where the losses just reached the host."""
        if not self.curves.on:
            return  # the task's summary may read the device
        summary = {f"train/{name}": float(value) for name, value in self.task.train_summary(self.model).items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        self.curves.scalars(self.state.step, {"train/dense_lr": dense_lr, "train/table_lr": sharding.sparse_lr(
            self.cfg.train), "train/examples_per_second": rate, **summary})

    def _plain_line(self, loss: float, rate: float) -> None:
        """Progress as one plain line, every ``train.progress_every_seconds`` and at the end."""
        now, step, total = time.monotonic(), self.state.step, self.total_steps
        if self.plain_progress and (now - self.last_line >= self.cfg.train.progress_every_seconds or step == total):
            print(f"train: step {step}/{total} ({100 * step // max(total, 1)}%), loss {loss:.4f}, "
                  f"{rate:,.0f} examples/s", file=sys.stderr, flush=True)
            self.last_line = now

    def _advance(self, examples: int) -> bool:
        """Count one step over ``examples``; whether it ended an epoch."""
        state = self.state
        state.step += 1
        state.examples += examples
        state.batch += 1
        end_of_epoch = state.batch == self.batches_per_epoch
        if end_of_epoch:
            state.epoch, state.batch = state.epoch + 1, 0
        return end_of_epoch

    def _between_steps(self, stepper: Stepper, end_of_epoch: bool) -> None:
        """Validate and / or save ``last`` when the schedule says so."""
        step, train = self.state.step, self.cfg.train
        validating = (train.val_every_steps and step % train.val_every_steps == 0) or (
            not train.val_every_steps and end_of_epoch)
        saving = train.checkpoint_every_steps and step % train.checkpoint_every_steps == 0
        if validating or saving:
            stepper.pause()
            self._read_losses()
        if validating:
            self._validate_and_keep_best()
        if saving:
            self._save_last()

    def _validate_and_keep_best(self) -> None:
        """Validate; save the weights if they improved; set ``stopped_early`` when patience runs out."""
        state, metric = self.state, self.metric
        result = validate(self.model, self.data, self.batcher, self.validation_cfg, self.task, self.cfg.train.seed)
        state.validation.append({"step": state.step, **result})
        self.curves.scalars(state.step, validation_scalars(result))
        self.curves.flush()
        value = result[metric]
        improved = value > state.best
        if improved:
            state.best, state.best_step, state.stale = value, state.step, 0
            checkpoint.save(self.best_path, self.model, self.cfg, self.data, state.step,
                            {"validation": state.validation[-1]})
        else:
            state.stale += 1
        if self.env.is_main:
            self.progress.write(f"step {state.step}: validation recall@10 {result['recall@10']:.4f} "
                                f"ndcg@10 {result['ndcg@10']:.4f}"
                                + (f" {metric} {value:.4f}" if metric not in ("recall@10", "ndcg@10") else "")
                                + ("  (best: checkpoint saved)" if improved else ""))
        patience = self.cfg.train.early_stopping_patience
        state.stopped_early = bool(patience) and state.stale >= patience

    def _save_last(self) -> None:
        checkpoint.save(self.last_path, self.model, self.cfg, self.data, self.state.step, optimizer=self.optimizer,
                        trainer_state=asdict(self.state), extra=self.task.state_dict())

    def _finish(self, rate: float) -> TrainResult:
        """Write ``train_metrics.json`` and the summary line (rank 0)."""
        state, metric = self.state, self.metric
        metrics = {"steps": state.step, "final_loss": state.losses[-1] if state.losses else None,
                   "examples_per_second": rate, "startup_seconds": self.startup_seconds,
                   "world_size": self.env.world_size, "best_step": state.best_step,
                   f"best_validation_{metric}": state.best, "stopped_early": state.stopped_early,
                   "validation": state.validation, **self.task.train_summary(self.model)}
        if self.env.is_main:
            (self.out_dir / "train_metrics.json").write_text(json.dumps({**metrics, "losses": state.losses}, indent=2))
            final = f"{metrics['final_loss']:.4f}" if state.losses else "n/a"
            print(f"train: {state.step} steps, {rate:,.0f} examples/s, final loss {final}, "
                  f"best validation {metric} {state.best:.4f} at step {state.best_step}"
                  f"{' (stopped early)' if state.stopped_early else ''}; checkpoint {self.best_path}", file=sys.stderr)
        return TrainResult(state.step, state.losses, state.validation, self.best_path, rate)
