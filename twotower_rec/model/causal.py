"""The causal history encoder (``model.history_encoder: causal``): one pass over a user's items,
oldest first, gives a state at every position that depends on that position and the ones
before it only.

Shapes: ``B`` rows (users or windows), ``T`` = ``max_length`` slots (``features.history_length``),
``E`` embedding dim, ``N`` = ``sum(lengths)`` items. Row ``b`` holds its items in slots
``0 .. lengths[b] - 1``, oldest first (right padding); slot ``t`` gets the learned position
embedding ``t``, counted from the window's start, so a position's input and its output do not
depend on how many items follow it. The layers are ``torch.nn.TransformerEncoderLayer``'s
(pre-norm, ReLU feed-forward): its parameters, initialisation and checkpoint keys, with a
forward pass of this module's own (:meth:`CausalEncoder.encode`) that computes what torch's
encoder computes with a causal and a padding mask (a test checks it) in fewer operations:
- the causal mask alone (slot ``t`` attends to slots ``<= t``): with right padding every pad
  slot comes after a row's items, so no valid slot reads one (pad slots' outputs are unused);
- dropout as one uniform draw and a compare (:meth:`CausalEncoder.drop`) instead of
  ``bernoulli_``, which is slow on CPU (docs/benchmarks-history.md, "Speed: the causal encoder's
  own pass, and what was not done").

Training with ``task: next_item`` reads every position (:meth:`CausalEncoder.encode`):
the output at slot ``t`` is the query that scores the item at ``t + 1``. Evaluation, export and
serving read the history strictly before the scored event and take the output at its most
recent item (:meth:`CausalEncoder.forward`), which is the training computation at that position.

:class:`CausalEncoder` is plain torch and scriptable: the exported query tower reuses it as it
is. :class:`CausalHistory` is the history encoder around it: the history's item table (an
EmbeddingCollection of its own, or with ``features.share_item_table`` the item tower's
item-id table, one id per slot of a pooled bag) and the encoder. Example::

    encoder = CausalEncoder(dim=8, max_length=4, layers=1, heads=2, dropout=0.0).eval()
    items = torch.randn(3, 8)                      # row 0: 2 items, row 1: 1 item
    encoder(items, torch.tensor([2, 1])).shape     # torch.Size([2, 8])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from twotower_rec.data.features import HISTORY
from twotower_rec.model.history import UNPOOLED_TABLE, HistoryEncoder
from twotower_rec.model.kjt import slot_kjt, with_keys

torch.fx.wrap("with_keys")  # leaves of TorchRec's pipeline trace (model/kjt.py)
torch.fx.wrap("slot_kjt")


class CausalEncoder(nn.Module):
    """Item embeddings of each row, oldest first -> a state per position (``encode``) or at the
    most recent item (``forward``)."""

    def __init__(self, dim: int, max_length: int, layers: int, heads: int, dropout: float,
                 with_mean: bool = False) -> None:
        """Args:
            dim: ``E``.
            max_length: ``T``, the slots of a row (``features.history_length``).
            layers, heads, dropout: the transformer's (``model.encoder_*``).
            with_mean: each state also carries the mean of the items up to it (``model.history_mean``).
        """
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
        self.p = dropout
        self.heads = heads
        # the layers hold the parameters; encode runs them, with its own dropout (drop), so theirs is 0
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout at ``model.encoder_dropout`` in training (identity in evaluation): a share p
        of the entries zeroed, the rest scaled by 1 / (1 - p), the mask drawn by ``rand_like``.

        Args:
            x: the activations, of any shape.
        """
        if not self.training or self.p == 0.0:
            return x
        return x * torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))  # the mask as 0 / 1 floats, in place

    def attend(self, x: torch.Tensor, in_weight: torch.Tensor, in_bias: torch.Tensor, out_weight: torch.Tensor,
               out_bias: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
        """``[B, T, E]`` -> ``[B, T, E]``: multi-head self-attention with a layer's ``self_attn``
        weights (passed as tensors: TorchScript types a module argument by its first compiled
        shape).

        Args:
            x: ``[B, T, E]`` the layer's normalised input.
            in_weight, in_bias: ``[3E, E]`` and ``[3E]``, the query, key and value projection (``in_proj_*``).
            out_weight, out_bias: ``[E, E]`` and ``[E]``, the output projection (``out_proj``).
            causal: ``[T, T]`` added to the scores: 0 on and below the diagonal, -inf above it.
        """
        rows, slots, dim = x.shape
        heads = self.heads
        qkv = F.linear(x, in_weight, in_bias)
        q, k, v = qkv.view(rows, slots, 3, heads, dim // heads).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, E/H]
        scores = torch.matmul(q, k.transpose(-2, -1)) * float(dim // heads) ** -0.5 + causal
        mixed = torch.matmul(self.drop(torch.softmax(scores, dim=-1)), v)  # [B, H, T, E / H]
        return F.linear(mixed.transpose(1, 2).reshape(rows, slots, dim), out_weight, out_bias)

    def encode(self, padded: torch.Tensor) -> torch.Tensor:
        """``[B, T, E]`` -> ``[B, T, E]`` (``with_mean``: ``[B, T, 2E]``, then the mean of the items in
        slots 0..t): slot t's output reads slots 0..t only (pad slots' outputs are unused).

        Args:
            padded: ``[B, T, E]`` each row's items in its first slots, oldest first, zeros after (:meth:`pad`).
        """
        slots = torch.arange(padded.shape[1], device=padded.device)
        x = self.drop(self.input_norm(padded + self.positions(slots).unsqueeze(0)))
        causal = torch.full((slots.shape[0], slots.shape[0]), float("-inf"), device=padded.device,
                            dtype=x.dtype).triu(1)
        for layer in self.encoder.layers:  # pre-norm TransformerEncoderLayer, ReLU
            attention = layer.self_attn
            x = x + self.drop(self.attend(layer.norm1(x), attention.in_proj_weight, attention.in_proj_bias,
                                          attention.out_proj.weight, attention.out_proj.bias, causal))
            x = x + self.drop(layer.linear2(self.drop(torch.relu(layer.linear1(layer.norm2(x))))))
        states = self.norm(x)
        if not self.with_mean:
            return states
        counts = (slots + 1).to(padded.dtype).view(1, -1, 1)
        return torch.cat([states, padded.cumsum(1) / counts], dim=2)

    def pad(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Jagged ``values`` ``[N, E]`` -> ``[B, T, E]`` right-padded with zeros (at most T per row:
        the callers never pass more).

        Args:
            values: ``[N, E]`` every row's items, row after row, each row's oldest first.
            lengths: ``[B]`` (long) each row's item count.
        """
        rows = lengths.shape[0]
        starts = torch.cumsum(lengths, 0) - lengths
        # output_size: the values' count, so the device need not tell the host (no sync)
        row = torch.repeat_interleave(torch.arange(rows, device=values.device), lengths, output_size=values.shape[0])
        col = torch.arange(values.shape[0], device=values.device) - starts[row]
        padded = values.new_zeros(rows, self.max_length, values.shape[1])
        padded[row, col] = values
        return padded

    def last(self, states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[B, T, E]`` states -> ``[B, E]`` the state at each row's most recent item (zeros when empty).

        Args:
            states: ``[B, T, E]`` (``with_mean``: ``[B, T, 2E]``) the states at every slot (:meth:`encode`).
            lengths: ``[B]`` (long) each row's item count: its most recent item is in slot ``lengths - 1``.
        """
        rows = torch.arange(states.shape[0], device=states.device)
        out = states[rows, (lengths - 1).clamp(min=0)]
        return out * (lengths > 0).unsqueeze(1).to(out.dtype)

    def forward(self, values: torch.Tensor, lengths: torch.Tensor, slotted: bool = False) -> torch.Tensor:
        """``values`` ``[N, E]`` (each row's items, oldest first), ``lengths`` ``[B]`` -> ``[B, E]``
        (``with_mean``: ``[B, 2E]``): the output at each row's most recent item. With ``slotted``,
        ``values`` is ``[B * T, E]`` instead: row b's t-th item at ``b * T + t``, zeros after its
        items. One module call, so TorchRec's pipeline trace keeps it whole (a leaf)."""
        lengths = lengths.long()
        padded = values.view(lengths.shape[0], self.max_length, -1) if slotted else self.pad(values, lengths)
        return self.last(self.encode(padded), lengths)


class CausalHistory(HistoryEncoder):
    """The history through :class:`CausalEncoder`: ``forward`` gives its state at each row's
    most recent item (``[B, V * E]``, ``V`` 2 with ``model.history_mean``), :meth:`states` the
    state at every slot (``task: next_item``)."""

    def __init__(self, num_embeddings: int, dim: int, max_length: int, layers: int, heads: int, dropout: float,
                 with_mean: bool = False, shared_table: str | None = None, join: str = "concat",
                 device: torch.device | None = None) -> None:
        """Args:
            num_embeddings: rows of its own item table (items + 1, row 0 unknown).
            dim, max_length, layers, heads, dropout, with_mean: the :class:`CausalEncoder`'s.
            shared_table: the item tower's table the history reads (``features.share_item_table``),
                or None for a table of its own.
            join: ``model.user_join``.
            device: where its own table is built (``meta`` by default).
        """
        super().__init__()
        self.shared_table = shared_table
        self.items = None if shared_table else EmbeddingCollection(
            tables=[EmbeddingConfig(name=UNPOOLED_TABLE, embedding_dim=dim, num_embeddings=num_embeddings,
                                    feature_names=[HISTORY])],
            device=device or torch.device("meta"))
        self.encoder = CausalEncoder(dim, max_length, layers, heads, dropout, with_mean)
        self.vectors = 2 if with_mean else 1
        self.join = join

    @classmethod
    def build(cls, spec, cfg, device=None) -> "CausalHistory":
        """From the feature spec and the model section.

        Args:
            spec: the feature spec: the catalog size, ``T``, and the history feature's table (one naming an
                item-tower table shares it).
            cfg: the ``model`` section (``embedding_dim``, ``encoder_*``, ``history_mean``, ``user_join``).
            device: where its own table is built (``meta`` when None).
        """
        history = next(f for f in spec.query_features if f.name == HISTORY)
        shared = history.table if history.table in {f.table for f in spec.item_features} else None
        return cls(spec.num_items + 1, cfg.embedding_dim, spec.history_length, cfg.encoder_layers, cfg.encoder_heads,
                   cfg.encoder_dropout, cfg.history_mean, shared, cfg.user_join, device)

    def states(self, features: KeyedJaggedTensor, item_tower: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(``[B, T, V * E]`` the encoder's state at every slot, ``[B]`` history lengths).

        Args:
            features: the query KJT (``B`` rows; its ``history`` key holds each row's items, oldest first).
            item_tower: the model's item tower, whose table a shared history reads (``features.share_item_table``).
        """
        values, lengths = self._items(features, item_tower)
        lengths = lengths.long()
        if self.shared_table:
            padded = values.view(lengths.shape[0], self.encoder.max_length, -1)
        else:
            padded = self.encoder.pad(values, lengths)
        return self.encoder.encode(padded), lengths

    def _items(self, features: KeyedJaggedTensor, item_tower: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The history's item embeddings, ``[N, E]`` jagged (a table of its own) or ``[B * T, E]``
        one per slot (the item tower's, looked up slot by slot), and ``[B]`` lengths."""
        history = features[HISTORY]
        if self.shared_table:
            slots = slot_kjt(history, self.encoder.max_length, item_tower.collection_feature_names, HISTORY)
            return item_tower.pool(slots, [HISTORY])[0], history.lengths()  # zeros in empty slots
        out = self.items(with_keys(features, [HISTORY]))
        if hasattr(out, "wait"):  # a sharded collection returns an awaitable
            out = out.wait()
        return out[HISTORY].values(), history.lengths()

    def forward(self, features: KeyedJaggedTensor, item_tower: nn.Module) -> torch.Tensor:
        # the encoder as one module call: TorchRec's pipeline trace does not enter it (it cannot
        # trace the padding's item assignment nor the shapes' arithmetic)
        values, lengths = self._items(features, item_tower)
        return self.encoder(values, lengths, self.shared_table is not None)

    def for_serving(self, item_tables):
        table = item_tables[self.shared_table] if self.shared_table else self.items.embeddings[UNPOOLED_TABLE].weight
        return table.detach(), self.encoder
