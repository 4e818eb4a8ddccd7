"""The only code that reads RANK / LOCAL_RANK / WORLD_SIZE: process group, rank, device, seeds.

``python -m twotower_rec train`` (no torchrun) becomes a world of one on a private port, so
the same DistributedModelParallel path serves one process or many.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


# TWOTOWER_DEVICE=auto (default) | cuda | cpu: auto takes CUDA when torch sees a GPU; cuda
# refuses to start without one (rather than training on the CPU unnoticed); cpu ignores GPUs.
DEVICE_VARIABLE = "TWOTOWER_DEVICE"


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: its rank, device and process group.

    Args:
        rank: this process's global rank.
        local_rank: its rank on this host (the CUDA device index).
        world_size: the number of processes.
        device: the device this process computes on.
        backend: the process group's backend: ``nccl`` on CUDA, ``gloo`` on CPU.
        local_world_size: processes on this host (torchrun's ``LOCAL_WORLD_SIZE``).
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str
    local_world_size: int = 1  # processes on this host (torchrun's LOCAL_WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self, threads_why: str = "") -> str:
        """One line: the device, the backend and the world, for the log of every run.

        Args:
            threads_why: what chose the thread count (:func:`twotower_rec.distributed.threads.thread_count`).
        """
        where = str(self.device)
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            where += f" ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
        threads = torch.get_num_threads()
        return (f"device: {where}, backend {self.backend}, {self.world_size} process(es), "
                f"{self.local_world_size} per host, {threads} thread{'s' if threads != 1 else ''} each"
                f"{f' ({threads_why})' if threads_why else ''}; "
                f"torch {torch.__version__}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _gpus_present() -> bool:
    """Whether this host has NVIDIA GPUs, whatever torch's build can see."""
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


def choose_device(local_rank: int) -> torch.device:
    """The device ``TWOTOWER_DEVICE`` asks for (see :data:`DEVICE_VARIABLE`).

    Args:
        local_rank: this process's rank on its host: the index of its CUDA device.
    """
    wanted = os.environ.get(DEVICE_VARIABLE, "auto").strip().lower() or "auto"
    if wanted not in ("auto", "cuda", "cpu"):
        raise ValueError(f"{DEVICE_VARIABLE}={wanted!r}: expected auto, cuda or cpu")
    if wanted == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} but only {torch.cuda.device_count()} visible GPU(s): "
                               "start at most one process per GPU (torchrun --nproc_per_node)")
        return torch.device("cuda", local_rank)
    why = (f"torch {torch.__version__} was built without CUDA" if torch.version.cuda is None
           else "torch cannot use the GPU (driver or CUDA_VISIBLE_DEVICES)")
    if wanted == "cuda":
        raise RuntimeError(f"{DEVICE_VARIABLE}=cuda but {why}: re-run `DEVICE=cuda bash launch/setup.sh` on the "
                           "GPU node, then `bash launch/gpu_check.sh`")
    if _gpus_present():
        print(f"warning: this host has NVIDIA GPUs but {why}; running on the CPU. For the GPUs: "
              f"`DEVICE=cuda bash launch/setup.sh`; to silence this: {DEVICE_VARIABLE}=cpu", file=sys.stderr)
    return torch.device("cpu")


# How long a collective may wait for the other ranks before the process group gives up (NCCL's
# watchdog kills the job): ``distributed.timeout_minutes``. A checkpoint save in which one rank
# writes a whole large table-wise table to a shared filesystem can outlast torch's 10 minutes.
DEFAULT_TIMEOUT_MINUTES = 60.0


def init_distributed(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> DistEnv:
    """Join (or create) the default process group: nccl on CUDA, gloo on CPU.

    Args:
        timeout_minutes: how long a collective waits for the other ranks (``distributed.timeout_minutes``).
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = choose_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(world_size))
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return DistEnv(rank, local_rank, world_size, device, backend, local_world_size)


def shutdown() -> None:
    """Leave the process group. On a normal exit every rank first meets at a barrier, which
    gloo completes only after all of this rank's earlier work: a rank that tears gloo down
    while a send of its own is still in flight (e.g. its shards gathered to rank 0 for
    export) can abort at exit with "terminate called without an active exception". While an
    exception propagates (shutdown called from a ``finally``) there is no barrier: the other
    ranks may never reach it."""
    if dist.is_initialized():
        if sys.exc_info()[0] is None and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where a tensor must be for a collective of the default process group: the current CUDA
    device under nccl (NCCL takes no CPU tensors), the CPU under gloo.

    We keep one backend and move the few CPU-side tensors we gather (evaluation's rankings,
    export's unsharded tables) to the device, rather than running a second backend beside
    NCCL (``cpu:gloo,cuda:nccl``): one transport across nodes, no gloo network interface to
    configure on a multi-node job, and what TorchRec's own collectives need anyway.
    """
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously): call before reading a clock.

    Args:
        device: the device to wait for; a no-op unless it is CUDA.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int, rank: int = 0) -> np.random.Generator:
    """Seed torch, numpy and random; model init uses ``seed`` on every rank so tables agree
    (call :func:`seed_rank_streams` after building the model).

    Args:
        seed: the run's seed: torch's on every rank.
        rank: this process's rank, added to ``seed`` for numpy's and random's global streams.

    Returns:
        A numpy generator seeded with ``seed`` alone, the same on every rank.
    """
    random.seed(seed + rank)
    torch.manual_seed(seed)
    np.random.seed(seed + rank)
    return np.random.default_rng(seed)


def seed_rank_streams(seed: int, rank: int) -> None:
    """After the (identical) model init: give every rank but 0 its own torch stream, so dropout
    masks differ across ranks as they differ across the rows of one process's batch. Rank 0
    continues the init stream, so a world of one draws what it always drew.

    Args:
        seed: the run's seed, as given to :func:`seed_everything`.
        rank: this process's rank.
    """
    if rank:
        torch.manual_seed(seed * 1_000_003 + rank)


def broadcast_object(value):
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself without a process group.

    Args:
        value: what rank 0 has (the other ranks' values are ignored).
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank: how ranks
    agree on an outcome (e.g. an error one of them met) so that all stop together.

    Args:
        value: this rank's value.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
