"""Raw query values -> the codes ``query_tower.pt2`` takes: the export's pre-processing step.

The exported program computes embeddings from codes (``export/__init__.py``); this module maps
what a client sends, one list of raw values per row for each query feature, to those codes
with the export's own plain data, in plain Python and torch (no TorchRec, no model code):

- ``history``: item ids, oldest first -> item codes (``row + 1`` of ``item_ids.npy``; an id
  not in the catalog is 0) -> each row's last ``history_length`` (:func:`last_items`).
- ``recent_m``: the same item codes -> each row's m-th last item, 0 when it has fewer
  (:func:`item_before`). Both are the functions training batches use
  (``data/query_inputs.py``), so a raw history gives exactly what the model trained on.
- ``user_id``: the raw user id -> ``users.npz`` ``feature_user_id`` at the user's row + 1 (0: a
  user the export does not know, or one without training events).
- any other side feature: its value -> index + 1 in ``vocabularies.json[name]`` (0: unknown).
- a hashed feature (the manifest's ``hashed``: name -> buckets, ``data.hash_buckets``): the
  raw id -> ``1 + hash % buckets`` (``data/features.py``, :func:`hash_rows`), known or not.

A feature left out, and an empty row, is the unknown code: a new user is ``user_id`` left out.
Ids follow the id rule (``data/ids.py``): ``"007"`` is item ``7`` of an integer id space.

Shapes: ``B`` rows. Example (an export whose query features are ``user_id``, ``history``)::

    inputs = ExportedModel.load(directory).query_tower.inputs  # a QueryInputs on the export's own files
    values, lengths = inputs.encode({"user_id": [["42"], []], "history": [["1", "50"], ["260"]]})
    # values[f] [N_f] int64 codes, lengths[f] [B] int64: what query_tower.pt2 takes
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from twotower_rec.data.features import HISTORY, hash_rows, recent_position
from twotower_rec.data.ids import canonical_id, lookup_key
from twotower_rec.data.query_inputs import item_before, last_items
from twotower_rec.errors import ExportError


def raw_key(value) -> str:
    """The text of a raw side-feature value, as ``vocabularies.json`` values are matched (``25``: ``"25"``).

    Args:
        value: a raw value: text, an integer, or a numpy scalar.
    """
    return str(value.item() if isinstance(value, np.generic) else value)


class IdSpace:
    """The rows of an export's raw ids (int64: an integer id space; unicode: text ids), looked up
    under the id rule (``data/ids.py``)."""

    def __init__(self, ids: np.ndarray) -> None:
        """Index ``ids``.

        Args:
            ids: ``[N]`` raw ids, int64 or unicode; row ``r`` holds ``ids[r]``.
        """
        self.integer = ids.dtype.kind in "iu"
        self.row = {key: r for r, key in enumerate(ids.tolist())}

    def __len__(self) -> int:
        return len(self.row)

    def find(self, value) -> int | None:
        """The row of the raw id ``value`` (as a user typed or sent it), or None.

        Args:
            value: a raw id: text or an integer.
        """
        if self.integer and type(value) is str and value.isascii() and value.isdigit():
            return self.row.get(int(value))  # the common case: what the id rule makes of plain digits
        key = lookup_key(value, self.integer)
        return None if key is None else self.row.get(key)


def read_vocabularies(directory: Path) -> dict:
    """``vocabularies.json`` (side feature -> its raw values, code = index + 1); empty where the export has none.

    Args:
        directory: the export directory.
    """
    path = directory / "vocabularies.json"
    if not path.is_file():
        return {}
    try:
        vocabularies = json.loads(path.read_text())
    except ValueError as err:
        raise ExportError(f"{path}: not valid JSON ({err}): export again") from None
    return vocabularies if isinstance(vocabularies, dict) else {}


class QueryInputs:
    """Raw values per query feature and row -> ``(values, lengths)`` codes (see the module docstring)."""

    def __init__(self, names: list[str], history_length: int, items: IdSpace, users: IdSpace | None = None,
                 user_codes: np.ndarray | None = None, vocabularies: Mapping[str, list] | None = None,
                 hashed: Mapping[str, int] | None = None) -> None:
        """Hold the export's plain data for the lookups.

        Args:
            names: the query features in input order (the manifest's ``query_features``).
            history_length: the most items ``history`` keeps (the manifest's ``history_length``).
            items: the catalog's raw ids (``item_ids.npy``); item code = row + 1.
            users: the known users' raw ids (``users.npz`` ``raw_user_ids``), for ``user_id``.
            user_codes: ``[U + 1]`` the ``user_id`` code of each user row + 1 (``users.npz`` ``feature_user_id``).
            vocabularies: side feature -> its raw values (``vocabularies.json``): code = index + 1.
            hashed: hashed feature -> its number of buckets (the manifest's ``hashed``).
        """
        self.names = list(names)
        self.history_length = int(history_length)
        self.items, self.users = items, users
        self.user_codes = None if user_codes is None else np.asarray(user_codes, dtype=np.int64)
        self.hashed = dict(hashed or {})
        self.recent = {name: recent_position(name) for name in self.names if recent_position(name)}
        self.codes = {name: {raw_key(value): code for code, value in enumerate(values, start=1)}
                      for name, values in (vocabularies or {}).items() if name in self.names}

    def encode(self, features: Mapping[str, Sequence[Sequence]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Raw values -> the codes ``query_tower.pt2`` takes, one ``(values [N_f], lengths [B])``
        int64 pair per name in ``names``, in that order.

        Args:
            features: query feature name -> one list of raw values per row (``B`` rows for every feature
                given); single-valued features take at most one value a row; ``history`` and each
                ``recent_m`` take the row's item ids, oldest first. A feature left out is ``B`` empty rows.
        """
        batch = self._batch_size(features)
        values, lengths = [], []
        for name in self.names:
            rows = features[name] if name in features else [[]] * batch
            if name == HISTORY or name in self.recent:
                sequence, starts, ends = self._sequences(rows)
                if name == HISTORY:
                    value, length = last_items(sequence, starts, ends, self.history_length)
                else:  # recent_m reads the whole history: its m-th last item
                    value, length = item_before(sequence, starts, ends, self.recent[name]), torch.ones_like(ends)
            else:
                value, length = self._single(name, rows), torch.ones(batch, dtype=torch.long)
            values.append(value)
            lengths.append(length)
        return values, lengths

    def _batch_size(self, features: Mapping[str, Sequence[Sequence]]) -> int:
        """``B``, the rows every given feature has; ``ExportError`` for an unknown name or ragged rows."""
        batch = None
        for name, rows in features.items():
            if name not in self.names:
                raise ExportError(f"unknown query feature '{name}': this model's query features are {self.names}")
            if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or not all(
                    isinstance(row, Sequence) and not isinstance(row, (str, bytes)) for row in rows):
                raise ExportError(f"query feature '{name}': give one list of raw values per row")
            if batch is None:
                batch = len(rows)
            elif len(rows) != batch:
                raise ExportError(f"every query feature needs the same number of rows: '{name}' has {len(rows)}, "
                                  f"another {batch}")
        if not batch:
            raise ExportError("give at least one query feature with at least one row")
        return batch

    def _sequences(self, rows: Sequence[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every row's item codes back to back (ids not in the catalog: 0), with each row's [start, end)."""
        codes = []
        for row in rows:
            for value in row:
                found = self.items.find(value)
                codes.append(0 if found is None else found + 1)
        counts = torch.tensor([len(row) for row in rows], dtype=torch.long)
        ends = torch.cumsum(counts, 0)
        return torch.tensor(codes, dtype=torch.long), ends - counts, ends

    def _single(self, name: str, rows: Sequence[Sequence]) -> torch.Tensor:
        """``[B]`` a single-valued feature's codes (missing or unknown: 0)."""
        for row in rows:
            if len(row) > 1:
                raise ExportError(f"query feature '{name}' takes one value per row, got {len(row)}")
        codes = np.zeros(len(rows), dtype=np.int64)
        given = [r for r, row in enumerate(rows) if len(row) == 1]
        if name in self.hashed:  # an id: hashed as prepare hashed its canonical text
            if given:
                codes[given] = hash_rows(np.asarray([canonical_id(rows[r][0]) for r in given], dtype=object),
                                         self.hashed[name])
        elif name == "user_id" and self.users is not None and self.user_codes is not None:
            for r in given:
                found = self.users.find(rows[r][0])
                codes[r] = 0 if found is None else self.user_codes[found + 1]
        else:
            vocabulary = self.codes.get(name, {})
            for r in given:
                codes[r] = vocabulary.get(raw_key(rows[r][0]), 0)
        return torch.from_numpy(codes)
