"""What a checkpoint's ``meta.json`` records so that loading can refuse a damaged or misapplied one.

- ``files``: every file of the checkpoint (DCP's shards and ``.metadata``, the RNG files) with
  its size and SHA-256. Each rank hashes the files it wrote, right after writing them (while
  they are in the page cache), and rank 0 records them all; on load the ranks share the
  files out, verify their share and agree on the outcome, so every rank stops together.
- ``vocabulary_fingerprint``: a digest of the raw ids of every user and item code. The
  feature spec's fingerprint has the table sizes and the source's name, but two files with
  the same counts and other ids give the same spec: this tells them apart.

DCP reads its ``.metadata`` with plain ``pickle.load``, which runs whatever the file names.
:class:`SafeReader` reads it allowing only the classes DCP writes into it (its metadata
dataclasses, ``torch.Size``, dtypes, paths); anything else is refused before it is called.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint import FileSystemReader

from twotower_rec.data.prepared import PreparedData
from twotower_rec.distributed.env import gather_objects, world
from twotower_rec.errors import CheckpointError

# Written by the checkpoint's writer around the files this module records.
UNRECORDED = ("meta.json", ".complete")
_CHUNK = 8 << 20
_ID_CHUNK = 1 << 20
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, read 8 MiB at a time.

    Args:
        path: the file.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _relative(folder: Path, path: Path) -> str:
    return path.relative_to(folder).as_posix()


def _own_files(folder: Path, rank: int) -> list[Path]:
    """The files rank ``rank`` wrote: its DCP shards, its RNG file, and on rank 0 DCP's ``.metadata``."""
    own = sorted(folder.glob(f"__{rank}_*"))
    rng = folder / "rng" / f"rank{rank}.pt"
    if rng.is_file():
        own.append(rng)
    if rank == 0 and (folder / ".metadata").is_file():
        own.append(folder / ".metadata")
    return own


def _entries(folder: Path, paths: list[Path]) -> dict[str, dict]:
    return {_relative(folder, p): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths}


def hash_own_files(folder: Path) -> dict[str, dict]:
    """Size and SHA-256 of the files this rank wrote into ``folder`` (not a collective).

    Args:
        folder: the checkpoint folder being written.

    Returns:
        ``{relative path: {"bytes": size, "sha256": hex digest}}``.
    """
    rank, _ = world()
    return _entries(folder, _own_files(folder, rank))


def complete_record(folder: Path, gathered: list[dict[str, dict]]) -> dict[str, dict]:
    """Every rank's entries merged, plus any file of ``folder`` no rank claimed (hashed here):
    the ``files`` entry of meta.json (rank 0, once every rank has written).

    Args:
        folder: the checkpoint folder being written.
        gathered: each rank's :func:`hash_own_files`.
    """
    files: dict[str, dict] = {}
    for entries in gathered:
        files.update(entries)
    rest = [p for p in sorted(folder.rglob("*")) if p.is_file() and _relative(folder, p) not in files
            and p.name not in UNRECORDED]
    files.update(_entries(folder, rest))
    return dict(sorted(files.items()))


def _problem(folder: Path, name: str, entry: dict) -> str | None:
    """What is wrong with one recorded file, or None."""
    path = folder / name
    if not path.is_file():
        return f"{path} is missing: the checkpoint is incomplete; re-train, or use an intact copy of {folder}"
    size = path.stat().st_size
    if size != entry.get("bytes"):
        return (f"{path} is {size} bytes, meta.json records {entry.get('bytes')}: the file is truncated or was "
                f"replaced; re-train, or use an intact copy of {folder}")
    if sha256_file(path) != entry.get("sha256"):
        return (f"{path}: its SHA-256 differs from the one meta.json records: the file is damaged or was replaced; "
                f"re-train, or use an intact copy of {folder}")
    return None


def verify(folder: Path, meta: dict) -> None:
    """Check every file meta.json records against its size and SHA-256 (a collective under a
    process group: each rank checks its share of the files, then all learn of any problem).

    Args:
        folder: the checkpoint folder.
        meta: its meta.json; one of an earlier version, without ``files``, is only checked for
            DCP's ``.metadata``.

    Raises:
        CheckpointError: naming the first file that is missing, truncated or changed.
    """
    files = meta.get("files")
    if not isinstance(files, dict):
        metadata = folder / ".metadata"
        problems = [] if metadata.is_file() else [f"{metadata} is missing: the checkpoint is incomplete; re-train"]
    else:
        rank, size = world()
        names = sorted(files)[rank::size]
        problems = [p for p in (_problem(folder, n, files[n]) for n in names) if p]
    found = [p for part in gather_objects(problems) for p in part]
    if found:
        raise CheckpointError(found[0])


def vocabulary_fingerprint(data: PreparedData) -> str:
    """A digest of the raw id of every user and item code of the prepared data (computed once
    per opened cache: it reads every id).

    Args:
        data: the prepared data.
    """
    if data in _FINGERPRINTS:
        return _FINGERPRINTS[data]
    digest = hashlib.sha256()
    for kind, ids in (("users", data.raw_user_ids), ("items", data.raw_item_ids)):
        ids = np.asarray(ids)
        digest.update(f"{kind}:{ids.size}:".encode())
        for start in range(0, ids.size, _ID_CHUNK):
            _update_ids(digest, ids[start:start + _ID_CHUNK])
    _FINGERPRINTS[data] = value = digest.hexdigest()[:16]
    return value


def _update_ids(digest, ids: np.ndarray) -> None:
    """Ids of one chunk into ``digest``: integers by value, anything else by its text."""
    if ids.dtype.kind in "iub":
        digest.update(ids.astype("<i8").tobytes())
    else:
        digest.update("\x00".join(map(str, ids.tolist())).encode("utf-8", "surrogatepass") + b"\x00")


# What DCP's .metadata holds besides the classes of torch.distributed.checkpoint.metadata.
_METADATA_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                     ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata, refusing every global but its own classes."""

    def find_class(self, module: str, name: str) -> Any:
        """The global ``module.name`` if DCP's metadata may hold it.

        Args:
            module: the global's module.
            name: its (qualified) name.

        Raises:
            pickle.UnpicklingError: for any other global.
        """
        found = None
        if (module, name) in _METADATA_GLOBALS:
            found = super().find_class(module, name)
        elif module == _METADATA_MODULE or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            candidate = super().find_class(module, name)
            if isinstance(candidate, torch.dtype) or (isinstance(candidate, type) and candidate.__module__ == module):
                found = candidate
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return found


def read_metadata(path: Path):
    """DCP's ``.metadata`` at ``path``, unpickled with only DCP's own classes allowed.

    Args:
        path: the file.

    Raises:
        CheckpointError: when it names anything else (nothing of it is run) or is not a pickle.
    """
    try:
        return _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refers to {str(err)[:200]}, which torch.distributed.checkpoint's metadata "
                              "never holds: the file is not the checkpoint's (nothing in it was run); re-train, or use "
                              "an intact copy") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise CheckpointError(f"{path}: not torch.distributed.checkpoint metadata ({type(err).__name__}): the "
                              "checkpoint is damaged; re-train, or use an intact copy") from None


class SafeReader(FileSystemReader):
    """DCP's file system reader, with ``.metadata`` read by :func:`read_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        """The checkpoint's metadata, as DCP's reader returns it.

        Args:
            args, kwargs: DCP's (``rank`` for a rank's own metadata file).
        """
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        metadata = read_metadata(Path(str(self.path)) / (".metadata" if rank is None else f"__{rank}.metadata"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
