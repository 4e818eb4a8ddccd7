"""The chunked in-batch softmax equals the materialised one: value and every gradient, with
accidental-hit masking, logQ, uniform negatives, a positive offset (global negatives) and a
learned temperature, at chunk sizes from 1 to more than the candidates."""

from __future__ import annotations

import pytest
import torch

from twotower_rec.losses.chunked import chunked_in_batch_softmax
from twotower_rec.losses.softmax import in_batch_softmax


def _case(seed: int, rows: int, extra: int, offset: int, duplicates: bool):
    gen = torch.Generator().manual_seed(seed)
    n = rows + offset + extra
    query = torch.nn.functional.normalize(torch.randn(rows, 8, generator=gen), dim=1).requires_grad_()
    item = torch.nn.functional.normalize(torch.randn(n, 8, generator=gen), dim=1).requires_grad_()
    ids = torch.randint(0, 6 if duplicates else 10_000, (n,), generator=gen)
    log_q = torch.randn(n, generator=gen)
    return query, item, ids, log_q


def _grads(loss_fn, query, item, temperature):
    for t in (query, item, temperature):
        if isinstance(t, torch.Tensor):
            t.grad = None
    loss = loss_fn()
    loss.backward()
    return [loss.detach()] + [t.grad.clone() for t in (query, item, temperature) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("masked, with_log_q, offset, extra", [
    (True, True, 0, 0), (True, True, 5, 11), (False, False, 3, 4), (True, False, 0, 9), (False, True, 2, 0)])
def test_chunked_equals_materialised(chunk, masked, with_log_q, offset, extra):
    query, item, ids, log_q = _case(chunk + offset + extra, rows=13, extra=extra, offset=offset, duplicates=True)
    temperature = torch.tensor(0.07, requires_grad=True)
    kwargs = dict(item_ids=ids if masked else None, positive_offset=offset, log_q=log_q if with_log_q else None)
    want = _grads(lambda: in_batch_softmax(query, item, temperature, **kwargs), query, item, temperature)
    got = _grads(lambda: chunked_in_batch_softmax(query, item, temperature, chunk=chunk, **kwargs),
                 query, item, temperature)
    for name, a, b in zip(("loss", "d query", "d item", "d temperature"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_float_temperature_and_a_row_with_every_negative_masked():
    query, item, _, _ = _case(1, rows=4, extra=0, offset=0, duplicates=False)
    ids = torch.tensor([3, 3, 3, 3])  # every candidate is every row's accidental hit: the loss is 0
    want = _grads(lambda: in_batch_softmax(query, item, 0.1, item_ids=ids), query, item, 0.1)
    got = _grads(lambda: chunked_in_batch_softmax(query, item, 0.1, item_ids=ids, chunk=3), query, item, 0.1)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(got[0]) == pytest.approx(0.0, abs=1e-6)


def test_a_bad_chunk_is_refused():
    query, item, _, _ = _case(0, rows=2, extra=0, offset=0, duplicates=False)
    with pytest.raises(ValueError, match="chunk"):
        chunked_in_batch_softmax(query, item, 0.1, chunk=0)


def test_training_with_chunks_equals_training_without_at_one_and_two_processes(tmp_path):
    """retrieval.chunk_size through the real CLI: logQ, masking, uniform negatives and a learned
    temperature on, global negatives over 2 gloo processes; per-step losses as without chunks."""
    from conftest import prepared_config, tiny_config, training_losses

    cfg = tiny_config(tmp_path)
    cfg["train"].update({"batch_size": 64, "max_steps": 5, "val_every_steps": 0})
    cfg["loss"] = {"temperature": 0.1, "uniform_negatives": 16, "learn_temperature": True}
    path = prepared_config(tmp_path, cfg, "chunks")
    losses = training_losses(tmp_path, path, [(name, nproc, [f"retrieval.chunk_size={chunk}"])
                                              for name, nproc, chunk in (
        ("whole", 1, 0), ("chunks-ws1", 1, 24), ("chunks-ws2", 2, 24))])
    assert len(losses["whole"]) == 5
    for name in ("chunks-ws1", "chunks-ws2"):
        assert losses[name] == pytest.approx(losses["whole"], rel=1e-5), name
