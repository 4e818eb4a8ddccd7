"""Ensemble: K independently trained TwoTower members that serve as one two-tower model.

Shapes: ``B`` rows, ``K`` members, ``D`` each member's output dim. ``encode_query`` and
``encode_items`` return ``[B, K * D]``: the members' L2-normalised embeddings side by side,
divided by ``sqrt(K)``. The result is again unit-length, and the dot product of a query and
an item is the mean of the members' cosines, so evaluation, the exported item embeddings and
the inner-product ANN index treat an ensemble like any other two-tower model.

Training keeps the members independent: the loss is the mean of each member's own in-batch
softmax (see ``trainer.forward_loss``), so a member's weights get gradients from its own
scores only. The members differ in their initial weights (their table keys differ, so
``sharding.init_tables`` draws different rows, and the MLPs are drawn one after another) and
share the batches.

Example::

    model = Ensemble([TwoTower(spec, cfg, torch.device("cpu")) for _ in range(3)])
    query = model.encode_query(query_kjt)   # [B, 3 * cfg.output_dim], rows of norm 1
    parts = model.split(query)              # 3 x [B, cfg.output_dim], rows of norm 1
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from twotower_rec.data.batches import Batch
from twotower_rec.model.two_tower import TwoTower


class Ensemble(nn.Module):
    def __init__(self, members: list[TwoTower]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.scale = 1.0 / math.sqrt(len(members))
        # what export and evaluation read from a two-tower model
        self.query_feature_order = list(members[0].query_feature_order)
        self.score_scale = None  # retrieval only: pointwise objectives train one TwoTower

    def _join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=1) * self.scale

    def split(self, joined: torch.Tensor) -> list[torch.Tensor]:
        """``[B, K * D]`` -> K x ``[B, D]``: each member's own unit-length embeddings."""
        return [part / self.scale for part in joined.chunk(len(self.members), dim=1)]

    def encode_query(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Query KJT (B rows) -> ``[B, K * D]``."""
        return self._join([member.encode_query(features) for member in self.members])

    def encode_items(self, features: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """Item KJT (B rows) + ``[B, Dd]`` -> ``[B, K * D]``."""
        return self._join([member.encode_items(features, dense) for member in self.members])

    def temperatures(self) -> list[torch.Tensor]:
        """Each member's learned softmax temperature (``loss.learn_temperature``)."""
        return [member.temperature() for member in self.members]

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_query(batch.query_features), self.encode_items(batch.item_features, batch.item_dense)
