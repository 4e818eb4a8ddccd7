"""Training and its checkpoints under hostile conditions: two runs on one folder, a planted
pickle, a diverging loss, a checkpoint applied to other data of the same shape, corrupted or
truncated files, a full disk during a save. Each case is refused with one line naming the
folder or file (a user error), and each test failed before its fix.

Most run in this process (the API's functions, a world of one); the lock's test runs two CLI
processes, as two users would.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, run_cli, tiny_config

from twotower_rec.config import load_config
from twotower_rec.errors import CheckpointError


class InProcess:
    """Run an API verb in this process (it joins and leaves its own world of one), with the
    environment variables ``init_distributed`` sets put back afterwards."""

    def __call__(self, fn, *args, **kwargs):
        saved = dict(os.environ)
        try:
            return fn(*args, **kwargs)
        finally:
            os.environ.clear()
            os.environ.update(saved)


run = InProcess()


def _config(root: Path, *extra: str):
    """The tiny config of conftest (data under ``root``), a one-epoch run saving ``last`` every 2 steps."""
    path = root / "base.yaml"
    if not path.is_file():
        cfg = tiny_config(root)
        cfg["train"].update({"epochs": 1, "checkpoint_every_steps": 2, "log_every_steps": 1})
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return load_config(path, list(extra))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Tiny prepared data and one finished run (``checkpoint`` and ``last``), trained in process."""
    from twotower_rec import api

    root = tmp_path_factory.mktemp("ckpt")
    cfg = _config(root)
    run(api.prepare, cfg)
    result = run(api.train, cfg)
    return root, cfg, result


def _copy_run(base, tmp_path, *extra: str):
    """A copy of the base run's out_dir under ``tmp_path``, and a config pointing at it."""
    root, cfg, _ = base
    out = tmp_path / "run"
    shutil.copytree(cfg.train.out_dir, out)
    return _config(root, f"train.out_dir={out}", *extra), out


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# A small model of user and item ids alone, for interaction files without side features.
_SMALL = ("features.user_features=[user_id]", "features.item_features=[item_id]", "features.item_dense=[]",
          "model.embedding_dim=8", "model.mlp_dims=[8]", "model.output_dim=8")


# --- 5. train --resume unpickles nothing ----------------------------------------------------------


class _Planted:
    """Unpickling this creates a marker file: what a planted ``rank0.pt`` could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("checksum", ["left", "rewritten"])
def test_resume_refuses_a_pickle_planted_as_the_rng_state(base, tmp_path, checksum):
    """Whether or not whoever planted it also rewrote its checksum in meta.json, the file is
    refused and its code never runs."""
    from twotower_rec import api
    from twotower_rec.train.integrity import sha256_file

    cfg, out = _copy_run(base, tmp_path, "train.epochs=2")
    marker = tmp_path / "pwned"
    planted = out / "last" / "rng" / "rank0.pt"
    torch.save({"rng": _Planted(marker), "extra": {}}, planted)
    if checksum == "rewritten":
        meta = json.loads((out / "last" / "meta.json").read_text())
        meta["files"]["rng/rank0.pt"] = {"bytes": planted.stat().st_size, "sha256": sha256_file(planted)}
        (out / "last" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        run(api.train, cfg, resume=True)
    assert not marker.exists()
    message = _one_line(err)
    assert str(planted) in message
    assert ("meta.json records" if checksum == "left" else "nothing in it was run") in message


def test_resume_from_an_rng_file_of_an_earlier_version_says_retrain(base, tmp_path):
    """The pickled form earlier versions wrote (numpy's state as a tuple with an array) is
    refused too, with the fix, rather than unpickled."""
    import random

    from twotower_rec import api

    cfg, out = _copy_run(base, tmp_path, "train.epochs=2")
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(), "cuda": None}
    path = out / "last" / "rng" / "rank0.pt"
    torch.save({"rng": old, "extra": {}}, path)
    # the checksum recorded for the file no longer holds either: rewrite it as an old checkpoint had none
    meta = json.loads((out / "last" / "meta.json").read_text())
    meta.pop("files", None)
    (out / "last" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        run(api.train, cfg, resume=True)
    message = _one_line(err)
    assert str(path) in message and "re-train" in message


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    from twotower_rec.train.checkpoint import rng_state, set_rng_state

    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    np.random.standard_normal(), random.gauss(0, 1)  # each caches a second gaussian: the states hold one
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


@pytest.mark.parametrize("verb", ["evaluate", "resume"])
def test_a_pickle_planted_as_dcp_metadata_is_refused_and_never_run(base, tmp_path, verb):
    """DCP unpickles ``.metadata`` with plain ``pickle.load``: it is read with only DCP's own
    metadata classes allowed, even when the planter rewrote its checksum in meta.json."""
    import pickle

    from twotower_rec import api
    from twotower_rec.train.integrity import sha256_file

    cfg, out = _copy_run(base, tmp_path, "train.epochs=2")
    folder = out / ("last" if verb == "resume" else "checkpoint")
    marker = tmp_path / "pwned"
    planted = folder / ".metadata"
    planted.write_bytes(pickle.dumps(_Planted(marker)))
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"][".metadata"] = {"bytes": planted.stat().st_size, "sha256": sha256_file(planted)}
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as err:
        run(api.evaluate, cfg) if verb == "evaluate" else run(api.train, cfg, resume=True)
    assert not marker.exists()
    message = _one_line(err)
    assert str(planted) in message and "pathlib" in message, message


# --- 9b. a non-finite loss stops the run -----------------------------------------------------------


def test_a_loss_that_becomes_infinite_stops_training_and_keeps_the_last_good_checkpoint(base, tmp_path,
                                                                                      monkeypatch):
    from twotower_rec import api
    from twotower_rec.errors import TrainingError
    from twotower_rec.train import checkpoint, step

    root, _, _ = base
    out = tmp_path / "run"
    cfg = _config(root, f"train.out_dir={out}", "train.log_every_steps=3", "train.checkpoint_every_steps=2",
                  "train.pipeline=never")
    calls = []
    forward_loss = step.forward_loss

    def diverging(model, batch, task, bf16=False):
        calls.append(1)
        loss, value = forward_loss(model, batch, task, bf16)
        if len(calls) >= 5:  # step 5 on: the loss overflows
            loss = loss * float("inf")
        return loss, loss.detach()

    monkeypatch.setattr(step, "forward_loss", diverging)
    with pytest.raises(TrainingError) as err:
        run(api.train, cfg)
    message = _one_line(err)
    assert "step 5" in message and ("inf" in message or "nan" in message), message
    assert checkpoint.read_meta(out / "last")["step"] == 4  # step 6's save never happened
    assert not (out / "train_metrics.json").exists()


def test_an_infinite_rating_under_mse_stops_at_the_first_step(tmp_path):
    """A rating that overflows (here written into the prepared column) makes mse's loss inf."""
    from twotower_rec import api
    from twotower_rec.errors import TrainingError

    rows = [(u, 10 + (u * 3 + k) % 17, 100 * u + k, 4.0) for u in range(1, 41) for k in range(8)]
    path = tmp_path / "events.csv"
    pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"]).to_csv(path, index=False)
    cfg = load_config(None, ["data.source=interactions", f"data.interactions_path={path}",
                             f"data.cache_dir={tmp_path / 'cache'}", f"train.out_dir={tmp_path / 'run'}",
                             "task=pointwise", "pointwise.objective=mse", "train.batch_size=32", "train.epochs=1",
                             "train.progress=false", *_SMALL])
    run(api.prepare, cfg)
    rating = np.load(tmp_path / "cache" / "interactions" / "rating.npy", mmap_mode="r+")
    rating[:] = np.inf
    rating.flush()
    del rating
    with pytest.raises(TrainingError) as err:
        run(api.train, cfg)
    assert "step 1" in _one_line(err)


# --- 10. a checkpoint on other data of the same shape ----------------------------------------------


def test_a_checkpoint_is_refused_on_other_ids_with_the_same_counts(tmp_path):
    """The same file name, the same counts, other users and items: the feature spec is the same,
    the vocabularies are not."""
    from twotower_rec import api

    path = tmp_path / "events.csv"

    def write(offset: int) -> None:
        rows = [(offset + u, offset + 10 + (u * 3 + k) % 17, 100 * u + k) for u in range(1, 41) for k in range(8)]
        pd.DataFrame(rows, columns=["user", "item", "timestamp"]).to_csv(path, index=False)

    cfg = load_config(None, ["data.source=interactions", f"data.interactions_path={path}",
                             f"data.cache_dir={tmp_path / 'cache'}", f"train.out_dir={tmp_path / 'run'}",
                             f"export.dir={tmp_path / 'export'}", "train.batch_size=32", "train.epochs=1",
                             "train.progress=false", "eval.ks=[5]", *_SMALL])
    write(0)
    run(api.prepare, cfg)
    run(api.train, cfg)
    run(api.evaluate, cfg)  # accepted on its own data
    spec = (tmp_path / "cache" / "feature_spec.json").read_text()
    write(1000)
    run(api.prepare, cfg)
    assert (tmp_path / "cache" / "feature_spec.json").read_text() == spec  # the spec cannot tell them apart
    for verb in (api.evaluate, api.export):
        with pytest.raises(CheckpointError) as err:
            run(verb, cfg)
        message = _one_line(err)
        assert str(tmp_path / "run" / "checkpoint") in message and "ids" in message, message
    assert not (tmp_path / "export").exists()


# --- 11, 17. corrupted checkpoints -----------------------------------------------------------------


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.distcp"))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _corrupt(folder: Path, how: str) -> str:
    """Damage the checkpoint at ``folder``; the name the error must give."""
    if how == "flipped":
        _flip(_shards(folder)[0])
        return _shards(folder)[0].name
    if how == "truncated":
        _truncate(_shards(folder)[0])
        return _shards(folder)[0].name
    if how == "no_metadata":
        (folder / ".metadata").unlink()
        return ".metadata"
    if how == "meta_not_json":
        (folder / "meta.json").write_text('{"format_version": 1, "step": ')
        return "meta.json"
    if how == "meta_missing_keys":
        meta = json.loads((folder / "meta.json").read_text())
        del meta["config"]
        (folder / "meta.json").write_text(json.dumps(meta))
        return "config"
    raise AssertionError(how)


CORRUPTIONS = ["flipped", "truncated", "no_metadata", "meta_not_json", "meta_missing_keys"]


@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("verb", ["evaluate", "export", "resume"])
def test_a_corrupted_checkpoint_is_one_line_naming_it(base, tmp_path, verb, how):
    from twotower_rec import api

    cfg, out = _copy_run(base, tmp_path, f"export.dir={tmp_path / 'export'}", "train.epochs=2")
    folder = out / ("last" if verb == "resume" else "checkpoint")
    fragment = _corrupt(folder, how)
    call = {"evaluate": lambda: api.evaluate(cfg), "export": lambda: api.export(cfg),
            "resume": lambda: api.train(cfg, resume=True)}[verb]
    with pytest.raises(CheckpointError) as err:
        run(call)
    message = _one_line(err)
    assert str(folder) in message and fragment in message, message
    if how == "flipped":
        assert "SHA-256" in message
    assert not (tmp_path / "export").exists()


def test_a_corrupted_checkpoint_through_the_cli_is_one_error_line(base, tmp_path):
    from test_cli_errors import assert_user_error

    cfg, out = _copy_run(base, tmp_path)
    _flip(_shards(out / "checkpoint")[0])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config(base[0]), sort_keys=False))
    result = run_cli("evaluate", "--config", config, "--set", f"train.out_dir={out}", cwd=tmp_path)
    assert_user_error(result, str(out / "checkpoint"), _shards(out / "checkpoint")[0].name, "SHA-256")


def test_meta_records_every_file_of_the_checkpoint(base):
    _, cfg, _ = base
    for name in ("checkpoint", "last"):
        folder = Path(cfg.train.out_dir) / name
        meta = json.loads((folder / "meta.json").read_text())
        on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "meta.json")
        assert sorted(meta["files"]) == on_disk
        assert ".metadata" in on_disk and any(n.endswith(".distcp") for n in on_disk)
        for rel, entry in meta["files"].items():
            assert entry["bytes"] == (folder / rel).stat().st_size and len(entry["sha256"]) == 64


# --- 15. a full disk during a save ------------------------------------------------------------------


@pytest.mark.parametrize("where", ["shards", "rng", "meta"])
def test_a_full_disk_during_a_save_names_the_folder_and_keeps_the_previous_checkpoint(base, tmp_path, monkeypatch,
                                                                                    where):
    import torch.distributed.checkpoint.filesystem as dcp_fs

    from twotower_rec import api
    from twotower_rec.train import checkpoint

    root, _, _ = base
    out = tmp_path / "run"
    cfg = _config(root, f"train.out_dir={out}", "train.checkpoint_every_steps=2")
    saves = {"n": 0}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_save = checkpoint.save

    def second_save_fails(path, *args, **kwargs):
        if Path(path).name == "last":
            saves["n"] += 1
            if saves["n"] == 2:
                target = {"shards": (dcp_fs.FileSystemWriter, "write_data"), "rng": (checkpoint.torch, "save"),
                          "meta": (checkpoint, "_write_json")}[where]
                monkeypatch.setattr(*target, full)
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", second_save_fails)
    with pytest.raises(CheckpointError) as err:
        run(api.train, cfg)
    message = _one_line(err)
    assert str(out / "last") in message and "No space left on device" in message, message
    monkeypatch.undo()
    assert checkpoint.read_meta(out / "last")["step"] == 2
    assert not [p.name for p in out.iterdir() if p.name.startswith(".last.")]  # the half-written folder is gone


def test_ctrl_c_during_a_save_finishes_the_checkpoint_then_interrupts(base, tmp_path, monkeypatch):
    """A SIGINT that lands inside DCP's write used to reach the CLI as a CheckpointException (a
    traceback, exit 1, a half-written folder): the save now completes, then KeyboardInterrupt."""
    import signal

    import torch.distributed.checkpoint.filesystem as dcp_fs

    from twotower_rec import api
    from twotower_rec.train import checkpoint

    root, _, _ = base
    out = tmp_path / "run"
    cfg = _config(root, f"train.out_dir={out}", "train.checkpoint_every_steps=2")
    real_write = dcp_fs.FileSystemWriter.write_data
    saves = {"n": 0}

    def interrupted_write(self, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # the second save of `last`: Ctrl-C half-way through the shards
            os.kill(os.getpid(), signal.SIGINT)
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(dcp_fs.FileSystemWriter, "write_data", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        run(api.train, cfg)
    monkeypatch.undo()
    assert checkpoint.read_meta(out / "last")["step"] == 4  # the interrupted save is whole
    assert not [p.name for p in out.iterdir() if p.name.startswith(".last.")]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


# --- 3. one train per out_dir -----------------------------------------------------------------------


def test_a_second_train_on_the_same_out_dir_is_refused_while_the_first_runs(base, tmp_path):
    from test_cli_errors import assert_user_error

    root, _, _ = base
    cfg = tiny_config(root)
    out = tmp_path / "run"
    cfg["train"].update({"out_dir": str(out), "epochs": 250, "max_steps": 0, "log_every_steps": 50,
                         "val_every_steps": 0})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    first = subprocess.Popen([sys.executable, "-m", "twotower_rec", "train", "--config", str(config)], cwd=REPO,
                             env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in first.stderr:  # "device: ..." is printed once the run holds the folder
            lines.append(line)
            if line.startswith("device:"):
                break
        assert first.poll() is None, "".join(lines)
        started = time.monotonic()
        second = run_cli("train", "--config", config, "--set", "train.epochs=1", cwd=tmp_path)
        assert first.poll() is None, "the first run ended before the second was checked: make it longer"
        assert_user_error(second, str(out), "another")
        refused = time.monotonic() - started
        assert refused < 60
        rest = first.communicate(timeout=400)[1]
        print(f"the second run was refused after {refused:.1f}s, the first ended {time.monotonic() - started:.1f}s "
              "after the second started")
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, "".join(lines) + rest
    assert json.loads((out / "train_metrics.json").read_text())["steps"] > 0
    # a lock whose holder has gone is free: a new run takes it
    result = run_cli("train", "--config", config, "--set", "train.epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.describe()


def test_the_out_dir_lock_is_exclusive_and_released(tmp_path):
    from twotower_rec.train.lock import out_dir_lock

    with out_dir_lock(tmp_path / "run"):
        code = ("import sys; from twotower_rec.train.lock import out_dir_lock\n"
                f"try:\n    out_dir_lock({str(tmp_path / 'run')!r}).__enter__()\n"
                "except Exception as err:\n    print(type(err).__name__, err); sys.exit(3)\n")
        held = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert held.returncode == 3 and "another" in held.stdout and str(tmp_path / "run") in held.stdout, held
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert free.returncode == 0, free
