"""Ranking metrics and exact chunked top-K, against hand computations and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from twotower_rec.evaluation.metrics import ranking_metrics
from twotower_rec.evaluation.ranking import rank_catalog
from twotower_rec.evaluation.topk import chunked_topk


def test_ranking_metrics_hand_example():
    top = torch.tensor([[5, 3, 9, 1],
                        [1, 2, 4, 8],
                        [7, 8, 6, 2]])
    targets = torch.tensor([5, 4, 0])  # ranks 0, 2 and missing
    m = ranking_metrics(top, targets, ks=[1, 2, 3, 4])
    ndcg_rank0, ndcg_rank2 = 1 / math.log2(0 + 2), 1 / math.log2(2 + 2)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(1 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["recall@4"] == pytest.approx(2 / 3)
    for k in (1, 2, 3, 4):
        assert m[f"hr@{k}"] == pytest.approx(m[f"recall@{k}"])
    assert m["ndcg@1"] == pytest.approx(ndcg_rank0 / 3)
    assert m["ndcg@2"] == pytest.approx(ndcg_rank0 / 3)
    assert m["ndcg@3"] == pytest.approx((ndcg_rank0 + ndcg_rank2) / 3)
    assert m["mrr"] == pytest.approx((1 / 1 + 1 / 3 + 0) / 3)


def test_ranking_metrics_against_a_loop_on_random_lists():
    gen = torch.Generator().manual_seed(0)
    q, k = 50, 12
    top = torch.stack([torch.randperm(40, generator=gen)[:k] for _ in range(q)])
    targets = torch.randint(0, 40, (q,), generator=gen)
    ks = [1, 5, 12]
    m = ranking_metrics(top, targets, ks)
    for cut in ks:
        recall = ndcg = 0.0
        for row, target in zip(top.tolist(), targets.tolist()):
            if target in row[:cut]:
                recall += 1
                ndcg += 1 / math.log2(row.index(target) + 2)
        assert m[f"recall@{cut}"] == pytest.approx(recall / q)
        assert m[f"ndcg@{cut}"] == pytest.approx(ndcg / q)
    mrr = sum(1 / (row.index(t) + 1) for row, t in zip(top.tolist(), targets.tolist()) if t in row) / q
    assert m["mrr"] == pytest.approx(mrr)


def test_ranking_metrics_rejects_no_queries():
    with pytest.raises(ValueError):
        ranking_metrics(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long), [1])


def test_a_missing_target_is_a_miss_even_when_the_list_is_shorter_than_k():
    """A catalog smaller than k gives lists shorter than k: a target not in them is still a miss."""
    top = torch.tensor([[1, 2],
                        [3, 4]])
    targets = torch.tensor([2, 9])  # rank 1, and not retrieved at all
    m = ranking_metrics(top, targets, ks=[2, 5])
    assert m["recall@2"] == pytest.approx(0.5)
    assert m["recall@5"] == pytest.approx(0.5)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3)) / 2)


def _random_exclusions(rng: np.random.Generator, q: int, n: int, max_per_query: int):
    per_query = [np.sort(rng.choice(n, rng.integers(0, max_per_query + 1), replace=False)) for _ in range(q)]
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in per_query])]).astype(np.int64)
    values = np.concatenate(per_query).astype(np.int64) if per_query else np.zeros(0, np.int64)
    return per_query, offsets, values


@pytest.mark.parametrize("chunk, max_scores", [(1, 1 << 26), (2, 1 << 26), (5, 1 << 26), (13, 1 << 26),
                                               (1000, 1 << 26), (1000, 29 * 3), (1000, 1)])
def test_chunked_topk_equals_brute_force(chunk, max_scores):
    """max_scores caps the block of queries (29 * 3: 3 queries at a time; 1: one) whatever the chunk."""
    rng = np.random.default_rng(chunk)
    q, n, d, k = 13, 29, 6, 7
    queries = torch.from_numpy(rng.normal(size=(q, d)).astype(np.float32))
    items = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32))
    per_query, offsets, values = _random_exclusions(rng, q, n, max_per_query=10)
    invalid = torch.zeros(n, dtype=torch.bool)
    invalid[0] = True

    scores, indices = chunked_topk(queries, items, k, offsets, values, chunk=chunk, invalid_columns=invalid,
                                   max_scores=max_scores)

    brute = queries @ items.t()
    brute[:, 0] = float("-inf")
    for row, excluded in enumerate(per_query):
        brute[row, torch.from_numpy(excluded)] = float("-inf")
    expected = torch.topk(brute, k, dim=1)
    assert indices.shape == (q, k) and scores.shape == (q, k)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(scores, expected.values)
    for row, excluded in enumerate(per_query):
        returned = set(indices[row].tolist())
        assert not returned & set(excluded.tolist()), "an excluded (seen) item was returned"
        assert 0 not in returned


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_chunked_topk_without_exclusions(chunk):
    gen = torch.Generator().manual_seed(chunk)
    queries, items = torch.randn(9, 5, generator=gen), torch.randn(20, 5, generator=gen)
    scores, indices = chunked_topk(queries, items, 4, chunk=chunk)
    expected = torch.topk(queries @ items.t(), 4, dim=1)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(scores, expected.values)
    # k larger than the catalog is clamped to it
    _, all_items = chunked_topk(queries, items, 50, chunk=chunk)
    assert all_items.shape == (9, 20)
    assert all(sorted(r) == list(range(20)) for r in all_items.tolist())


def test_seen_items_are_never_recommended_by_rank_catalog():
    rng = np.random.default_rng(7)
    q, n = 20, 30
    queries = torch.from_numpy(rng.normal(size=(q, 4)).astype(np.float32))
    items = torch.from_numpy(rng.normal(size=(n + 1, 4)).astype(np.float32))
    per_query, offsets, values = _random_exclusions(rng, q, n + 1, max_per_query=15)
    top = rank_catalog(queries, items, 10, (offsets, values), chunk=6)
    assert top.shape == (q, 10)
    for row, excluded in enumerate(per_query):
        returned = top[row].tolist()
        assert 0 not in returned
        assert not set(returned) & set(excluded.tolist())
        assert len(set(returned)) == len(returned)


def test_rank_catalog_never_returns_oov_or_seen_items_even_when_k_exceeds_what_is_left():
    """k >= the number of recommendable items (a small catalog): OOV row 0 and seen items
    must still never come back as recommendations (a negative padding id would be fine)."""
    items = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.8, 0.2], [0.0, 1.0], [0.5, 0.5]])  # row 0: OOV
    query = torch.tensor([[1.0, 0.1]])
    seen = (np.array([0, 2]), np.array([1, 2]))  # the user saw items 1 and 2
    top = rank_catalog(query, items, k=4, seen=seen, chunk=8)
    returned = [c for c in top[0].tolist() if c >= 0]
    assert 0 not in returned
    assert 1 not in returned and 2 not in returned
    assert returned[:2] == [4, 3]


def test_an_oov_target_is_never_a_hit():
    """The evaluation docstring: a held-out item unseen in training (code 0) counts as a miss."""
    items = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.6]])
    query = torch.tensor([[1.0, 0.2], [0.1, 1.0]])
    seen = (np.array([0, 1, 1]), np.array([1]))  # query 0 saw item 1; query 1 saw nothing
    targets = torch.tensor([0, 0])
    top = rank_catalog(query, items, k=10, seen=seen, chunk=1)
    m = ranking_metrics(top, targets, ks=[1, 10])
    assert m["recall@10"] == 0.0
    assert m["ndcg@10"] == 0.0
    assert m["mrr"] == 0.0
