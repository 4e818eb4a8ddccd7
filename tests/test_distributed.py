"""Two CPU processes on gloo (under torchrun) against one process, on the same global batches.

Each test launches the real CLI: ``torchrun --standalone --nproc_per_node=2 -m twotower_rec``.
Training with global in-batch negatives must give the same per-step losses and final weights
as one process (relative difference <= 1e-5 in float32) under row-wise and table-wise
sharding; checkpoints move between world sizes; a save killed with SIGKILL leaves the previous
checkpoint loadable; export and evaluation from two ranks equal those from one.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli, tiny_config

STEPS = 8
REL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Prepared tiny data, a config, and the one-process reference run of STEPS steps."""
    root = tmp_path_factory.mktemp("dist")
    cfg = tiny_config(root)
    cfg["train"].update({"batch_size": 64, "max_steps": STEPS, "checkpoint_every_steps": 4, "val_every_steps": 0})
    cfg["loss"] = {"temperature": 0.1, "global_negatives": True}
    path = root / "dist.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    result = run_cli("prepare", "--config", path, cwd=root)
    assert result.returncode == 0, result.describe()
    reference = train(root, path, "ref", nproc=1)
    return root, path, reference


def train(root: Path, config: Path, name: str, nproc: int, *extra: str, env: dict | None = None,
          expect: int = 0) -> Path:
    out = root / name
    result = run_cli("train", "--config", config, "--set", f"train.out_dir={out}", *extra, cwd=root, nproc=nproc,
                     env=env)
    assert result.returncode == expect, result.describe()
    return out


def losses(out: Path) -> list[float]:
    return json.loads((out / "train_metrics.json").read_text())["losses"]


def weights(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, unsharded (DCP's own converter)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(target))
    state = torch.load(target, weights_only=True)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 1:
            flat[prefix] = value

    walk("", state)
    return flat


def assert_close_relative(a: list[float] | torch.Tensor, b, what: str) -> None:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = a.abs().max().clamp_min(1e-12)
    assert float((a - b).abs().max() / scale) <= REL, f"{what}: max relative difference {(a - b).abs().max() / scale:.3g}"


@pytest.mark.parametrize("sharding, pipeline", [("row_wise", "never"), ("table_wise", "never"),
                                                ("row_wise", "always")])
def test_two_processes_train_exactly_like_one(setup, sharding, pipeline, tmp_path):
    """``pipeline=always`` runs TorchRec's TrainPipelineSparseDist (the CUDA default) on CPU."""
    root, config, reference = setup
    out = train(root, config, f"ws2-{sharding}-{pipeline}", 2, "--set", f"sharding.sharding_types=[{sharding}]",
                "--set", f"train.pipeline={pipeline}")
    assert len(losses(out)) == STEPS
    assert_close_relative(losses(reference), losses(out), f"{sharding} per-step losses")
    ref_w, got_w = weights(reference / "last", tmp_path), weights(out / "last", tmp_path)
    model_keys = sorted(k for k in ref_w if k.startswith("model."))
    assert any("embedding_bags" in k for k in model_keys) and any("mlp" in k for k in model_keys)
    assert sorted(k for k in got_w if k.startswith("model.")) == model_keys
    for key in model_keys:
        assert_close_relative(ref_w[key], got_w[key], key)
    # the fused table optimizer's state too (RowWiseAdagrad's per-row accumulators)
    optim_keys = sorted(k for k in ref_w if k.startswith("optim.") and "embedding_bags" in k)
    assert optim_keys
    for key in optim_keys:
        assert_close_relative(ref_w[key], got_w[key], key)
    if sharding == "row_wise":  # the plan rank 0 printed really is row-wise over both ranks
        meta = json.loads((out / "last" / "meta.json").read_text())
        assert meta["world_size"] == 2


def test_the_causal_encoder_per_event_through_the_pipeline_with_its_table_row_wise(setup):
    """The causal history encoder read per event (task=retrieval) through TorchRec's pipeline at
    two processes, every table asked ``table_row_wise``, which TorchRec's EmbeddingCollection
    (the encoder's table) cannot take: the plan gives that table ``row_wise`` and says so, and the
    losses are the unpipelined one-process run's."""
    root, config, _ = setup
    causal = ("--set", "model.history_encoder=causal", "--set", "model.encoder_dropout=0.0")
    one = train(root, config, "causal-ws1", 1, *causal, "--set", "train.pipeline=never")
    out = root / "causal-ws2-trw"
    result = run_cli("train", "--config", config, "--set", f"train.out_dir={out}", *causal, "--set",
                     "sharding.sharding_types=[table_row_wise]", "--set", "train.pipeline=always", cwd=root, nproc=2)
    assert result.returncode == 0, result.describe()
    assert "history.items.t_history_sequence: row_wise" in result.stderr
    assert "query_tower.embedding_bags.t_user_id: table_row_wise" in result.stderr
    assert "it was offered row_wise instead" in result.stderr
    assert_close_relative(losses(one), losses(out), "causal per-step losses")


def test_local_negatives_do_depend_on_the_world_size(setup):
    """The control: without global negatives each rank sees half the negatives, and the
    comparison above would fail. (So that test can fail.)"""
    root, config, reference = setup
    out = train(root, config, "ws2-local", 2, "--set", "loss.global_negatives=false", "--set", "train.max_steps=3")
    first = losses(out)[0]
    assert abs(first - losses(reference)[0]) / losses(reference)[0] > 1e-3


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_across_world_sizes_continues_exactly(setup, before, after):
    root, config, reference = setup
    name = f"resume-{before}-{after}"
    out = train(root, config, name, before, "--set", "train.max_steps=4",
                "--set", "sharding.sharding_types=[row_wise]")
    assert json.loads((out / "last" / "meta.json").read_text())["world_size"] == before
    train(root, config, name, after, "--resume")
    got = losses(out)
    assert len(got) == STEPS
    assert_close_relative(losses(reference), got, f"losses after resuming {before} -> {after}")


@pytest.mark.parametrize("phase", ["shards_written", "between_renames"])
def test_sigkill_during_a_save_leaves_a_complete_checkpoint(setup, phase):
    """Killed (SIGKILL) in the middle of its second save of ``last`` (step 4), the run leaves a
    loadable checkpoint: the step-2 one when the new shards were not all written, the step-4
    one when only the last rename was missing (the swap is finished on the next open). Resuming
    from it reproduces the uninterrupted run, and no temporary folder is left behind."""
    from twotower_rec.train import checkpoint

    root, config, reference = setup
    out = train(root, config, f"kill-{phase}", 1, "--set", "train.checkpoint_every_steps=2",
                env={"TWOTOWER_KILL_DURING_SAVE": f"{phase}:2"}, expect=-signal.SIGKILL)
    assert not (out / "train_metrics.json").exists()
    leftovers = sorted(p.name for p in out.iterdir() if p.name.startswith(".last."))
    assert leftovers and (phase == "shards_written") == (out / "last").exists(), leftovers
    survivor = checkpoint.resolve(out / "last")
    assert survivor == out / "last"
    assert checkpoint.read_meta(out / "last")["step"] == (2 if phase == "shards_written" else 4)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".last.")]
    train(root, config, f"kill-{phase}", 1, "--resume")
    assert_close_relative(losses(reference), losses(out), "losses after resuming a killed run")


def test_export_and_evaluation_from_two_ranks_equal_one(setup, tmp_path):
    from twotower_rec.data.prepared import PreparedData
    from twotower_rec.serving.exported import ExportedModel

    root, config, reference = setup
    exports, metrics = {}, {}
    for nproc in (1, 2):
        exports[nproc] = tmp_path / f"export{nproc}"
        args = ["--config", config, "--set", f"train.out_dir={reference}", "--set", "sharding.sharding_types=[row_wise]"]
        result = run_cli("export", *args, "--out", exports[nproc], cwd=root, nproc=nproc)
        assert result.returncode == 0, result.describe()
        result = run_cli("evaluate", *args, "--output", tmp_path / f"eval{nproc}.json", cwd=root, nproc=nproc)
        assert result.returncode == 0, result.describe()
        metrics[nproc] = json.loads((tmp_path / f"eval{nproc}.json").read_text())
    one, two = exports[1], exports[2]
    np.testing.assert_array_equal(np.load(one / "item_ids.npy", allow_pickle=False),
                                  np.load(two / "item_ids.npy", allow_pickle=False))
    np.testing.assert_allclose(np.load(one / "item_embeddings.npy"), np.load(two / "item_embeddings.npy"),
                               rtol=1e-5, atol=1e-6)
    a, b = ExportedModel.load(one), ExportedModel.load(two)
    users = [str(u) for u in PreparedData(root / "data").raw_user_ids.tolist()]
    with torch.no_grad():
        qa, qb = a.query_tower(*a.user_query(users)[:2]), b.query_tower(*b.user_query(users)[:2])
    torch.testing.assert_close(qa, qb, rtol=1e-5, atol=1e-6)
    assert [r.item for r in a.recommend_user(users[0], k=10)] == [r.item for r in b.recommend_user(users[0], k=10)]
    for name in ("model", "popularity"):
        for key, value in metrics[1][name].items():
            assert metrics[2][name][key] == pytest.approx(value, abs=1e-6), (name, key)


def test_two_ranks_refuse_a_damaged_checkpoint_and_a_held_out_dir_together(setup, tmp_path):
    """The ranks agree on the outcome: a changed shard (checked in shares, one rank's files
    each) and an out_dir another run holds (rank 0 locks) stop both ranks with the message,
    rather than one rank failing and the other waiting in a collective until the timeout."""
    import shutil
    import time

    from twotower_rec.train.lock import out_dir_lock

    root, config, reference = setup
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shard = sorted((out / "checkpoint").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    args = ["--config", config, "--set", f"train.out_dir={out}", "--set", "distributed.timeout_minutes=2"]
    started = time.monotonic()
    result = run_cli("evaluate", *args, cwd=root, nproc=2, timeout=180)
    assert result.returncode != 0 and f"error: {shard}: its SHA-256 differs" in result.stderr, result.describe()
    with out_dir_lock(out):
        result = run_cli("train", *args, cwd=root, nproc=2, timeout=180)
    assert result.returncode != 0 and "is in use: another `twotower-rec train` holds it" in result.stderr, \
        result.describe()
    # (torchrun itself then prints a traceback of its own ChildFailedError)
    assert time.monotonic() - started < 120  # no rank waited for the collective timeout


def test_sequence_encoder_two_processes_equal_one(setup):
    """The EmbeddingCollection of the sequence encoder shards row-wise too (dropout off: its
    random masks would differ between one and two processes)."""
    root, config, _ = setup
    extra = ["--set", "model.history_encoder=transformer", "--set", "model.encoder_dropout=0.0",
             "--set", "sharding.sharding_types=[row_wise]", "--set", "train.max_steps=4"]
    one = train(root, config, "seq-ws1", 1, *extra)
    two = train(root, config, "seq-ws2", 2, *extra)
    assert len(losses(one)) == 4
    assert_close_relative(losses(one), losses(two), "sequence encoder per-step losses")


def test_table_weight_decay_two_processes_equal_one(setup):
    """fbgemm's L2 decay inside the fused update, on a row-wise sharded table read by three
    features (history + 2 recent items), is the same at one and two processes."""
    root, config, _ = setup
    data = ["--set", f"data.cache_dir={root / 'data-recent'}", "--set", "features.recent_items=2"]
    result = run_cli("prepare", "--config", config, *data, cwd=root)
    assert result.returncode == 0, result.describe()
    extra = [*data, "--set", "sharding.sharding_types=[row_wise]", "--set", "train.max_steps=4"]
    plain = train(root, config, "twd-none", 1, *extra)
    decay = ["--set", "train.table_weight_decay={t_history: 0.5}"]
    one = train(root, config, "twd-ws1", 1, *extra, *decay)
    two = train(root, config, "twd-ws2", 2, *extra, *decay)
    assert losses(one)[1:] != pytest.approx(losses(plain)[1:], rel=1e-4)  # the decay does act
    assert_close_relative(losses(one), losses(two), "per-step losses with table weight decay")


def test_ensemble_two_processes_equal_one(setup):
    """model.members=2: each member trains at two processes as at one (row-wise), and the
    ensemble checkpoint they are loaded into holds the same weights."""
    root, config, _ = setup
    extra = ["--set", "model.members=2", "--set", "sharding.sharding_types=[row_wise]", "--set", "train.max_steps=4"]
    one = train(root, config, "ens-ws1", 1, *extra)
    two = train(root, config, "ens-ws2", 2, *extra)
    for k in range(2):
        assert len(losses(one / f"member{k}")) == 4
        assert_close_relative(losses(one / f"member{k}"), losses(two / f"member{k}"), f"member {k} per-step losses")
    assert losses(one / "member0") != losses(one / "member1")  # seeds 0 and 1
    a, b = weights(one / "checkpoint", root), weights(two / "checkpoint", root)
    assert any("members.1." in key for key in a), sorted(a)
    assert sorted(a) == sorted(b)
    for key in a:
        assert_close_relative(a[key], b[key], key)


@pytest.fixture(scope="module")
def sequence_runs(setup):
    """task=next_item: one-process references over a table of its own and over the
    item tower's shared item-id table (data prepared with features.share_item_table), the
    latter with context positions (next_item.window_context), its window's items masked
    (next_item.mask_window_items) and the next three targets as positives (next_item.future_targets) too."""
    root, config, _ = setup
    shared_data = ["--set", f"data.cache_dir={root / 'data-shared'}", "--set", "features.share_item_table=true"]
    result = run_cli("prepare", "--config", config, *shared_data, cwd=root)
    assert result.returncode == 0, result.describe()
    base = ["--set", "model.history_encoder=causal", "--set", "task=next_item", "--set", "train.batch_size=16",
            "--set", "loss.uniform_negatives=8", "--set", "model.encoder_dropout=0.0", "--set", "train.max_steps=4"]
    options = {"own": base, "shared": [*base, *shared_data, "--set", "next_item.window_context=4",
                                       "--set", "next_item.mask_window_items=true",
                                       "--set", "next_item.future_targets=3"]}
    references = {name: train(root, config, f"seq-{name}-ws1", 1, *extra) for name, extra in options.items()}
    return root, config, options, references


@pytest.mark.parametrize("table, sharding", [("own", "row_wise"), ("own", "table_wise"), ("shared", "row_wise")])
def test_sequence_mode_two_processes_equal_one(sequence_runs, table, sharding):
    """Every position a query, the global batch's deduplicated targets and uniform negatives
    gathered from both ranks: the per-step losses of two processes equal one's."""
    root, config, options, references = sequence_runs
    two = train(root, config, f"seq-{table}-{sharding}-ws2", 2, *options[table],
                "--set", f"sharding.sharding_types=[{sharding}]")
    one = references[table]
    assert len(losses(one)) == 4
    assert_close_relative(losses(one), losses(two), f"sequence mode ({table} table, {sharding}) per-step losses")
    metrics = json.loads((two / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2


def test_sequence_mode_resumes_exactly(sequence_runs):
    """Stopped after 2 of 4 steps and resumed at two processes, the sequence mode continues
    from the same window batch: the losses equal the uninterrupted one-process run's."""
    root, config, options, references = sequence_runs
    out = train(root, config, "seq-resume", 1, *options["own"], "--set", "train.max_steps=2",
                "--set", "train.checkpoint_every_steps=2")
    train(root, config, "seq-resume", 2, *options["own"], "--resume")
    assert_close_relative(losses(references["own"]), losses(out), "sequence mode losses after resuming")
