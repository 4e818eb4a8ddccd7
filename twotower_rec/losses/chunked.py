"""The in-batch sampled softmax over candidates in chunks: the same loss as
:func:`twotower_rec.losses.softmax.in_batch_softmax` without the ``[B, N]`` logits.

Shapes: ``B`` query rows, ``N`` candidates, ``D`` embedding dim, ``C`` the chunk of candidates.
The forward keeps a running (max, sum of exponentials) per row over the chunks (an online
log-sum-exp); the backward recomputes each chunk's logits from the saved inputs. Memory is
``O(B x C)`` instead of ``O(B x N)``; the arithmetic is the same matrix products, in pieces.
"""

from __future__ import annotations

import torch


def _chunk_logits(q: torch.Tensor, item: torch.Tensor, start: int, stop: int, log_q: torch.Tensor | None,
                  item_ids: torch.Tensor | None, target_ids: torch.Tensor | None,
                  targets: torch.Tensor) -> torch.Tensor:
    """``[B, stop - start]`` logits of candidates ``start:stop`` with logQ and the accidental-hit mask."""
    logits = q @ item[start:stop].t()
    if log_q is not None:
        logits.sub_(log_q[start:stop].unsqueeze(0))
    if item_ids is not None:
        same = target_ids.unsqueeze(1) == item_ids[start:stop].unsqueeze(0)  # [B, C]
        columns = torch.arange(start, stop, device=q.device).unsqueeze(0)
        same &= columns != targets.unsqueeze(1)  # a row's own positive stays
        logits.masked_fill_(same, torch.finfo(logits.dtype).min)
    return logits


class _ChunkedSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, item, temperature, item_ids, positive_offset, log_q, chunk):
        """Mean over rows of ``-log softmax(query · item / t - log_q)[b, b + positive_offset]``."""
        q = query / temperature
        rows = q.shape[0]
        targets = torch.arange(rows, device=q.device) + positive_offset
        target_ids = item_ids[targets] if item_ids is not None else None
        running_max = q.new_full((rows,), float("-inf"))
        running_sum = q.new_zeros(rows)
        for start in range(0, item.shape[0], chunk):
            logits = _chunk_logits(q, item, start, min(start + chunk, item.shape[0]), log_q, item_ids, target_ids,
                                   targets)
            new_max = torch.maximum(running_max, logits.max(dim=1).values)
            running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(
                logits - new_max.unsqueeze(1)).sum(dim=1)
            running_max = new_max
        lse = running_max + torch.log(running_sum)
        positive = (q * item[targets]).sum(dim=1)
        if log_q is not None:
            positive = positive - log_q[targets]
        ctx.save_for_backward(query, item, lse, targets, *(t for t in (item_ids, target_ids, log_q) if t is not None))
        ctx.has_ids, ctx.has_log_q = item_ids is not None, log_q is not None
        ctx.temperature, ctx.chunk = temperature, chunk
        return (lse - positive).mean()

    @staticmethod
    def backward(ctx, grad_out):
        query, item, lse, targets, *rest = ctx.saved_tensors
        item_ids = target_ids = log_q = None
        if ctx.has_ids:
            item_ids, target_ids, *rest = rest
        if ctx.has_log_q:
            log_q = rest[0]
        temperature, rows = ctx.temperature, query.shape[0]
        q = query / temperature
        scale = grad_out / rows
        grad_q = torch.zeros_like(q)  # d loss / d q, q = query / t
        grad_item = torch.zeros_like(item)
        for start in range(0, item.shape[0], ctx.chunk):
            stop = min(start + ctx.chunk, item.shape[0])
            probs = torch.exp(_chunk_logits(q, item, start, stop, log_q, item_ids, target_ids, targets)
                              - lse.unsqueeze(1)) * scale  # [B, C]: softmax, masked entries 0
            grad_q += probs @ item[start:stop]
            grad_item[start:stop] = probs.t() @ q
        # the positive's -1 in (softmax - one_hot)
        grad_q -= item[targets] * scale
        grad_item.index_add_(0, targets, -q * scale)
        grad_query = grad_q / temperature
        grad_temperature = None
        if isinstance(temperature, torch.Tensor) and temperature.requires_grad:
            grad_temperature = -(grad_q * q).sum() / temperature
        return grad_query, grad_item, grad_temperature, None, None, None, None


def chunked_in_batch_softmax(query: torch.Tensor, item: torch.Tensor, temperature, item_ids: torch.Tensor | None = None,
                             positive_offset: int = 0, log_q: torch.Tensor | None = None,
                             chunk: int = 4096) -> torch.Tensor:
    """The in-batch softmax loss of :func:`~twotower_rec.losses.softmax.in_batch_softmax` (same
    arguments, same value and gradients up to float32 summation order), computed over ``chunk``
    candidates at a time so no ``[B, N]`` matrix is ever held.

    Args:
        query: ``[B, D]`` the queries.
        item: ``[N, D]`` the candidates; row ``b``'s positive is candidate ``b + positive_offset``.
        temperature: a float or a scalar tensor (its gradient is returned when it requires one).
        item_ids: ``[N]`` the candidates' item codes: a candidate with its row's positive's id is masked in that
            row (an accidental hit); ``None``: no mask.
        positive_offset: the candidate of row 0's positive.
        log_q: ``[N]`` subtracted from each candidate's logit (logQ correction); ``None``: no correction.
        chunk: ``C``, the candidates scored at a time (>= 1).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    return _ChunkedSoftmax.apply(query, item, temperature, item_ids, positive_offset, log_q, chunk)
