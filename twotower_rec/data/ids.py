"""The one rule for raw user and item ids, in every reader and in serving.

1. Surrounding white space is removed (``" 7 "`` is ``"7"``).
2. A value that is an integer literal (``007``, ``+7``) or an integer-valued decimal (``7.0``,
   ``7.``) and fits in int64 is that integer, written canonically (``"7"``): so ``007``, ``7``,
   ``7.0`` and ``" 7 "`` are one id wherever they appear.
3. An id space (users, or items) is integer when every one of its values, in every file that
   names it, is an integer under rule 2; otherwise every id of that space is text (integers in
   their canonical form from rule 2, everything else as written after rule 1).

Serving applies the same rule to ``--user`` and to the liked ids of a request.
"""

from __future__ import annotations

import re

import numpy as np

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
