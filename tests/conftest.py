"""Shared fixtures: a CLI runner and ONE tiny prepared + trained + exported model per session.

Everything is written under pytest's tmp directories; nothing outside the repository is read.
The CLI runs as a subprocess (``python -m twotower_rec VERB ...``), exactly as a user runs it,
so each verb gets its own torch.distributed world of one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import settings

# No example database in the working tree: the suite leaves nothing behind but pytest's cache.
settings.register_profile("twotower", database=None)
settings.load_profile("twotower")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Variables a torchrun launch (or an in-process init_distributed in this pytest process) may
# leave behind; a CLI subprocess must start its own world of one on its own free port.
_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


@dataclass
class CliResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (f"twotower-rec {' '.join(self.args)} -> exit {self.returncode}\n"
                f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}")


def run_cli(*args: str, cwd: str | Path | None = None, timeout: float = 240, nproc: int = 1,
            env: dict | None = None) -> CliResult:
    """Run ``python -m twotower_rec ARGS`` and capture stdout, stderr and the exit status.

    With ``nproc`` > 1 it runs under ``torchrun --standalone --nproc_per_node=NPROC`` (gloo on
    CPU), exactly as a user launches a multi-process job.
    """
    run_env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    run_env.setdefault("OMP_NUM_THREADS", "2" if nproc == 1 else "1")
    run_env.update(env or {})
    argv = [str(a) for a in args]
    launcher = [sys.executable, "-m", "twotower_rec"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "twotower_rec"]
    proc = subprocess.run([*launcher, *argv], cwd=str(cwd or REPO), env=run_env,
                          capture_output=True, text=True, timeout=timeout)
    return CliResult(argv, proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def cli():
    return run_cli


def prepared_config(root: Path, cfg: dict, name: str) -> Path:
    """Write ``cfg`` to ``root/NAME.yaml`` and run ``prepare`` on it; the config's path."""
    import yaml

    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    result = run_cli("prepare", "--config", path, cwd=root)
    assert result.returncode == 0, result.describe()
    return path


def training_losses(root: Path, path: Path, runs: list[tuple[str, int, list[str]]]) -> dict[str, list[float]]:
    """Train the config at ``path`` once per ``(name, processes, overrides)`` into ``root/name``;
    each run's per-step losses (``train_metrics.json``) by name."""
    import json

    losses = {}
    for name, nproc, overrides in runs:
        out = root / name
        sets = [a for o in overrides for a in ("--set", o)]
        result = run_cli("train", "--config", path, "--set", f"train.out_dir={out}", *sets, cwd=root, nproc=nproc)
        assert result.returncode == 0, result.describe()
        losses[name] = json.loads((out / "train_metrics.json").read_text())["losses"]
    return losses


def tiny_config(root: Path) -> dict:
    """A seconds-long synthetic job; every path lives under ``root``."""
    return {
        "data": {
            "source": "synthetic",
            "cache_dir": str(root / "data"),
            "synthetic": {"num_users": 200, "num_items": 150, "interactions_per_user": 20,
                          "num_clusters": 6, "seed": 0},
        },
        "features": {"history_length": 10},
        "model": {"embedding_dim": 16, "mlp_dims": [32], "output_dim": 16},
        "loss": {"temperature": 0.05},
        "train": {"batch_size": 128, "epochs": 3, "val_every_steps": 0, "val_max_users": 200,
                  "log_every_steps": 5, "seed": 0, "out_dir": str(root / "run"), "progress": False},
        # max(ks) exceeds the catalog on purpose: a tiny catalog must not inflate the metrics.
        "eval": {"ks": [10, 50, 100, 200], "filter_seen": True, "split": "test"},
        "export": {"dir": str(root / "export")},
    }


@dataclass
class Pipeline:
    root: Path
    config_path: Path
    cache_dir: Path
    out_dir: Path
    export_dir: Path
    prepare: CliResult
    train: CliResult
    evaluate: CliResult
    export: CliResult

    def load_config(self, overrides: list[str] | None = None):
        from twotower_rec.config import load_config

        return load_config(self.config_path, overrides)

    @property
    def train_metrics(self) -> dict:
        return json.loads((self.out_dir / "train_metrics.json").read_text())

    @property
    def eval_results(self) -> dict:
        return json.loads((self.out_dir / "eval_test.json").read_text())


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Pipeline:
    """prepare -> train -> evaluate -> export once, on tiny synthetic data, via the CLI."""
    root = tmp_path_factory.mktemp("pipeline")
    config_path = root / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(tiny_config(root), sort_keys=False))
    results = {}
    for verb in ("prepare", "train", "evaluate", "export"):
        result = run_cli(verb, "--config", config_path, cwd=root)
        assert result.returncode == 0, result.describe()
        results[verb] = result
    return Pipeline(root=root, config_path=config_path, cache_dir=root / "data", out_dir=root / "run",
                    export_dir=root / "export", **results)
