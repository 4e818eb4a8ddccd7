"""The retrieval loss: in-batch sampled softmax over L2-normalised embeddings, with the
corrections that make it work (logQ, accidental-hit masking, mixed uniform negatives,
candidates gathered from every rank).

Shapes: ``B`` rows, ``D`` embedding dim, ``M`` uniform negatives, ``N`` candidates. ``query`` is
``[B, D]``; row ``b`` of the items is the positive of row ``b`` of ``query`` and every other
candidate is a negative.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from twotower_rec.config import LossConfig


def logit_offset(like: torch.Tensor, columns: int, log_q: torch.Tensor | None = None,
                 masked: torch.Tensor | None = None) -> torch.Tensor:
    """The additive term of a loss's logits, ``[1 or rows, columns]``: ``-log_q`` (zeros without
    it), and the float minimum where ``masked``. It is built
    outside autograd for ``torch.addmm(offset, queries, candidates.t())``, so no pass over the
    logits is recorded for the backward, and none is made in the forward beyond the product: a
    ``masked_fill_`` ran again on the gradient and a ``sub_`` was one more pass (docs/benchmarks-history.md,
    "The ceiling, and one more loss cut").

    Args:
        like: a tensor whose dtype and device the offset takes (the loss's scaled queries).
        columns: the logits' columns (the candidates): the offset's width without ``log_q``.
        log_q: ``[columns]`` the candidates' logQ, subtracted; ``None``: zeros.
        masked: ``[rows, columns]`` the logits to mask (set to the float minimum); ``None``: none.
    """
    with torch.no_grad():
        offset = (-log_q.unsqueeze(0).to(like.dtype) if log_q is not None
                  else like.new_zeros(1, columns))
        if masked is not None:
            offset = torch.where(masked, torch.finfo(like.dtype).min, offset)
    return offset


def in_batch_softmax(
    query: torch.Tensor,
    item: torch.Tensor,
    temperature: float,
    item_ids: torch.Tensor | None = None,
    positive_offset: int = 0,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax with in-batch negatives: mean over rows of ``-log softmax(q·I / t)[b, b + offset]``.

    Args:
        query: ``[B, D]`` the queries.
        item: ``[N, D]`` with ``N >= B``: the candidates of every row.
        temperature: ``t``, a float or the learned scalar tensor.
        item_ids: ``[N]`` the candidates' item codes: a candidate whose id equals the row's positive id (an
            "accidental hit": the same item appears twice in the batch) is removed from that row's negatives,
            so the model is not pushed away from its own positive. ``None``: no mask.
        positive_offset: row ``b``'s positive is candidate ``b + positive_offset`` (> 0 when the candidates
            are the items of the global batch gathered from every rank and this rank's rows start there).
        log_q: ``[N]`` logQ correction: ``log_q[j]`` is subtracted from candidate j's logit in every row: the
            log of how often j is expected among the candidates, so frequent items are not over-penalised for
            being frequent negatives. ``None``: no correction.
    """
    rows = torch.arange(query.shape[0], device=query.device)
    targets = rows + positive_offset
    # Scale the [B, D] queries rather than the [B, N] logits (one pass fewer over B x N).
    scaled = query / temperature
    # On the CPU, skip the mask when no id repeats; on a GPU that test would be a host sync
    # every step, and masking with no hit changes nothing.
    masking = item_ids is not None and (item_ids.is_cuda or torch.unique(item_ids).numel() < item_ids.numel())
    if log_q is None and not masking:
        return F.cross_entropy(scaled @ item.t(), targets)
    same = None
    if masking:
        same = item_ids[targets].unsqueeze(1) == item_ids.unsqueeze(0)  # [B, N]
        same[rows, targets] = False
    offset = logit_offset(scaled, item.shape[0], log_q, same)
    return F.cross_entropy(torch.addmm(offset, scaled, item.t()), targets)  # [B, N] logits


def softmax_cross_entropy(query: torch.Tensor, item: torch.Tensor, temperature, targets: torch.Tensor,
                          log_q: torch.Tensor | None = None, item_ids: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`in_batch_softmax` as one pure expression, for ``torch.compile`` (``retrieval.compile``):
    the accidental-hit mask is always built
    (no data-dependent test), so the compiler can fuse it with logQ and the log-softmax and
    never write the ``[B, N]`` mask out. The same value as :func:`in_batch_softmax`.

    Args:
        query: ``[B, D]`` the queries.
        item: ``[N, D]`` the candidates.
        temperature: a float, or the learned scalar tensor.
        targets: ``[B]`` row ``b``'s positive is candidate ``targets[b]``.
        log_q: ``[N]`` subtracted from each candidate's logit (logQ correction); ``None``: no correction.
        item_ids: ``[N]`` the candidates' item codes, for the accidental-hit mask; ``None``: no mask.
    """
    logits = (query / temperature) @ item.t()  # [B, N]
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    if item_ids is not None:
        columns = torch.arange(item.shape[0], device=item.device).unsqueeze(0)
        same = (item_ids[targets].unsqueeze(1) == item_ids.unsqueeze(0)) & (columns != targets.unsqueeze(1))
        logits = logits.masked_fill(same, torch.finfo(logits.dtype).min)
    return F.cross_entropy(logits, targets)


def sampled_batch_softmax(query: torch.Tensor, item: torch.Tensor, temperature, pick: torch.Tensor,
                          num_positives: int, item_ids: torch.Tensor | None = None, positive_offset: int = 0,
                          log_q: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`in_batch_softmax` with each row scored against a sample of the batch's positives
    (``retrieval.batch_negatives``). Row ``b``'s candidates are its own positive (column
    ``b + positive_offset``), the picked columns less that one, and the uniform negatives. The logits are
    ``[B, 1 + K + M]`` instead of ``[B, N]``, so a step's cost grows linearly with the batch.
    With every column picked this is :func:`in_batch_softmax` (the tests check it).

    Args:
        query: ``[B, D]`` the queries.
        item: ``[N, D]`` the candidates: the batch's ``num_positives`` positives, then the ``M`` uniform negatives.
        temperature: a float, or the learned scalar tensor.
        pick: ``[K]`` the sampled columns among the first ``num_positives`` candidates.
        num_positives: the candidates that are the batch's positives; all those after them (the uniform
            negatives) are kept.
        item_ids: ``[N]`` the candidates' item codes: every candidate with its row's positive's id is masked,
            as in :func:`in_batch_softmax`; ``None``: no mask.
        positive_offset: row ``b``'s positive is candidate ``b + positive_offset``.
        log_q: ``[N]`` the caller's logQ, for a sample the expected count among the picked columns
            (:meth:`LossContext.sample_positives`); ``None``: no correction.
    """
    rows = query.shape[0]
    own = slice(positive_offset, positive_offset + rows)  # the rows' positives: a slice, not a gather
    targets = torch.arange(rows, device=query.device) + positive_offset
    columns = torch.cat([pick, torch.arange(num_positives, item.shape[0], device=pick.device)])  # [K + M]
    q = query / temperature
    positive = (q * item[own]).sum(dim=1, keepdim=True)  # [B, 1]
    if log_q is not None:
        positive = positive - log_q[own].unsqueeze(1)
    drop = columns.unsqueeze(0) == targets.unsqueeze(1)  # the row's own positive, if picked
    if item_ids is not None:
        drop |= item_ids[targets].unsqueeze(1) == item_ids[columns].unsqueeze(0)
    offset = logit_offset(q, columns.shape[0], log_q[columns] if log_q is not None else None, drop)
    negative = torch.addmm(offset, q, item[columns].t())  # [B, K + M]
    logits = torch.cat([positive, negative], dim=1)
    return F.cross_entropy(logits, torch.zeros(rows, dtype=torch.long, device=query.device))


class _GatherRows(torch.autograd.Function):
    """All-gather along rows; backward sums every rank's gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` this rank's rows -> ``[world_size * B, D]`` every rank's, in rank order."""
        import torch.distributed as dist

        ctx.rank, ctx.rows = dist.get_rank(), local.shape[0]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        """``[world_size * B, D]`` -> ``[B, D]``: every rank's gradient of this rank's rows, summed."""
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_candidates(item: torch.Tensor, item_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """All ranks' item embeddings and ids, concatenated in rank order, and this rank's offset.

    The gather's backward sums every rank's gradient into each rank's own slice, so a negative
    scored on any rank trains the tower that produced it. Every rank must hold the same number
    of rows.

    Args:
        item: ``[B, D]`` this rank's item embeddings.
        item_ids: ``[B]`` their item codes.

    Returns:
        ``(items [world_size * B, D], ids [world_size * B], offset)``, ``offset`` the index of this rank's first
        row (``rank * B``); in a world of one, the inputs and 0.
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

    def __init__(self, hash_size: int, alpha: float, device: torch.device | None = None) -> None:
        """An estimator that has seen no step.

        Args:
            hash_size: the slots of its hash table (``loss.streaming_hash_size``); ids in one slot share an estimate.
            alpha: the moving average's rate (``loss.streaming_alpha``).
            device: where its tables live: the ids' device.
        """
        # On the ids' device: reading or updating it costs no copy to the host and no sync.
        self.hash_size, self.alpha = hash_size, alpha
        self.last_step = torch.zeros(hash_size, dtype=torch.float64, device=device)
        self.gap = torch.full((hash_size,), float("nan"), dtype=torch.float64, device=device)

    def _slots(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids.long() * 2654435761) % self.hash_size  # Knuth's multiplicative hash

    def update(self, ids: torch.Tensor, step: int) -> None:
        """Record the ids of global step ``step`` (>= 1). A slot hit twice is written twice with
        the same value (both writes read the same old state), so no deduplication is needed.

        Args:
            ids: ``[n]`` the item codes of the step's global batch, on the estimator's device.
            step: the global step, from 1.
        """
        slots = self._slots(ids)
        seen = self.last_step[slots] > 0
        gap = step - self.last_step[slots]
        old = self.gap[slots]
        new = torch.where(torch.isnan(old), gap, (1 - self.alpha) * old + self.alpha * gap)
        self.gap[slots] = torch.where(seen, new, old)
        self.last_step[slots] = float(step)

    def probability(self, ids: torch.Tensor) -> torch.Tensor:
        """Estimated probability that each id appears in a step's batch (1 until a gap is known).

        Args:
            ids: ``[n]`` item codes, on the estimator's device.

        Returns:
            ``[n]`` float64 probabilities.
        """
        gap = self.gap[self._slots(ids)]
        return torch.where(torch.isnan(gap), torch.ones_like(gap), 1.0 / gap.clamp_min(1.0))

    def state_dict(self) -> dict:
        return {"last_step": self.last_step.cpu(), "gap": self.gap.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the tables, on this estimator's device.

        Args:
            state: what :meth:`state_dict` returned: ``last_step`` and ``gap``, each ``[hash_size]``.
        """
        device = self.gap.device
        self.last_step, self.gap = state["last_step"].to(device).clone(), state["gap"].to(device).clone()


class LossContext:
    """What the loss needs beyond one batch: logQ frequencies, the catalog size, the step.

    logQ subtracts log(expected number of times a candidate is among the candidates): for an
    in-batch candidate j that is ``global_batch * q(j)``, q from training counts
    (``item_counts`` ``[V + 1]`` by item code) or from the streaming estimator; for a uniform
    negative ``uniform_negatives / num_items``.
    """

    def __init__(self, cfg: LossConfig, item_counts: np.ndarray, batch_size: int, device: torch.device) -> None:
        """The state before the first step.

        Args:
            cfg: the ``loss`` section (``logq``, ``logq_weight``, the streaming estimator's settings).
            item_counts: ``[V + 1]`` training counts by item code (code 0 is padding): ``q`` for ``logq: counts``
                and a sequence batch's targets; its length gives the catalog size ``V``.
            batch_size: the positives among each step's candidates (:func:`positives_per_step`).
            device: where the logQ tables live.
        """
        self.cfg, self.num_items, self.step, self.device = cfg, item_counts.shape[0] - 1, 0, device
        counts = item_counts.astype(np.float64)
        q = counts / max(counts.sum(), 1.0)
        q[q == 0] = 1.0 / max(counts.sum(), 1.0)  # never a positive; keep the log finite
        self.log_q = torch.from_numpy(np.log(q * batch_size)).float().to(device)
        self.q = torch.from_numpy(q).to(device)  # float64: (1 - q)^P below needs the precision
        self.streaming = (StreamingFrequency(cfg.streaming_hash_size, cfg.streaming_alpha, device)
                          if cfg.logq == "streaming" else None)
        # retrieval.compile: a compiled softmax_cross_entropy for the retrieval loss (None: eager)
        self.kernel = None
        self.sampler = torch.Generator()  # retrieval.batch_negatives: reseeded with the step at each draw

    def candidate_log_q(self, positive_ids: torch.Tensor, num_uniform: int) -> torch.Tensor | None:
        """``[B' + M]`` logQ of the (global) positives ``[B']`` then ``M`` uniform negatives.

        Args:
            positive_ids: ``[B']`` the positives' item codes; with ``logq: streaming`` they update the estimator.
            num_uniform: ``M``, the uniform negatives after them.

        Returns:
            The logQ, scaled by ``loss.logq_weight``; ``None`` with ``logq: none``.
        """
        logq = self.cfg.logq
        if logq == "none":
            return None
        if logq == "counts":
            in_batch = self.log_q[positive_ids]
        else:  # the estimate is already the probability of appearing in a step's candidates
            self.streaming.update(positive_ids, self.step)
            in_batch = torch.log(self.streaming.probability(positive_ids).float())
        uniform = torch.full((num_uniform,), float(np.log(max(num_uniform, 1) / self.num_items)),
                             device=in_batch.device)
        log_q = torch.cat([in_batch, uniform])
        weight = self.cfg.logq_weight
        return log_q if weight == 1.0 else log_q * weight

    def sample_positives(self, num_positives: int, log_q: torch.Tensor | None, k: int
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``k`` (``retrieval.batch_negatives``) of the step's ``num_positives`` positives, drawn without
        replacement by a generator seeded with the step (every rank draws the same; a resumed
        run the same as an unbroken one), and ``log_q`` for them: an in-batch candidate's
        expected count among the ``K`` picked is ``K / num_positives`` of that among all.

        Args:
            num_positives: the step's positives, the first candidates.
            log_q: ``[num_positives + M]`` the candidates' logQ (:meth:`candidate_log_q`), or ``None``.
            k: ``K``, the positives to draw (``retrieval.batch_negatives``).

        Returns:
            ``(pick [K], log_q)``: the picked columns, on the loss's device, and ``log_q`` with the positives'
            terms shifted by ``logq_weight * log(K / num_positives)`` (``None`` if it was).
        """
        # drawn on the host, so a GPU run draws what the CPU does; copied from pinned memory,
        # asynchronously (a copy from pageable memory would wait for the stream every step)
        pick = torch.randperm(num_positives, generator=self.sampler.manual_seed(7_919 * self.step + 1))[:k]
        if self.device.type == "cuda":
            pick = pick.pin_memory().to(self.device, non_blocking=True)
        if log_q is not None:
            shift = self.cfg.logq_weight * float(np.log(k / num_positives))
            log_q = torch.cat([log_q[:num_positives] + shift, log_q[num_positives:]])
        return pick, log_q

    def target_log_q(self, target_ids: torch.Tensor, num_uniform: int, positions: int) -> torch.Tensor | None:
        """``[U + M]`` logQ of a sequence batch's deduplicated targets ``[U]`` then ``M`` uniform
        negatives. A target is a candidate when any of the batch's ``positions`` draws it: with
        each drawn with training frequency q, that happens with probability ``1 - (1 - q)^P``;
        a uniform negative is expected ``M / V`` times. Each source keeps its own term.

        Args:
            target_ids: ``[U]`` the deduplicated targets' item codes.
            num_uniform: ``M``, the uniform negatives.
            positions: ``P``, the positions of the global batch.

        Returns:
            The logQ, scaled by ``loss.logq_weight``; ``None`` with ``logq: none``.
        """
        if self.cfg.logq == "none":
            return None
        q = self.q[target_ids]
        in_batch = torch.log(-torch.expm1(positions * torch.log1p(-q.clamp(max=1 - 1e-12)))).float()
        uniform = torch.full((num_uniform,), float(np.log(max(num_uniform, 1) / self.num_items)),
                             device=in_batch.device)
        return torch.cat([in_batch, uniform]) * self.cfg.logq_weight


def positives_per_step(cfg: LossConfig, batch_size: int, world_size: int) -> int:
    """How many positives each query is scored against: the global batch's with
    ``loss.global_negatives``, else this rank's slice of it.

    Args:
        cfg: the ``loss`` section (``global_negatives``).
        batch_size: the global batch's rows (``train.batch_size``).
        world_size: the number of ranks.
    """
    return batch_size if cfg.global_negatives else batch_size // world_size


def retrieval_loss(query: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, temperature,
                   cfg: LossConfig, ctx: LossContext, batch_negatives: int = 0, chunk_size: int = 0) -> torch.Tensor:
    """The loss of this rank's rows.

    Args:
        query: ``[B, D]`` this rank's queries.
        item: ``[B + M, D]`` this rank's positives, then its share of the uniform negatives.
        item_ids: ``[B + M]`` their item codes.
        temperature: a float, or the learned scalar tensor.
        cfg: the ``loss`` section; with ``cfg.global_negatives`` every rank's candidates join (gathered).
        ctx: the loss state (logQ, the step, the optional compiled kernel).
        batch_negatives: > 0 scores each row against this many of the batch's positives
            (:func:`sampled_batch_softmax`) instead of all of them.
        chunk_size: > 0 scores the candidates this many at a time (``losses/chunked.py``).
    """
    ctx.step += 1
    rows = query.shape[0]
    positives, positive_ids = item[:rows], item_ids[:rows]
    negatives, negative_ids = item[rows:], item_ids[rows:]
    offset = 0
    if cfg.global_negatives:
        positives, positive_ids, offset = gather_candidates(positives, positive_ids)
        if negatives.shape[0]:
            negatives, negative_ids, _ = gather_candidates(negatives, negative_ids)
    candidates = torch.cat([positives, negatives])
    candidate_ids = torch.cat([positive_ids, negative_ids])
    log_q = ctx.candidate_log_q(positive_ids, negatives.shape[0])
    ids = candidate_ids if cfg.mask_accidental_hits else None
    if 0 < batch_negatives < positives.shape[0]:  # a sample of K >= the positives would be all of them
        pick, log_q = ctx.sample_positives(positives.shape[0], log_q, batch_negatives)
        return sampled_batch_softmax(query, candidates, temperature, pick, positives.shape[0], ids, offset, log_q)
    if chunk_size:
        from twotower_rec.losses.chunked import chunked_in_batch_softmax

        return chunked_in_batch_softmax(query, candidates, temperature, ids, offset, log_q, chunk=chunk_size)
    if ctx.kernel is not None:
        targets = torch.arange(rows, device=query.device) + offset
        return ctx.kernel(query, candidates, temperature, targets, log_q, ids)
    return in_batch_softmax(query, candidates, temperature, ids, offset, log_q)


def future_positives(target_index: torch.Tensor, scored: torch.Tensor, k: int) -> torch.Tensor:
    """``[P, k]`` (``next_item.future_targets``): each position's next k targets in its own window,
    as indices into the gathered targets, -1 past the window's end.

    Args:
        target_index: ``[P]`` each position's target as an index into the gathered targets, the windows'
            positions in order.
        scored: ``[B]`` how many positions each window has.
        k: the targets per position, its own first.
    """
    window = torch.repeat_interleave(torch.arange(scored.shape[0], device=scored.device), scored,
                                     output_size=target_index.shape[0])  # [P]; output_size: no host sync
    ahead = torch.arange(target_index.shape[0], device=scored.device).unsqueeze(1) + torch.arange(
        k, device=scored.device)  # [P, k]: position p + j
    inside = ahead < target_index.shape[0]
    ahead = ahead.clamp(max=max(target_index.shape[0] - 1, 0))
    inside = inside & (window[ahead] == window.unsqueeze(1))
    return torch.where(inside, target_index[ahead], -1)


def _sequence_mask(query: torch.Tensor, target_ids: torch.Tensor, negative_ids: torch.Tensor, own: torch.Tensor,
                   window_items: torch.Tensor | None, mask_accidental_hits: bool) -> torch.Tensor:
    """``[P, U + M]`` (or ``[1, U + M]``) the candidates a position does not score: padding targets;
    with ``window_items``, the window's items other than the position's ``own`` positives; with
    ``mask_accidental_hits``, uniform negatives equal to one of its positives."""
    masked = torch.cat([target_ids == 0, torch.zeros_like(negative_ids, dtype=torch.bool)]).unsqueeze(0)
    if window_items is not None:
        others = window_items.clone().scatter_(1, own, False)  # the position's own positives stay
        masked = masked | torch.cat([others, others.new_zeros(others.shape[0], negative_ids.shape[0])], dim=1)
    if mask_accidental_hits and negative_ids.shape[0]:
        hits = (target_ids[own].unsqueeze(2) == negative_ids.view(1, 1, -1)).any(1)  # [P, M]
        masked = masked | torch.cat([torch.zeros(query.shape[0], target_ids.shape[0], dtype=torch.bool,
                                                 device=query.device), hits], dim=1)
    return masked


def sequence_loss(query: torch.Tensor, item: torch.Tensor, item_ids: torch.Tensor, num_targets: int,
                  target_index: torch.Tensor, global_positions: int, temperature, cfg: LossConfig,
                  ctx: LossContext, window_items: torch.Tensor | None = None,
                  positives: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of this rank's positions (``task: next_item``): sampled softmax of each
    position's query over the global batch's deduplicated targets and uniform negatives.

    Every rank's candidates are gathered, in rank order. Padding candidates are never
    scored; a uniform negative equal to the position's own target (an accidental hit) is
    masked for that position (``loss.mask_accidental_hits``).

    Args:
        query: ``[P, D]`` this rank's positions' queries.
        item: ``[C, D]`` this rank's ``num_targets`` target candidates (padded with code 0), then its uniform
            negatives.
        item_ids: ``[C]`` their item codes.
        num_targets: how many of ``item``'s rows are target candidates.
        target_index: ``[P]`` each position's target, as an index into the gathered targets.
        global_positions: the positions of the global batch (every rank's): the mean's count, and the ``P``
            of :meth:`LossContext.target_log_q`.
        temperature: a float, or the learned scalar tensor.
        cfg: the ``loss`` section.
        ctx: the loss state (logQ, the step).
        window_items: ``[P, U]`` (``next_item.mask_window_items``) which gathered targets are items of each
            position's own window: those targets, the position's own excepted, are masked too: the user's other
            events are not negatives. ``None``: no such mask.
        positives: ``[P, k]`` (:func:`future_positives`, ``next_item.future_targets``): a position's loss is
            the mean over its positives (-1: none) of their -log-softmax over the same candidates; none of them
            is masked as a window item or an accidental hit. ``None``: the position's own target alone.

    Returns:
        This rank's share of the mean over the global batch's ``global_positions``: summed over positions
        and scaled by ``world_size / global_positions``, so the ranks' mean (what the gradients
        average to) is the global mean.
    """
    import torch.distributed as dist

    ctx.step += 1
    targets, target_ids, _ = gather_candidates(item[:num_targets], item_ids[:num_targets])
    negatives, negative_ids = item[num_targets:], item_ids[num_targets:]
    if negatives.shape[0]:
        negatives, negative_ids, _ = gather_candidates(negatives, negative_ids)
    if positives is None:
        own, valid = target_index.unsqueeze(1), None  # [P, 1]
    else:  # [P, k]; a missing positive (-1) repeats the first, the next target, which always exists
        valid = positives >= 0
        own = torch.where(valid, positives, positives[:, :1])
    masked = _sequence_mask(query, target_ids, negative_ids, own, window_items, cfg.mask_accidental_hits)
    offset = logit_offset(query, masked.shape[1], ctx.target_log_q(target_ids, negatives.shape[0], global_positions),
                          masked)
    logits = torch.addmm(offset, query / temperature, torch.cat([targets, negatives]).t())  # [P, U + M]
    world = dist.get_world_size() if dist.is_initialized() else 1
    scale = world / max(global_positions, 1)
    if positives is None:
        return F.cross_entropy(logits, target_index, reduction="sum") * scale
    log_p = torch.log_softmax(logits, dim=1).gather(1, own)  # [P, k]
    return -((log_p * valid).sum(1) / valid.sum(1)).sum() * scale
