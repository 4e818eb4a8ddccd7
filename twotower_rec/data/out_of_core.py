"""Out-of-core ``prepare`` of the interactions (``data.engine: duckdb``): the same
``interactions/*.npy`` the in-memory path writes, byte for byte, within ``data.memory_limit``.

DuckDB does what needs the whole log at once, spilling to ``data.spill_dir`` past its memory
limit: keep each (user, item) pair's first event by (time, file order), count each user's
events, and sort the kept events by (user, time, file order). Python then streams the sorted
rows in chunks of ``CHUNK_ROWS`` into memory-mapped ``.npy`` files, so its own memory is a
chunk plus arrays of one entry per user or per item. Why DuckDB and not Polars streaming or
Arrow: BENCHMARKS.md ("Preparing data bigger than memory").

The input is a DataFrame from any of today's readers (already in memory; the engine bounds
the work done on it) or a list of Parquet files read by DuckDB itself, in name order.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from twotower_rec.data import ids, splits
from twotower_rec.errors import DataError

if TYPE_CHECKING:
    from twotower_rec.config import DataConfig

CHUNK_ROWS = 1 << 20


def _log(message: str) -> None:
    print(f"prepare: {message}", file=sys.stderr, flush=True)


@dataclass
class Interactions:
    """What the rest of ``prepare`` needs of the interactions once their files are written.

    Args:
        num_rows: ``R``, the kept events.
        num_users: ``U``, the kept users.
        raw_user_ids: ``[U]`` raw id of user code c at c - 1.
        user_id_codes: ``[U + 1]`` the ``user_id`` feature: the code, or 0 for a user without training events.
        item_vocab: raw ids of the items with training events, sorted; code = position + 1.
    """

    num_rows: int
    num_users: int
    raw_user_ids: np.ndarray  # [U] raw id of user code c at c - 1
    user_id_codes: np.ndarray  # [U + 1] the user_id feature: the code, or 0 for a user without training events
    item_vocab: pd.Index  # raw ids of the items with training events, sorted; code = position + 1


def connect(data_cfg: DataConfig, spill_dir: Path):
    """A DuckDB connection held to ``data.memory_limit``, spilling into ``spill_dir``.

    Args:
        data_cfg: the ``data`` section (``memory_limit``, ``threads``).
        spill_dir: the folder DuckDB writes its temporary files to (:func:`spill_folder`).
    """
    import duckdb

    con = duckdb.connect()
    try:
        con.execute(f"SET memory_limit = '{data_cfg.memory_limit}'")
    except duckdb.Error as err:
        raise DataError(f"data.memory_limit: '{data_cfg.memory_limit}' is not a size DuckDB reads "
                        f"(e.g. 500MB, 4GB): {err}") from None
    if data_cfg.threads:
        con.execute(f"SET threads = {int(data_cfg.threads)}")
    con.execute(f"SET temp_directory = '{spill_dir}'")
    con.execute("SET preserve_insertion_order = false")  # every order that matters is an ORDER BY
    return con


def duckdb_out_of_memory() -> type[Exception]:
    import duckdb

    return duckdb.OutOfMemoryException


def spill_folder(data_cfg: DataConfig, final: Path) -> Path:
    """``data.spill_dir``, or a new temporary folder beside the cache (the same disk).

    Args:
        data_cfg: the ``data`` section (``spill_dir``).
        final: the cache folder (``data.cache_dir``); the new folder's name starts with its name.

    Returns:
        A new, empty folder inside ``data.spill_dir``, or beside ``final`` when ``data.spill_dir`` is empty.
    """
    parent = Path(data_cfg.spill_dir) if data_cfg.spill_dir else final.parent
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.spill-", dir=parent))


def register_frame(con, inter: pd.DataFrame, name: str) -> None:
    """Today's readers' table as a DuckDB view ``raw`` with ``pos``, the row's file order.

    Args:
        con: the DuckDB connection (:func:`connect`).
        inter: the interactions table (``user, item, timestamp, rating``, ``RawData.interactions``).
        name: the source's name, for error messages.
    """
    import pyarrow as pa

    columns = {}
    for column in ("user", "item"):
        values = inter[column].to_numpy()
        if values.dtype == object and not all(isinstance(v, str) for v in values[: min(values.size, 1000)]):
            raise DataError(f"{name}: {column} ids beyond 64 bits (or of mixed types) need data.engine=pandas")
        columns[column] = pa.array(values)
    columns["timestamp"] = pa.array(inter["timestamp"].to_numpy(np.int64))
    columns["rating"] = pa.array(inter["rating"].to_numpy(np.float32))
    columns["pos"] = pa.array(np.arange(len(inter), dtype=np.int64))
    con.register("raw_frame", pa.table(columns))
    con.execute("CREATE VIEW raw AS SELECT * FROM raw_frame")


def register_parquet(con, files: list[Path], data_cfg: DataConfig, side_integer: dict[str, bool]) -> dict[str, bool]:
    """A directory's Parquet files as the view ``raw`` (user, item, timestamp, rating, pos);
    the file order is the files' name order, then their rows. Ids follow the id rule
    (``ids.py``) over the files and the side tables together. A file without a column, and
    missing ids, times or ratings, non-finite times or ratings, are errors naming the file (and row).

    Args:
        con: the DuckDB connection (:func:`connect`).
        files: the Parquet files, in name order.
        data_cfg: the ``data`` section (the user, item, timestamp and rating column names).
        side_integer: ``{"user": ..., "item": ...}``: whether the users' (items') table has only
            integer ids (True when there is none).

    Returns:
        ``{"user": ..., "item": ...}``: whether each id space is integer (its ids in ``raw`` are
        BIGINT), else canonical text (VARCHAR).
    """
    names = {"user": data_cfg.user_column, "item": data_cfg.item_column, "timestamp": data_cfg.timestamp_column}
    starts, types, has_ratings = _parquet_schemas(files, names, data_cfg.rating_column)
    con.execute("CREATE TEMP TABLE file_start (filename VARCHAR, start BIGINT)")
    con.executemany("INSERT INTO file_start VALUES (?, ?)", starts)
    listed = "[" + ", ".join(_quote(str(p)) for p in files) + "]"
    union = ", union_by_name = true" if any(len(t) > 1 for t in types.values()) else ""  # one type for all files
    con.execute(f"CREATE VIEW raw_file AS SELECT * FROM read_parquet({listed}, filename = true, "
                f"file_row_number = true{union})")
    column_type = dict(con.execute("SELECT column_name, column_type FROM (DESCRIBE raw_file)").fetchall())
    seconds = _seconds_sql(con, data_cfg.timestamp_column, column_type[data_cfg.timestamp_column], files[0])
    integer, id_sql = {}, {}
    for key in ("user", "item"):
        text, is_int, as_int = _id_sql(names[key], column_type[names[key]], files[0])
        parquet_integer = is_int == "true" or bool(
            con.execute(f"SELECT coalesce(bool_and({is_int}), true) FROM raw_file").fetchone()[0])
        integer[key] = parquet_integer and side_integer[key]
        id_sql[key] = as_int if integer[key] else text
    rating = f"CAST({_ident(data_cfg.rating_column)} AS FLOAT)" if has_ratings else "CAST(1.0 AS FLOAT)"
    con.execute(f"""CREATE VIEW raw_checked AS SELECT {id_sql['user']} AS user, {id_sql['item']} AS item,
        {seconds} AS timestamp, {rating} AS rating, filename, file_row_number AS file_row FROM raw_file""")
    _refuse_missing_values(con)
    con.execute("""CREATE VIEW raw AS SELECT r.user, r.item, r.timestamp, r.rating, f.start + r.file_row AS pos
                   FROM raw_checked r JOIN file_start f USING (filename)""")
    return integer


def _parquet_schemas(files: list[Path], names: dict[str, str],
                     rating_column: str) -> tuple[list[tuple[str, int]], dict[str, set[str]], bool]:
    """Each file's first row number in the directory's order, every named column's types over the
    files, and whether they have ratings; a file missing a column, or alone in having (or not
    having) the rating column, is a ``DataError`` naming it."""
    import pyarrow.parquet as pq

    starts, total, types = [], 0, {}
    first_rated = rating_column in pq.ParquetFile(files[0]).schema_arrow.names
    for path in files:
        meta = pq.ParquetFile(path)
        starts.append((str(path), total))
        total += meta.metadata.num_rows
        schema = meta.schema_arrow
        missing = [f"{k} ('{v}')" for k, v in names.items() if v not in schema.names]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {schema.names}. Name yours with "
                            "data.user_column / data.item_column / data.timestamp_column")
        for column in names.values():
            types.setdefault(column, set()).add(str(schema.field(column).type))
        if (rating_column in schema.names) != first_rated:
            has = "has" if rating_column in schema.names else "has no"
            raise DataError(f"{path}: {has} rating column '{rating_column}', unlike {files[0]}: give every "
                            "file of the directory the same columns")
    return starts, types, first_rated


def _refuse_missing_values(con) -> None:
    """The first row of ``raw_checked`` with a missing id, time or rating (or a non-finite rating),
    as a ``DataError`` naming its file and row and how many such rows there are."""
    for column, what in (("user", "empty user id"), ("item", "empty item id"), ("timestamp", "missing timestamp"),
                         ("rating", "missing or non-finite rating")):
        test = f"{column} IS NULL" + (" OR NOT isfinite(rating)" if column == "rating" else "")
        bad = con.execute(f"SELECT filename, file_row, count(*) OVER () FROM raw_checked WHERE {test} "
                          "ORDER BY filename, file_row LIMIT 1").fetchone()
        if bad:
            raise DataError(f"{bad[0]}: row {bad[1] + 1}: {what} ({bad[2]} such rows)")


_INTEGER_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT",
                  "HUGEINT", "UHUGEINT")
_FLOAT_TYPES = ("FLOAT", "DOUBLE")
_FITS = "{0} >= -9223372036854775808.0 AND {0} < 9223372036854775808.0"  # int64 range, for a float
_WHITE_SPACE = "chr(32) || chr(9) || chr(10) || chr(13) || chr(11) || chr(12)"  # what str.strip() removes (ASCII)


def _seconds_sql(con, column: str, duck_type: str, first_file: Path) -> str:
    """SQL of the timestamp column as BIGINT seconds; a float that is not finite or beyond
    int64 is refused naming its file and row."""
    c = _ident(column)
    if duck_type.startswith(("TIMESTAMP", "DATE")):
        return f"CAST(epoch({c}) AS BIGINT)"
    if duck_type in _INTEGER_TYPES:
        return f"CAST({c} AS BIGINT)"
    if duck_type in _FLOAT_TYPES:
        bad = con.execute(f"SELECT filename, file_row_number, {c}, count(*) OVER () FROM raw_file "
                          f"WHERE NOT (isfinite({c}) AND {_FITS.format(c)}) "
                          "ORDER BY filename, file_row_number LIMIT 1").fetchone()
        if bad:
            raise DataError(f"{bad[0]}: row {bad[1] + 1}: timestamp '{bad[2]}' in column '{column}' is not a finite "
                            f"number of seconds within int64 ({bad[3]} such rows)")
        return f"CAST(trunc({c}) AS BIGINT)"
    raise DataError(f"{first_file}: column '{column}' is {duck_type}; a directory of Parquet files needs timestamps "
                    "as integer seconds or a Parquet timestamp")


def _id_sql(column: str, duck_type: str, first_file: Path) -> tuple[str, str, str]:
    """SQL of an id column under the id rule: (its canonical text, whether it is an integer,
    its BIGINT value where it is one)."""
    c = _ident(column)
    if duck_type in _INTEGER_TYPES:
        if duck_type in ("BIGINT", "INTEGER", "SMALLINT", "TINYINT", "UTINYINT", "USMALLINT", "UINTEGER"):
            return f"CAST({c} AS VARCHAR)", "true", f"CAST({c} AS BIGINT)"
        return f"CAST({c} AS VARCHAR)", f"(TRY_CAST({c} AS BIGINT) IS NOT NULL)", f"CAST({c} AS BIGINT)"
    if duck_type in _FLOAT_TYPES:
        is_int = f"(isfinite({c}) AND {c} = trunc({c}) AND {_FITS.format(c)})"
        return (f"CASE WHEN {is_int} THEN CAST(CAST({c} AS BIGINT) AS VARCHAR) ELSE CAST({c} AS VARCHAR) END",
                is_int, f"CAST({c} AS BIGINT)")
    if duck_type == "VARCHAR":
        text = f"trim({c}, {_WHITE_SPACE})"
        as_int = f"TRY_CAST(regexp_extract({text}, '^[+-]?[0-9]+') AS BIGINT)"
        is_int = f"(regexp_full_match({text}, '[+-]?[0-9]+(\\.0*)?') AND {as_int} IS NOT NULL)"
        return f"CASE WHEN {is_int} THEN CAST({as_int} AS VARCHAR) ELSE {text} END", is_int, as_int
    raise DataError(f"{first_file}: id column '{column}' is {duck_type}; ids must be integers or text")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def write_interactions(con, out: Path, spill: Path, name: str, data_cfg: DataConfig) -> Interactions:
    """Order, deduplicate, filter, split and encode the view ``raw``; write ``interactions/*.npy``,
    ``raw_user_ids.npy`` and ``raw_item_ids.npy`` into ``out``.

    Args:
        con: the DuckDB connection holding the view ``raw`` (:func:`register_frame`,
            :func:`register_parquet`).
        out: the new cache folder being written.
        spill: the spill folder (:func:`spill_folder`); it also holds a temporary column of item indices.
        name: the source's name, for messages.
        data_cfg: the ``data`` section (``min_interactions``, the split and its fractions and seed).
    """
    started = time.perf_counter()
    total, spilled = _first_events(con, name, data_cfg, started)
    raw_user_ids, user_offsets, dropped = _kept_users(con, name, data_cfg)
    num_users, num_rows = raw_user_ids.size, int(user_offsets[-1])
    items, result = _sorted_events(con, data_cfg, raw_user_ids, dropped)
    _log(f"duckdb: {total} events -> {num_rows} kept, {num_users} users, {len(items)} items "
         f"({time.perf_counter() - started:.1f}s); sorting")
    folder = out / "interactions"
    item_idx, trained_user, trained_item = _stream_columns(con, result, folder, spill, data_cfg, user_offsets,
                                                           len(items), started, spilled)
    np.save(folder / "user_offsets.npy", user_offsets)
    item_vocab = _encode_items(folder, item_idx, trained_item, items, num_rows)
    np.save(out / "raw_user_ids.npy", ids.stored(raw_user_ids))
    np.save(out / "raw_item_ids.npy", ids.stored(item_vocab))
    user_id_codes = np.where(trained_user, np.arange(num_users + 1), 0).astype(np.int64)
    _log(f"duckdb: interactions written ({time.perf_counter() - started:.1f}s)")
    return Interactions(num_rows, num_users, raw_user_ids, user_id_codes, item_vocab)


def _first_events(con, name: str, data_cfg: DataConfig, started: float) -> tuple[int, int]:
    """Table ``first``: each (user, item) pair's first event of the view ``raw``; (the number of
    events, the bytes DuckDB had spilled by then)."""
    total = con.execute("SELECT count(*) FROM raw").fetchone()[0]
    if total == 0:
        raise DataError(f"{name}: the interactions table is empty")
    _log(f"duckdb: {total} events; keeping each (user, item) pair's first (memory limit {data_cfg.memory_limit})")
    # A user meets an item once: the pair's first event by time, then file order (a struct
    # compares field by field; pos is unique, so rating never decides).
    con.execute("""CREATE TEMP TABLE first AS SELECT user, item, min({'t': timestamp, 'p': pos, 'r': rating}) AS f
                   FROM raw GROUP BY user, item""")
    spilled = _spilled_bytes(con)
    kept_pairs = con.execute("SELECT count(*) FROM first").fetchone()[0]
    _log(f"duckdb: {kept_pairs} distinct (user, item) pairs ({time.perf_counter() - started:.1f}s); counting users")
    if kept_pairs < total:
        _log(f"dropped {total - kept_pairs} repeated (user, item) events, keeping each pair's first")
    return total, spilled


def _kept_users(con, name: str, data_cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(raw ids of the users with ``data.min_interactions`` or more events, in order; their row
    offsets ``[U + 1]``; how many users were dropped)."""
    counts = con.execute("SELECT user, count(*) AS n FROM first GROUP BY user ORDER BY user").fetchnumpy()
    keep = counts["n"] >= data_cfg.min_interactions
    dropped = int((~keep).sum())
    if dropped:
        _log(f"dropped {dropped} of {keep.size} users with fewer than {data_cfg.min_interactions} interactions")
    if not keep.any():
        raise DataError(f"{name}: no user has {data_cfg.min_interactions} or more interactions")
    user_offsets = np.concatenate([[0], np.cumsum(counts["n"][keep])]).astype(np.int64)
    return np.asarray(counts["user"])[keep], user_offsets, dropped


def _sorted_events(con, data_cfg: DataConfig, raw_user_ids: np.ndarray, dropped: int):
    """(every distinct raw item id, sorted; the kept users' events ordered by (user, time, file
    order) as a DuckDB relation of timestamp, rating, item_idx and, for temporal splits, time_rank)."""
    import pyarrow as pa

    items = con.execute("SELECT DISTINCT item FROM first ORDER BY item").fetchnumpy()["item"]
    con.execute("CREATE TEMP TABLE item_index (item {}, idx BIGINT)".format(
        con.execute("SELECT typeof(item) FROM first LIMIT 1").fetchone()[0]))
    con.register("item_list", pa.table({"item": pa.array(np.asarray(items)),
                                        "idx": pa.array(np.arange(len(items), dtype=np.int64))}))
    con.execute("INSERT INTO item_index SELECT * FROM item_list")
    con.unregister("item_list")
    kept_users = ""
    if dropped:
        con.register("kept_users", pa.table({"user": pa.array(np.asarray(raw_user_ids))}))
        kept_users = "WHERE first.user IN (SELECT user FROM kept_users)"
    rank = ", row_number() OVER (ORDER BY f.t, f.p) - 1 AS time_rank" if data_cfg.split == "temporal" else ""
    return items, con.sql(f"""SELECT f.t AS timestamp, f.r AS rating, i.idx AS item_idx{rank}
                             FROM first JOIN item_index i USING (item) {kept_users}
                             ORDER BY first.user, f.t, f.p""")


def _stream_columns(con, result, folder: Path, spill: Path, data_cfg: DataConfig, user_offsets: np.ndarray,
                    num_items: int, started: float, spilled: int):
    """Stream the sorted events into ``folder``'s user / timestamp / rating / split columns and
    ``spill``'s item indices; (the item-index writer, which users and which items have a
    training event)."""
    num_rows, num_users = int(user_offsets[-1]), user_offsets.size - 1
    # Plain appends, not memory maps: dirty pages of a written map count in the process's RSS
    # until the kernel writes them back (3 GB at 1e8 rows); appended pages are the page cache's.
    column = {name: _ColumnWriter(folder / f"{name}.npy", dtype, num_rows)
              for name, dtype in (("user", np.int64), ("timestamp", np.int64), ("rating", np.float32),
                                  ("split", np.int8))}
    item_idx = _ColumnWriter(spill / "item_idx.npy", np.int64, num_rows)
    trained_user = np.zeros(num_users + 1, dtype=bool)
    trained_item = np.zeros(num_items, dtype=bool)
    split_of = _chunk_splitter(data_cfg, user_offsets, num_rows)
    temporal = data_cfg.split == "temporal"
    row, last_log = 0, time.monotonic()
    for batch in result.to_arrow_reader(CHUNK_ROWS):
        n = batch.num_rows
        spilled = max(spilled, _spilled_bytes(con))
        user = np.searchsorted(user_offsets, np.arange(row, row + n), side="right").astype(np.int64)
        split = split_of(row, n, batch.column("time_rank").to_numpy() if temporal else None)
        idx = batch.column("item_idx").to_numpy()
        timestamp = batch.column("timestamp").to_numpy()
        if (np.diff(timestamp)[user[1:] == user[:-1]] < 0).any():  # the stream must follow the ORDER BY
            raise RuntimeError("duckdb returned the events out of (user, time) order")
        for key, values in (("user", user), ("timestamp", timestamp), ("rating", batch.column("rating").to_numpy()),
                            ("split", split)):
            column[key].append(values)
        item_idx.append(idx)
        train = split == splits.TRAIN
        trained_user[user[train]] = True
        trained_item[idx[train]] = True
        row += n
        if time.monotonic() - last_log > 30:
            _log(f"wrote {row} of {num_rows} rows ({time.perf_counter() - started:.0f}s)")
            last_log = time.monotonic()
    for writer in (*column.values(), item_idx):
        writer.close()
    if spilled:
        _log(f"duckdb spilled up to {spilled / 2**20:.1f} MiB to {spill}")
    return item_idx, trained_user, trained_item


def _encode_items(folder: Path, item_idx, trained_item: np.ndarray, items, num_rows: int) -> pd.Index:
    """Write ``item.npy`` (codes 1..V of the items with a training event, 0 for the others) and
    the out-of-vocabulary rows and raw ids; the item vocabulary."""
    code_of_idx = np.where(trained_item, np.cumsum(trained_item), 0).astype(np.int64)
    item = _ColumnWriter(folder / "item.npy", np.int64, num_rows)
    oov_rows, oov_idx = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for lo, idx in item_idx.chunks():
        codes = code_of_idx[idx]
        item.append(codes)
        oov = np.flatnonzero(codes == 0)
        oov_rows.append(oov + lo)
        oov_idx.append(idx[oov])
    item.close()
    np.save(folder / "oov_rows.npy", np.concatenate(oov_rows).astype(np.int64))
    np.save(folder / "oov_raw_items.npy", ids.stored(np.asarray(items)[np.concatenate(oov_idx)]))
    return pd.Index(np.asarray(items)[trained_item])


class _ColumnWriter:
    """A 1-D ``.npy`` file of ``n`` values written by appending chunks (the header ``np.save``
    writes, so the file is the same byte for byte); :meth:`chunks` reads it back in chunks."""

    def __init__(self, path: Path, dtype, n: int) -> None:
        self.path, self.dtype, self.n, self.written = path, np.dtype(dtype), n, 0
        self.file = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.file, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                         "fortran_order": False, "shape": (n,)})
        self.offset = self.file.tell()

    def append(self, values: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(values, dtype=self.dtype).tobytes())
        self.written += len(values)

    def close(self) -> None:
        self.file.close()
        if self.written != self.n:
            raise RuntimeError(f"duckdb returned {self.written} rows for {self.path.name}, expected {self.n}")

    def chunks(self):
        """``(first_row, values)`` of the written file, ``CHUNK_ROWS`` at a time."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for lo in range(0, self.n, CHUNK_ROWS):
                yield lo, np.fromfile(f, dtype=self.dtype, count=min(CHUNK_ROWS, self.n - lo))


def _spilled_bytes(con) -> int:
    """Bytes DuckDB holds in temporary files now (its spill)."""
    return int(con.cursor().execute("SELECT coalesce(sum(size), 0) FROM duckdb_temporary_files()").fetchone()[0])


def _chunk_splitter(data_cfg: DataConfig, user_offsets: np.ndarray, num_rows: int):
    """``split_of(first_row, n, time_rank)`` -> ``[n]`` split codes of sorted rows, the same as
    ``splits.leave_last_out`` / ``temporal`` / ``random_split`` give for the whole table."""
    if data_cfg.split == "leave_last_out":
        whole = splits.leave_last_out(user_offsets)  # one byte a row
        return lambda row, n, _: whole[row:row + n]
    if data_cfg.split == "temporal":
        return lambda row, n, rank: splits.split_of_time_rank(rank, num_rows, data_cfg.validation_fraction,
                                                               data_cfg.test_fraction)
    rng = np.random.default_rng(data_cfg.seed)  # drawn chunk by chunk: the same stream as one draw
    return lambda row, n, _: splits.split_of_draw(rng.random(n), data_cfg.validation_fraction,
                                                  data_cfg.test_fraction)


def remove_spill(spill: Path) -> None:
    """Delete the spill folder and everything in it; a missing folder is not an error.

    Args:
        spill: the folder :func:`spill_folder` made.
    """
    shutil.rmtree(spill, ignore_errors=True)
