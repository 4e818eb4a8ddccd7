"""Readers that turn raw files into :class:`twotower_rec.data.raw.RawData`: your own
interactions CSV / TSV / Parquet with optional user and item tables, and the MovieLens
archives. :func:`load_raw` picks the reader ``data.source`` names (the built-in synthetic
generator is in ``synthetic.py``).

Errors name the file, the line (or Parquet row) and the problem.
"""

from __future__ import annotations

import csv
import io
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from twotower_rec.data import ids
from twotower_rec.data.raw import RawData
from twotower_rec.data.synthetic import synthetic
from twotower_rec.errors import DataError

if TYPE_CHECKING:
    from twotower_rec.config import DataConfig


def read_table(path: str | Path, what: str, id_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV, TSV or Parquet file as a DataFrame; errors name the file (and line, for text).

    Args:
        path: a ``.csv`` or ``.txt`` (comma-separated), ``.tsv`` or ``.parquet`` file.
        what: what the file holds (``interactions``, ``users``, ...), for error messages.
        id_columns: columns of raw ids: in a text file, one that pandas reads as neither integers
            nor text (floats, which round large ids) is read again as the text written, for the id
            rule (``ids.py``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv", ".txt"):
            sep = "\t" if suffix == ".tsv" else ","
            frame = pd.read_csv(path, sep=sep, dtype_backend="numpy_nullable", skip_blank_lines=False)
            inexact = [c for c in id_columns if c in frame.columns and not pd.api.types.is_integer_dtype(frame[c])
                       and not pd.api.types.is_string_dtype(frame[c])]  # floats (and the like) round large ids
            if inexact:
                frame = pd.read_csv(path, sep=sep, dtype_backend="numpy_nullable", skip_blank_lines=False,
                                    dtype={c: "string" for c in inexact})
            frame = frame.dropna(how="all")  # blank lines go; the index keeps each row's file position
            frame.attrs["first_line"] = 2  # the header is line 1
            return frame
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: {err}".strip()) from None
    except UnicodeDecodeError:
        _decode(path, "utf-8", what)  # raises, naming the line of the first bad byte
        raise DataError(f"{path}: not UTF-8 text; re-encode it as UTF-8") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read {what} ({err})") from None
    raise DataError(f"{path}: unsupported file type '{suffix}' (use .csv, .tsv or .parquet)")


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _where(frame: pd.DataFrame, row: int) -> str:
    """'line N' of a text file (counting the header and blank lines) or 'row N' of a Parquet file."""
    if "first_line" in frame.attrs:
        return f"line {int(frame.index[row]) + frame.attrs['first_line']}"
    return f"row {row + 1}"


SECONDS_LIMIT = 2.0**63  # timestamps are int64 seconds


def _in_seconds_range(values: np.ndarray) -> np.ndarray:
    """Which float timestamps are finite and fit int64 seconds."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(values) & (np.abs(values) < SECONDS_LIMIT)


def _numeric_column(frame: pd.DataFrame, column: str, path: Path, what: str, seconds: bool = False) -> np.ndarray:
    """A column as float64; the first non-numeric, missing or non-finite value (or, for
    ``seconds``, one beyond int64 seconds) is reported with its line."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    bad = ~(_in_seconds_range(values) if seconds else np.isfinite(values))
    if bad.any():
        row = _first_bad(bad)
        problem = ("is not a number" if np.isnan(values[row]) else "is not finite" if np.isinf(values[row])
                   else "is beyond the int64 seconds a timestamp holds")
        raise DataError(f"{path}: {_where(frame, row)}: {what} '{_text(frame[column].iloc[row])}' in column "
                        f"'{column}' {problem} ({int(bad.sum())} such rows)")
    return values


def _side_table(path: str | None, id_column: str, key: str, interactions: pd.DataFrame,
                setting: str) -> tuple[pd.DataFrame, str]:
    """An optional user or item feature table keyed by ``key``; ids only when none is given.
    The table's ids and the interactions' are one id space (``ids.py``): both are made int64,
    or both canonical text, so equal ids match."""
    if not path:
        interactions[key] = ids.id_space(interactions[key])[0]
        return pd.DataFrame({key: pd.unique(interactions[key])}), f"{key}s table (none given: set {setting})"
    table = _read_side_file(path, id_column, key)
    interactions[key], table[key] = ids.id_space(interactions[key], table[key])
    return table, str(path)


def _read_side_file(path: str, id_column: str, key: str) -> pd.DataFrame:
    """A user or item table named in the config: its id column renamed to ``key``; a file
    without rows, or a row without an id, is refused naming the file (and line)."""
    table = read_table(path, f"{key}s", (id_column,)).rename(columns={id_column: key})
    if key not in table.columns:
        raise DataError(f"{path}: missing column '{id_column}' (data.{key}_column)")
    if len(table) == 0:
        raise DataError(f"{path}: no {key} rows (the file has a header only); add its rows, or unset "
                        f"data.{key}s_path")
    bad = table[key].isna().to_numpy()
    if bad.any():
        raise DataError(f"{path}: {_where(table, _first_bad(bad))}: empty {key} id in column '{id_column}' "
                        f"({int(bad.sum())} such rows)")
    return table


def interactions_source(cfg: DataConfig) -> RawData:
    """Your own data: an interactions table plus optional user and item feature tables.

    Args:
        cfg: the ``data`` section (``interactions_path``: a file or a directory of Parquet files;
            ``users_path``, ``items_path``, the column names, ``timestamp_format``,
            ``genres_separator``, ``engine``).
    """
    if not cfg.interactions_path:
        raise DataError("data.source=interactions needs data.interactions_path")
    path = Path(cfg.interactions_path)
    if path.is_dir():
        return _parquet_directory(path, cfg)
    frame = read_table(path, "interactions", (cfg.user_column, cfg.item_column))
    columns = {"user": cfg.user_column, "item": cfg.item_column, "timestamp": cfg.timestamp_column}
    missing = [f"{name} ('{column}')" for name, column in columns.items() if column not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {list(frame.columns)}. "
                        f"Name yours with data.user_column / data.item_column / data.timestamp_column")
    if len(frame) == 0:
        raise DataError(f"{path}: no interaction rows (the file has a header only)")
    for name in ("user", "item"):
        bad = frame[columns[name]].isna().to_numpy()
        if bad.any():
            raise DataError(f"{path}: {_where(frame, _first_bad(bad))}: empty {name} id in column '{columns[name]}'")
    seconds = _seconds(frame, columns["timestamp"], path, cfg.timestamp_format)
    has_ratings = cfg.rating_column in frame.columns
    if has_ratings:
        rating = _numeric_column(frame, cfg.rating_column, path, "rating")
    else:
        rating = np.ones(len(frame))
    interactions = pd.DataFrame({
        "user": frame[columns["user"]].to_numpy(), "item": frame[columns["item"]].to_numpy(),
        "timestamp": seconds.astype(np.int64), "rating": rating.astype(np.float32),
    })

    users, users_name = _side_table(cfg.users_path, cfg.user_column, "user", interactions, "data.users_path")
    items, items_name = _side_table(cfg.items_path, cfg.item_column, "item", interactions, "data.items_path")
    if cfg.items_path:
        items = _item_columns(items, cfg.genres_separator)
    return RawData(interactions, users, items, name=str(path), users_name=users_name, items_name=items_name,
                   has_ratings=has_ratings)


def _parquet_directory(path: Path, cfg: DataConfig) -> RawData:
    """A directory of Parquet files (what a Spark or Ray job writes), left on disk for the
    out-of-core ``prepare``; the side tables are read as for a single file."""
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise DataError(f"{path}: a directory with no .parquet files (data.interactions_path takes a file or a "
                        "directory of Parquet files)")
    if cfg.engine == "pandas":
        raise DataError(f"{path}: a directory of Parquet files is prepared out of core: set data.engine=duckdb "
                        "(or auto)")
    empty = pd.DataFrame({"user": pd.Series([], dtype=np.int64), "item": pd.Series([], dtype=np.int64)})
    users, users_name = ((_read_side_file(cfg.users_path, cfg.user_column, "user"), str(cfg.users_path))
                         if cfg.users_path else (empty[["user"]], "users table (none given)"))
    items, items_name = ((_read_side_file(cfg.items_path, cfg.item_column, "item"), str(cfg.items_path))
                         if cfg.items_path else (empty[["item"]], "items table (none given)"))
    for table, key in ((users, "user"), (items, "item")):  # this file's ids alone; prepare joins the spaces
        table[key] = ids.id_space(table[key])[0]
    if cfg.items_path:
        items = _item_columns(items, cfg.genres_separator)
    import pyarrow.parquet as pq

    has_ratings = cfg.rating_column in pq.ParquetFile(files[0]).schema_arrow.names
    return RawData(pd.DataFrame(columns=["user", "item", "timestamp", "rating"]), users, items, name=str(path),
                   users_name=users_name, items_name=items_name, has_ratings=has_ratings,
                   interactions_files=files)


def _seconds(frame: pd.DataFrame, column: str, path: Path, date_format: str = "") -> np.ndarray:
    """A timestamp column as seconds: numbers are seconds already; dates are parsed with one
    format for the whole column (``date_format``, or the one format every row fits). The first
    value that fits neither is reported with its line."""
    timestamp = frame[column]
    as_number = pd.to_numeric(timestamp, errors="coerce")
    if as_number.notna().any() and not date_format:  # numeric timestamps (seconds); report the first that is not
        return _numeric_column(frame, column, path, "timestamp", seconds=True)
    text = timestamp.astype("string").str.strip()
    formats = [date_format] if date_format else _date_formats(text)
    if not formats:
        row = _first_bad(text.notna().to_numpy()) if text.notna().any() else 0
        raise DataError(f"{path}: {_where(frame, row)}: timestamp '{_text(timestamp.iloc[row])}' is neither a number "
                        "nor a date")
    parsed = {fmt: pd.to_datetime(text, format=fmt, errors="coerce", utc=True) for fmt in formats}
    complete = [fmt for fmt in formats if parsed[fmt].notna().all()]
    if not complete:
        fmt = max(formats, key=lambda f: int(parsed[f].notna().sum()))  # the format most rows follow
        bad = parsed[fmt].isna().to_numpy()
        row = _first_bad(bad)
        raise DataError(f"{path}: {_where(frame, row)}: timestamp '{_text(timestamp.iloc[row])}' does not match the "
                        f"date format {fmt} of column '{column}' ({int(bad.sum())} such rows); set "
                        "data.timestamp_format if the column has another")
    if any(not parsed[fmt].equals(parsed[complete[0]]) for fmt in complete[1:]):
        raise DataError(f"{path}: the dates of column '{column}' are ambiguous: every one reads as "
                        f"{' and as '.join(complete)}; set data.timestamp_format to the one the file uses")
    return (parsed[complete[0]] - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()


def _date_formats(text: pd.Series) -> list[str]:
    """The formats (strftime) that the first distinct values of a date column suggest, read
    month-first and day-first."""
    from pandas.tseries.api import guess_datetime_format

    formats: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for value in text.dropna().unique()[:20]:
            for dayfirst in (False, True):
                fmt = guess_datetime_format(str(value), dayfirst=dayfirst)
                if fmt and fmt not in formats:
                    formats.append(fmt)
    return formats


def _item_columns(items: pd.DataFrame, genres_separator: str) -> pd.DataFrame:
    """Your item table's ``genres`` text as lists and ``year`` as an integer (-1 unknown)."""
    if "genres" in items.columns:
        items["genres"] = items["genres"].apply(
            lambda v: [g for g in str(v).split(genres_separator) if g] if isinstance(v, str) else [])
    if "year" in items.columns:
        items["year"] = pd.to_numeric(items["year"], errors="coerce").fillna(-1).astype(np.int64)
    return items


MOVIELENS_GENRES_100K = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
IDS = ("user", "item")
ML1M_AGE = {1: "Under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}


def _read_delimited(path: Path, sep: str, names: list[str] | None, encoding: str, on_bad_rows: str,
                    what: str, id_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A delimited text file; rows with the wrong field count raise (naming the line) or are
    skipped. ``id_columns`` keep their exact text wherever a column is not plain int64 (a
    float or an overflow would round or wrap the ids), for the id rule (``ids.py``)."""
    text = _decode(path, encoding, what)
    total_lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    if len(sep) > 1:  # '::' in MovieLens 1M: the C parser takes one-character separators only
        text = text.replace(sep, "\x1f")
        sep = "\x1f"
    header_lines = 0 if names is not None else 1
    frame, first_row_too_long = _parse(text, sep, names, on_bad_rows, path, None)
    inexact = [c for c in id_columns if c in frame.columns and frame[c].dtype != np.int64]
    if inexact:
        frame, _ = _parse(text, sep, names, on_bad_rows, path, {c: str for c in inexact})
    if first_row_too_long and on_bad_rows == "error":
        raise DataError(f"{path}: malformed row: line {header_lines + 1} has more than the "
                        f"{len(frame.columns)} fields of this file")
    if first_row_too_long:
        frame = frame.iloc[1:]
    skipped = total_lines - header_lines - len(frame)
    if on_bad_rows == "skip" and skipped > 0:
        print(f"prepare: {path}: skipped {skipped} rows with the wrong number of fields", file=sys.stderr)
    frame = frame.dropna(how="all")
    if on_bad_rows == "error":  # nothing was skipped: the index is the file position
        frame.attrs["first_line"] = header_lines + 1
    return frame


def _decode(path: Path, encoding: str, what: str) -> str:
    """The file's text; a byte that is not ``encoding`` is reported with its line."""
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: line {line}: not {encoding} text (byte {err.start}: {err.reason}); "
                        f"re-encode the file as {encoding}") from None


def _parse(text: str, sep: str, names: list[str] | None, on_bad_rows: str, path: Path,
           dtype: dict | None) -> tuple[pd.DataFrame, bool]:
    """pandas' C parser over ``text``; also whether the first data row had a field too many."""
    try:
        # index_col=False: an extra field on the first data row must not turn into an index
        # column (shifting every row); pandas warns instead, and that warning is handled above.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            frame = pd.read_csv(io.StringIO(text), sep=sep, header=None if names is not None else 0, names=names,
                                on_bad_lines="skip" if on_bad_rows == "skip" else "error", engine="c",
                                index_col=False, quoting=csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE,
                                keep_default_na=False, na_values=[""], skip_blank_lines=False, dtype=dtype)
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: malformed row: {str(err).strip()}") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    return frame, any(issubclass(w.category, pd.errors.ParserWarning) for w in caught)


def _exact_id_column(frame: pd.DataFrame, column: str, path: Path, on_bad_rows: str) -> pd.DataFrame:
    """``frame`` without the rows whose ``column`` id is not an integer (MovieLens ids are):
    the first raises naming the line, or they are dropped and counted. The ids keep their text
    until :func:`movielens` applies the id rule to every file."""
    bad = ~ids.integer_literals(frame[column])
    if bad.any():
        if on_bad_rows == "error":
            _refuse(frame, column, bad, path, f"{column} id '{{}}' is not an integer")
        print(f"prepare: {path}: skipped {int(bad.sum())} rows whose {column} id is not an integer", file=sys.stderr)
    return frame[~bad]


def _refuse(frame: pd.DataFrame, column: str, bad: np.ndarray, path: Path, problem: str) -> None:
    """Raise for the first ``bad`` row: its line, its value (``problem`` formats it), how many."""
    row = _first_bad(bad)
    raise DataError(f"{path}: {_where(frame, row)}: {problem.format(_text(frame[column].iloc[row]))} "
                    f"({int(bad.sum())} such rows; --on-bad-rows skip drops them)")


def _text(value) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA else str(value)


def _clean_interactions(frame: pd.DataFrame, path: Path, on_bad_rows: str) -> pd.DataFrame:
    """Exact integer user and item ids, numeric timestamp and rating; bad values raise naming
    the line, or are skipped."""
    out, bad_any = {}, np.zeros(len(frame), dtype=bool)
    reasons = []
    for column in ("user", "item", "timestamp", "rating"):
        if column in ("user", "item"):
            values = frame[column].to_numpy()
            bad = ~ids.integer_literals(values)
            problem = f"{column} id '{{}}' is not an integer"
        else:
            values = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64, na_value=np.nan)
            bad = ~np.isfinite(values)
            problem = f"{column} '{{}}' is not a number"
            if column == "timestamp":
                bad |= ~_in_seconds_range(values)
                problem = "timestamp '{}' is not a finite number of seconds within int64"
        if bad.any():
            if on_bad_rows == "error":
                _refuse(frame, column, bad, path, problem)
            reasons.append(f"{int(bad.sum())} with a non-{'integer' if column in ('user', 'item') else 'numeric'} "
                           f"or missing {column}")
            bad_any |= bad
        out[column] = values
    if reasons:
        print(f"prepare: {path}: skipped {int(bad_any.sum())} rows: {', '.join(reasons)}", file=sys.stderr)
    keep = ~bad_any
    return pd.DataFrame({"user": out["user"][keep], "item": out["item"][keep],
                         "timestamp": out["timestamp"][keep].astype(np.int64),
                         "rating": out["rating"][keep].astype(np.float32)})


def _title_year(titles: pd.Series) -> np.ndarray:
    """'Toy Story (1995)' -> 1995; -1 where the title has no trailing year."""
    year = titles.str.extract(r"\((\d{4})\)\s*$", expand=False)
    return pd.to_numeric(year, errors="coerce").fillna(-1).astype(np.int64).to_numpy()


def movielens(cfg: DataConfig) -> RawData:
    """MovieLens 100K, 1M and the CSV family (latest-small, 20M, 25M, 32M) from ``cfg.data_dir``.

    Args:
        cfg: the ``data`` section (``source``: which archive; ``data_dir``: the folder it unpacked to;
            ``on_bad_rows``).
    """
    if not cfg.data_dir:
        raise DataError(f"data.source={cfg.source} needs data.data_dir (or --data-dir): the unpacked archive")
    root = Path(cfg.data_dir)
    if root.exists() and not root.is_dir():
        raise DataError(f"data.data_dir {root} is a file, not a directory: give the folder the {cfg.source} "
                        "archive unpacks to")
    if not root.is_dir():
        raise DataError(f"data directory not found: {root} (fetch it with `twotower-rec download --dataset "
                        f"{cfg.source} --data-dir DIR`)")
    if cfg.source == "movielens-100k":
        interactions, users, items = _movielens_100k(root, cfg.on_bad_rows)
    elif cfg.source == "movielens-1m":
        interactions, users, items = _movielens_1m(root, cfg.on_bad_rows)
    else:
        interactions, users, items = _movielens_csv(root, cfg.on_bad_rows)
    interactions["user"], users["user"] = ids.id_space(interactions["user"], users["user"])
    interactions["item"], items["item"] = ids.id_space(interactions["item"], items["item"])
    return RawData(interactions, _movielens_users(users, cfg.source), _movielens_items(items),
                   name=f"{cfg.source}:{root}", users_name=f"{cfg.source} users", items_name=f"{cfg.source} movies")


def _movielens_100k(root: Path, bad: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``u.data``, ``u.user``, ``u.item`` (genres as 19 flag columns)."""
    inter = _read_delimited(root / "u.data", "\t", ["user", "item", "rating", "timestamp"], "latin-1", bad,
                            "ratings", IDS)
    users = _read_delimited(root / "u.user", "|", ["user", "age", "gender", "occupation", "zip"], "latin-1",
                            bad, "users", ("user",))
    item_cols = ["item", "title", "release", "video_release", "url", *MOVIELENS_GENRES_100K]
    items = _read_delimited(root / "u.item", "|", item_cols, "latin-1", bad, "movies", ("item",))
    users = _exact_id_column(users, "user", root / "u.user", bad)
    items = _exact_id_column(items, "item", root / "u.item", bad)
    flags = items[list(MOVIELENS_GENRES_100K)].fillna(0).to_numpy(np.int64) > 0
    names = np.array(MOVIELENS_GENRES_100K)
    items["genres"] = [names[row].tolist() for row in flags]
    return _clean_interactions(inter, root / "u.data", bad), users, items


def _movielens_1m(root: Path, bad: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``ratings.dat``, ``users.dat``, ``movies.dat`` (``::``-separated, latin-1)."""
    inter = _read_delimited(root / "ratings.dat", "::", ["user", "item", "rating", "timestamp"], "latin-1",
                            bad, "ratings", IDS)
    users = _read_delimited(root / "users.dat", "::", ["user", "gender", "age", "occupation", "zip"],
                            "latin-1", bad, "users", ("user",))
    items = _read_delimited(root / "movies.dat", "::", ["item", "title", "genres"], "latin-1", bad, "movies",
                            ("item",))
    users = _exact_id_column(users, "user", root / "users.dat", bad)
    items = _exact_id_column(items, "item", root / "movies.dat", bad)
    items["genres"] = items["genres"].fillna("").str.split("|")
    return _clean_interactions(inter, root / "ratings.dat", bad), users, items


def _movielens_csv(root: Path, bad: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``ratings.csv`` and ``movies.csv``; no user side features, so users are ids alone."""
    inter = _read_delimited(root / "ratings.csv", ",", None, "utf-8", bad, "ratings", ("userId", "movieId"))
    _require_file_columns(inter, ["userId", "movieId", "rating", "timestamp"], root / "ratings.csv")
    inter = inter.rename(columns={"userId": "user", "movieId": "item"})
    items = _read_delimited(root / "movies.csv", ",", None, "utf-8", bad, "movies", ("movieId",))
    _require_file_columns(items, ["movieId", "title", "genres"], root / "movies.csv")
    items = _exact_id_column(items.rename(columns={"movieId": "item"}), "item", root / "movies.csv", bad)
    items["genres"] = items["genres"].fillna("").apply(
        lambda g: [] if g == "(no genres listed)" else [x for x in g.split("|") if x])
    interactions = _clean_interactions(inter, root / "ratings.csv", bad)
    return interactions, pd.DataFrame({"user": interactions["user"].unique()}), items


def _movielens_items(items: pd.DataFrame) -> pd.DataFrame:
    """Titles as text, the year parsed from the title (ids are exact already)."""
    items["title"] = items["title"].fillna("").astype(str)
    items["year"] = _title_year(items["title"])
    return items


def _movielens_users(users: pd.DataFrame, source: str) -> pd.DataFrame:
    """The zip code's first digit, age as the 1M archive's brackets (ids are exact already)."""
    if "zip" in users.columns:
        users["zip_prefix"] = users["zip"].fillna("").astype(str).str[:1]
    if "age" in users.columns and source == "movielens-1m":
        users["age"] = pd.to_numeric(users["age"], errors="coerce").map(ML1M_AGE).fillna("unknown")
    elif "age" in users.columns:
        age = pd.to_numeric(users["age"], errors="coerce")
        users["age"] = pd.cut(age, [0, 18, 25, 35, 45, 50, 56, 200], right=False).astype(str)
    return users


def _require_file_columns(frame: pd.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")


def load_raw(cfg: DataConfig) -> RawData:
    """The source named by ``cfg.source``.

    Args:
        cfg: the ``data`` section.
    """
    if cfg.source == "synthetic":
        return synthetic(cfg.synthetic)
    if cfg.source == "interactions":
        return interactions_source(cfg)
    if cfg.source.startswith("movielens-"):
        return movielens(cfg)
    raise DataError(f"unknown data source '{cfg.source}'")
