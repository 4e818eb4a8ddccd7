"""Export's memory at two processes: a table of T bytes is held about once, not per rank nor
gathered into copies (rank 0 reads the checkpoint on its own; the served tower shares the
plain model's tables)."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml
from conftest import REPO, run_cli, tiny_config

ROWS, DIM = 1 << 21, 32
TABLE_BYTES = ROWS * DIM * 4  # the hashed user-id table: 256 MiB


def _export_peak_bytes(root, path) -> int:
    """The largest resident set of any process of a 2-process ``export`` (rank 0's), in bytes."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    script = ("import resource, subprocess, sys; "
              "code = subprocess.run(sys.argv[1:]).returncode; "
              "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    argv = [sys.executable, "-c", script, sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node=2", "-m", "twotower_rec", "export", "--config", str(path)]
    proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.strip().splitlines()[-1]) * 1024


def _trained(root, buckets: int):
    cfg = tiny_config(root)
    cfg["data"]["hash_buckets"] = {"user_id": buckets}
    cfg["model"] = {"embedding_dim": DIM, "mlp_dims": [32], "output_dim": 16}
    cfg["train"].update({"max_steps": 2, "epochs": 1, "checkpoint_every_steps": 0})
    cfg["export"]["ann"] = "flat"
    path = root / "big.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    for verb in ("prepare", "train"):
        result = run_cli(verb, "--config", path, cwd=root, timeout=600)
        assert result.returncode == 0, result.describe()
    return path


def test_export_of_a_large_table_at_two_processes_holds_it_about_once(tmp_path):
    small_root, big_root = tmp_path / "small", tmp_path / "big"
    small_root.mkdir()
    big_root.mkdir()
    small = _export_peak_bytes(small_root, _trained(small_root, 1000))
    big = _export_peak_bytes(big_root, _trained(big_root, ROWS - 1))
    assert (big_root / "export" / "query_tower.pt2").stat().st_size > TABLE_BYTES  # the table was exported
    growth = big - small
    assert TABLE_BYTES < growth < 2 * TABLE_BYTES, f"export's peak grew {growth / TABLE_BYTES:.2f} x the table"
