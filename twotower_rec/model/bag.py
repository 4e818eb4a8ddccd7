"""The pooled bag (``model.history_encoder: bag``, the default): the history's items, mean-pooled.

The bag is an ordinary pooled feature of a tower's EmbeddingBagCollection (the query tower's
``t_history`` table, or with ``features.share_item_table`` the item tower's item-id table),
pooled in feature order with the user's side features. So this encoder has no parameters and
adds no input of its own (``pooled``); it exists so every history encoder is chosen the same way.
"""

from __future__ import annotations

from twotower_rec.model.history import HistoryEncoder


class BagHistory(HistoryEncoder):
    """The history as a mean-pooled bag of a tower's table (see the module docstring)."""

    pooled = True
    vectors = 0

    @classmethod
    def build(cls, spec, cfg, device=None) -> "BagHistory":
        """The bag encoder; its arguments are unused (every encoder is built alike).

        Args:
            spec: the feature spec.
            cfg: the ``model`` section.
            device: where tables go.
        """
        return cls()
