"""How many threads a process computes with, chosen once at start-up, and how they wait.

torch's default is one OpenMP thread per core of the machine, and OpenMP's workers spin while
they wait for each other. Beside another busy process, a spinning worker holds a core the
other worker needs: a step then waits whole scheduler slices at every barrier (BENCHMARKS.md,
"CPU throughput when the cores are shared"). So:

- :func:`limit_spinning` shortens how long GNU OpenMP's workers spin before they sleep
  (``GOMP_SPINCOUNT``, :data:`SPIN_COUNT` instead of libgomp's 300,000) unless the user chose
  (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set). A short spin still catches the next parallel
  region of a step on a quiet machine, where sleeping at once (``OMP_WAIT_POLICY=PASSIVE``)
  costs a lone run; beside a busy process the workers sleep within microseconds instead of
  holding a core (BENCHMARKS.md, "CPU throughput when the cores are shared"). It must run
  before torch is imported: the CLI calls it first thing.
- :func:`thread_count` is the policy: the cores this process may run on
  (``os.sched_getaffinity``), shared by the processes of this host (``LOCAL_WORLD_SIZE``),
  less one where a batch-prefetch thread runs beside the step; at least one. A number in
  ``train.num_threads``, or ``OMP_NUM_THREADS`` in the environment, overrides it.
"""

from __future__ import annotations

import os

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SPIN_COUNT = "1000"  # chosen by benchmarks/bench_contention.py among 0 (passive), 1e3, 1e4, 1e5


def limit_spinning() -> bool:
    """Set ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` unless the user set how OpenMP waits; whether it did."""
    if any(name in os.environ for name in WAIT_VARIABLES):
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. from ``taskset`` or Slurm)."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def thread_count(configured: int, local_world_size: int, prefetching: bool) -> tuple[int, str]:
    """The intra-op threads for this process, and why (for the run's first log line).

    Args:
        configured: ``train.num_threads``; 0 means the policy.
        local_world_size: the processes of this host.
        prefetching: whether a background thread builds batches beside the step.
    """
    if configured > 0:
        return configured, "train.num_threads"
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdecimal() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    cores = usable_cores()
    share = cores // max(local_world_size, 1) - (1 if prefetching else 0)
    why = f"{cores} usable core{'s' if cores != 1 else ''} / {local_world_size} process(es) on this host"
    return max(share, 1), why + (" - 1 for batch prefetch" if prefetching else "")


def apply_thread_count(configured: int, local_world_size: int, prefetching: bool) -> str:
    """Set torch's intra-op threads from :func:`thread_count`; the reason, for the log.

    Args:
        configured: ``train.num_threads``; 0 means the policy.
        local_world_size: the processes of this host.
        prefetching: whether a background thread builds batches beside the step.
    """
    import torch

    count, why = thread_count(configured, local_world_size, prefetching)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return why
