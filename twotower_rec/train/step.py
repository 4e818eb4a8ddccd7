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
from twotower_rec.distributed.env import DistEnv
from twotower_rec.losses.pointwise import pointwise_loss
from twotower_rec.losses.softmax import LossContext, retrieval_loss, sequence_loss


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
        loss = sequence_loss(query, item, batch.item_ids, batch.num_targets, batch.target_index,
                             batch.global_positions, temperature, loss_cfg, ctx)
    elif loss_cfg.name != "in_batch_softmax":
        loss = pointwise_loss(model, query, item, batch.labels, loss_cfg)
    else:
        temperature = model.module.temperature() if loss_cfg.learn_temperature else loss_cfg.temperature
        loss = retrieval_loss(query, item, batch.item_ids, temperature, loss_cfg, ctx)
    return loss, loss.detach()


def global_loss(local: torch.Tensor) -> float:
    """The mean over ranks of each rank's loss: the global batch's loss."""
    value = local.detach().float().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def train_step(model: DistributedModelParallel, optimizer, batch: Batch, loss_cfg: LossConfig, ctx: LossContext,
               bf16: bool = False) -> float:
    """One step on this rank's slice of a global batch; returns the global batch's mean loss."""
    with record_function("## forward + loss ##"):
        loss, value = forward_loss(model, batch, loss_cfg, ctx, bf16)
    with record_function("## backward (fused table update) ##"):
        loss.backward()
    with record_function("## dense optimizer ##"):
        optimizer.step()
        optimizer.zero_grad()
    return global_loss(value)


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

    def step(self) -> float:
        """One training step on the next batch; the global batch's mean loss."""
        if self.pipeline is None:
            batch = next(self.batches)
            self.last_examples = batch.global_positions if isinstance(batch, SequenceBatch) else 0
            return train_step(self.model, self.optimizer, batch.to(self.device), self.loss_cfg, self.ctx, self.bf16)
        return global_loss(self.pipeline.progress(self.batches))

    def pause(self) -> None:
        """Before the model is used outside the pipeline (validation, checkpoints, the end)."""
        if self.pipeline is not None:
            self.pipeline.detach()
