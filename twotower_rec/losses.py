"""Retrieval losses over L2-normalised embeddings.

Shapes: ``B`` rows, ``D`` embedding dim. ``query`` and ``item`` are ``[B, D]``; row ``b`` of
``item`` is the positive of row ``b`` of ``query`` and every other row is a negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def in_batch_softmax(
    query: torch.Tensor,
    item: torch.Tensor,
    temperature: float,
    item_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax with in-batch negatives: mean over rows of ``-log softmax(q·I / t)[b, b]``.

    With ``item_ids`` ``[B]``, a candidate whose id equals the row's positive id (an
    "accidental hit": the same item appears twice in the batch) is removed from that row's
    negatives, so the model is not pushed away from its own positive.
    """
    logits = query @ item.t() / temperature  # [B, B]
    if item_ids is not None:
        same = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, torch.finfo(logits.dtype).min)
    targets = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(logits, targets)
