"""TensorBoard curves (``train.tensorboard``): what a run writes to ``<out_dir>/tensorboard``
matches what it reports in ``train_metrics.json``; a resumed run appends without repeating
steps; ``false`` writes nothing; only rank 0 writes; the package is imported only when on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONFIGS, REPO, prepared_config, run_cli

from twotower_rec.config import load_config
from twotower_rec.distributed.env import DistEnv
from twotower_rec.errors import ConfigError
from twotower_rec.train import tensorboard
from twotower_rec.train.tensorboard import resolve, validation_scalars, writes_curves

# The event-file reader; without the package only the unit tests of the rule run.
needs_tensorboard = pytest.mark.skipif(not tensorboard.tensorboard_installed(),
                                       reason="the tensorboard package is not installed (bash launch/setup.sh)")


def _env(rank: int) -> DistEnv:
    import torch

    return DistEnv(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"), backend="gloo")


def test_the_option_resolves_to_on_or_off_and_true_needs_the_package():
    assert resolve(None, installed=True) is True
    assert resolve(None, installed=False) is False
    assert resolve(False, installed=True) is False
    assert resolve(True, installed=True) is True
    with pytest.raises(ConfigError, match=r"^train\.tensorboard=true: .*`pip install tensorboard`.*launch/setup\.sh"):
        resolve(True, installed=False)
    assert load_config(None).train.tensorboard is None
    assert load_config(None, ["train.tensorboard=false"]).train.tensorboard is False
    with pytest.raises(ConfigError, match="train.tensorboard: expected true or false"):
        load_config(None, ["train.tensorboard=sometimes"])


def test_only_rank_0_writes_and_its_refusal_is_raised(monkeypatch):
    """Rank 0 decides (in one process broadcast_object hands back the rank's own value, so a
    rank > 0 sees no refusal of its own; in a real world it receives rank 0's)."""
    monkeypatch.setattr(tensorboard, "tensorboard_installed", lambda: True)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", sys.modules.get("torch.utils.tensorboard")
                        or type(sys)("torch.utils.tensorboard"))  # the import check finds a module
    assert writes_curves(True, _env(0)) is True
    assert writes_curves(None, _env(0)) is True
    assert writes_curves(True, _env(1)) is False
    assert writes_curves(None, _env(1)) is False
    assert writes_curves(False, _env(0)) is False
    monkeypatch.setattr(tensorboard, "tensorboard_installed", lambda: False)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        writes_curves(True, _env(0))
    assert writes_curves(None, _env(0)) is False
    assert writes_curves(True, _env(1)) is False


def test_validation_curves_leave_out_the_sample_counts():
    result = {"ndcg@10": 0.25, "recall@10": 0.5, "mrr": 0.125, "events": 200.0, "users": 200.0, "pairs": 400.0}
    assert validation_scalars(result) == {"val/ndcg@10": 0.25, "val/recall@10": 0.5, "val/mrr": 0.125}


def test_the_package_is_not_imported_when_off():
    """``train.tensorboard=false`` (and the look-up null does) import nothing of TensorBoard."""
    script = ("import sys, torch\n"
              "from twotower_rec.distributed.env import DistEnv\n"
              "from twotower_rec.train.tensorboard import open_curves, tensorboard_installed, writes_curves\n"
              "env = DistEnv(0, 0, 1, torch.device('cpu'), 'gloo')\n"
              "tensorboard_installed()\n"
              "on = writes_curves(False, env)\n"
              "open_curves('unused', on).scalars(1, {'train/loss': 1.0})\n"
              "print(on, sorted(m for m in sys.modules if 'tensorboard' in m and 'twotower_rec' not in m))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "False []"
    assert not (REPO / "unused").exists()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """configs/tiny.yaml, its paths under a tmp folder, prepared once: (root, config path)."""
    root = tmp_path_factory.mktemp("tensorboard")
    cfg = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    cfg["run_dir"] = str(root / "run")
    cfg["train"].update({"progress": False, "val_every_steps": 10, "max_steps": 30, "checkpoint_every_steps": 0})
    return root, prepared_config(root, cfg, "tiny")


def _train(root: Path, config: Path, out: Path, *sets: str, resume: str | None = None):
    args = ["train", "--config", config, "--set", f"train.out_dir={out}"]
    args += [a for s in sets for a in ("--set", s)] + ([] if resume is None else ["--resume", resume])
    result = run_cli(*args, cwd=root)
    assert result.returncode == 0, result.describe()
    return result, json.loads((out / "train_metrics.json").read_text())


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every curve in ``folder`` as TensorBoard reads it (earlier runs' purged steps hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@needs_tensorboard
def test_the_curves_hold_what_the_run_reports(tiny):
    root, config = tiny
    out = root / "curves"
    sets = ("train.tensorboard=true", "loss.learn_temperature=true", "train.warmup_steps=10",
            "train.lr_schedule=cosine")
    result, metrics = _train(root, config, out, *sets)
    folder = out / "tensorboard"
    assert f"TensorBoard curves in {folder}" in result.stderr
    curves = _scalars(folder)
    steps, losses = metrics["steps"], metrics["losses"]
    assert steps == 30 and len(losses) == steps

    assert [s for s, _ in curves["train/loss"]] == list(range(1, steps + 1))  # every step's loss, once
    assert [v for _, v in curves["train/loss"]] == pytest.approx(losses, rel=1e-6)  # stored as float32

    cfg = load_config(config, [f"train.out_dir={out}", *sets])
    log_steps = list(range(cfg.train.log_every_steps, steps + 1, cfg.train.log_every_steps))
    from twotower_rec.distributed.sharding import sparse_lr
    from twotower_rec.train.optim import lr_factor

    # the dense rate the step at s ran with: set before it, from its 0-based index s - 1
    expected_lr = [cfg.train.dense_lr * lr_factor(s - 1, steps, cfg.train) for s in log_steps]
    assert [s for s, _ in curves["train/dense_lr"]] == log_steps
    assert [v for _, v in curves["train/dense_lr"]] == pytest.approx(expected_lr, rel=1e-6)
    assert curves["train/dense_lr"][0][1] < curves["train/dense_lr"][1][1]  # warming up
    assert [v for _, v in curves["train/table_lr"]] == pytest.approx([sparse_lr(cfg.train)] * len(log_steps))
    rates = [v for s, v in curves["train/examples_per_second"]]
    assert len(rates) == len(log_steps) and min(rates) > 0
    assert [s for s, _ in curves["train/learned_temperature"]] == log_steps
    assert curves["train/learned_temperature"][-1][1] == pytest.approx(metrics["learned_temperature"], rel=1e-6)

    validations = metrics["validation"]
    assert [v["step"] for v in validations] == [10, 20, 30]
    for name in ("ndcg@10", "recall@10", "ndcg@50", "recall@50", "mrr"):
        assert curves[f"val/{name}"] == [(v["step"], pytest.approx(v[name], rel=1e-6)) for v in validations], name
    assert "val/events" not in curves and "val/users" not in curves


@needs_tensorboard
def test_a_resumed_run_appends_and_a_rerun_from_an_earlier_step_replaces_the_later_points(tiny):
    """Run to step 20, resume to 30 (a second event file); then resume again from the copy of
    step 20's ``last``: TensorBoard hides the first resumption's steps 21-30 (purge_step), so
    each step has one point, the latest run's."""
    root, config = tiny
    out = root / "resumed"
    _, first = _train(root, config, out, "train.max_steps=20")
    shutil.copytree(out / "last", root / "last-at-20")
    _train(root, config, out, "train.max_steps=30", resume="")
    _, again = _train(root, config, out, "train.max_steps=30", resume=str(root / "last-at-20"))
    folder = out / "tensorboard"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 3
    curves = _scalars(folder)
    assert [s for s, _ in curves["train/loss"]] == list(range(1, 31))
    assert [v for _, v in curves["train/loss"]] == pytest.approx(again["losses"], rel=1e-6)
    assert again["losses"][:20] == first["losses"]
    assert [s for s, _ in curves["val/ndcg@10"]] == [v["step"] for v in again["validation"]] == [10, 20, 30]


def test_false_writes_no_folder(tiny):
    root, config = tiny
    out = root / "off"
    result, metrics = _train(root, config, out, "train.tensorboard=false", "train.max_steps=5")
    assert metrics["steps"] == 5 and (out / "checkpoint").is_dir()
    assert not (out / "tensorboard").exists()
    assert "TensorBoard" not in result.stderr
