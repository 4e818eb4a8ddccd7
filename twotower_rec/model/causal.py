"""The causal sequence encoder (``model.user_encoder: causal``): one pass over a user's items,
oldest first, gives a state at every position that depends on that position and the ones
before it only.

Shapes: ``B`` rows (users or windows), ``T`` = ``max_length`` slots (``features.history_length``),
``E`` embedding dim, ``N`` = ``sum(lengths)`` items. Row ``b`` holds its items in slots
``0 .. lengths[b] - 1``, oldest first (right padding); slot ``t`` gets the learned position
embedding ``t``, counted from the window's start, so a position's input and its output do not
depend on how many items follow it. A causal mask (slot ``t`` attends to slots ``<= t``) and a
padding mask feed ``torch.nn.TransformerEncoder``.

Training with ``train.examples: sequences`` reads every position (:meth:`CausalEncoder.encode`):
the output at slot ``t`` is the query that scores the item at ``t + 1``. Evaluation, export and
serving read the history strictly before the scored event and take the output at its most
recent item (:meth:`CausalEncoder.forward`), which is the training computation at that position.

Plain torch and scriptable: the exported query tower reuses this module as it is. Example::

    encoder = CausalEncoder(dim=8, max_length=4, layers=1, heads=2, dropout=0.0).eval()
    items = torch.randn(3, 8)                      # row 0: 2 items, row 1: 1 item
    encoder(items, torch.tensor([2, 1])).shape     # torch.Size([2, 8])
"""

from __future__ import annotations

import torch
from torch import nn


class CausalEncoder(nn.Module):
    """Item embeddings of each row, oldest first -> a state per position (``encode``) or at the
    most recent item (``forward``)."""

    def __init__(self, dim: int, max_length: int, layers: int, heads: int, dropout: float,
                 with_mean: bool = False) -> None:
        super().__init__()
        self.max_length = max_length
        # model.history_mean: each slot's state also carries the mean of the items up to it (a
        # pooled bag of the window so far, beside what attention makes of the order)
        self.with_mean = with_mean
        self.positions = nn.Embedding(max_length, dim)
        # The item tables start at U(+-1/sqrt(rows)); positions on the same small scale, so they do
        # not drown the items at the start of training.
        nn.init.normal_(self.positions.weight, std=0.01)
        self.input_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def encode(self, padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``padded`` ``[B, T, E]`` (row b's items in slots ``< lengths[b]``), ``lengths`` ``[B]``
        -> ``[B, T, E]`` (``with_mean``: ``[B, T, 2E]``, then the mean of the items in slots 0..t):
        slot t's output reads slots 0..t only (pad slots' outputs are unused)."""
        slots = torch.arange(padded.shape[1], device=padded.device)
        x = self.dropout(self.input_norm(padded + self.positions(slots).unsqueeze(0)))
        causal = slots.unsqueeze(0) > slots.unsqueeze(1)  # [T, T]: True = may not attend (a later slot)
        pad = slots.unsqueeze(0) >= lengths.unsqueeze(1)  # [B, T]
        pad[:, 0] = pad[:, 0] & (lengths > 0)  # an empty row attends to one zero slot, not to nothing
        states = self.norm(self.encoder(x, mask=causal, src_key_padding_mask=pad))
        if not self.with_mean:
            return states
        counts = (slots + 1).to(padded.dtype).view(1, -1, 1)
        return torch.cat([states, padded.cumsum(1) / counts], dim=2)

    def pad(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Jagged ``values`` ``[N, E]`` -> ``[B, T, E]`` right-padded with zeros (at most T per row:
        the callers never pass more)."""
        rows = lengths.shape[0]
        starts = torch.cumsum(lengths, 0) - lengths
        row = torch.repeat_interleave(torch.arange(rows, device=values.device), lengths)
        col = torch.arange(values.shape[0], device=values.device) - starts[row]
        padded = values.new_zeros(rows, self.max_length, values.shape[1])
        padded[row, col] = values
        return padded

    def last(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, T, E]`` states -> ``[B, E]`` the state at each row's most recent item (zeros when empty)."""
        rows = torch.arange(states.shape[0], device=states.device)
        out = states[rows, (lengths - 1).clamp(min=0)]
        return out * (lengths > 0).unsqueeze(1).to(out.dtype)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``values`` ``[N, E]`` (each row's items, oldest first), ``lengths`` ``[B]`` -> ``[B, E]``
        (``with_mean``: ``[B, 2E]``): the output at each row's most recent item."""
        lengths = lengths.long()
        return self.last(self.encode(self.pad(values, lengths), lengths), lengths)
