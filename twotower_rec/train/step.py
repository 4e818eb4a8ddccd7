"""One training step: the model's forward and its loss, the backward with the fused table
update, the dense optimizer step; one by one or through TorchRec's train pipeline.

Shapes: ``B`` this rank's rows of the global batch, ``D`` embedding dim.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.profiler import record_function
from torchrec.distributed import DistributedModelParallel

from twotower_rec.distributed.env import DistEnv

if TYPE_CHECKING:
    from twotower_rec.tasks import Task


def forward_loss(model: DistributedModelParallel, batch: Any, task: Task,
                 bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, its detached value) for this rank's slice of a global batch;
    the ``(losses, output)`` pair TorchRec's train pipelines expect from a forward.

    Args:
        model: the sharded model.
        batch: this rank's batch (the task's).
        task: the run's task, which computes the loss of the embeddings.
        bf16: autocast the towers (``train.bf16``); the loss is computed in float32 either way.
    """
    autocast = torch.autocast(batch.item_ids.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        query, item = model(batch)  # [B, D] (or [P, D], one per position), [B + negatives, D]
    loss = task.loss(model, query.float(), item.float(), batch)
    return loss, loss.detach()


class LossLog:
    """Per-step losses kept on the device until they are read: reading one means a host sync
    (and, at N ranks, an all-reduce), which would stall TorchRec's pipeline every step. So the
    trainer reads them every ``train.log_every_steps`` steps and before each validation or
    checkpoint: one all-reduce and one sync for all the steps since the last read."""

    def __init__(self) -> None:
        self.pending: list[torch.Tensor] = []

    def add(self, local: torch.Tensor) -> None:
        """This rank's loss of one step (a detached scalar, on the device).

        Args:
            local: the step's loss, a scalar tensor (kept on its device).
        """
        self.pending.append(local.detach().float().reshape(()))

    def read(self) -> list[float]:
        """The global batch's mean loss of each step added since the last read (a collective)."""
        if not self.pending:
            return []
        values = torch.stack(self.pending)
        self.pending = []
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
            values /= dist.get_world_size()
        return values.tolist()


def train_step(model: DistributedModelParallel, optimizer, batch: Any, task: Task, bf16: bool = False) -> torch.Tensor:
    """One step on this rank's slice of a global batch; returns this rank's loss, detached and
    on the device (no host sync: :class:`LossLog` reads it later).

    Args:
        model: the sharded model.
        optimizer: the combined (fused table + dense) optimizer: its dense step; the table update runs in the backward.
        batch: this rank's batch (the task's), on the device.
        task: the run's task, which computes the loss of the embeddings.
        bf16: autocast the towers (``train.bf16``).
    """
    with record_function("## forward + loss ##"):
        loss, value = forward_loss(model, batch, task, bf16)
    with record_function("## backward (fused table update) ##"):
        loss.backward()
    with record_function("## dense optimizer ##"):
        optimizer.step()
        optimizer.zero_grad()
    return value


class Stepper:
    """Runs training steps either one by one or through TorchRec's ``TrainPipelineSparseDist``,
    which overlaps the copy of batch i+2 to the device and the id all-to-all of batch i+1 with
    the forward and backward of batch i. The pipeline reads batches ahead of the step count,
    which stays the data position: a resumed run restarts from the first batch not trained."""

    def __init__(self, model: DistributedModelParallel, optimizer, task: Task, batches: Iterator[Any], env: DistEnv,
                 pipeline: str = "auto", bf16: bool = False) -> None:
        """Args:
            model: the sharded model.
            optimizer: the combined (fused table + dense) optimizer.
            task: the run's task: its loss, and whether the pipeline may run it (``task.pipelined``).
            batches: this rank's batches.
            env: the process group.
            pipeline: ``train.pipeline``.
            bf16: ``train.bf16``.
        """
        self.model, self.optimizer, self.task, self.bf16 = model, optimizer, task, bf16
        self.batches, self.device = batches, env.device
        # examples of the global batch of the last step (the task's count)
        self.last_examples = task.cfg.train.batch_size
        self.pipeline = None
        if task.pipelined and (pipeline == "always" or (pipeline == "auto" and env.device.type == "cuda")):
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            self.pipeline = TrainPipelineSparseDist(
                model, optimizer, env.device, execute_all_batches=True,
                custom_model_fwd=lambda b: forward_loss(model, b, task, bf16))

    def step(self) -> torch.Tensor:
        """One training step on the next batch; this rank's loss on the device (see :class:`LossLog`)."""
        if self.pipeline is None:
            batch = next(self.batches)
            self.last_examples = self.task.step_examples(batch)
            return train_step(self.model, self.optimizer, batch.to(self.device, non_blocking=True), self.task,
                              self.bf16)
        return self.pipeline.progress(self.batches)

    def pause(self) -> None:
        """Before the model is used outside the pipeline (validation, checkpoints, the end)."""
        if self.pipeline is not None:
            self.pipeline.detach()
