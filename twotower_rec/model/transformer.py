"""The per-event transformer (``model.history_encoder: transformer``), SASRec-style.

The pooled bag forgets which item came last. Here the history's items are looked up unpooled
in a TorchRec ``EmbeddingCollection`` (shardable like the bags), given a learned position
embedding counted from the most recent item (0 = the last item before the event), passed
through a small transformer encoder, and the output at the most recent item is the history's
vector. Every item in the history precedes the event, so attention over all of them leaks
nothing. One transformer pass per event: the causal encoder (``model/causal.py``) reads every
position of a window in one pass instead.

:class:`TransformerPooling` is plain torch and scriptable: the exported query tower reuses it,
its :meth:`~TransformerPooling.layers` run through torch's fused operator as eager evaluation
runs them (``export/query_encoder.py``), so serving computes exactly what evaluation does.

Shapes: ``B`` rows, ``T`` = ``max_length``, ``E`` embedding dim, ``N`` = ``sum(lengths)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from twotower_rec.data.features import HISTORY
from twotower_rec.model.history import UNPOOLED_TABLE, HistoryEncoder
from twotower_rec.model.kjt import with_keys

torch.fx.wrap("with_keys")  # a leaf of TorchRec's pipeline trace (model/kjt.py)


class TransformerPooling(nn.Module):
    """``(values [N, E], lengths [B])`` of per-row item embeddings, oldest first -> ``[B, E]``."""

    def __init__(self, dim: int, max_length: int, layers: int, heads: int, dropout: float) -> None:
        """Args:
            dim: ``E``.
            max_length: ``T``, the most items a row has.
            layers, heads, dropout: the transformer's (``model.encoder_*``).
        """
        super().__init__()
        self.max_length = max_length
        self.positions = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``values`` ``[sum(lengths), E]`` (each row's items, oldest first), ``lengths`` ``[B]``
        -> ``[B, E]``: the encoder's output at each row's most recent item (zeros when empty)."""
        lengths = lengths.long().clamp(max=self.max_length)
        rows = lengths.shape[0]
        dim = values.shape[1]
        starts = torch.cumsum(lengths, 0) - lengths
        # output_size: the values' count (no row holds more than max_length: the query inputs cut
        # the history there), so the device need not tell the host (no sync)
        row = torch.repeat_interleave(torch.arange(rows, device=values.device), lengths, output_size=values.shape[0])
        col = torch.arange(values.shape[0], device=values.device) - starts[row]
        padded = values.new_zeros(rows, self.max_length, dim)
        padded[row, col] = values
        slots = torch.arange(self.max_length, device=values.device).unsqueeze(0)
        # position 0 = the most recent item; pads get position 0 too but are masked out
        recency = (lengths.unsqueeze(1) - 1 - slots).clamp(min=0)
        x = padded + self.positions(recency)
        pad = slots >= lengths.unsqueeze(1)
        pad[:, 0] = pad[:, 0] & (lengths > 0)  # an empty history attends to one zero slot, not to nothing
        out = self.norm(self.layers(x, pad))
        last = out[torch.arange(rows, device=values.device), (lengths - 1).clamp(min=0)]
        return last * (lengths > 0).unsqueeze(1).to(last.dtype)

    def layers(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """``[B, T, E]`` -> ``[B, T, E]``: the encoder's layers, ``pad`` ``[B, T]`` (True: a pad slot) masked out.

        Args:
            x: ``[B, T, E]`` each row's items with their position embeddings, zeros in pad slots.
            pad: ``[B, T]`` bool, the slots attention ignores.
        """
        return self.encoder(x, src_key_padding_mask=pad)


class TransformerHistory(HistoryEncoder):
    """History KJT (key ``history``) -> ``[B, E]`` via an EmbeddingCollection of its own and
    :class:`TransformerPooling`."""

    def __init__(self, num_embeddings: int, dim: int, max_length: int, layers: int, heads: int, dropout: float,
                 device: torch.device | None = None) -> None:
        """Args:
            num_embeddings: rows of its item table (items + 1, row 0 unknown).
            dim: ``E``.
            max_length: ``T`` (``features.history_length``).
            layers, heads, dropout: the transformer's (``model.encoder_*``).
            device: where the table is built (``meta`` by default: sharding materialises it).
        """
        super().__init__()
        self.embeddings = EmbeddingCollection(
            tables=[EmbeddingConfig(name=UNPOOLED_TABLE, embedding_dim=dim, num_embeddings=num_embeddings,
                                    feature_names=[HISTORY])],
            device=device or torch.device("meta"))
        self.pooling = TransformerPooling(dim, max_length, layers, heads, dropout)

    @classmethod
    def build(cls, spec, cfg, device=None) -> "TransformerHistory":
        """From the feature spec and the model section (``model.encoder_*``).

        Args:
            spec: the feature spec (the catalog size and ``features.history_length``).
            cfg: the ``model`` section (``embedding_dim``, ``encoder_layers``, ``encoder_heads``, ``encoder_dropout``).
            device: where the table is built (``meta`` when None).
        """
        return cls(spec.num_items + 1, cfg.embedding_dim, spec.history_length, cfg.encoder_layers,
                   cfg.encoder_heads, cfg.encoder_dropout, device)

    def forward(self, features: KeyedJaggedTensor, item_tower: nn.Module) -> torch.Tensor:
        out = self.embeddings(with_keys(features, [HISTORY]))
        if hasattr(out, "wait"):  # a sharded collection returns an awaitable
            out = out.wait()
        jagged = out[HISTORY]
        return self.pooling(jagged.values(), jagged.lengths())

    def for_serving(self, item_tables):
        return self.embeddings.embeddings[UNPOOLED_TABLE].weight.detach(), self.pooling
