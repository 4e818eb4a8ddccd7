"""retrieval.batch_negatives: each row scored against a sample of the batch's positives instead of
all of them. Sampling every positive is the in-batch softmax (value and gradients); a smaller
sample is checked against a hand computation; training draws the same sample on every rank."""

from __future__ import annotations

import math

import pytest
import torch

from twotower_rec.config import ConfigError, load_config
from twotower_rec.errors import ConfigWarning
from twotower_rec.losses.softmax import in_batch_softmax, sampled_batch_softmax


def _case(seed: int, rows: int, positives: int, extra: int, duplicates: bool = True):
    gen = torch.Generator().manual_seed(seed)
    n = positives + extra
    query = torch.nn.functional.normalize(torch.randn(rows, 8, generator=gen), dim=1).requires_grad_()
    item = torch.nn.functional.normalize(torch.randn(n, 8, generator=gen), dim=1).requires_grad_()
    ids = torch.randint(0, 5 if duplicates else 10_000, (n,), generator=gen)
    log_q = torch.randn(n, generator=gen)
    return query, item, ids, log_q


def _loss_and_grads(fn, query, item):
    query.grad = item.grad = None
    loss = fn()
    loss.backward()
    return loss.detach(), query.grad.clone(), item.grad.clone()


@pytest.mark.parametrize("masked, with_log_q, offset, extra", [
    (True, True, 0, 0), (True, True, 4, 6), (False, False, 2, 3), (False, True, 0, 5), (True, False, 3, 0)])
def test_sampling_every_positive_is_the_in_batch_softmax(masked, with_log_q, offset, extra):
    rows, positives = 7, 7 + offset + 2
    query, item, ids, log_q = _case(offset + extra, rows, positives, extra)
    kwargs = dict(item_ids=ids if masked else None, positive_offset=offset, log_q=log_q if with_log_q else None)
    want = _loss_and_grads(lambda: in_batch_softmax(query, item, 0.1, **kwargs), query, item)
    pick = torch.randperm(positives, generator=torch.Generator().manual_seed(1))  # every positive, any order
    got = _loss_and_grads(lambda: sampled_batch_softmax(query, item, 0.1, pick, positives, **kwargs), query, item)
    for name, a, b in zip(("loss", "d query", "d item"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("masked", [True, False])
def test_a_sample_of_the_positives_by_hand(masked):
    """Row b: its positive, then the sampled positives (less its own column, and with masking
    every candidate with its positive's id), then the uniform negatives; logQ subtracted."""
    rows, positives, extra, offset = 5, 8, 3, 2
    query, item, ids, log_q = _case(3, rows, positives, extra)
    pick = torch.tensor([6, 2, 4])
    got = sampled_batch_softmax(query, item, 0.2, pick, positives, item_ids=ids if masked else None,
                                positive_offset=offset, log_q=log_q)
    total = 0.0
    for b in range(rows):
        own = offset + b
        columns = [own] + [int(p) for p in pick if int(p) != own] + list(range(positives, positives + extra))
        if masked:
            columns = [own] + [c for c in columns[1:] if int(ids[c]) != int(ids[own])]
        logits = [float(query[b] @ item[c]) / 0.2 - float(log_q[c]) for c in columns]
        top = max(logits)
        total += top + math.log(sum(math.exp(x - top) for x in logits)) - logits[0]
    assert float(got) == pytest.approx(total / rows, rel=1e-5)


def test_batch_negatives_is_checked():
    with pytest.raises(ConfigError, match="retrieval.batch_negatives"):
        load_config(None, ["retrieval.batch_negatives=-1"])
    with pytest.raises(ConfigError, match="retrieval.chunk_size"):
        load_config(None, ["retrieval.batch_negatives=64", "retrieval.chunk_size=32"])
    with pytest.raises(ConfigError, match="retrieval.compile"):
        load_config(None, ["retrieval.batch_negatives=64", "retrieval.compile=true"])
    with pytest.warns(ConfigWarning, match="retrieval.batch_negatives=64 is read by task=retrieval only; "
                                           "task=next_item ignores it"):
        load_config(None, ["retrieval.batch_negatives=64", "task=next_item", "model.history_encoder=causal",
                           "features.history_length=5", "features.recent_items=0"])


def test_training_with_a_sample_of_the_batch_at_one_and_two_processes(tmp_path):
    """retrieval.batch_negatives through the real CLI, with logQ, masking and uniform negatives,
    global negatives over 2 gloo processes: the same per-step losses as one process (every
    rank draws the same sample), and not those of scoring the whole batch."""
    from conftest import prepared_config, tiny_config, training_losses

    cfg = tiny_config(tmp_path)
    cfg["train"].update({"batch_size": 64, "max_steps": 5, "val_every_steps": 0})
    cfg["loss"] = {"temperature": 0.1, "uniform_negatives": 16}
    path = prepared_config(tmp_path, cfg, "sampled")
    losses = training_losses(tmp_path, path, [(name, nproc, [f"retrieval.batch_negatives={k}"]) for name, nproc, k in (
        ("whole", 1, 0), ("sample-ws1", 1, 16), ("sample-ws2", 2, 16))])
    assert len(losses["sample-ws1"]) == 5
    assert losses["sample-ws2"] == pytest.approx(losses["sample-ws1"], rel=1e-5)
    assert losses["sample-ws1"][0] != pytest.approx(losses["whole"][0], rel=1e-3)
