"""TwoTower: a query tower and an item tower.

``forward(batch) -> (query_emb [B, D], item_emb [B, D])``; ``encode_query(query_kjt)`` and
``encode_items(item_kjt, item_dense)`` embed one side (evaluation and export use them).
Both outputs are L2-normalised, so their dot product is the cosine similarity the loss,
evaluation and the exported index all use.

With ``features.share_item_table`` the history feature names the item tower's item-id
table: it is looked up in the item tower's collection and its pooled vector joins the query
tower's MLP input after the query tower's own features.

With ``model.user_encoder: causal`` the history's items, oldest first, are read by the causal
encoder (``model/causal.py``) from a table of their own (an EmbeddingCollection, sharded like
the others) or, with ``features.share_item_table``, from the item tower's item-id table (one
id per slot of a pooled bag); its state at the most recent item joins the query MLP's input
after the user features (``model.user_join: add``: summed with them). ``encode_positions``
gives the query at every scored position of a window (``train.examples: sequences``): ``P`` =
the number of scored positions of the batch's windows.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from twotower_rec.config import ModelConfig
from twotower_rec.data.batches import Batch, SequenceBatch, slot_kjt, with_keys
from twotower_rec.data.features import HISTORY, FeatureSpec
from twotower_rec.errors import ConfigError
from twotower_rec.model.causal import CausalEncoder
from twotower_rec.model.sequence import SEQUENCE_TABLE, SequenceEncoder
from twotower_rec.model.towers import Tower

# TorchRec's train pipeline traces ``forward`` with torch.fx to find each sharded collection's
# input; re-keying a KJT iterates its keys, which a trace cannot do. As a leaf call the
# re-keyed KJT is computed when the forward runs, and a collection fed by it is simply not
# pipelined (its ids are distributed inside the forward) instead of failing the trace.
torch.fx.wrap("with_keys")


class TwoTower(nn.Module):
    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, device: torch.device | None = None,
                 pointwise_head: bool = False, learned_temperature: float | None = None) -> None:
        super().__init__()
        # loss.learn_temperature: log of the softmax temperature, trained with the towers.
        self.log_temperature = (nn.Parameter(torch.tensor(float(np.log(learned_temperature))))
                                if learned_temperature is not None else None)
        # Pointwise objectives (BCE, MSE) score a pair as scale * cos(query, item) + bias.
        self.score_scale = nn.Parameter(torch.tensor(5.0)) if pointwise_head else None
        self.score_bias = nn.Parameter(torch.tensor(0.0)) if pointwise_head else None
        item_tables = {f.table for f in spec.item_features}
        sequence = cfg.user_encoder == "sequence" and HISTORY in spec.query_keys
        causal = cfg.user_encoder == "causal" and HISTORY in spec.query_keys
        query = [f for f in spec.query_features if not ((sequence or causal) and f.name == HISTORY)]
        own = [f for f in query if f.table not in item_tables]
        self.borrowed = [f.name for f in query if f.table in item_tables]
        self.sequence = None
        if sequence:
            shared = any(f.name == HISTORY and f.table in item_tables for f in spec.query_features)
            if HISTORY in self.borrowed or shared:
                raise ConfigError("model.user_encoder=sequence reads the history through its own table: "
                                  "it cannot be combined with features.share_item_table")
            self.sequence = SequenceEncoder(spec.num_items + 1, cfg.embedding_dim, spec.history_length,
                                            cfg.sequence_layers, cfg.sequence_heads, cfg.sequence_dropout, device)
        self.causal = None
        self.causal_shared = False  # the causal encoder reads the item tower's item-id table
        self.causal_items = None  # else this table of its own
        if causal:
            history = next(f for f in spec.query_features if f.name == HISTORY)
            self.causal_shared = history.table in item_tables
            if not self.causal_shared:
                self.causal_items = EmbeddingCollection(
                    tables=[EmbeddingConfig(name=SEQUENCE_TABLE, embedding_dim=cfg.embedding_dim,
                                            num_embeddings=spec.num_items + 1, feature_names=[HISTORY])],
                    device=device or torch.device("meta"))
            self.causal = CausalEncoder(cfg.embedding_dim, spec.history_length, cfg.sequence_layers,
                                        cfg.sequence_heads, cfg.sequence_dropout, cfg.history_mean)
        reads_history = sequence or causal
        # The order the query MLP sees its inputs: its own features, borrowed ones, the sequence.
        self.query_feature_order = [f.name for f in own] + self.borrowed + ([HISTORY] if reads_history else [])
        history_width = 2 if causal and cfg.history_mean else 1 if reads_history else 0
        extra = cfg.embedding_dim * (len(self.borrowed) + history_width)
        self.query_tower = Tower(own, cfg.embedding_dim, extra, cfg.mlp_dims, cfg.output_dim, cfg.dropout, device,
                                 join=cfg.user_join if causal else "concat")
        self.item_tower = Tower(spec.item_features, cfg.embedding_dim, len(spec.item_dense), cfg.mlp_dims,
                                cfg.output_dim, cfg.dropout, device,
                                lent_features=[f for f in spec.query_features if f.table in item_tables])

    def encode_query(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """Query KJT (B rows) -> ``[B, D]``."""
        if self.causal is not None:
            states, lengths = self._causal_states(features)
            return self.query_tower(self._own(features), self.causal.last(states, lengths))
        if not self.borrowed and self.sequence is None:
            return self.query_tower(features, features.values().new_zeros(features.stride(), 0).float())
        extra = []
        if self.borrowed:
            lent = with_keys(features, self.item_tower.collection_feature_names)
            extra += self.item_tower.pool(lent, self.borrowed)
        if self.sequence is not None:
            extra.append(self.sequence(with_keys(features, [HISTORY])))
        own = with_keys(features, self.query_tower.collection_feature_names)
        return self.query_tower(own, torch.cat(extra, dim=1))

    def encode_positions(self, features: KeyedJaggedTensor, first: torch.Tensor | None = None) -> torch.Tensor:
        """Query KJT of B windows (``history``: each window's input items, oldest first) ->
        ``[P, D]``: the query at every position from ``first`` ``[B]`` on (default 0: all),
        windows in order, positions oldest first."""
        states, lengths = self._causal_states(features)
        slots = torch.arange(states.shape[1], device=states.device).unsqueeze(0)
        valid = slots < lengths.unsqueeze(1)
        if first is not None:
            valid = valid & (slots >= first.unsqueeze(1))
            lengths = lengths - first
        pooled = self.query_tower.pool(self._own(features), self.query_tower.feature_names)  # F x [B, E]
        pooled = [p.repeat_interleave(lengths, dim=0) for p in pooled]  # F x [P, E]
        return self.query_tower.head(self.query_tower.joined(pooled, states[valid]))

    def _own(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor | None:
        """The query tower's own features of ``features`` (None when it has none)."""
        names = self.query_tower.collection_feature_names
        return with_keys(features, names) if names else None

    def _causal_states(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``[B, T, E]`` the causal encoder's state at every slot, ``[B]`` history lengths)."""
        history = features[HISTORY]
        lengths = history.lengths().long()
        if self.causal_shared:
            slots = slot_kjt(history, self.causal.max_length, self.item_tower.collection_feature_names, HISTORY)
            looked_up = self.item_tower.pool(slots, [HISTORY])[0]  # [B * T, E], zeros in empty slots
            padded = looked_up.view(lengths.shape[0], self.causal.max_length, -1)
        else:
            out = self.causal_items(with_keys(features, [HISTORY]))
            if hasattr(out, "wait"):  # a sharded collection returns an awaitable
                out = out.wait()
            padded = self.causal.pad(out[HISTORY].values(), lengths)
        return self.causal.encode(padded), lengths

    def encode_items(self, features: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """Item KJT (B rows) + ``[B, Dd]`` -> ``[B, D]``."""
        if self.borrowed or self.causal_shared:  # the collection also holds features lent to the query side
            features = with_keys(features, self.item_tower.collection_feature_names)
        return self.item_tower(features, dense)

    def temperature(self) -> torch.Tensor:
        """The learned softmax temperature (a scalar within [0.01, 1])."""
        return self.log_temperature.clamp(float(np.log(0.01)), 0.0).exp()

    def score(self, query: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` x ``[B, D]`` -> ``[B]``: the pointwise logit (BCE) or predicted rating (MSE)
        of each (query row, item row) pair."""
        return self.score_scale * (query * item).sum(dim=-1) + self.score_bias

    def forward(self, batch: Batch | SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of B queries and N items (B positives, then any sampled negatives) ->
        (``[B, D]`` queries, ``[N, D]`` items), rows of norm 1. A :class:`SequenceBatch` of
        windows gives ``[P, D]`` queries, one per position, and its ``[C, D]`` candidates."""
        if isinstance(batch, SequenceBatch):
            return (self.encode_positions(batch.query_features, batch.first_position),
                    self.encode_items(batch.item_features, batch.item_dense))
        return self.encode_query(batch.query_features), self.encode_items(batch.item_features, batch.item_dense)
