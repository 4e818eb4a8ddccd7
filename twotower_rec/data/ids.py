"""The one rule for raw user and item ids, in every reader and in serving.

1. Surrounding white space is removed (``" 7 "`` is ``"7"``).
2. A value that is an integer literal (``007``, ``+7``) or an integer-valued decimal (``7.0``,
   ``7.``) and fits in int64 is that integer, written canonically (``"7"``): so ``007``, ``7``,
   ``7.0`` and ``" 7 "`` are one id wherever they appear.
3. An id space (users, or items) is integer when every one of its values, in every file that
   names it, is an integer under rule 2; otherwise every id of that space is text (integers in
   their canonical form from rule 2, everything else as written after rule 1).

Serving applies the same rule to ``--user`` and to the liked ids of a request.

The column helpers below apply the rule to whole columns: integer and float columns are
checked with numpy alone; a text column runs :func:`canonical_id` once per distinct value, not
per row. :func:`stored` turns a space's ids into what the prepared cache saves: int64, or
fixed-width text (``np.load`` reads both without pickle).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

_INTEGER = re.compile(r"[+-]?\d+(\.0*)?")
_INT64_MAX = np.iinfo(np.int64).max
_INT64_MIN = np.iinfo(np.int64).min


def canonical_id(value: object) -> str:
    """The canonical text of one raw id under the rule above.

    Args:
        value: a raw id as read: text, an int or a float (from a typed column).
    """
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if np.isfinite(value) and float(value).is_integer() and _INT64_MIN <= value <= _INT64_MAX:
            return str(int(value))
        return repr(float(value))
    text = str(value).strip()
    if _INTEGER.fullmatch(text):
        number = int(text.split(".")[0])
        if _INT64_MIN <= number <= _INT64_MAX:
            return str(number)
    return text


def is_integer_id(text: str) -> bool:
    """Whether a canonical id (from :func:`canonical_id`) is an integer.

    Args:
        text: a canonical id.
    """
    return bool(re.fullmatch(r"-?\d+", text)) and _INT64_MIN <= int(text) <= _INT64_MAX


def lookup_key(value: object, integer_space: bool) -> int | str | None:
    """The key a raw id has in an id space (None: it cannot be in an integer space).

    Args:
        value: the raw id a user typed or sent.
        integer_space: whether the space's ids are integers (rule 3).
    """
    text = canonical_id(value)
    if not integer_space:
        return text
    return int(text) if is_integer_id(text) else None


def _plain(values) -> np.ndarray:
    """A column (Series, Index, pandas or numpy array) as a numpy array: int64 or float64 when
    the column is numeric without missing values, else objects."""
    if isinstance(values, np.ndarray):
        return values
    series = pd.Series(values, copy=False)
    if series.isna().any():
        return series.to_numpy(object)
    return series.to_numpy()


def _float_integers(values: np.ndarray) -> np.ndarray:
    """Which floats are integers that fit int64 (rule 2)."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (values == np.trunc(values)) & (values >= -2.0**63) & (values < 2.0**63)


def _by_value(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(``[N]`` the index of each value's distinct value, the canonical text of each distinct value)."""
    codes, uniques = pd.factorize(values, use_na_sentinel=False)
    return codes, [canonical_id(u) for u in uniques]


def integer_ids(values) -> np.ndarray | None:
    """The column's ids as int64 when every one is an integer under rule 2, else None.

    Args:
        values: one column of raw ids (numpy array, pandas Series or array).
    """
    return _Column(values).integers()


def canonical_ids(values) -> np.ndarray:
    """``[N]`` object array: the canonical text (:func:`canonical_id`) of every id of a column.

    Args:
        values: one column of raw ids (numpy array, pandas Series or array).
    """
    return _Column(values).text()


class _Column:
    """One column of raw ids, its distinct values canonicalised at most once."""

    def __init__(self, values) -> None:
        self.values = _plain(values)
        self.kind = self.values.dtype.kind
        self._distinct: tuple[np.ndarray, list[str]] | None = None

    def distinct(self) -> tuple[np.ndarray, list[str]]:
        if self._distinct is None:
            self._distinct = _by_value(self.values)
        return self._distinct

    def integers(self) -> np.ndarray | None:
        values = self.values
        if self.kind == "i":
            return values.astype(np.int64, copy=False)
        if self.kind == "u":
            return values.astype(np.int64) if values.size == 0 or values.max() <= _INT64_MAX else None
        if self.kind == "f":
            return values.astype(np.int64) if _float_integers(values).all() else None
        codes, canonical = self.distinct()
        if not all(is_integer_id(text) for text in canonical):
            return None
        return np.array([int(text) for text in canonical], dtype=np.int64)[codes]

    def text(self) -> np.ndarray:
        if self.kind in "iu" or (self.kind == "f" and _float_integers(self.values).all()):
            codes, uniques = pd.factorize(self.values.astype(np.int64) if self.kind == "f" else self.values)
            return np.asarray(uniques).astype(str).astype(object)[codes]
        codes, canonical = self.distinct()
        return np.array(canonical, dtype=object)[codes]


def integer_literals(values) -> np.ndarray:
    """``[N]`` bool: which ids are integers under rule 2, also those too large for int64 (the
    readers of integer-only formats refuse the others).

    Args:
        values: one column of raw ids.
    """
    values = _plain(values)
    if values.dtype.kind in "iu":
        return np.ones(values.size, dtype=bool)
    if values.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            return np.isfinite(values) & (values == np.trunc(values))
    codes, canonical = _by_value(values)
    literal = np.array([bool(_INTEGER.fullmatch(text)) for text in canonical], dtype=bool)
    return literal[codes] if canonical else np.zeros(0, dtype=bool)


def id_space(*columns) -> list[np.ndarray]:
    """Rule 3 over every column that names one id space (e.g. the interactions' users and the
    users table's): all int64 when every id of every column is an integer, else all the
    canonical text (an object array of ``str``), so equal ids match across the files.

    Args:
        columns: the columns of raw ids, one per file.
    """
    parsed = [_Column(column) for column in columns]
    integers = []
    for column in parsed:
        ints = column.integers()
        if ints is None:
            return [c.text() for c in parsed]
        integers.append(ints)
    return integers


def in_space(ids: np.ndarray, integer_space: bool) -> np.ndarray:
    """Ids of one file (int64, or canonical text) as the space they belong to holds them.

    Args:
        ids: the file's ids from :func:`id_space` applied to that file alone.
        integer_space: whether the whole space is integer (then ``ids`` are int64 already).
    """
    ids = np.asarray(ids)
    if integer_space or ids.dtype.kind not in "iu":
        return ids
    return ids.astype(str).astype(object)


def stored(ids) -> np.ndarray:
    """A space's ids as the prepared cache saves them: int64, or fixed-width text (``<U``),
    both of which ``np.load(..., allow_pickle=False)`` reads.

    Args:
        ids: int64 ids, or canonical text ids (from :func:`id_space`).
    """
    ids = np.asarray(ids)
    if ids.dtype.kind in "iu":
        return ids.astype(np.int64, copy=False)
    if ids.dtype.kind == "U":
        return ids
    return ids.astype(str) if ids.size else np.zeros(0, dtype="<U1")
