"""The only code that reads RANK / LOCAL_RANK / WORLD_SIZE: process group, rank, device, seeds.

``python -m twotower_rec train`` (no torchrun) becomes a world of one on a private port, so
the same DistributedModelParallel path serves one process or many.
"""

from __future__ import annotations

import os
import random
import socket
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_distributed() -> DistEnv:
    """Join (or create) the default process group: nccl on CUDA, gloo on CPU."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(world_size))
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistEnv(rank, local_rank, world_size, device, backend)


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


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int, rank: int = 0) -> np.random.Generator:
    """Seed torch, numpy and random; model init uses ``seed`` on every rank so tables agree."""
    random.seed(seed + rank)
    torch.manual_seed(seed)
    np.random.seed(seed + rank)
    return np.random.default_rng(seed)
