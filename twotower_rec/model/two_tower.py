"""TwoTower: a query tower and an item tower; ``forward(batch) -> (query_emb [B, D], item_emb [B, D])``.

Both outputs are L2-normalised, so their dot product is the cosine similarity the loss,
evaluation and the exported index all use.
"""

from __future__ import annotations

import torch
from torch import nn

from twotower_rec.config import ModelConfig
from twotower_rec.data.batches import Batch
from twotower_rec.data.features import FeatureSpec
from twotower_rec.model.towers import Tower


class TwoTower(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, device: torch.device | None = None) -> None:
        super().__init__()
        self.query_tower = Tower(spec.query_features, cfg.embedding_dim, 0, cfg.mlp_dims, cfg.output_dim,
                                 cfg.dropout, device)
        self.item_tower = Tower(spec.item_features, cfg.embedding_dim, len(spec.item_dense), cfg.mlp_dims,
                                cfg.output_dim, cfg.dropout, device)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        query_dense = batch.item_dense.new_zeros(len(batch), 0)
        return (self.query_tower(batch.query_features, query_dense),
                self.item_tower(batch.item_features, batch.item_dense))
