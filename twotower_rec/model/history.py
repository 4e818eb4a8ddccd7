"""The interface of a history encoder: how the query tower reads the ``history`` feature.

:class:`~twotower_rec.model.two_tower.TwoTower` is given one (as TorchRec modules are given
their EmbeddingBagCollection); there is one per file:

- ``model/bag.py``, :class:`BagHistory` (``model.history_encoder: bag``): the history is a
  mean-pooled bag in a tower's table, pooled with the other features; it adds no input.
- ``model/transformer.py``, :class:`TransformerHistory` (``transformer``): a transformer over the
  unpooled items, its output at the most recent one.
- ``model/causal.py``, :class:`CausalHistory` (``causal``): a causal transformer, oldest item
  first; a state at every position (``states``), the last one for a query.

Shapes: ``B`` query rows, ``T`` = ``features.history_length`` slots, ``E`` embedding dim,
``V`` = :attr:`HistoryEncoder.vectors`. Example, with a TwoTower's item tower ``item_tower``::

    vector = encoder(query_kjt, item_tower)     # [B, V * E], appended to the query MLP's input
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# The unpooled item table of the transformer and causal encoders (an EmbeddingCollection's).
UNPOOLED_TABLE = "t_history_sequence"


class HistoryEncoder(nn.Module):
    """Query KJT -> ``[B, V * E]``: the history's part of the query MLP's input.

    Attributes:
        pooled: True when the history is one more pooled feature of the towers' tables (the
            bag): it is then pooled, in feature order, with the user's side features, and
            ``forward`` is never called.
        vectors: ``V``, the E-wide vectors ``forward`` gives each row (0 for the bag).
        join: how the query MLP's inputs are combined: ``concat`` (side by side) or ``add``
            (summed into one E-wide vector; the causal encoder's ``model.user_join``).
    """

    pooled: bool = False
    vectors: int = 1
    join: str = "concat"

    def forward(self, features: KeyedJaggedTensor, item_tower: nn.Module) -> torch.Tensor:
        """The history's ``[B, V * E]`` at each row's most recent item.

        Args:
            features: the query KJT (``B`` rows; its ``history`` key holds each row's items,
                oldest first).
            item_tower: the model's item tower, whose tables a shared history reads
                (``features.share_item_table``).
        """
        raise NotImplementedError

    def for_serving(self, item_tables: dict[str, torch.Tensor]) -> tuple[torch.Tensor, nn.Module] | None:
        """What the exported query tower needs to compute ``forward`` without TorchRec: the
        ``[V_items + 1, E]`` table of the history's items and a scriptable module
        ``(values [N, E], lengths [B]) -> [B, V * E]``; None for a pooled history.

        Args:
            item_tables: the item tower's table weights by table name (a shared history reads one).
        """
        return None
