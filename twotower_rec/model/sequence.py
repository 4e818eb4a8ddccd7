"""A sequence-aware encoder of the history (``model.user_encoder: sequence``), SASRec-style.

The pooled history bag forgets which item came last. Here the history's items are looked up
unpooled in a TorchRec ``EmbeddingCollection`` (shardable like the bags), given a learned
position embedding counted from the most recent item (0 = the last item before the event),
passed through a small transformer encoder, and the output at the most recent item is the
history's vector. Every item in the history precedes the event, so attention over all of
them leaks nothing.

:class:`SequencePooling` is plain torch and scriptable: the exported query tower reuses it
as it is, so serving computes exactly what training does.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from twotower_rec.data.features import HISTORY

SEQUENCE_TABLE = "t_history_sequence"


class SequencePooling(nn.Module):
    """``(values [N, E], lengths [B])`` of per-row item embeddings, oldest first -> ``[B, E]``."""

    def __init__(self, dim: int, max_length: int, layers: int, heads: int, dropout: float) -> None:
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
        row = torch.repeat_interleave(torch.arange(rows, device=values.device), lengths)
        col = torch.arange(values.shape[0], device=values.device) - starts[row]
        padded = values.new_zeros(rows, self.max_length, dim)
        padded[row, col] = values[: row.shape[0]]
        slots = torch.arange(self.max_length, device=values.device).unsqueeze(0)
        # position 0 = the most recent item; pads get position 0 too but are masked out
        recency = (lengths.unsqueeze(1) - 1 - slots).clamp(min=0)
        x = padded + self.positions(recency)
        pad = slots >= lengths.unsqueeze(1)
        pad[:, 0] = pad[:, 0] & (lengths > 0)  # an empty history attends to one zero slot, not to nothing
        out = self.norm(self.encoder(x, src_key_padding_mask=pad))
        last = out[torch.arange(rows, device=values.device), (lengths - 1).clamp(min=0)]
        return last * (lengths > 0).unsqueeze(1).to(last.dtype)


class SequenceEncoder(nn.Module):
    """History KJT (key ``history``) -> ``[B, E]`` via an EmbeddingCollection and :class:`SequencePooling`."""

    def __init__(self, num_embeddings: int, dim: int, max_length: int, layers: int, heads: int, dropout: float,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.embeddings = EmbeddingCollection(
            tables=[EmbeddingConfig(name=SEQUENCE_TABLE, embedding_dim=dim, num_embeddings=num_embeddings,
                                    feature_names=[HISTORY])],
            device=device or torch.device("meta"))
        self.pooling = SequencePooling(dim, max_length, layers, heads, dropout)

    def forward(self, history: KeyedJaggedTensor) -> torch.Tensor:
        """History KJT (key ``history``, B rows) -> ``[B, E]``."""
        out = self.embeddings(history)
        if hasattr(out, "wait"):  # a sharded collection returns an awaitable
            out = out.wait()
        jagged = out[HISTORY]
        return self.pooling(jagged.values(), jagged.lengths())
