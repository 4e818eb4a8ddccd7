"""retrieval.compile: the compiled in-batch softmax gives the eager numbers.

The pure loss expression the compiler sees equals the eager in-batch softmax (value and
gradients, with masking, logQ and an offset); through the real CLI, 50 compiled steps give the
eager per-step losses within 1e-5 under DistributedModelParallel, with TorchRec's pipeline, and
at 2 gloo processes with global and uniform negatives; the compiled run's checkpoint evaluates.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from twotower_rec.losses.softmax import in_batch_softmax, softmax_cross_entropy


def _case(seed: int, rows: int, extra: int, duplicates: bool):
    gen = torch.Generator().manual_seed(seed)
    query = torch.nn.functional.normalize(torch.randn(rows, 8, generator=gen), dim=1).requires_grad_()
    item = torch.nn.functional.normalize(torch.randn(rows + extra, 8, generator=gen), dim=1).requires_grad_()
    ids = torch.randint(0, 5 if duplicates else 10_000, (rows + extra,), generator=gen)
    return query, item, ids, torch.randn(rows + extra, generator=gen)


def _value_and_grads(loss, query, item):
    query.grad = item.grad = None
    value = loss()
    value.backward()
    return value.detach(), query.grad.clone(), item.grad.clone()


@pytest.mark.parametrize("duplicates, masked, with_log_q, offset", [
    (True, True, True, 0), (True, True, False, 3), (False, True, True, 2), (True, False, True, 0)])
def test_the_pure_loss_equals_the_in_batch_softmax(duplicates, masked, with_log_q, offset):
    query, item, ids, log_q = _case(offset, rows=9, extra=offset + 6, duplicates=duplicates)
    ids, log_q = (ids if masked else None), (log_q if with_log_q else None)
    targets = torch.arange(9) + offset
    want = _value_and_grads(lambda: in_batch_softmax(query, item, 0.1, ids, offset, log_q), query, item)
    got = _value_and_grads(lambda: softmax_cross_entropy(query, item, 0.1, targets, log_q, ids), query, item)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _train(tmp_path, path, name, nproc=1, *sets):
    from conftest import run_cli

    out = tmp_path / name
    result = run_cli("train", "--config", path, "--set", f"train.out_dir={out}", *sets, cwd=tmp_path, nproc=nproc,
                     timeout=600)
    assert result.returncode == 0, result.describe()
    compiled = "retrieval.compile: the in-batch softmax is compiled" in result.stderr
    assert compiled == ("retrieval.compile=true" in sets)  # the compiled runs did compile
    return out, json.loads((out / "train_metrics.json").read_text())["losses"]


def test_compiled_training_gives_the_eager_losses_at_one_and_two_processes(tmp_path):
    """50 steps of the two-tower with logQ, masking, 16 uniform negatives and a learned
    temperature: eager, compiled, compiled through the pipeline, and compiled at 2 processes
    (global negatives) against eager at 2; then evaluate the compiled run."""
    from conftest import run_cli, tiny_config

    cfg = tiny_config(tmp_path)
    cfg["train"].update({"batch_size": 64, "max_steps": 50, "epochs": 100, "log_every_steps": 10})
    cfg["loss"] = {"temperature": 0.1, "uniform_negatives": 16, "learn_temperature": True}
    path = tmp_path / "compile.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert run_cli("prepare", "--config", path, cwd=tmp_path).returncode == 0
    on = ("--set", "retrieval.compile=true")
    _, eager = _train(tmp_path, path, "eager")
    compiled_dir, compiled = _train(tmp_path, path, "compiled", 1, *on)
    _, piped = _train(tmp_path, path, "compiled-pipeline", 1, *on, "--set", "train.pipeline=always")
    _, eager2 = _train(tmp_path, path, "eager-ws2", 2)
    _, compiled2 = _train(tmp_path, path, "compiled-ws2", 2, *on)
    assert len(eager) == 50 and len(eager2) == 50
    assert compiled == pytest.approx(eager, abs=1e-5)
    assert piped == pytest.approx(eager, abs=1e-5)
    assert compiled2 == pytest.approx(eager2, abs=1e-5)
    assert eager[-1] < eager[0] - 0.05  # it trained

    result = run_cli("evaluate", "--config", path, "--set", f"train.out_dir={compiled_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.describe()
