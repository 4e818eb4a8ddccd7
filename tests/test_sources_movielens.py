"""MovieLens readers: 100K, 1M and the CSV family, from tiny files in the real formats.

Every fixture is written under ``tmp_path`` byte for byte as the archives lay it out
(100K and 1M are latin-1, the CSV family UTF-8); nothing outside the repository is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest

from twotower_rec.config import load_config
from twotower_rec.data import splits
from twotower_rec.data.prepared import PreparedData, prepare
from twotower_rec.data.sources import MOVIELENS_GENRES_100K, load_raw
from twotower_rec.errors import DataError

# ---------------------------------------------------------------------------------------------
# Fixture files in the exact MovieLens layouts
# ---------------------------------------------------------------------------------------------

T0 = 881_250_949


def _flags(genres: list[str]) -> str:
    """The 19 trailing 0/1 genre columns of u.item, in the archive's order."""
    assert set(genres) <= set(MOVIELENS_GENRES_100K)
    return "|".join("1" if g in genres else "0" for g in MOVIELENS_GENRES_100K)


@dataclass
class Item:
    id: int
    title: str
    genres: list[str]
    year: int


@dataclass
class Format:
    source: str
    ratings_file: str
    required_files: tuple[str, ...]
    items: list[Item]
    users: pd.DataFrame | None  # expected side features; None: ids only (CSV family)
    user_features: list[str]
    header_lines: int
    render_rating: Callable[[tuple], str]
    write_side_files: Callable[[Path, "Format"], None]
    rating_values: tuple[float, ...]

    def ratings(self) -> list[tuple[int, int, float, int]]:
        """(user, item, rating, timestamp): users 1 and 2 see every item, user 3 only two (dropped)."""
        i = [item.id for item in self.items]
        r = self.rating_values
        return [
            (1, i[0], r[0], T0 + 0), (1, i[1], r[1], T0 + 1), (1, i[2], r[2], T0 + 2), (1, i[3], r[3], T0 + 3),
            (2, i[3], r[4], T0 + 10), (2, i[2], r[5], T0 + 11), (2, i[1], r[6], T0 + 12), (2, i[0], r[7], T0 + 13),
            (3, i[0], r[8], T0 + 20), (3, i[2], r[0], T0 + 21),
        ]

    def ratings_lines(self, rows=None) -> list[str]:
        return [self.render_rating(row) for row in (self.ratings() if rows is None else rows)]

    def write(self, root: Path, ratings_lines: list[str] | None = None) -> Path:
        root.mkdir(parents=True, exist_ok=True)
        self.write_ratings(root, self.ratings_lines() if ratings_lines is None else ratings_lines)
        self.write_side_files(root, self)
        return root

    def write_ratings(self, root: Path, lines: list[str]) -> None:
        if self.source.endswith(("100k", "1m")):
            (root / self.ratings_file).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
        else:
            text = "userId,movieId,rating,timestamp\n" + "\n".join(lines) + "\n"
            (root / self.ratings_file).write_bytes(text.encode("utf-8"))

    def file_line(self, row_index: int) -> int:
        """1-based line in the ratings file of data row ``row_index`` (0-based)."""
        return self.header_lines + row_index + 1


def _write_100k_side(root: Path, fmt: Format) -> None:
    users = ["1|24|M|technician|85711", "2|53|F|other|94043", "3|7|M|student|E2A4H"]
    (root / "u.user").write_bytes(("\n".join(users) + "\n").encode("latin-1"))
    lines = []
    for item in fmt.items:
        release = f"01-Jan-{item.year}" if item.year > 0 else ""
        url = f"http://us.imdb.com/M/title-exact?{item.id}" if item.year > 0 else ""
        lines.append(f"{item.id}|{item.title}|{release}||{url}|{_flags(item.genres)}")
    (root / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))


def _write_1m_side(root: Path, fmt: Format) -> None:
    users = ["1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::15::55117"]
    (root / "users.dat").write_bytes(("\n".join(users) + "\n").encode("latin-1"))
    lines = [f"{item.id}::{item.title}::{'|'.join(item.genres)}" for item in fmt.items]
    (root / "movies.dat").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))


def _write_csv_side(root: Path, fmt: Format) -> None:
    def quote(title: str) -> str:
        return f'"{title}"' if "," in title else title

    lines = ["movieId,title,genres"]
    for item in fmt.items:
        lines.append(f"{item.id},{quote(item.title)},{'|'.join(item.genres) or '(no genres listed)'}")
    (root / "movies.csv").write_bytes(("\n".join(lines) + "\n").encode("utf-8"))


ML100K = Format(
    source="movielens-100k", ratings_file="u.data", required_files=("u.data", "u.user", "u.item"),
    items=[
        Item(10, "Café au lait (1994)", ["Comedy", "Romance"], 1994),  # 'é' is one latin-1 byte, 0xE9
        Item(20, "Toy Story (1995)", ["Animation", "Children's", "Comedy"], 1995),
        Item(267, "unknown", ["unknown"], -1),  # as in the archive: no dates, no URL, no year
        Item(30, "Heat (1995)", ["Action", "Crime", "Thriller"], 1995),
    ],
    users=pd.DataFrame({"user": [1, 2, 3], "gender": ["M", "F", "M"], "age": ["[18, 25)", "[50, 56)", "[0, 18)"],
                        "occupation": ["technician", "other", "student"], "zip_prefix": ["8", "9", "E"]}),
    user_features=["user_id", "gender", "age", "occupation", "zip_prefix"], header_lines=0,
    render_rating=lambda r: f"{r[0]}\t{r[1]}\t{int(r[2])}\t{r[3]}",
    write_side_files=_write_100k_side, rating_values=(5, 3, 4, 2, 1, 4, 5, 4, 3),
)
ML1M = Format(
    source="movielens-1m", ratings_file="ratings.dat", required_files=("ratings.dat", "users.dat", "movies.dat"),
    items=[
        Item(1193, "One Flew Over the Cuckoo's Nest (1975)", ["Drama"], 1975),
        Item(661, "Bêtes (1998)", ["Animation", "Children's", "Musical"], 1998),  # 'ê' as latin-1 0xEA
        Item(914, "My Fair Lady (1964)", ["Musical", "Romance"], 1964),
        Item(3408, "Erin Brockovich (2000)", ["Drama"], 2000),
    ],
    users=pd.DataFrame({"user": [1, 2, 3], "gender": ["F", "M", "M"], "age": ["Under 18", "56+", "25-34"],
                        "occupation": [10, 16, 15], "zip_prefix": ["4", "7", "5"]}),
    user_features=["user_id", "gender", "age", "occupation", "zip_prefix"], header_lines=0,
    render_rating=lambda r: f"{r[0]}::{r[1]}::{int(r[2])}::{r[3]}",
    write_side_files=_write_1m_side, rating_values=(5, 3, 4, 2, 1, 4, 5, 4, 3),
)
ML_CSV = Format(
    source="movielens-latest-small", ratings_file="ratings.csv", required_files=("ratings.csv", "movies.csv"),
    items=[
        Item(1, "Toy Story (1995)", ["Adventure", "Animation", "Children", "Comedy", "Fantasy"], 1995),
        Item(11, "American President, The (1995)", ["Comedy", "Drama", "Romance"], 1995),
        Item(4973, "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)", ["Comedy", "Romance"], 2001),
        Item(114335, "La cravate (1957)", [], 1957),  # '(no genres listed)' in the file
    ],
    users=None, user_features=["user_id"], header_lines=1,
    render_rating=lambda r: f"{r[0]},{r[1]},{r[2]:.1f},{r[3]}",
    write_side_files=_write_csv_side, rating_values=(5.0, 3.5, 4.0, 2.0, 0.5, 4.0, 4.5, 4.0, 3.0),
)
FORMATS = [ML100K, ML1M, ML_CSV]
by_source = pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.source)


def data_cfg(fmt: Format, root: Path, *overrides: str):
    return config(fmt, root, *overrides).data


def config(fmt: Format, root: Path, *overrides: str):
    return load_config(None, [f"data.source={fmt.source}", f"data.data_dir={root}",
                              f"data.cache_dir={root.parent / 'cache'}",
                              f"features.user_features=[{','.join(fmt.user_features)}]", *overrides])


def expected_interactions(rows) -> pd.DataFrame:
    return pd.DataFrame({"user": [r[0] for r in rows], "item": [r[1] for r in rows],
                         "timestamp": [r[3] for r in rows], "rating": [r[2] for r in rows]}).astype(
        {"user": np.int64, "item": np.int64, "timestamp": np.int64, "rating": np.float32})


# ---------------------------------------------------------------------------------------------
# Well-formed files
# ---------------------------------------------------------------------------------------------


@by_source
def test_load_raw_gives_exactly_the_interactions_written(fmt, tmp_path):
    root = fmt.write(tmp_path / "ml")
    raw = load_raw(data_cfg(fmt, root))
    got = raw.interactions[["user", "item", "timestamp", "rating"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected_interactions(fmt.ratings()), check_dtype=False)
    assert got["rating"].tolist() == [float(r[2]) for r in fmt.ratings()]  # half stars survive (CSV)


@by_source
def test_load_raw_user_features(fmt, tmp_path):
    raw = load_raw(data_cfg(fmt, fmt.write(tmp_path / "ml")))
    users = raw.users.sort_values("user").reset_index(drop=True)
    assert users["user"].tolist() == [1, 2, 3]
    if fmt.users is None:
        return
    for column in fmt.users.columns:
        assert users[column].astype(object).tolist() == fmt.users[column].tolist(), column


@by_source
def test_load_raw_items_titles_genres_and_years(fmt, tmp_path):
    raw = load_raw(data_cfg(fmt, fmt.write(tmp_path / "ml")))
    items = raw.items.set_index("item")
    assert sorted(items.index) == sorted(item.id for item in fmt.items)
    for item in fmt.items:
        row = items.loc[item.id]
        assert row["title"] == item.title  # latin-1 / UTF-8 accents decoded, CSV quotes removed
        assert list(row["genres"]) == item.genres
        assert int(row["year"]) == item.year


@pytest.mark.parametrize("source", ["movielens-20m", "movielens-25m", "movielens-32m"])
def test_every_csv_family_source_reads_the_csv_layout(source, tmp_path):
    root = ML_CSV.write(tmp_path / "ml")
    raw = load_raw(load_config(None, [f"data.source={source}", f"data.data_dir={root}"]).data)
    pd.testing.assert_frame_equal(raw.interactions.reset_index(drop=True), expected_interactions(ML_CSV.ratings()),
                                  check_dtype=False)
    assert raw.items.set_index("item").loc[11, "title"] == "American President, The (1995)"


def test_100k_latin1_title_decodes(tmp_path):
    root = ML100K.write(tmp_path / "ml")
    assert "Café au lait (1994)".encode("latin-1") in (root / "u.item").read_bytes()
    items = load_raw(data_cfg(ML100K, root)).items.set_index("item")
    assert items.loc[10, "title"] == "Café au lait (1994)"
    assert items.loc[10, "year"] == 1994


@by_source
def test_prepare_leave_last_out_one_test_row_per_kept_user(fmt, tmp_path):
    cfg = config(fmt, fmt.write(tmp_path / "ml"))
    data = prepare(load_raw(cfg.data), cfg.data, cfg.features)
    summary = data.summary()
    # user 3 has two events and is dropped; users 1 and 2 keep all four.
    assert data.raw_user_ids.tolist() == [1, 2]
    assert (summary["rows"], summary["users"], summary["test"], summary["validation"]) == (8, 2, 2, 2)
    split = np.asarray(data.split)
    offsets = data.user_offsets
    for code in range(1, data.spec.num_users + 1):
        rows = split[offsets[code - 1]:offsets[code]]
        assert (rows == splits.TEST).sum() == 1
        assert rows[-1] == splits.TEST and rows[-2] == splits.VALIDATION
    # The test event is each user's latest: item i[3] for user 1, i[0] for user 2.
    test_ts = np.asarray(data.timestamp)[split == splits.TEST].tolist()
    assert test_ts == [T0 + 3, T0 + 13]
    assert [f.name for f in data.spec.query_features if f.name != "history"] == fmt.user_features


@by_source
def test_prepared_item_metadata_keeps_titles_and_genres(fmt, tmp_path):
    cfg = config(fmt, fmt.write(tmp_path / "ml"))
    data = prepare(load_raw(cfg.data), cfg.data, cfg.features)
    meta = PreparedData(data.dir).item_metadata().set_index("item")
    for item in fmt.items:
        assert meta.loc[str(item.id), "title"] == item.title
        assert meta.loc[str(item.id), "genres"] == "|".join(item.genres)


@pytest.mark.parametrize("fmt", [ML100K, ML1M], ids=lambda f: f.source)
def test_prepared_user_features_decode_to_the_file_values(fmt, tmp_path):
    cfg = config(fmt, fmt.write(tmp_path / "ml"))
    data = prepare(load_raw(cfg.data), cfg.data, cfg.features)
    expected = fmt.users.set_index("user")
    for name in ("gender", "age", "occupation", "zip_prefix"):
        vocab = data.spec.vocabularies[name]
        codes = data.user_features[name][1:]  # row 0: unknown user
        assert [vocab[c - 1] for c in codes] == expected.loc[[1, 2], name].tolist(), name


@by_source
def test_duplicate_pair_keeps_only_the_first_by_time(fmt, tmp_path):
    rows = fmt.ratings()
    i = [item.id for item in fmt.items]
    # A later repeat of (1, i[1]) goes; an earlier repeat of (2, i[0]), last in the file, stays
    # and the original (2, i[0]) at T0 + 13 goes.
    repeats = [(1, i[1], 1.0, T0 + 50), (2, i[0], 1.0, T0 + 5)]
    root = fmt.write(tmp_path / "ml", fmt.ratings_lines(rows + repeats))
    cfg = config(fmt, root)
    raw = load_raw(cfg.data)
    assert len(raw.interactions) == len(rows) + 2  # the reader keeps everything; prepare applies the rule
    data = prepare(raw, cfg.data, cfg.features)
    assert data.num_rows == 8
    users = data.raw_user_ids[np.asarray(data.user) - 1]
    ts = np.asarray(data.timestamp)
    item_of_ts = {r[3]: r[1] for r in rows + repeats}
    pairs = [(int(u), item_of_ts[int(t)]) for u, t in zip(users, ts)]
    assert len(pairs) == len(set(pairs)) == 8
    kept = dict(zip(pairs, zip(ts.tolist(), np.asarray(data.rating).tolist())))
    assert kept[(1, i[1])] == (T0 + 1, float(rows[1][2]))
    assert kept[(2, i[0])] == (T0 + 5, 1.0)
    assert T0 + 50 not in ts and T0 + 13 not in ts


# ---------------------------------------------------------------------------------------------
# Malformed files
# ---------------------------------------------------------------------------------------------


def _with_line(fmt: Format, index: int, line: str) -> list[str]:
    lines = fmt.ratings_lines()
    lines[index] = line
    return lines


def _extra_field(fmt: Format, index: int) -> list[str]:
    lines = fmt.ratings_lines()
    sep = {"movielens-100k": "\t", "movielens-1m": "::"}.get(fmt.source, ",")
    lines[index] = lines[index] + sep + "7"
    return lines


def _bad_rating(fmt: Format, index: int, value: str) -> list[str]:
    row = fmt.ratings()[index]
    line = fmt.render_rating(row)
    sep = {"movielens-100k": "\t", "movielens-1m": "::"}.get(fmt.source, ",")
    fields = line.split(sep)
    fields[2] = value
    return _with_line(fmt, index, sep.join(fields))


@by_source
def test_extra_field_names_file_and_line(fmt, tmp_path):
    root = fmt.write(tmp_path / "ml", _extra_field(fmt, 2))
    with pytest.raises(DataError) as err:
        load_raw(data_cfg(fmt, root))
    message = str(err.value)
    assert str(root / fmt.ratings_file) in message
    assert f"line {fmt.file_line(2)}" in message


@by_source
def test_extra_field_on_the_first_data_line_is_an_error(fmt, tmp_path):
    """pandas takes a first row with one field too many as 'the file has an index column':
    the reader must still report that line, not shift every column by one."""
    root = fmt.write(tmp_path / "ml", _extra_field(fmt, 0))
    with pytest.raises(DataError) as err:
        raw = load_raw(data_cfg(fmt, root))
        pytest.fail(f"no error; interactions read as\n{raw.interactions}")
    message = str(err.value)
    assert str(root / fmt.ratings_file) in message
    assert f"line {fmt.file_line(0)}" in message, message


def test_extra_field_on_the_first_line_is_skipped_with_skip(tmp_path, capsys):
    root = ML100K.write(tmp_path / "ml", _extra_field(ML100K, 0))
    raw = load_raw(data_cfg(ML100K, root, "data.on_bad_rows=skip"))
    got = raw.interactions.reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected_interactions(ML100K.ratings()[1:]), check_dtype=False)
    assert "skipped 1 rows" in capsys.readouterr().err


@by_source
def test_non_numeric_rating_names_file_and_line(fmt, tmp_path):
    root = fmt.write(tmp_path / "ml", _bad_rating(fmt, 4, "five"))
    with pytest.raises(DataError) as err:
        load_raw(data_cfg(fmt, root))
    message = str(err.value)
    assert str(root / fmt.ratings_file) in message
    assert f"line {fmt.file_line(4)}:" in message
    assert "rating" in message and "'five'" in message


@by_source
@pytest.mark.parametrize("value", ["nan", "NaN", "inf", ""])
def test_nan_or_missing_rating_is_an_error(fmt, value, tmp_path):
    root = fmt.write(tmp_path / "ml", _bad_rating(fmt, 3, value))
    with pytest.raises(DataError) as err:
        load_raw(data_cfg(fmt, root))
    message = str(err.value)
    assert str(root / fmt.ratings_file) in message
    assert f"line {fmt.file_line(3)}:" in message and "rating" in message


@by_source
@pytest.mark.parametrize("value", ["inf", "-inf", "1e30", "nan"])
def test_a_non_finite_or_out_of_range_timestamp_names_file_and_line(fmt, value, tmp_path):
    """inf and 1e30 became INT64_MIN (with a numpy warning): the event moved to the start of the history."""
    lines = fmt.ratings_lines()
    sep = {"movielens-100k": "\t", "movielens-1m": "::"}.get(fmt.source, ",")
    fields = lines[5].split(sep)
    fields[3] = value
    lines[5] = sep.join(fields)
    root = fmt.write(tmp_path / "ml", lines)
    with pytest.raises(DataError) as err:
        load_raw(data_cfg(fmt, root))
    message = str(err.value)
    assert str(root / fmt.ratings_file) in message and f"line {fmt.file_line(5)}:" in message, message
    assert "timestamp" in message, message


@by_source
def test_skip_drops_bad_rows_and_counts_them(fmt, tmp_path, capsys):
    lines = _extra_field(fmt, 2)
    lines[4] = _bad_rating(fmt, 4, "five")[4]
    lines[6] = _bad_rating(fmt, 6, "nan")[6]
    root = fmt.write(tmp_path / "ml", lines)
    with pytest.raises(DataError):
        load_raw(data_cfg(fmt, root))
    capsys.readouterr()
    raw = load_raw(data_cfg(fmt, root, "data.on_bad_rows=skip"))
    kept = [row for k, row in enumerate(fmt.ratings()) if k not in (2, 4, 6)]
    pd.testing.assert_frame_equal(raw.interactions.reset_index(drop=True), expected_interactions(kept),
                                  check_dtype=False)
    err = capsys.readouterr().err
    path = str(root / fmt.ratings_file)
    assert f"{path}: skipped 1 rows with the wrong number of fields" in err
    assert f"{path}: skipped 2 rows" in err and "rating" in err
    # The side tables are untouched.
    assert sorted(raw.items["item"]) == sorted(item.id for item in fmt.items)


def test_skip_on_a_side_table_row(tmp_path, capsys):
    root = ML1M.write(tmp_path / "ml")
    movies = (root / "movies.dat").read_bytes().decode("latin-1").splitlines()
    movies.insert(1, "999::Broken (1999)::Drama::extra")
    (root / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    with pytest.raises(DataError) as err:
        load_raw(data_cfg(ML1M, root))
    assert str(root / "movies.dat") in str(err.value) and "line 2" in str(err.value)
    raw = load_raw(data_cfg(ML1M, root, "data.on_bad_rows=skip"))
    assert 999 not in raw.items["item"].tolist()
    assert sorted(raw.items["item"]) == sorted(item.id for item in ML1M.items)
    assert "movies.dat: skipped 1 rows" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["ratings.csv", "movies.csv"])
def test_csv_with_invalid_utf8_names_the_encoding(name, tmp_path):
    root = ML_CSV.write(tmp_path / "ml")
    path = root / name
    data = path.read_bytes()
    cut = data.index(b"\n", data.index(b"\n") + 1) + 1  # after the first data line
    path.write_bytes(data[:cut] + b"1,\xe9\xff,4.0,964982703\n" + data[cut:])
    with pytest.raises(DataError) as err:
        load_raw(data_cfg(ML_CSV, root))
    message = str(err.value)
    assert str(path) in message and "utf-8" in message.lower()
    assert "line 3" in message, message  # the line of the bad byte, not its offset


@by_source
@pytest.mark.parametrize("base", [2**53, 2**63 - 1, 2**64 + 5], ids=["above-2^53", "int64-max", "beyond-int64"])
def test_ids_are_read_exactly(fmt, base, tmp_path):
    """Ids that a float64 cannot hold, or that int64 cannot: two users one apart stay two users,
    and every id keeps its exact value (it used to round through float, or wrap to int64 min)."""
    rows = [(base + (r[0] - 1), r[1], r[2], r[3]) for r in fmt.ratings()]
    root = fmt.write(tmp_path / "ml", fmt.ratings_lines(rows))
    side = {"movielens-100k": ("u.user", "|"), "movielens-1m": ("users.dat", "::")}.get(fmt.source)
    if side:  # the users file names the same users (a users file that matches none is refused)
        name, sep = side
        lines = [line.split(sep, 1) for line in (root / name).read_bytes().decode("latin-1").splitlines()]
        text = "".join(f"{base + int(user) - 1}{sep}{rest}\n" for user, rest in lines)
        (root / name).write_bytes(text.encode("latin-1"))
    raw = load_raw(data_cfg(fmt, root))
    assert [int(u) for u in raw.interactions["user"]] == [r[0] for r in rows]
    assert raw.interactions["user"].nunique() == 3
    cfg = config(fmt, root)
    data = prepare(raw, cfg.data, cfg.features)
    assert [int(u) for u in data.raw_user_ids] == [base, base + 1]


@by_source
@pytest.mark.parametrize("column,value", [(0, "2.9"), (1, "10.5"), (0, "abc"), (1, "")])
def test_an_id_that_is_not_an_integer_names_file_and_line(fmt, column, value, tmp_path, capsys):
    sep = {"movielens-100k": "\t", "movielens-1m": "::"}.get(fmt.source, ",")
    fields = fmt.render_rating(fmt.ratings()[4]).split(sep)
    fields[column] = value
    root = fmt.write(tmp_path / "ml", _with_line(fmt, 4, sep.join(fields)))
    with pytest.raises(DataError) as err:
        load_raw(data_cfg(fmt, root))
    message = str(err.value)
    assert str(root / fmt.ratings_file) in message and f"line {fmt.file_line(4)}:" in message, message
    assert ("user" if column == 0 else "item") in message and f"'{value}'" in message, message
    raw = load_raw(data_cfg(fmt, root, "data.on_bad_rows=skip"))
    assert len(raw.interactions) == len(fmt.ratings()) - 1
    assert "skipped 1 rows" in capsys.readouterr().err


def test_a_side_table_id_that_is_not_an_integer_names_file_and_line(tmp_path):
    root = ML1M.write(tmp_path / "ml")
    movies = (root / "movies.dat").read_bytes().decode("latin-1").splitlines()
    movies[2] = movies[2].replace("914::", "914.5::")
    (root / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode("latin-1"))
    with pytest.raises(DataError) as err:
        load_raw(data_cfg(ML1M, root))
    assert str(root / "movies.dat") in str(err.value) and "line 3:" in str(err.value)
    assert "'914.5'" in str(err.value)


def test_data_dir_that_is_a_file_says_so(tmp_path):
    path = tmp_path / "ml-1m.zip"
    path.write_bytes(b"PK")
    with pytest.raises(DataError) as err:
        load_raw(data_cfg(ML1M, path))
    assert str(path) in str(err.value) and "not a directory" in str(err.value)


def test_latin1_formats_do_not_reject_high_bytes(tmp_path):
    """Every byte is valid latin-1: a UTF-8 encoded title reads as mojibake, not an error."""
    root = ML1M.write(tmp_path / "ml")
    (root / "movies.dat").write_bytes("661::Bêtes (1998)::Animation\n".encode("utf-8"))
    items = load_raw(data_cfg(ML1M, root)).items.set_index("item")
    assert items.loc[661, "title"] == "Bêtes (1998)".encode("utf-8").decode("latin-1")


@by_source
def test_data_dir_not_set_or_missing(fmt, tmp_path):
    cfg = load_config(None, [f"data.source={fmt.source}"]).data
    with pytest.raises(DataError, match="data.data_dir"):
        load_raw(cfg)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_raw(data_cfg(fmt, missing))
    assert str(missing) in str(err.value)


@pytest.mark.parametrize("fmt,name", [(f, n) for f in FORMATS for n in f.required_files],
                         ids=lambda v: v if isinstance(v, str) else v.source)
def test_missing_required_file_is_named(fmt, name, tmp_path):
    root = fmt.write(tmp_path / "ml")
    (root / name).unlink()
    with pytest.raises(DataError) as err:
        load_raw(data_cfg(fmt, root))
    assert str(root / name) in str(err.value)
    assert "not found" in str(err.value)


def test_csv_missing_column_is_named(tmp_path):
    root = ML_CSV.write(tmp_path / "ml")
    text = (root / "ratings.csv").read_text().replace("userId,movieId,rating,timestamp", "user,movieId,rating,timestamp")
    (root / "ratings.csv").write_text(text)
    with pytest.raises(DataError) as err:
        load_raw(data_cfg(ML_CSV, root))
    assert str(root / "ratings.csv") in str(err.value) and "userId" in str(err.value)


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------


def _one_error_line(result) -> str:
    assert result.returncode == 2, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.describe()
    return errors[0]


def test_cli_prepare_movielens_1m(cli, tmp_path):
    root = ML1M.write(tmp_path / "ml-1m")
    cache = tmp_path / "cache"
    result = cli("prepare", "--dataset", "movielens-1m", "--data-dir", root, "--set", f"data.cache_dir={cache}",
                 cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["rows"], summary["users"], summary["items"], summary["test"]) == (8, 2, 4, 2)
    assert (cache / "feature_spec.json").is_file()
    assert PreparedData(cache).item_metadata().set_index("item").loc["661", "title"] == "Bêtes (1998)"


def test_cli_prepare_movielens_1m_malformed_exits_2(cli, tmp_path):
    root = ML1M.write(tmp_path / "ml-1m", _extra_field(ML1M, 2))
    cache = tmp_path / "cache"
    result = cli("prepare", "--dataset", "movielens-1m", "--data-dir", root, "--set", f"data.cache_dir={cache}",
                 cwd=tmp_path)
    error = _one_error_line(result)
    assert str(root / "ratings.dat") in error and "line 3" in error
    assert not (cache / "feature_spec.json").exists()

    result = cli("prepare", "--dataset", "movielens-1m", "--data-dir", root, "--on-bad-rows", "skip",
                 "--set", f"data.cache_dir={cache}", cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    assert "skipped 1 rows" in result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["rows"] == 7
