"""Ensemble: K independently trained TwoTower members that serve as one two-tower model.

Shapes: ``B`` rows, ``K`` members, ``D`` each member's output dim. ``encode_query`` and
``encode_items`` return ``[B, K * D]``: the members' L2-normalised embeddings side by side,
divided by ``sqrt(K)``. The result is again unit-length, and the dot product of a query and
an item is the mean of the members' cosines, so evaluation, the exported item embeddings and
the inner-product ANN index treat an ensemble like any other two-tower model.

The members are trained apart, each as an ordinary run with its own seed, batch order and
early stop (``twotower_rec/train/ensemble.py``), and loaded side by side into this module.

Example::

    model = Ensemble([TwoTower(spec, cfg, BagHistory(), device=torch.device("cpu")) for _ in range(3)])
    query = model.encode_query(query_kjt)   # [B, 3 * cfg.output_dim], rows of norm 1
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from twotower_rec.model.two_tower import TwoTower


class Ensemble(nn.Module):
    def __init__(self, members: list[TwoTower]) -> None:
        """Args:
            members: the ``K`` >= 2 trained retrieval models, of one feature spec and output dim ``D``.
        """
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.scale = 1.0 / math.sqrt(len(members))
        # what export and evaluation read from a two-tower model
        self.query_feature_order = list(members[0].query_feature_order)
        self.head = None  # ensembles are of retrieval members, whose head (if any) serves no score

    def _join(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=1) * self.scale

    def encode_query(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Query KJT (B rows) -> ``[B, K * D]``.

        Args:
            features: the query KJT, as every member's :meth:`TwoTower.encode_query` takes it.
        """
        return self._join([member.encode_query(features) for member in self.members])

    def encode_items(self, features: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """Item KJT (B rows) + ``[B, Dd]`` -> ``[B, K * D]``.

        Args:
            features: the item KJT (B rows).
            dense: ``[B, Dd]`` the items' dense features.
        """
        return self._join([member.encode_items(features, dense) for member in self.members])

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of B queries and N items -> (``[B, K * D]`` queries, ``[N, K * D]`` items)."""
        return self.encode_query(batch.query_features), self.encode_items(batch.item_features, batch.item_dense)
