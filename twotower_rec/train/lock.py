"""One ``train`` at a time per ``train.out_dir``: an exclusive ``flock`` on ``<out_dir>/.train.lock``.

Two runs writing one folder would mix their checkpoints and metrics. Rank 0 takes the lock
for the whole run (every rank writes into the folder, but the ranks of one job are one
writer) and tells the other ranks whether it got it, so all of them start or stop together.
The kernel releases a ``flock`` when its holder exits, however it exits (even SIGKILL), so a
lock is never left stale. The lock file holds the holder's host and pid, for the message.
(``flock`` locks are per host on some network file systems: two jobs on two hosts writing one
shared folder are only kept apart where the file system honours it.)
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from twotower_rec.distributed.env import broadcast_object, world
from twotower_rec.errors import CheckpointError

LOCK = ".train.lock"


@contextmanager
def out_dir_lock(out_dir: str | Path) -> Iterator[Path]:
    """Hold ``out_dir`` for this run (a collective under a process group: rank 0 locks).

    Args:
        out_dir: ``train.out_dir``; made if missing.

    Yields:
        The lock file's path.

    Raises:
        CheckpointError: on every rank, when another run holds the folder or it cannot be written.
    """
    out = Path(out_dir)
    rank, _ = world()
    handle, error = _take(out) if rank == 0 else (None, None)
    error = broadcast_object(error)
    if error:
        if handle is not None:
            handle.close()
        raise CheckpointError(error)
    try:
        yield out / LOCK
    finally:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()


def _take(out: Path):
    """(the open, locked lock file, None) or (None, why not)."""
    path = out / LOCK
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as err:
        return None, f"cannot write to train.out_dir {out}: {err.strerror or err}; give a folder this user can write"
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        return None, (f"train.out_dir {out} is in use: another `twotower-rec train` holds it ({holder}); wait for it "
                      "to finish, or give this run its own train.out_dir")
    except OSError as err:
        handle.close()
        return None, (f"cannot lock {path}: {err.strerror or err}; give a train.out_dir on a file system that supports "
                      "locks (e.g. a local disk)")
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
    handle.flush()
    return handle, None
