"""In-batch sampled softmax against an explicit log-softmax loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from twotower_rec.losses.softmax import in_batch_softmax


def _embeddings(b: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=-1)
    i = F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=-1)
    return q, i


def manual_loss(q: torch.Tensor, i: torch.Tensor, t: float, item_ids: list[int] | None = None) -> float:
    """mean_b -log( exp(s_bb) / sum_{j kept} exp(s_bj) ), s = q.i / t; with ids, j != b sharing
    row b's positive id are dropped from row b's denominator."""
    b_size = q.shape[0]
    total = 0.0
    for b in range(b_size):
        logits = []
        for j in range(b_size):
            if item_ids is not None and j != b and item_ids[j] == item_ids[b]:
                continue
            logits.append(sum(q[b, d].item() * i[j, d].item() for d in range(q.shape[1])) / t)
        positive = sum(q[b, d].item() * i[b, d].item() for d in range(q.shape[1])) / t
        top = max(logits)
        log_denominator = top + math.log(sum(math.exp(x - top) for x in logits))
        total += -(positive - log_denominator)
    return total / b_size


@pytest.mark.parametrize("temperature", [1.0, 0.2, 0.05])
def test_in_batch_softmax_matches_hand_computation(temperature):
    q, i = _embeddings(5, 3, seed=1)
    loss = in_batch_softmax(q, i, temperature)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(manual_loss(q, i, temperature), rel=1e-9, abs=1e-9)
    # distinct ids: no masking at all
    distinct = in_batch_softmax(q, i, temperature, torch.arange(5) + 10)
    assert distinct.item() == pytest.approx(loss.item(), rel=1e-12)


def test_tiny_two_row_example():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    i = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    # row 0: logits [1, 0.6]; row 1: logits [0, 0.8]  (t = 1)
    expected = 0.5 * (-(1 - math.log(math.e + math.exp(0.6))) - (0.8 - math.log(1 + math.exp(0.8))))
    assert in_batch_softmax(q, i, 1.0).item() == pytest.approx(expected)


def test_accidental_hits_are_masked_exactly():
    q, i = _embeddings(6, 4, seed=3)
    ids = [7, 3, 7, 5, 3, 7]  # item 7 three times, item 3 twice
    t = 0.1
    masked = in_batch_softmax(q, i, t, torch.tensor(ids))
    assert masked.item() == pytest.approx(manual_loss(q, i, t, ids), rel=1e-9, abs=1e-9)
    # ... and it is not the unmasked loss: masking removed something
    unmasked = manual_loss(q, i, t)
    assert masked.item() != pytest.approx(unmasked, rel=1e-6)
    # removing logits from a denominator can only lower every row's loss
    assert masked.item() < unmasked


def test_masking_removes_only_the_duplicate_logits_per_row():
    """Row-wise: compare per-row losses (a batch of one query row at a time) with the manual sum."""
    q, i = _embeddings(4, 3, seed=5)
    ids = torch.tensor([1, 2, 1, 3])
    t = 0.5
    logits = q @ i.t() / t
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[0, 2] = keep[2, 0] = False  # exactly these two
    rows = []
    for b in range(4):
        kept = logits[b][keep[b]]
        rows.append(-(logits[b, b] - torch.logsumexp(kept, dim=0)))
    expected = torch.stack(rows).mean()
    torch.testing.assert_close(in_batch_softmax(q, i, t, ids), expected)


def test_a_batch_of_one_item_repeated_has_zero_loss_and_zero_gradient():
    """Every row's only other candidate is an accidental hit: all negatives are masked."""
    q, i = _embeddings(3, 4, seed=9)
    q.requires_grad_(True)
    i.requires_grad_(True)
    loss = in_batch_softmax(q, i, 0.05, torch.tensor([4, 4, 4]))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert torch.count_nonzero(q.grad) == 0 and torch.count_nonzero(i.grad) == 0
    # without ids the same batch has a positive loss
    assert in_batch_softmax(q.detach(), i.detach(), 0.05).item() > 0.0


def test_positive_offset_scores_rows_against_a_larger_candidate_set():
    """A rank's rows against the whole gathered batch give exactly those rows' terms of the
    single-process loss: the mean of both ranks' losses is the full-batch loss."""
    q, i = _embeddings(8, 4, seed=5)
    ids = torch.tensor([1, 2, 3, 1, 4, 5, 2, 6])
    full = in_batch_softmax(q, i, 0.3, ids)
    first = in_batch_softmax(q[:4], i, 0.3, ids, positive_offset=0)
    second = in_batch_softmax(q[4:], i, 0.3, ids, positive_offset=4)
    assert ((first + second) / 2).item() == pytest.approx(full.item(), rel=1e-12)
    # and not the local-negatives loss
    assert second.item() != pytest.approx(in_batch_softmax(q[4:], i[4:], 0.3, ids[4:]).item(), rel=1e-6)
