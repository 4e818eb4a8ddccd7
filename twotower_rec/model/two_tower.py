"""TwoTower: a query tower and an item tower, given its history encoder and its task's head.

``forward(batch) -> (query_emb [B, D], item_emb [N, D])``; ``encode_query(query_kjt)`` and
``encode_items(item_kjt, item_dense)`` embed one side (evaluation and export use them).
Both outputs are L2-normalised, so their dot product is the cosine similarity the loss,
evaluation and the exported index all use.

The query MLP's input is, in this order: the query tower's own pooled features (the user's
side features, and the history bag when the history encoder is ``pooled``), the pooled features
borrowed from the item tower (``features.share_item_table``: the history names the item
tower's item-id table, so it is looked up in the item tower's collection), and the history
encoder's vectors (``model/history.py``). With ``every_position`` (``task: next_item``) the
forward gives the query at every scored position of a window instead (:meth:`encode_positions`):
``P`` = the number of scored positions of the batch's windows.

The batch is anything with ``query_features`` and ``item_features`` (KJTs), ``item_dense`` and,
for ``every_position``, ``first_position``: the model imports nothing of the data layer but the
feature spec.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from typing import TYPE_CHECKING

from twotower_rec.data.features import HISTORY, FeatureSpec
from twotower_rec.model.history import HistoryEncoder
from twotower_rec.model.kjt import with_keys
from twotower_rec.model.towers import Tower

if TYPE_CHECKING:
    from twotower_rec.config import ModelConfig

# TorchRec's train pipeline traces ``forward`` with torch.fx to find each sharded collection's
# input; re-keying a KJT iterates its keys, which a trace cannot do. As a leaf call the
# re-keyed KJT is computed when the forward runs, and a collection fed by it is simply not
# pipelined (its ids are distributed inside the forward) instead of failing the trace.
torch.fx.wrap("with_keys")


class TwoTower(nn.Module):
    """Query and item towers over one feature spec."""

    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, history: HistoryEncoder, head: nn.Module | None = None,
                 device: torch.device | None = None, every_position: bool = False) -> None:
        """Args:
            spec: the prepared data's features and tables.
            cfg: the model section (dims, MLP, dropout).
            history: how the query tower reads the history (``model/history.py``).
            head: the task's own parameters (a pointwise score, a learned temperature), or None.
            device: where tables are built (``meta`` by default: sharding materialises them).
            every_position: ``forward`` gives a query per scored position of each window
                (the history encoder must have ``states``: the causal one).
        """
        super().__init__()
        self.head = head
        self.history = history
        self.every_position = every_position
        item_tables = {f.table for f in spec.item_features}
        query = [f for f in spec.query_features if history.pooled or f.name != HISTORY]
        own = [f for f in query if f.table not in item_tables]
        self.borrowed = [f.name for f in query if f.table in item_tables]
        # The order the query MLP sees its inputs: its own features, borrowed ones, the history's vectors.
        self.query_feature_order = ([f.name for f in own] + self.borrowed
                                    + ([HISTORY] if history.vectors else []))
        extra = cfg.embedding_dim * (len(self.borrowed) + history.vectors)
        self.query_tower = Tower(own, cfg.embedding_dim, extra, cfg.mlp_dims, cfg.output_dim, cfg.dropout, device,
                                 join=history.join)
        lent = [f for f in spec.query_features if f.table in item_tables]
        self.item_tower = Tower(spec.item_features, cfg.embedding_dim, len(spec.item_dense), cfg.mlp_dims,
                                cfg.output_dim, cfg.dropout, device, lent_features=lent)
        # The query KJT feeds the query collection as it is when that holds exactly its keys
        # (so TorchRec's pipeline can distribute its ids ahead), else re-keyed; likewise items.
        self._query_kjt_whole = self.query_tower.collection_feature_names == spec.query_keys
        self._items_lend = bool(lent)

    def encode_query(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Query KJT (B rows) -> ``[B, D]``.

        Args:
            features: the query KJT: the query tower's features, any borrowed from the item tower, and the history.
        """
        extra = []
        if self.borrowed:
            lent = with_keys(features, self.item_tower.collection_feature_names)
            extra += self.item_tower.pool(lent, self.borrowed)
        if self.history.vectors:
            extra.append(self.history(features, self.item_tower))
        dense = torch.cat(extra, dim=1) if extra else features.values().new_zeros(features.stride(), 0).float()
        return self.query_tower(self._own(features), dense)

    def encode_positions(self, features: KeyedJaggedTensor, first: torch.Tensor | None = None,
                         positions: int | None = None) -> torch.Tensor:
        """Query KJT of B windows (``history``: each window's input items, oldest first) ->
        ``[P, D]``: the query at every position from ``first`` on, windows in order, positions oldest first.

        Args:
            features: the query KJT of B windows.
            first: ``[B]`` each window's first scored position; None: every position.
            positions: ``P``, when the caller knows it (a window batch does): then nothing waits
                for the device to count them (no host sync).
        """
        states, lengths = self.history.states(features, self.item_tower)
        scored = lengths - first if first is not None else lengths  # [B] positions each window scores
        if positions is None:
            positions = int(scored.sum())
        rows, slots = states.shape[0], states.shape[1]
        # the scored slots, window by window, oldest first: slot first[b] .. lengths[b] - 1 of row b
        window = torch.repeat_interleave(torch.arange(rows, device=states.device), scored, output_size=positions)
        starts = torch.cumsum(scored, 0) - scored
        slot = torch.arange(positions, device=states.device) - starts[window]
        if first is not None:
            slot = slot + first[window]
        chosen = states.reshape(rows * slots, -1)[window * slots + slot]  # [P, V * E]
        pooled = self.query_tower.pool(self._own(features), self.query_tower.feature_names)  # F x [B, E]
        pooled = [p.repeat_interleave(scored, dim=0, output_size=positions) for p in pooled]  # F x [P, E]
        return self.query_tower.head(self.query_tower.joined(pooled, chosen))

    def _own(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor | None:
        """The query tower's own features of ``features`` (None when it has none)."""
        if self._query_kjt_whole:
            return features
        names = self.query_tower.collection_feature_names
        return with_keys(features, names) if names else None

    def encode_items(self, features: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """Item KJT (B rows) + ``[B, Dd]`` -> ``[B, D]``.

        Args:
            features: the item KJT (B rows) of the item tower's own features.
            dense: ``[B, Dd]`` the items' dense features.
        """
        if self._items_lend:  # the collection also holds features lent to the query side
            features = with_keys(features, self.item_tower.collection_feature_names)
        return self.item_tower(features, dense)

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of B queries and N items (B positives, then any sampled negatives) ->
        (``[B, D]`` queries, ``[N, D]`` items), rows of norm 1. With ``every_position``, a batch
        of windows gives ``[P, D]`` queries, one per scored position, and its ``[C, D]`` candidates."""
        if self.every_position:
            query = self.encode_positions(batch.query_features, batch.first_position, batch.target_index.shape[0])
        else:
            query = self.encode_query(batch.query_features)
        return query, self.encode_items(batch.item_features, batch.item_dense)
