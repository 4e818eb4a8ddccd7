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

import numpy as np
import pandas as pd

from twotower_rec.config import DataConfig
from twotower_rec.data.raw import RawData
from twotower_rec.data.synthetic import synthetic
from twotower_rec.errors import DataError


def read_table(path: str | Path, what: str) -> pd.DataFrame:
    """A CSV, TSV or Parquet file as a DataFrame; errors name the file (and line, for text)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".csv", ".tsv", ".txt"):
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype_backend="numpy_nullable",
                                skip_blank_lines=False)
            frame = frame.dropna(how="all")  # blank lines go; the index keeps each row's file position
            frame.attrs["first_line"] = 2  # the header is line 1
            return frame
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: {err}".strip()) from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); re-encode it as UTF-8") from None
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


def _numeric_column(frame: pd.DataFrame, column: str, path: Path, what: str) -> np.ndarray:
    """A column as float64; the first non-numeric or missing value is reported with its line."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    bad = np.isnan(values)
    if bad.any():
        row = _first_bad(bad)
        raise DataError(f"{path}: {_where(frame, row)}: {what} '{frame[column].iloc[row]}' in column '{column}' "
                        f"is not a number ({int(bad.sum())} such rows)")
    return values


def _side_table(path: str | None, id_column: str, key: str, interactions: pd.DataFrame,
                setting: str) -> tuple[pd.DataFrame, str]:
    """An optional user or item feature table keyed by ``key``; ids only when none is given."""
    if not path:
        return pd.DataFrame({key: pd.unique(interactions[key])}), f"{key}s table (none given: set {setting})"
    table = read_table(path, f"{key}s").rename(columns={id_column: key})
    if key not in table.columns:
        raise DataError(f"{path}: missing column '{id_column}' (data.{key}_column)")
    return table, str(path)


def interactions_source(cfg: DataConfig) -> RawData:
    """Your own data: an interactions table plus optional user and item feature tables."""
    if not cfg.interactions_path:
        raise DataError("data.source=interactions needs data.interactions_path")
    path = Path(cfg.interactions_path)
    frame = read_table(path, "interactions")
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
    seconds = _seconds(frame, columns["timestamp"], path)
    if cfg.rating_column in frame.columns:
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
    return RawData(interactions, users, items, name=str(path), users_name=users_name, items_name=items_name)


def _seconds(frame: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """A timestamp column as seconds: numbers are seconds already, else dates are parsed; the
    first value that is neither is reported with its line."""
    timestamp = frame[column]
    as_number = pd.to_numeric(timestamp, errors="coerce")
    if as_number.notna().any():  # numeric timestamps (seconds); report the first that is not
        return _numeric_column(frame, column, path, "timestamp")
    parsed = pd.to_datetime(timestamp, errors="coerce", utc=True, format="mixed")
    bad = parsed.isna().to_numpy()
    if bad.any():
        row = _first_bad(bad)
        raise DataError(f"{path}: {_where(frame, row)}: timestamp '{timestamp.iloc[row]}' is neither a number "
                        f"nor a date ({int(bad.sum())} such rows)")
    return (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()


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
ML1M_AGE = {1: "Under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}


def _read_delimited(path: Path, sep: str, names: list[str] | None, encoding: str, on_bad_rows: str,
                    what: str) -> pd.DataFrame:
    """A delimited text file; rows with the wrong field count raise (naming the line) or are skipped."""
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        text = path.read_bytes().decode(encoding)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not {encoding} text (byte {err.start}: {err.reason})") from None
    total_lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    if len(sep) > 1:  # '::' in MovieLens 1M: the C parser takes one-character separators only
        text = text.replace(sep, "\x1f")
        sep = "\x1f"
    header_lines = 0 if names is not None else 1
    try:
        # index_col=False: an extra field on the first data row must not turn into an index
        # column (shifting every row); pandas warns instead, and that warning is handled below.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            frame = pd.read_csv(io.StringIO(text), sep=sep, header=None if names is not None else 0, names=names,
                                on_bad_lines="skip" if on_bad_rows == "skip" else "error", engine="c",
                                index_col=False, quoting=csv.QUOTE_MINIMAL if sep == "," else csv.QUOTE_NONE,
                                keep_default_na=False, na_values=[""], skip_blank_lines=False)
    except pd.errors.ParserError as err:
        raise DataError(f"{path}: malformed row: {str(err).strip()}") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    first_row_too_long = any(issubclass(w.category, pd.errors.ParserWarning) for w in caught)
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


def _clean_interactions(frame: pd.DataFrame, path: Path, on_bad_rows: str) -> pd.DataFrame:
    """Numeric user, item, timestamp and rating; bad values raise naming the line, or are skipped."""
    out, bad_any = {}, np.zeros(len(frame), dtype=bool)
    reasons = []
    for column in ("user", "item", "timestamp", "rating"):
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(np.float64, na_value=np.nan)
        bad = ~np.isfinite(values)
        if bad.any():
            if on_bad_rows == "error":
                row = _first_bad(bad)
                raise DataError(f"{path}: {_where(frame, row)}: {column} '{frame[column].iloc[row]}' is not a "
                                f"number ({int(bad.sum())} such rows; --on-bad-rows skip drops them)")
            reasons.append(f"{int(bad.sum())} with a non-numeric or missing {column}")
            bad_any |= bad
        out[column] = values
    if reasons:
        print(f"prepare: {path}: skipped {int(bad_any.sum())} rows: {', '.join(reasons)}", file=sys.stderr)
    keep = ~bad_any
    return pd.DataFrame({"user": out["user"][keep].astype(np.int64), "item": out["item"][keep].astype(np.int64),
                         "timestamp": out["timestamp"][keep].astype(np.int64),
                         "rating": out["rating"][keep].astype(np.float32)})


def _title_year(titles: pd.Series) -> np.ndarray:
    """'Toy Story (1995)' -> 1995; -1 where the title has no trailing year."""
    year = titles.str.extract(r"\((\d{4})\)\s*$", expand=False)
    return pd.to_numeric(year, errors="coerce").fillna(-1).astype(np.int64).to_numpy()


def movielens(cfg: DataConfig) -> RawData:
    """MovieLens 100K, 1M and the CSV family (latest-small, 20M, 25M, 32M) from ``cfg.data_dir``."""
    if not cfg.data_dir:
        raise DataError(f"data.source={cfg.source} needs data.data_dir (or --data-dir): the unpacked archive")
    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root} (fetch it with `twotower-rec download --dataset "
                        f"{cfg.source} --data-dir DIR`)")
    if cfg.source == "movielens-100k":
        interactions, users, items = _movielens_100k(root, cfg.on_bad_rows)
    elif cfg.source == "movielens-1m":
        interactions, users, items = _movielens_1m(root, cfg.on_bad_rows)
    else:
        interactions, users, items = _movielens_csv(root, cfg.on_bad_rows)
    return RawData(interactions, _movielens_users(users, cfg.source), _movielens_items(items),
                   name=f"{cfg.source}:{root}", users_name=f"{cfg.source} users", items_name=f"{cfg.source} movies")


def _movielens_100k(root: Path, bad: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``u.data``, ``u.user``, ``u.item`` (genres as 19 flag columns)."""
    inter = _read_delimited(root / "u.data", "\t", ["user", "item", "rating", "timestamp"], "latin-1", bad,
                            "ratings")
    users = _read_delimited(root / "u.user", "|", ["user", "age", "gender", "occupation", "zip"], "latin-1",
                            bad, "users")
    item_cols = ["item", "title", "release", "video_release", "url", *MOVIELENS_GENRES_100K]
    items = _read_delimited(root / "u.item", "|", item_cols, "latin-1", bad, "movies")
    flags = items[list(MOVIELENS_GENRES_100K)].fillna(0).to_numpy(np.int64) > 0
    names = np.array(MOVIELENS_GENRES_100K)
    items["genres"] = [names[row].tolist() for row in flags]
    return _clean_interactions(inter, root / "u.data", bad), users, items


def _movielens_1m(root: Path, bad: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``ratings.dat``, ``users.dat``, ``movies.dat`` (``::``-separated, latin-1)."""
    inter = _read_delimited(root / "ratings.dat", "::", ["user", "item", "rating", "timestamp"], "latin-1",
                            bad, "ratings")
    users = _read_delimited(root / "users.dat", "::", ["user", "gender", "age", "occupation", "zip"],
                            "latin-1", bad, "users")
    items = _read_delimited(root / "movies.dat", "::", ["item", "title", "genres"], "latin-1", bad, "movies")
    items["genres"] = items["genres"].fillna("").str.split("|")
    return _clean_interactions(inter, root / "ratings.dat", bad), users, items


def _movielens_csv(root: Path, bad: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``ratings.csv`` and ``movies.csv``; no user side features, so users are ids alone."""
    inter = _read_delimited(root / "ratings.csv", ",", None, "utf-8", bad, "ratings")
    _require_file_columns(inter, ["userId", "movieId", "rating", "timestamp"], root / "ratings.csv")
    inter = inter.rename(columns={"userId": "user", "movieId": "item"})
    items = _read_delimited(root / "movies.csv", ",", None, "utf-8", bad, "movies")
    _require_file_columns(items, ["movieId", "title", "genres"], root / "movies.csv")
    items = items.rename(columns={"movieId": "item"})
    items["genres"] = items["genres"].fillna("").apply(
        lambda g: [] if g == "(no genres listed)" else [x for x in g.split("|") if x])
    users = pd.DataFrame({"user": pd.unique(pd.to_numeric(inter["user"], errors="coerce").dropna())})
    return _clean_interactions(inter, root / "ratings.csv", bad), users, items


def _movielens_items(items: pd.DataFrame) -> pd.DataFrame:
    """Integer item ids, titles as text, the year parsed from the title."""
    items["item"] = pd.to_numeric(items["item"], errors="coerce")
    items = items.dropna(subset=["item"]).astype({"item": np.int64})
    items["title"] = items["title"].fillna("").astype(str)
    items["year"] = _title_year(items["title"])
    return items


def _movielens_users(users: pd.DataFrame, source: str) -> pd.DataFrame:
    """Integer user ids, the zip code's first digit, age as the 1M archive's brackets."""
    if "zip" in users.columns:
        users["zip_prefix"] = users["zip"].fillna("").astype(str).str[:1]
    if "age" in users.columns and source == "movielens-1m":
        users["age"] = pd.to_numeric(users["age"], errors="coerce").map(ML1M_AGE).fillna("unknown")
    elif "age" in users.columns:
        age = pd.to_numeric(users["age"], errors="coerce")
        users["age"] = pd.cut(age, [0, 18, 25, 35, 45, 50, 56, 200], right=False).astype(str)
    users["user"] = pd.to_numeric(users["user"], errors="coerce")
    return users.dropna(subset=["user"]).astype({"user": np.int64})


def _require_file_columns(frame: pd.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")


def load_raw(cfg: DataConfig) -> RawData:
    """The source named by ``cfg.source``."""
    if cfg.source == "synthetic":
        return synthetic(cfg.synthetic)
    if cfg.source == "interactions":
        return interactions_source(cfg)
    if cfg.source.startswith("movielens-"):
        return movielens(cfg)
    raise DataError(f"unknown data source '{cfg.source}'")
