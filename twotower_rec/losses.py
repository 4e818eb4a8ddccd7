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
    positive_offset: int = 0,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax with in-batch negatives: mean over rows of ``-log softmax(q·I / t)[b, b + offset]``.

    ``query`` is ``[B, D]`` and ``item`` ``[N, D]`` with ``N >= B``: the candidates of every row.
    Row ``b``'s positive is candidate ``b + positive_offset`` (``positive_offset`` > 0 when the
    candidates are the items of the global batch gathered from every rank and this rank's
    rows start there). With ``item_ids`` ``[N]``, a candidate whose id equals the row's
    positive id (an "accidental hit": the same item appears twice in the batch) is removed
    from that row's negatives, so the model is not pushed away from its own positive.
    With ``log_q`` ``[N]`` (logQ correction), ``log_q[j]`` is subtracted from candidate j's
    logit in every row: the log of how often j is expected among the candidates, so frequent
    items are not over-penalised for being frequent negatives.
    """
    rows = torch.arange(query.shape[0], device=query.device)
    targets = rows + positive_offset
    # Scale the [B, D] queries rather than the [B, N] logits, and edit the logits in place
    # (the matrix product's backward needs only its inputs): two fewer passes over B x N.
    logits = (query / temperature) @ item.t()  # [B, N]
    if log_q is not None:
        logits.sub_(log_q.unsqueeze(0))
    if item_ids is not None and torch.unique(item_ids).numel() < item_ids.numel():  # any accidental hit at all?
        same = item_ids[targets].unsqueeze(1) == item_ids.unsqueeze(0)  # [B, N]
        same[rows, targets] = False
        logits.masked_fill_(same, torch.finfo(logits.dtype).min)
    return F.cross_entropy(logits, targets)


class _GatherRows(torch.autograd.Function):
    """All-gather along rows; backward sums every rank's gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), local.shape[0]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_candidates(item: torch.Tensor, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All ranks' item embeddings and ids, concatenated in rank order, and this rank's offset.

    The gather's backward sums every rank's gradient into each rank's own slice, so a negative
    scored on any rank trains the tower that produced it. Every rank must hold the same number
    of rows.
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return item, item_ids, 0
    ids = [torch.empty_like(item_ids) for _ in range(dist.get_world_size())]
    dist.all_gather(ids, item_ids.contiguous())
    return _GatherRows.apply(item), torch.cat(ids), dist.get_rank() * item.shape[0]


class StreamingFrequency:
    """Yi et al. 2019's streaming frequency estimator: for each (hashed) item, an exponential
    moving average ``B`` of the number of steps between its occurrences; its probability of
    appearing in a step's batch is estimated as ``1 / B``. Needs no pass over the data; it
    sees every rank's ids (the gathered global batch), so all ranks hold the same estimate.
    """

    def __init__(self, hash_size: int, alpha: float) -> None:
        self.hash_size, self.alpha = hash_size, alpha
        self.last_step = torch.zeros(hash_size, dtype=torch.float64)
        self.gap = torch.full((hash_size,), float("nan"), dtype=torch.float64)

    def _slots(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids.long() * 2654435761) % self.hash_size  # Knuth's multiplicative hash

    def update(self, ids: torch.Tensor, step: int) -> None:
        """Record the ids of global step ``step`` (>= 1)."""
        slots = torch.unique(self._slots(ids.cpu()))
        seen = self.last_step[slots] > 0
        gap = step - self.last_step[slots]
        old = self.gap[slots]
        new = torch.where(torch.isnan(old), gap, (1 - self.alpha) * old + self.alpha * gap)
        self.gap[slots] = torch.where(seen, new, old)
        self.last_step[slots] = float(step)

    def probability(self, ids: torch.Tensor) -> torch.Tensor:
        """Estimated probability that each id appears in a step's batch (1 until a gap is known)."""
        gap = self.gap[self._slots(ids.cpu())]
        return torch.where(torch.isnan(gap), torch.ones_like(gap), 1.0 / gap.clamp_min(1.0)).to(ids.device)

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "gap": self.gap}

    def load_state_dict(self, state: dict) -> None:
        self.last_step, self.gap = state["last_step"].clone(), state["gap"].clone()
