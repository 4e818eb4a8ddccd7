"""The one rule for raw ids (twotower_rec/data/ids.py), value by value and column by column: the
column helpers must agree with canonical_id / is_integer_id / lookup_key on every case."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from twotower_rec.data import ids

CASES = [  # raw value, canonical text, integer under rule 2
    ("7", "7", True), (" 7 ", "7", True), ("007", "7", True), ("+7", "7", True), ("7.0", "7", True),
    ("7.", "7", True), ("-0", "0", True), ("-12", "-12", True), (7, "7", True), (np.int64(7), "7", True),
    (7.0, "7", True), (np.float32(7.0), "7", True), ("7.5", "7.5", False), (7.5, "7.5", False),
    ("abc", "abc", False), (" a b ", "a b", False), ("1e3", "1e3", False), ("0x10", "0x10", False),
    (str(2**63 - 1), str(2**63 - 1), True), (str(-(2**63)), str(-(2**63)), True),
    (str(2**63), str(2**63), False), ("00" + str(2**64), "00" + str(2**64), False),
    (float(2**63), repr(float(2**63)), False), (float("inf"), "inf", False), (float("nan"), "nan", False),
    (True, "True", False),
]


@pytest.mark.parametrize("value,text,integer", CASES, ids=[repr(c[0]) for c in CASES])
def test_canonical_id_of_each_case(value, text, integer):
    assert ids.canonical_id(value) == text
    assert ids.is_integer_id(text) == integer
    assert ids.lookup_key(value, integer_space=False) == text
    assert ids.lookup_key(value, integer_space=True) == (int(text) if integer else None)


def _columns():
    """The cases as the columns readers hand over: numpy text, pandas string, nullable ints, floats."""
    text = [c[0] for c in CASES if isinstance(c[0], str)]
    return {
        "object": np.array(text, dtype=object),
        "pandas-string": pd.Series(text, dtype="string"),
        "numpy-U": np.array(text),
        "int64": np.array([7, -3, 2**63 - 1], dtype=np.int64),
        "nullable-Int64": pd.Series([7, -3, 0], dtype="Int64"),
        "uint64": np.array([1, 2**63 + 5], dtype=np.uint64),
        "float": np.array([1.0, 7.0, -2.0]),
        "float-mixed": np.array([1.0, 7.5, float("inf")]),
        "bool": np.array([True, False]),
    }


@pytest.mark.parametrize("name", list(_columns()))
def test_column_helpers_agree_with_canonical_id(name):
    column = _columns()[name]
    values = list(column)
    expected = [ids.canonical_id(v) for v in values]
    assert ids.canonical_ids(column).tolist() == expected
    all_integer = all(ids.is_integer_id(t) for t in expected)
    got = ids.integer_ids(column)
    assert (got is not None) == all_integer
    if all_integer:
        assert got.dtype == np.int64 and got.tolist() == [int(t) for t in expected]
    literal = ids.integer_literals(column).tolist()
    assert literal == [bool(ids._INTEGER.fullmatch(t)) for t in expected]


def test_a_space_is_integer_only_when_every_file_is():
    interactions, users = np.array([1, 2, 3]), np.array(["001", " 2 ", "3.0"], dtype=object)
    a, b = ids.id_space(interactions, users)
    assert a.dtype == np.int64 and b.dtype == np.int64 and b.tolist() == [1, 2, 3]
    a, b = ids.id_space(interactions, np.array(["001", "x"], dtype=object))
    assert a.tolist() == ["1", "2", "3"] and b.tolist() == ["1", "x"]  # text, canonical: 001 is 1
    assert a.dtype == object and all(type(v) is str for v in a)


def test_one_decimal_id_does_not_turn_the_others_into_decimals():
    """The bug: one 1.0 made pandas read the column as floats, and every id became 'N.0'."""
    (column,) = ids.id_space(np.array([1.0, 2.0, 30.0]))
    assert column.dtype == np.int64 and column.tolist() == [1, 2, 30]
    (column,) = ids.id_space(np.array([1.0, 2.5]))
    assert column.tolist() == ["1", "2.5"]


def test_in_space_and_stored():
    assert ids.in_space(np.array([1, 2]), True).tolist() == [1, 2]
    assert ids.in_space(np.array([1, 2]), False).tolist() == ["1", "2"]
    assert ids.stored(np.array([3, 4])).dtype == np.int64
    saved = ids.stored(np.array(["a", "bcd"], dtype=object))
    assert saved.dtype.kind == "U" and saved.tolist() == ["a", "bcd"]
    assert ids.stored(np.zeros(0, dtype=object)).dtype.kind == "U"


def test_text_columns_are_canonicalised_once_per_distinct_value(monkeypatch):
    calls = []
    real = ids.canonical_id
    monkeypatch.setattr(ids, "canonical_id", lambda v: calls.append(v) or real(v))
    column = np.array(["7", "x", "7", " 7 "] * 1000, dtype=object)
    assert ids.canonical_ids(column)[:4].tolist() == ["7", "x", "7", "7"]
    assert len(calls) == 3
