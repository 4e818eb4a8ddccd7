"""The thread policy (distributed/threads.py): how many intra-op threads, and how they wait."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from twotower_rec.distributed import threads


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


@pytest.mark.parametrize("local_world_size, prefetching, expected", [
    (1, False, 4), (1, True, 3), (2, False, 2), (2, True, 1), (4, True, 1), (8, False, 1),
])
def test_policy_shares_the_usable_cores_among_the_hosts_processes(four_cores, local_world_size, prefetching,
                                                                  expected):
    count, why = threads.thread_count(0, local_world_size, prefetching)
    assert count == expected
    assert "4 usable cores" in why and f"{local_world_size} process" in why


def test_a_number_or_omp_num_threads_overrides_the_policy(four_cores, monkeypatch):
    assert threads.thread_count(3, 1, False) == (3, "train.num_threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.thread_count(0, 1, False) == (2, "OMP_NUM_THREADS")
    assert threads.thread_count(1, 1, False) == (1, "train.num_threads")


def test_the_affinity_mask_not_the_machine_counts(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert threads.thread_count(0, 1, False)[0] == 1


def test_the_spin_count_is_set_only_when_the_user_did_not_choose(monkeypatch):
    for name in threads.WAIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert threads.limit_spinning() and os.environ["GOMP_SPINCOUNT"] == threads.SPIN_COUNT
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert not threads.limit_spinning() and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    assert not threads.limit_spinning() and os.environ["GOMP_SPINCOUNT"] == "7"


def test_the_cli_sets_the_wait_policy_before_torch_is_imported():
    # OpenMP reads GOMP_SPINCOUNT once, when torch loads it: the CLI module must not import torch.
    env = {k: v for k, v in os.environ.items() if k not in threads.WAIT_VARIABLES}
    code = ("import sys, os; from twotower_rec import cli; torch_before = 'torch' in sys.modules; "
            "cli.main(['recommend', '--help'])")
    proc = subprocess.run([sys.executable, "-c", code.replace("cli.main", "print(torch_before); cli.main")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "False"
    code = ("import os, sys; from twotower_rec import cli\n"
            "try:\n    cli.main(['recommend', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == f"{threads.SPIN_COUNT} None", proc.stdout + proc.stderr


def test_the_first_line_of_a_training_names_the_thread_count_and_its_reason(pipeline):
    first = pipeline.train.stderr.strip().splitlines()[0]
    assert first.startswith("device: cpu") and "thread" in first and "(OMP_NUM_THREADS)" in first, first
