"""Save a ``torch.export`` program without copying its weights in memory.

``torch.export.save`` turns each weight into a ``bytes`` object and hands that to the archive's
C++ writer, which copies it again: two transient copies of every table. A hashed id table of
many GiB then needs three times its size to export (BENCHMARKS.md, "Serving"). The archive's
writer can instead take a tensor's storage and stream it with no copy. :func:`save_program`
runs ``torch.export.save`` with exactly that change, so the file is the one ``torch.export.save``
writes (a test compares them byte for byte). Where this torch lacks the two private hooks used
here, it falls back to ``torch.export.save`` unchanged.
"""

from __future__ import annotations

import contextlib
from typing import IO, Iterator

import torch
from torch.export import ExportedProgram


class _StorageRecord(bytes):
    """An empty ``bytes`` that stands for a tensor's storage on its way to the archive."""

    storage: torch.UntypedStorage


def _storage_record(tensor: torch.Tensor) -> bytes:
    """The record of ``tensor``'s whole storage (what torch writes), without copying it."""
    record = _StorageRecord()
    record.storage = tensor.cpu().untyped_storage()
    return record


@contextlib.contextmanager
def _streamed_weights() -> Iterator[None]:
    """Within this block, the pt2 archive writer streams weights from their storage."""
    from torch.export.pt2_archive import _package

    writer, is_fake = getattr(_package, "PT2ArchiveWriter", None), getattr(_package, "_is_fake_tensor", None)
    hooks = (hasattr(_package, "_get_raw_tensor_bytes") and hasattr(writer, "write_bytes") and is_fake is not None)
    if not hooks:
        yield
        return
    raw_bytes, write_bytes = _package._get_raw_tensor_bytes, writer.write_bytes

    def tensor_bytes(value: torch.Tensor) -> bytes:
        return raw_bytes(value) if is_fake(value) or not value.data_ptr() else _storage_record(value)

    def write(self, name: str, data: bytes) -> None:
        if isinstance(data, _StorageRecord):
            self.archive_file.write_record(name, data.storage, data.storage.nbytes())
        else:
            write_bytes(self, name, data)

    _package._get_raw_tensor_bytes = tensor_bytes
    writer.write_bytes = write
    try:
        yield
    finally:
        _package._get_raw_tensor_bytes, writer.write_bytes = raw_bytes, write_bytes


def save_program(program: ExportedProgram, handle: IO[bytes]) -> None:
    """``torch.export.save(program, handle)``, streaming each weight from its storage.

    Args:
        program: the exported program.
        handle: a writable, seekable binary file.
    """
    with _streamed_weights():
        torch.export.save(program, handle)
