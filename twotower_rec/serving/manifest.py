"""The export format: the manifest ``export`` writes and the checks loading makes.

The one definition of the format version, the score metric, the files every export holds and
the manifest entries a reader relies on. :mod:`twotower_rec.export.writer` writes with it and
:mod:`twotower_rec.serving.exported` loads with it. Torch-free.

Every file the export holds is listed with its size and SHA-256 (hardware-accelerated on
current x86 and ARM: about 1.5 GB/s here), and loading recomputes both: a truncated file, and
a file swapped for another of the same size (embeddings of another run, reordered ids), are
refused. ``sha256sum`` checks the same digests by hand. Checksums detect damage, not tampering:
whoever can write the files can write the manifest too, so the arrays are plain (int64, float,
fixed-width unicode) and read with ``allow_pickle=False``: loading an export never runs code
from it (only ``query_tower.pt2`` is a program: a graph of torch operators that torch runs, its
archive checked for pickles before it is read, ``query_tower.py``).

An export of an older format is refused with one line saying how to read it: ``twotower-rec
export`` again from its checkpoint (5: the query tower is a ``torch.export`` program, not
TorchScript; the checkpoint format did not change).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from twotower_rec.errors import ExportError

# 3: SHA-256 of every file; 4: raw ids as int64 or unicode arrays (no pickles); 5: query_tower.pt2
# (torch.export) replaces query_tower.pt (TorchScript), the manifest lists the hashed query features
FORMAT_VERSION = 5
METRIC = "inner_product"
MANIFEST = "manifest.json"
REQUIRED_FILES = (MANIFEST, "item_embeddings.npy", "item_ids.npy", "query_tower.pt2", "users.npz")
REQUIRED_ENTRIES = ("embedding_dim", "num_items", "query_features", "history_length", "hashed", "files")


def file_entries(directory: Path) -> dict[str, dict]:
    """``{name: {"bytes": size, "sha256": digest}}`` of every file written so far (the
    manifest's ``files``).

    Args:
        directory: the export being written; names starting with ``.`` and subfolders are left out.
    """
    return {path.name: {"bytes": path.stat().st_size, "sha256": sha256(path)}
            for path in sorted(directory.iterdir()) if path.is_file() and not path.name.startswith(".")}


def is_export(directory: Path) -> bool:
    """Whether ``directory`` holds an export of this package (of any format version): its manifest,
    a JSON object with a format version and a file list. ``export`` replaces only such a folder.

    Args:
        directory: a folder.
    """
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):  # missing, unreadable, not JSON
        return False
    return isinstance(manifest, dict) and "format_version" in manifest and isinstance(manifest.get("files"), dict)


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    """The hex SHA-256 digest of a file.

    Args:
        path: the file.
        chunk: bytes read at a time.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read(directory: Path) -> dict:
    """The checked manifest of the export at ``directory``: every required file present,
    format version and metric this package reads, every listed file with its written size.

    Args:
        directory: the export directory.
    """
    if not directory.is_dir():
        raise ExportError(f"export directory not found: {directory}")
    if not (directory / MANIFEST).is_file():
        raise ExportError(f"{directory} is not a complete export: missing {MANIFEST}")
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{directory / MANIFEST}: not valid JSON (line {err.lineno}: {err.msg})") from None
    check_version(directory, manifest)  # an older export lacks newer files: say so, not that they are missing
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise ExportError(f"{directory} is not a complete export: missing {', '.join(missing)}")
    check(directory, manifest)
    return manifest


def check_version(directory: Path, manifest: dict) -> None:
    """``ExportError`` unless ``manifest`` is of the format this package reads, in one line saying
    what to do: an older export is exported again from its checkpoint.

    Args:
        directory: the export directory.
        manifest: its parsed ``manifest.json``.
    """
    where = directory / MANIFEST
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version == FORMAT_VERSION:
        return
    if isinstance(version, int) and not isinstance(version, bool) and version < FORMAT_VERSION:
        raise ExportError(f"{where}: format version {version}, this package reads {FORMAT_VERSION}: this export was "
                          "written by an older version; run `twotower-rec export` again from the checkpoint")
    raise ExportError(f"{where}: format version {version}, this package reads {FORMAT_VERSION}: export again with "
                      "this version (or serve it with the version that wrote it)")


def check(directory: Path, manifest: dict) -> None:
    """``ExportError`` unless this package reads ``manifest`` and every file it lists has its size and SHA-256.

    Args:
        directory: the export directory.
        manifest: its parsed ``manifest.json``.
    """
    where = directory / MANIFEST
    check_version(directory, manifest)
    if manifest.get("metric") != METRIC:
        raise ExportError(f"{where}: metric {manifest.get('metric')!r}, this package scores by {METRIC!r}")
    for key in REQUIRED_ENTRIES:
        if key not in manifest:
            raise ExportError(f"{where}: no '{key}' entry; not an export of this package")
    for name, info in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise ExportError(f"{directory} is not a complete export: {name} is missing")
        if path.stat().st_size != info.get("bytes"):
            raise ExportError(f"{path}: {path.stat().st_size} bytes, the manifest says {info.get('bytes')}: "
                              f"the file is truncated or was replaced; export again")
        if sha256(path) != info.get("sha256"):
            raise ExportError(f"{path}: its SHA-256 is not the one in the manifest: the file was changed or "
                              f"replaced after the export (same size, other content); export again")
