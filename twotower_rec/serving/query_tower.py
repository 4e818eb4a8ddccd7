"""The served query tower: ``query_tower.pt2`` (a ``torch.export`` program) behind its pre-processing.

:func:`load_program` reads the program with ``torch.export.load`` (torch alone), after checking
that the archive holds nothing ``torch.export.load`` would unpickle: a ``torch.export`` archive
of plain tensors stores them as raw bytes, but the loader unpickles a payload marked
``use_pickle``, a legacy weights file, a custom or opaque object, and falls back to an unsafe
``torch.load`` when its sample inputs fail the safe one. Such an archive (a changed file: the
export never writes one) is refused, never loaded. :class:`ServedQueryTower` is what
``ExportedModel.query_tower`` holds: called on codes (``tower(values, lengths)``) or raw values
(``encode_raw``, through ``serving/query_inputs.py``).

Shapes: ``B`` rows, ``D`` the manifest's ``embedding_dim``, ``N_f`` feature f's values.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch.export.pt2_archive import constants as pt2

from twotower_rec.errors import ExportError
from twotower_rec.serving.query_inputs import QueryInputs

TOWER_FILE = "query_tower.pt2"


class ServedQueryTower:
    """Codes or raw values -> ``[B, D]`` L2-normalised query embeddings (``export/__init__.py``)."""

    def __init__(self, program: torch.nn.Module, inputs: QueryInputs) -> None:
        """Hold the loaded program and the export's pre-processing.

        Args:
            program: ``query_tower.pt2``'s module (:func:`load_program`).
            inputs: raw values -> codes, from the same export.
        """
        self.program = program
        self.inputs = inputs

    def __call__(self, values: Sequence[torch.Tensor], lengths: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[B, D]`` from codes: per query feature, in the manifest's ``query_features`` order, ``values[f]``
        ``[N_f]`` and ``lengths[f]`` ``[B]`` (cast to int64, the program's dtype).

        Args:
            values: one tensor of codes per query feature (0 = unknown), rows back to back.
            lengths: one ``[B]`` tensor of per-row counts per query feature.
        """
        if len(values) != len(self.inputs.names) or len(lengths) != len(self.inputs.names):
            raise ExportError(f"the query tower takes one (values, lengths) pair per query feature "
                              f"{self.inputs.names}, got {len(values)} values and {len(lengths)} lengths")
        with torch.no_grad():
            return self.program([v.long() for v in values], [n.long() for n in lengths])

    def encode_inputs(self, features: Mapping[str, Sequence[Sequence]]) -> tuple[list[torch.Tensor],
                                                                                  list[torch.Tensor]]:
        """Raw values per feature and row -> the codes :meth:`__call__` takes (:meth:`QueryInputs.encode`).

        Args:
            features: query feature name -> one list of raw values per row, ``B`` rows for every feature given.
        """
        return self.inputs.encode(features)

    def encode_raw(self, features: Mapping[str, Sequence[Sequence]]) -> torch.Tensor:
        """Raw values per feature and row -> ``[B, D]``: :meth:`encode_inputs`, then the program.

        Args:
            features: as :meth:`encode_inputs` takes them; unknown values and features left out are the unknown code.
        """
        return self(*self.encode_inputs(features))


def load_program(path: Path) -> torch.nn.Module:
    """The module of the ``torch.export`` program at ``path``, once :func:`check_archive` passes.

    Args:
        path: ``query_tower.pt2`` of an export.
    """
    check_archive(path)
    try:
        return torch.export.load(str(path)).module()
    except (RuntimeError, ValueError, KeyError, AssertionError, zipfile.BadZipFile) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExportError(f"{path}: cannot load the torch.export program ({first}): export again with this "
                          f"version") from None


def check_archive(path: Path) -> None:
    """``ExportError`` unless the archive at ``path`` holds only what loads without unpickling: tensors
    as raw bytes (no ``use_pickle`` payload, legacy weights file, custom or opaque object) and sample
    inputs that the safe ``torch.load(weights_only=True)`` reads.

    Args:
        path: a ``torch.export`` archive (``query_tower.pt2``).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                inner = name.split("/", 1)[1] if "/" in name else name
                if inner.startswith((pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR)):
                    _check_payload(path, archive, name, inner)
                elif inner.startswith(pt2.SAMPLE_INPUTS_DIR):
                    _check_sample_inputs(path, archive.read(name))
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ExportError(f"{path}: cannot load the torch.export program ({err}): export again with this "
                          "version") from None


def _refuse(path: Path, what: str) -> ExportError:
    return ExportError(f"{path}: {what}, which torch.export.load would unpickle (a changed file: export never "
                       "writes one); refused, export again")


def _check_payload(path: Path, archive: zipfile.ZipFile, name: str, inner: str) -> None:
    """A weights or constants record: raw tensor bytes, or a payload config that marks none for pickling."""
    folder, file = inner.rsplit("/", 1)
    prefix = pt2.WEIGHT_FILENAME_PREFIX if inner.startswith(pt2.WEIGHTS_DIR) else pt2.TENSOR_CONSTANT_FILENAME_PREFIX
    if file.endswith(".json"):
        config = json.loads(archive.read(name))
        for fqn, meta in (config.get("config") or {}).items():
            if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(prefix):
                raise _refuse(path, f"'{fqn}' is stored as a pickle ({folder}/{meta.get('path_name')})")
    elif not file.startswith(prefix):
        raise _refuse(path, f"{inner} is not a raw tensor")


def _check_sample_inputs(path: Path, data: bytes) -> None:
    if not data:
        return
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as err:  # any failure here would send torch.export.load to an unsafe torch.load
        raise _refuse(path, f"its sample inputs are not plain tensors ({type(err).__name__})") from None
