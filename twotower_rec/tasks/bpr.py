"""``task: bpr``: Bayesian personalised ranking (Rendle et al. 2009) with in-batch negatives.

One example per training interaction, as ``retrieval``; the loss is pairwise instead of a
softmax: each query's positive against every other item of the (global) batch and the
``loss.uniform_negatives`` uniform items, the mean over those pairs of
``-log sigmoid((s(q, positive) - s(q, negative)) / loss.temperature)``, with candidates equal
to the row's positive left out (``loss.mask_accidental_hits``). It reads these options of the
shared ``loss`` section and no logQ: BPR scores pairs, not a distribution over candidates.
Users compare retrieval models against it; this file is the whole task.

Shapes: ``B`` this rank's rows, ``N`` the candidates (every rank's positives, then the uniform
negatives), ``D`` embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from twotower_rec.losses.softmax import gather_candidates
from twotower_rec.tasks.base import EventTask, check_uniform_share


def bpr_loss(query: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, temperature: float,
             global_negatives: bool = True, mask_accidental_hits: bool = True) -> torch.Tensor:
    """The mean over this rank's rows of each row's mean BPR loss over its negatives.

    Args:
        query: ``[B, D]`` this rank's queries.
        item: ``[B + M, D]`` this rank's positives (row b's at b), then its uniform negatives.
        item_ids: ``[B + M]`` their item codes.
        temperature: the scale of the score differences.
        global_negatives: every rank's candidates are every row's negatives (gathered).
        mask_accidental_hits: leave out candidates with the row's positive item code.
    """
    rows = query.shape[0]
    positives, positive_ids = item[:rows], item_ids[:rows]
    negatives, negative_ids = item[rows:], item_ids[rows:]
    offset = 0
    if global_negatives:
        positives, positive_ids, offset = gather_candidates(positives, positive_ids)
        if negatives.shape[0]:
            negatives, negative_ids, _ = gather_candidates(negatives, negative_ids)
    candidates, ids = torch.cat([positives, negatives]), torch.cat([positive_ids, negative_ids])
    own = torch.arange(rows, device=query.device) + offset
    positive = (query * candidates[own]).sum(dim=1, keepdim=True)  # [B, 1]
    margins = (positive - query @ candidates.t()) / temperature  # [B, N]
    keep = torch.ones_like(margins, dtype=torch.bool)
    keep[torch.arange(rows, device=query.device), own] = False
    if mask_accidental_hits:
        keep &= ids.unsqueeze(0) != ids[own].unsqueeze(1)
    pairs = F.softplus(-margins) * keep  # -log sigmoid(margin)
    return (pairs.sum(dim=1) / keep.sum(dim=1).clamp(min=1)).mean()


class BprTask(EventTask):
    """Pairwise ranking against in-batch and uniform negatives; see the module docstring."""

    name = "bpr"
    reads = ("loss.temperature", "loss.global_negatives", "loss.uniform_negatives", "loss.mask_accidental_hits")

    def check_data(self, data, env) -> None:
        check_uniform_share(self.cfg.loss.uniform_negatives, env.world_size)

    def negatives_per_batch(self) -> int:
        return self.cfg.loss.uniform_negatives

    def loss(self, model, query, item, batch):
        loss = self.cfg.loss
        return bpr_loss(query, item, batch.item_ids, loss.temperature, loss.global_negatives, loss.mask_accidental_hits)
