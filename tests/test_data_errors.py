"""Data input reliability (issue 30): ids that type inference changed or kept apart, side tables
that silently matched nothing, non-finite times and ratings, header-only side files, Parquet
directories DuckDB could not read, caches that cannot be written, and pickle-free caches.
Each test failed before its fix."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower_rec.config import load_config
from twotower_rec.data import prepared as prepared_module
from twotower_rec.data.prepared import PreparedData, prepare
from twotower_rec.data.sources import load_raw
from twotower_rec.errors import DataError

USERS = [1, 2, 3, 4]
ITEMS = [10, 11, 12, 13, 14]


def _events(user=None, item=None) -> pd.DataFrame:
    """Four users with four events each; ``user`` / ``item`` map a raw id to what the file says."""
    rows = [(u, ITEMS[(u + k) % len(ITEMS)], 1000 * u + k) for u in USERS for k in range(4)]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"]).astype(object)
    if user:
        frame["user"] = [user.get(u, u) for u in frame["user"]]
    if item:
        frame["item"] = [item.get(i, i) for i in frame["item"]]
    return frame


def _write(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def _cfg(tmp_path, interactions: Path, *overrides: str, users: Path | None = None, items: Path | None = None):
    side = ([f"data.users_path={users}"] if users else []) + ([f"data.items_path={items}"] if items else [])
    return load_config(None, ["data.source=interactions", f"data.interactions_path={interactions}",
                              f"data.cache_dir={tmp_path / 'cache'}", "features.item_dense=[]",
                              f"features.user_features=[user_id{',gender' if users else ''}]",
                              f"features.item_features=[item_id{',genres' if items else ''}]", *side, *overrides])


def _prepare(cfg) -> PreparedData:
    return prepare(load_raw(cfg.data), cfg.data, cfg.features)


def _users_table(ids=None) -> pd.DataFrame:
    return pd.DataFrame({"user": ids or USERS, "gender": ["F", "M", "F", "M"]})


def _items_table(ids=None) -> pd.DataFrame:
    return pd.DataFrame({"item": ids or ITEMS, "title": [f"T{i}" for i in ITEMS],
                         "genres": ["A|B", "B", "C", "A", "D"]})


def _decoded(data: PreparedData, feature: str, tower: str) -> list:
    """Each user's (or item's) side value decoded from the cache, by code (None: unknown)."""
    vocab = [None, *data.spec.vocabularies[feature]]
    if tower == "user":
        return [vocab[c] for c in data.user_features[feature][1:]]
    csr = data.item_multi[feature]
    return [sorted(vocab[v] for v in csr.values[csr.offsets[c]:csr.offsets[c + 1]])
            for c in range(1, data.spec.num_items + 1)]


ENGINES = pytest.mark.parametrize("engine", ["pandas", "duckdb"])


# --- 7. mixed id types across files -----------------------------------------------------------------


@ENGINES
@pytest.mark.parametrize("odd", ["users", "items", "interactions"])
def test_one_text_id_in_any_file_keeps_the_side_features(tmp_path, capsys, engine, odd):
    """A non-numeric id in one file made that file's ids text and the other's int: every side
    value came out empty. The whole id space is text now, and the rows match."""
    users = _users_table([*USERS[:3], "u-extra"] if odd == "users" else None).astype({"user": object})
    users.loc[len(users)] = ["u-extra" if odd != "users" else 99, "X"]
    items = _items_table().astype({"item": object})
    items.loc[len(items)] = ["i-extra", "T", "Z"]
    events = _events(item={14: "i-extra"} if odd == "interactions" else None)
    cfg = _cfg(tmp_path, _write(events, tmp_path / "events.csv"), f"data.engine={engine}",
               users=_write(users, tmp_path / "users.csv"), items=_write(items, tmp_path / "items.csv"))
    data = _prepare(cfg)
    by_user = dict(zip([str(u) for u in data.raw_user_ids], _decoded(data, "gender", "user")))
    assert by_user["1"] == "F" and by_user["2"] == "M"
    if odd != "users":
        assert by_user["4"] == "M"
    by_item = dict(zip([str(i) for i in data.raw_item_ids], _decoded(data, "genres", "item")))
    assert by_item["10"] == ["A", "B"] and by_item["11"] == ["B"]
    err = capsys.readouterr().err
    assert f"{tmp_path / 'users.csv'}:" in err and f"{tmp_path / 'items.csv'}:" in err
    assert "have a row" in err, err


@pytest.mark.parametrize("table", ["users", "items"])
def test_a_side_table_that_matches_no_id_is_refused(tmp_path, table):
    users = _users_table([f"user-{u}" for u in USERS]) if table == "users" else _users_table()
    items = _items_table([f"item-{i}" for i in ITEMS]) if table == "items" else _items_table()
    cfg = _cfg(tmp_path, _write(_events(), tmp_path / "events.csv"),
               users=_write(users, tmp_path / "users.csv"), items=_write(items, tmp_path / "items.csv"))
    with pytest.raises(DataError) as err:
        _prepare(cfg)
    message = str(err.value)
    assert str(tmp_path / f"{table}.csv") in message and "no" in message, message


# --- 8. ids changed by type inference ---------------------------------------------------------------


READERS = pytest.mark.parametrize("suffix,engine", [(".csv", "pandas"), (".csv", "duckdb"), (".parquet", "pandas"),
                                                    (".parquet", "duckdb"), ("dir", "duckdb")])


def _interactions_file(frame: pd.DataFrame, tmp_path: Path, suffix: str) -> Path:
    if suffix == "dir":  # a directory of Parquet files: the out-of-core reader (DuckDB reads the ids)
        half = len(frame) // 2
        frame = frame.astype({"user": str, "item": str, "timestamp": np.int64})
        _write(frame.iloc[:half], tmp_path / "events" / "part-0.parquet")
        _write(frame.iloc[half:], tmp_path / "events" / "part-1.parquet")
        return tmp_path / "events"
    if suffix == ".parquet":
        frame = frame.astype({"user": str, "item": str})
    return _write(frame, tmp_path / f"events{suffix}")


@READERS
def test_one_decimal_id_keeps_the_ids_integers(tmp_path, suffix, engine):
    """One 1.0 made every raw id N.0 (then `recommend --user 1` was an unknown user)."""
    path = _interactions_file(_events(user={1: "1.0"}), tmp_path, suffix)
    data = _prepare(_cfg(tmp_path, path, f"data.engine={engine}"))
    assert data.raw_user_ids.dtype == np.int64 and data.raw_user_ids.tolist() == USERS
    assert data.raw_item_ids.dtype == np.int64 and data.raw_item_ids.tolist() == ITEMS


@READERS
@pytest.mark.parametrize("spelling", [" 2 ", "002", "+2", "2.0"])
@pytest.mark.parametrize("with_text", [False, True], ids=["integer-space", "text-space"])
def test_one_id_spelt_two_ways_is_one_user(tmp_path, suffix, engine, spelling, with_text):
    """'002' and '2' were one user or two depending on what else was in the column."""
    frame = _events(user={3: "c"} if with_text else None)
    frame.loc[frame.index[frame["user"] == 2][:2], "user"] = spelling
    path = _interactions_file(frame, tmp_path, suffix)
    data = _prepare(_cfg(tmp_path, path, f"data.engine={engine}"))
    expected = ["1", "2", "4", "c"] if with_text else USERS
    assert data.raw_user_ids.tolist() == expected
    assert np.diff(data.user_offsets).tolist() == [4, 4, 4, 4]


def test_side_table_ids_follow_the_rule_too(tmp_path):
    users = pd.DataFrame({"user": ["001", " 2 ", "3.0", "4", "x"], "gender": ["F", "M", "F", "M", "X"]})
    cfg = _cfg(tmp_path, _write(_events(), tmp_path / "events.csv"), users=_write(users, tmp_path / "users.csv"))
    data = _prepare(cfg)
    assert _decoded(data, "gender", "user") == ["F", "M", "F", "M"]


# --- 13b. a header-only side table -------------------------------------------------------------------


@pytest.mark.parametrize("table", ["users", "items"])
@pytest.mark.parametrize("suffix", ["csv", "dir"])
def test_a_header_only_side_table_is_refused(tmp_path, table, suffix):
    empty = (_users_table() if table == "users" else _items_table()).iloc[:0]
    side = _write(empty, tmp_path / f"{table}.csv")
    events = _interactions_file(_events(), tmp_path, suffix) if suffix == "dir" else \
        _write(_events(), tmp_path / "events.csv")
    with pytest.raises(DataError) as err:
        load_raw(_cfg(tmp_path, events, **{table: side}).data)
    assert str(side) in str(err.value) and "header only" in str(err.value)


# --- 9a. non-finite or out-of-range timestamps and ratings ----------------------------------------


@pytest.mark.parametrize("column,value", [("timestamp", "inf"), ("timestamp", "-inf"), ("timestamp", "1e30"),
                                          ("rating", "inf"), ("rating", "nan"), ("rating", "-inf")])
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_non_finite_time_or_rating_names_file_and_line(tmp_path, column, value, suffix):
    """inf / 1e30 seconds became INT64_MIN (the event moved to the start of the history); an
    inf rating was accepted."""
    frame = _events().assign(rating=4.0).astype({"timestamp": object, "rating": object})
    frame.loc[6, column] = value
    if suffix == ".parquet":
        frame[column] = frame[column].astype(float)
    path = _write(frame, tmp_path / f"events{suffix}")
    with pytest.raises(DataError) as err:
        load_raw(_cfg(tmp_path, path).data)
    message = str(err.value)
    where = "line 8" if suffix == ".csv" else "row 7"
    assert str(path) in message and f"{where}:" in message and column in message, message


# --- 16. a Parquet directory DuckDB cannot read -----------------------------------------------------


def _directory(tmp_path, second: pd.DataFrame) -> Path:
    first = _events().astype({"user": np.int64, "item": np.int64, "timestamp": np.float64}).assign(rating=4.0)
    _write(first, tmp_path / "events" / "part-0.parquet")
    _write(second, tmp_path / "events" / "part-1.parquet")
    return tmp_path / "events"


@pytest.mark.parametrize("column", ["item", "timestamp", "rating"])
def test_a_parquet_file_without_a_column_is_named(tmp_path, column):
    second = _events().astype({"user": np.int64, "item": np.int64, "timestamp": np.float64}).assign(rating=4.0)
    folder = _directory(tmp_path, second.drop(columns=[column]))
    with pytest.raises(DataError) as err:
        _prepare(_cfg(tmp_path, folder))
    message = str(err.value)
    assert str(folder / "part-1.parquet") in message and column in message, message


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e30])
def test_a_parquet_directory_with_a_non_finite_time_names_file_and_row(tmp_path, value):
    second = _events().astype({"user": np.int64, "item": np.int64, "timestamp": np.float64}).assign(rating=4.0)
    second.loc[3, "timestamp"] = value
    folder = _directory(tmp_path, second)
    with pytest.raises(DataError) as err:
        _prepare(_cfg(tmp_path, folder))
    message = str(err.value)
    assert str(folder / "part-1.parquet") in message and "row 4" in message and "timestamp" in message, message


def test_other_duckdb_errors_are_one_data_error(tmp_path, monkeypatch):
    import duckdb

    from twotower_rec.data import out_of_core

    folder = _directory(tmp_path, _events().astype({"user": np.int64, "item": np.int64, "timestamp": np.int64}))

    def broken(*args, **kwargs):
        raise duckdb.IOException("IO Error: Could not read file \"part-1.parquet\": disk went away")

    monkeypatch.setattr(out_of_core, "write_interactions", broken)
    with pytest.raises(DataError, match="part-1.parquet") as err:
        _prepare(_cfg(tmp_path, folder))
    assert "\n" not in str(err.value)
    assert not list(tmp_path.glob(".cache.tmp-*"))


# --- 18. a cache folder under a file ------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["pandas", "duckdb"])
def test_a_cache_dir_under_a_regular_file_is_one_error(tmp_path, engine):
    path = _write(_events(), tmp_path / "events.csv")
    cfg = _cfg(tmp_path, path, f"data.cache_dir={path / 'cache'}", f"data.engine={engine}")
    with pytest.raises(DataError) as err:
        _prepare(cfg)
    assert str(path) in str(err.value) and "not a directory" in str(err.value)
    with pytest.raises(DataError):
        PreparedData(path / "cache")


# --- 15. a full disk or a read-only folder while prepare writes ----------------------------------------


@pytest.mark.parametrize("engine", ["pandas", "duckdb"])
def test_a_full_disk_keeps_the_old_cache(tmp_path, monkeypatch, engine):
    path = _write(_events(), tmp_path / "events.csv")
    cfg = _cfg(tmp_path, path, f"data.engine={engine}")
    _prepare(cfg)
    before = {p.relative_to(tmp_path / "cache"): p.read_bytes() for p in (tmp_path / "cache").rglob("*")
              if p.is_file()}
    real = np.save

    def full(file, *args, **kwargs):
        if "items" in str(file):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(file, *args, **kwargs)

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(DataError) as err:
        _prepare(cfg)
    message = str(err.value)
    assert str(tmp_path / "cache") in message and "No space left on device" in message, message
    after = {p.relative_to(tmp_path / "cache"): p.read_bytes() for p in (tmp_path / "cache").rglob("*")
             if p.is_file()}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cache.")]  # no half-written folder left


# --- pickle-free prepared data ------------------------------------------------------------------------


class _Planted:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["raw_user_ids.npy", "raw_item_ids.npy", "interactions/oov_raw_items.npy"])
def test_a_planted_pickle_in_the_cache_is_not_run(tmp_path, name):
    path = _write(_events(user={1: "a"}, item={10: "x"}), tmp_path / "events.csv")
    cfg = _cfg(tmp_path, path, "data.split=temporal")
    data = _prepare(cfg)
    assert data.raw_user_ids.dtype.kind == "U" and data.raw_item_ids.dtype.kind == "U"
    data.raw_items_of_rows(np.arange(data.num_rows))
    marker = tmp_path / "marker"
    np.save(tmp_path / "cache" / name, np.array([_Planted(str(marker))], dtype=object), allow_pickle=True)
    with pytest.raises((DataError, ValueError)):
        PreparedData(tmp_path / "cache").raw_items_of_rows(np.arange(data.num_rows))
    assert not marker.exists()


def test_a_cache_of_the_previous_format_is_refused_in_one_line(tmp_path):
    import json

    path = _write(_events(), tmp_path / "events.csv")
    _prepare(_cfg(tmp_path, path))
    info_path = tmp_path / "cache" / "prepared.json"
    info = json.loads(info_path.read_text())
    del info["format_version"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(DataError, match="run `twotower-rec prepare` again") as err:
        PreparedData(tmp_path / "cache")
    assert "\n" not in str(err.value)
    _prepare(_cfg(tmp_path, path))  # prepare replaces it
    assert PreparedData(tmp_path / "cache").info["format_version"] == prepared_module.FORMAT_VERSION
