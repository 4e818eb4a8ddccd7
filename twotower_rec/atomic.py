"""Replace a folder as a whole, and recover a replacement a kill interrupted.

The prepared cache, the export and the checkpoints are folders that must never be seen half
written. A writer makes :func:`new_folder` beside the final one (``.<name>.tmp-<host>-<pid>``),
writes everything into it, and calls :func:`swap_in`, which

1. marks the new folder complete (``.complete``),
2. renames the final folder, if any, to ``.<name>.old-<host>-<pid>``,
3. renames the new folder to the final name,
4. deletes the old one.

A kill between 2 and 3 leaves no folder under the final name. :func:`recover`, which every
reader and writer calls before it opens the folder, finishes such a swap (the new folder is
complete) or puts the old folder back, and deletes ``.tmp-*`` / ``.old-*`` folders whose
writer has gone (a process of this host that no longer runs; folders of other hosts, or of
live processes, are left alone).

A Ctrl-C (SIGINT) that lands inside such a write would stop it half way, and libraries that
catch exceptions there (DCP turns it into a ``CheckpointException``) would hide what it was:
:func:`uninterrupted` holds it until the write is done, then raises ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

COMPLETE = ".complete"
_FAULT_COUNTS: dict[str, int] = {}


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Within this block a SIGINT is held, and raised as ``KeyboardInterrupt`` when the block
    ends (normally; an error of the block's own wins). Only the main thread receives signals:
    elsewhere, or when SIGINT is not Python's default handler (a user's own), nothing changes."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def fault(phase: str) -> None:
    """Crash-test hook: ``TWOTOWER_KILL_DURING_SAVE=<phase>[:<n>]`` SIGKILLs this process the
    n-th time (default: the first) a save reaches ``phase``: ``between_renames`` here,
    ``shards_written`` in checkpoints.

    Args:
        phase: the point the save has reached.
    """
    wanted = os.environ.get("TWOTOWER_KILL_DURING_SAVE", "")
    name, _, nth = wanted.partition(":")
    if name != phase:
        return
    _FAULT_COUNTS[phase] = _FAULT_COUNTS.get(phase, 0) + 1
    if _FAULT_COUNTS[phase] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def owner() -> str:
    """``<host>-<pid>``: whose temporary folders these are."""
    return f"{socket.gethostname()}-{os.getpid()}"


def new_folder(final: Path) -> Path:
    """An empty folder beside ``final`` to write its replacement into (after :func:`recover`).

    Args:
        final: the folder to replace; it need not exist yet.
    """
    final = Path(final)
    recover(final)
    tmp = final.parent / f".{final.name}.tmp-{owner()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def swap_in(tmp: Path, final: Path) -> None:
    """Replace the folder ``final`` by the complete folder ``tmp`` (see the module docstring).

    Args:
        tmp: the folder :func:`new_folder` gave, written whole; it becomes ``final``.
        final: the folder replaced; it need not exist.
    """
    (tmp / COMPLETE).touch()
    old = final.parent / f".{final.name}.old-{owner()}"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    fault("between_renames")
    os.replace(tmp, final)
    (final / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)


def recover(final: Path, wait_seconds: float = 5.0) -> None:
    """Finish or roll back an interrupted :func:`swap_in` of ``final``, and delete the
    temporary folders of writers that have gone. A live writer in the middle of a swap is
    given ``wait_seconds`` to finish it.

    Args:
        final: the folder about to be read or written.
        wait_seconds: how long to wait while a live writer has renamed ``final`` away and not yet
            put its new folder in place; after that the old folder is put back.
    """
    final = Path(final)
    deadline = time.monotonic() + wait_seconds
    while not final.exists():
        olds = _leftovers(final, "old")
        if any(alive for _, alive in olds) and time.monotonic() < deadline:
            time.sleep(0.05)  # its writer is between the two renames right now
            continue
        complete = [p for p, alive in _leftovers(final, "tmp") if not alive and (p / COMPLETE).is_file()]
        if complete:  # the new folder was written whole: finish the swap
            _rename(max(complete, key=lambda p: p.stat().st_mtime), final)
        elif olds:  # put the old folder back
            _rename(max((p for p, _ in olds), key=lambda p: p.stat().st_mtime), final)
        break
    for path, alive in _leftovers(final, "tmp") + _leftovers(final, "old"):
        if not alive:
            shutil.rmtree(path, ignore_errors=True)


def _rename(source: Path, final: Path) -> None:
    """``source`` to ``final``, unless another process got there first."""
    try:
        os.replace(source, final)
    except OSError:
        if not final.exists():
            raise
    (final / COMPLETE).unlink(missing_ok=True)


def _leftovers(final: Path, kind: str) -> list[tuple[Path, bool]]:
    """``(folder, writer alive)`` for every ``.<name>.<kind>-<host>-<pid>`` beside ``final``."""
    out = []
    prefix = f".{final.name}.{kind}-"
    if not final.parent.is_dir():
        return out
    for path in final.parent.iterdir():
        if path.is_dir() and path.name.startswith(prefix):
            host, _, pid = path.name[len(prefix):].rpartition("-")
            out.append((path, not pid.isdigit() or host != socket.gethostname() or _running(int(pid))))
    return out


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        pass
    return True
