"""One training step: the model's forward and its loss, the backward with the fused table
update, the dense optimizer step; one by one or through TorchRec's train pipeline.

Shapes: ``B`` this rank's rows of the global batch, ``D`` embedding dim.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.profiler import record_function
from torchrec.distributed import DistributedModelParallel

from twotower_rec.config import LossConfig
from twotower_rec.data.batches import Batch, SequenceBatch
from twotower_rec.data.features import HISTORY
from twotower_rec.distributed.env import DistEnv
from twotower_rec.losses.pointwise import pointwise_loss
from twotower_rec.losses.softmax import LossContext, future_positives, retrieval_loss, sequence_loss


def forward_loss(model: DistributedModelParallel, batch: Batch | SequenceBatch, loss_cfg: LossConfig, ctx: LossContext,
                 bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, its detached value) for this rank's slice of a global batch;
    the ``(losses, output)`` pair TorchRec's train pipelines expect from a forward.

    ``bf16`` autocasts the towers (``train.bf16``); the loss is computed in float32 either way.
    """
    autocast = torch.autocast(batch.item_ids.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        query, item = model(batch)  # [B, D], [B + negatives, D]
    query, item = query.float(), item.float()
    if isinstance(batch, SequenceBatch):  # [P, D] queries, one per position; [C, D] candidates
        temperature = model.module.temperature() if loss_cfg.learn_temperature else loss_cfg.temperature
        scored = batch.query_features[HISTORY].lengths().long() - batch.first_position  # [B] positions a window
        window_items = positives = None
        if loss_cfg.mask_window_items:  # [P, U]: each scored position's row of its window's items
            window_items = batch.window_items.repeat_interleave(scored, dim=0,
                                                                output_size=batch.target_index.shape[0])
        if loss_cfg.future_targets > 1:  # [P, k]: the next k targets of each position's window
            positives = future_positives(batch.target_index, scored, loss_cfg.future_targets)
        loss = sequence_loss(query, item, batch.item_ids, batch.num_targets, batch.target_index,
                             batch.global_positions, temperature, loss_cfg, ctx, window_items, positives)
    elif loss_cfg.name != "in_batch_softmax":
        loss = pointwise_loss(model, query, item, batch.labels, loss_cfg)
    else:
        temperature = model.module.temperature() if loss_cfg.learn_temperature else loss_cfg.temperature
        loss = retrieval_loss(query, item, batch.item_ids, temperature, loss_cfg, ctx)
    return loss, loss.detach()


class LossLog:
    """Per-step losses kept on the device until they are read: reading one means a host sync
    (and, at N ranks, an all-reduce), which would stall TorchRec's pipeline every step. So the
    trainer reads them every ``train.log_every_steps`` steps and before each validation or
    checkpoint: one all-reduce and one sync for all the steps since the last read."""

    def __init__(self) -> None:
        self.pending: list[torch.Tensor] = []

    def add(self, local: torch.Tensor) -> None:
        """This rank's loss of one step (a detached scalar, on the device)."""
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


def train_step(model: DistributedModelParallel, optimizer, batch: Batch, loss_cfg: LossConfig, ctx: LossContext,
               bf16: bool = False) -> torch.Tensor:
    """One step on this rank's slice of a global batch; returns this rank's loss, detached and
    on the device (no host sync: :class:`LossLog` reads it later)."""
    with record_function("## forward + loss ##"):
        loss, value = forward_loss(model, batch, loss_cfg, ctx, bf16)
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

    def __init__(self, model: DistributedModelParallel, optimizer, loss_cfg: LossConfig, ctx: LossContext,
                 batches: Iterator[Batch], env: DistEnv, pipeline: str = "auto", bf16: bool = False) -> None:
        self.model, self.optimizer, self.loss_cfg, self.ctx, self.bf16 = model, optimizer, loss_cfg, ctx, bf16
        self.batches, self.device = batches, env.device
        # positions in the global batch of the last step (train.examples=sequences); 0 otherwise
        self.last_examples = 0
        self.pipeline = None
        if pipeline == "always" or (pipeline == "auto" and env.device.type == "cuda"):
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            self.pipeline = TrainPipelineSparseDist(
                model, optimizer, env.device, execute_all_batches=True,
                custom_model_fwd=lambda b: forward_loss(model, b, loss_cfg, ctx, bf16))

    def step(self) -> torch.Tensor:
        """One training step on the next batch; this rank's loss on the device (see :class:`LossLog`)."""
        if self.pipeline is None:
            batch = next(self.batches)
            self.last_examples = batch.global_positions if isinstance(batch, SequenceBatch) else 0
            return train_step(self.model, self.optimizer, batch.to(self.device, non_blocking=True), self.loss_cfg,
                              self.ctx, self.bf16)
        return self.pipeline.progress(self.batches)

    def pause(self) -> None:
        """Before the model is used outside the pipeline (validation, checkpoints, the end)."""
        if self.pipeline is not None:
            self.pipeline.detach()
