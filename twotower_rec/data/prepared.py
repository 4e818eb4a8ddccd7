"""The prepared columnar cache: ``prepare`` writes it once (beside it, then swaps it in);
training memory-maps it.

Layout of ``cache_dir``::

    feature_spec.json        FeatureSpec (vocab sizes, tables, small vocabularies)
    prepared.json            how it was made: the split, whether the source had ratings, and
                             the collisions of hashed ids (data.hash_buckets)
    interactions/*.npy       user, item, timestamp, rating, split: one row per event,
                             sorted by (user, time, file order); user_offsets [U + 1]
    users/<feature>.npy      [U + 1] encoded side features by user code (row 0: unknown user);
                             users/user_id.npy: the code, or 0 for a user without training events
                             (hashed user_id: every user's hashed row)
    items/<feature>.npy      [V + 1] single-valued item features by item code (row 0: OOV);
                             items/item_id.npy only when item_id is hashed: its row by item code
    items/<feature>.offsets.npy, items/<feature>.values.npy   multi-valued ones (CSR)
    items/dense.npy          [V + 1, Dd] float32 dense item features
    raw_user_ids.npy         [U] raw id of user code c at c - 1
    raw_item_ids.npy         [V] raw id of item code c at c - 1
    items.parquet            code, raw id, title, genres: metadata for people, not the model
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from twotower_rec import atomic
from twotower_rec.data import ids, out_of_core, splits
from twotower_rec.data.features import (HISTORY, RECENT, Feature, FeatureSpec, build_vocabulary, collisions, encode,
                                        hash_rows, year_bucket)
from twotower_rec.data.out_of_core import Interactions
from twotower_rec.data.raw import RawData
from twotower_rec.errors import ConfigError, DataError

if TYPE_CHECKING:
    from twotower_rec.config import DataConfig, FeaturesConfig

MULTI_VALUED_ITEM_FEATURES = {"genres", "title_tokens"}
INFO = "prepared.json"  # how the cache was made: {"split": ..., "ratings": whether the source had any}
# 2: raw ids saved as int64 or fixed-width text, read without pickle (1, unversioned: object arrays)
FORMAT_VERSION = 2
INTERACTION_COLUMNS = ("user", "item", "timestamp", "rating")
CHUNK = 1 << 22  # rows of a memory-mapped column read at once by the whole-column statistics


def _require_columns(frame: pd.DataFrame, columns, table: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{table}: missing column(s) {missing}; found {list(frame.columns)}")


def title_tokens(titles: pd.Series) -> pd.Series:
    """'Toy Story (1995)' -> ['toy', 'story']: lower-case words, the trailing year removed.

    Args:
        titles: item titles; a missing title gives no words.
    """
    cleaned = titles.fillna("").astype(str).str.lower().str.replace(r"\(\d{4}\)\s*$", "", regex=True)
    return cleaned.str.findall(r"[^\W_]+")


def _log(message: str) -> None:
    print(f"prepare: {message}", file=sys.stderr, flush=True)


@dataclass
class _Events:
    """The kept events in (user, time, file) order: positions into the raw table and codes."""

    order: np.ndarray  # [R] row of the raw interactions table
    user: np.ndarray  # [R] user code, 1-based, sorted
    num_users: int
    raw_user_ids: np.ndarray  # [U] raw id of user code c at c - 1
    user_offsets: np.ndarray  # [U + 1]
    timestamp: np.ndarray  # [R] of the raw table (index with ``order``)


def prepare(raw: RawData, data_cfg: DataConfig, features_cfg: FeaturesConfig) -> "PreparedData":
    """Sort, filter, split, build vocabularies on training rows, encode, and write the cache
    (in memory, or out of core with ``data.engine: duckdb``: the same files).

    Args:
        raw: the source's tables (:func:`twotower_rec.data.sources.load_raw`).
        data_cfg: the ``data`` section (``cache_dir``, the split, ``engine``, ``hash_buckets``, ...).
        features_cfg: the ``features`` section.

    Returns:
        The written cache at ``data.cache_dir``, opened.
    """
    started = time.perf_counter()
    final = Path(data_cfg.cache_dir)
    engine = _engine(raw, data_cfg)
    out = _new_cache_folder(final)
    try:
        interactions = _write_cache(raw, data_cfg, features_cfg, out, final, engine)
        atomic.swap_in(out, final)
    except OSError as err:  # a full disk, a read-only folder: the old cache stays as it was
        shutil.rmtree(out, ignore_errors=True)
        raise _unwritable(final, err) from None
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    _log(f"{interactions.num_rows} interactions, {interactions.num_users} users, {len(interactions.item_vocab)} "
         f"items -> {final} ({time.perf_counter() - started:.1f}s)")
    return PreparedData(final)


def _unwritable(final: Path, err: OSError) -> DataError:
    where = f" ({err.filename})" if err.filename else ""
    return DataError(f"data.cache_dir {final}: cannot write the prepared data: {err.strerror or err}{where}; "
                     "the previous cache, if any, is kept: free space or point data.cache_dir at a writable folder")


def _write_cache(raw: RawData, data_cfg: DataConfig, features_cfg: FeaturesConfig, out: Path, final: Path,
                 engine: str) -> Interactions:
    """Every file of the cache, written into the new folder ``out``."""
    if engine == "duckdb":
        interactions, raw = _interactions_out_of_core(raw, data_cfg, out, final)
    else:
        interactions = _interactions_in_memory(raw, data_cfg, out)
    item_vocab = interactions.item_vocab
    _report_side_rows(raw, interactions, out)
    vocabularies: dict[str, list] = {}
    hashing: dict[str, dict] = {}  # collision report per hashed id feature
    query_features = _write_user_features(out, raw, interactions, features_cfg, vocabularies,
                                          data_cfg.hash_buckets, hashing)
    query_features += _history_features(features_cfg, len(item_vocab), bool(query_features))
    items = raw.items.drop_duplicates("item", keep="first").set_index("item").reindex(item_vocab)
    if "title_tokens" in features_cfg.item_features and "title" in items.columns:
        items["title_tokens"] = title_tokens(items["title"])
    item_features = _write_item_features(out, raw, items, features_cfg, vocabularies, len(item_vocab),
                                         data_cfg.hash_buckets, hashing)
    _write_item_dense(out, raw, items, features_cfg, len(item_vocab))
    _write_item_metadata(out, raw, items, item_vocab)
    spec = FeatureSpec(
        query_features=query_features, item_features=item_features, item_dense=list(features_cfg.item_dense),
        history_length=features_cfg.history_length, num_users=interactions.num_users, num_items=len(item_vocab),
        vocabularies=vocabularies, source=raw.name, hashed={n: r["buckets"] for n, r in hashing.items()},
    )
    (out / "feature_spec.json").write_text(spec.to_json())
    info = {"format_version": FORMAT_VERSION, "split": data_cfg.split, "ratings": raw.has_ratings,
            **({"hashing": hashing} if hashing else {}), "prepared_with": prepared_with(data_cfg, features_cfg)}
    (out / INFO).write_text(json.dumps(info, indent=2))
    return interactions


def _interactions_in_memory(raw: RawData, data_cfg: DataConfig, out: Path) -> Interactions:
    """``interactions/*.npy`` and the raw ids, sorted and split with pandas and numpy."""
    inter = raw.interactions
    _require_columns(inter, INTERACTION_COLUMNS, f"{raw.name} interactions")
    if len(inter) == 0:
        raise DataError(f"{raw.name}: the interactions table is empty")
    events = _order_events(inter, raw.name, data_cfg.min_interactions)
    split = _split(events, data_cfg)
    item_raw = inter["item"].to_numpy()[events.order]
    item_vocab = pd.Index(np.unique(item_raw[split == splits.TRAIN]))
    item = encode(item_raw, item_vocab)
    _write_interactions(out, events, split, item, item_raw, item_vocab, inter["rating"].to_numpy(np.float32))
    return Interactions(len(events.user), events.num_users, events.raw_user_ids,
                        trained_user_ids(events.user, split, events.num_users), item_vocab)


# The options prepare fixes in the cache (the data.* options that only say how to read the
# source, such as paths, columns and the engine, are not among them): train, evaluate and
# export refuse a config whose value differs (PreparedData.check_config).
PREPARE_FIXED = ("data.source", "data.split", "data.validation_fraction", "data.test_fraction", "data.seed",
                 "data.min_interactions", "data.hash_buckets", "data.synthetic", "features")


def _flat(prefix: str, value) -> dict:
    if isinstance(value, dict) and value and prefix not in ("data.hash_buckets",):
        return {k: v for key, inner in value.items() for k, v in _flat(f"{prefix}.{key}", inner).items()}
    return {prefix: value}


def prepared_with(data_cfg: DataConfig, features_cfg: FeaturesConfig) -> dict:
    """The :data:`PREPARE_FIXED` options' values, one dotted key each (``data.synthetic.*``
    only for the synthetic source).

    Args:
        data_cfg: the ``data`` section.
        features_cfg: the ``features`` section.
    """
    sections = {"data": dataclasses.asdict(data_cfg), "features": dataclasses.asdict(features_cfg)}
    out = {}
    for key in PREPARE_FIXED:
        if key == "data.synthetic" and data_cfg.source != "synthetic":
            continue
        section, _, name = key.partition(".")
        out.update(_flat(key, sections[section][name] if name else sections[section]))
    return out


def _engine(raw: RawData, data_cfg: DataConfig) -> str:
    """``data.engine``, with ``auto`` resolved: duckdb for a directory of Parquet files."""
    if data_cfg.engine == "auto":
        return "duckdb" if raw.interactions_files else "pandas"
    if data_cfg.engine == "pandas" and raw.interactions_files:
        raise DataError(f"{raw.name}: a directory of Parquet files is prepared out of core: set data.engine=duckdb")
    return data_cfg.engine


def _interactions_out_of_core(raw: RawData, data_cfg: DataConfig, out: Path,
                              final: Path) -> tuple[Interactions, RawData]:
    """``interactions/*.npy`` and the raw ids through DuckDB within ``data.memory_limit``; the
    source with its side tables' ids in the id spaces of the whole data (``ids.py``)."""
    import duckdb

    spill = out_of_core.spill_folder(data_cfg, final)
    try:
        con = out_of_core.connect(data_cfg, spill)
        if raw.interactions_files:
            side_integer = {key: np.asarray(table[key]).dtype.kind in "iu"
                            for key, table in (("user", raw.users), ("item", raw.items))}
            integer = out_of_core.register_parquet(con, raw.interactions_files, data_cfg, side_integer)
            raw = dataclasses.replace(raw, users=_in_space(raw.users, "user", integer["user"]),
                                      items=_in_space(raw.items, "item", integer["item"]))
        else:
            _require_columns(raw.interactions, INTERACTION_COLUMNS, f"{raw.name} interactions")
            out_of_core.register_frame(con, raw.interactions, raw.name)
        try:
            result = out_of_core.write_interactions(con, out, spill, raw.name, data_cfg)
        except out_of_core.duckdb_out_of_memory() as err:
            raise DataError(f"{raw.name}: data.memory_limit={data_cfg.memory_limit} is too small for DuckDB to "
                            f"prepare this data even when spilling to disk: raise it or lower data.threads "
                            f"({str(err).splitlines()[0]})") from None
        con.close()
        return result, raw
    except duckdb.Error as err:
        shutil.rmtree(out, ignore_errors=True)
        raise DataError(f"{raw.name}: DuckDB cannot read the interactions: {str(err).strip().splitlines()[0]}") from None
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        out_of_core.remove_spill(spill)


def _in_space(table: pd.DataFrame, key: str, integer_space: bool) -> pd.DataFrame:
    """``table`` with its ``key`` ids as the id space holds them (:func:`ids.in_space`)."""
    return table.assign(**{key: ids.in_space(table[key].to_numpy(), integer_space)})


def _report_side_rows(raw: RawData, interactions: Interactions, out: Path) -> None:
    """One line per side table (one with features): how many of the kept users (items), and of
    their interactions, have a row in it; a table that none match is refused, naming it."""
    folder = out / "interactions"
    if set(raw.users.columns) - {"user"}:
        events = np.diff(np.load(folder / "user_offsets.npy"))
        _side_line(raw.users_name, "user", np.asarray(interactions.raw_user_ids), events, raw.users["user"])
    if set(raw.items.columns) - {"item"}:
        item = np.load(folder / "item.npy", mmap_mode="r")
        counts = np.zeros(len(interactions.item_vocab) + 1, dtype=np.int64)
        for lo in range(0, item.shape[0], CHUNK):
            counts += np.bincount(np.asarray(item[lo:lo + CHUNK]), minlength=counts.size)
        oov = np.load(folder / "oov_raw_items.npy", allow_pickle=False)
        oov_ids, oov_events = np.unique(oov, return_counts=True) if oov.size else (oov, np.zeros(0, np.int64))
        _side_line(raw.items_name, "item", np.concatenate([np.asarray(interactions.item_vocab), oov_ids]),
                   np.concatenate([counts[1:], oov_events]), raw.items["item"])


def _side_line(table: str, key: str, raw_ids: np.ndarray, events: np.ndarray, side_ids: pd.Series) -> None:
    """Log (or refuse) how many of ``raw_ids`` (with ``events`` interactions each) are in ``side_ids``."""
    found = pd.Series(raw_ids).isin(pd.Series(np.asarray(side_ids))).to_numpy()
    if raw_ids.size and not found.any():
        raise DataError(f"{table}: none of the {raw_ids.size} {key}s of the interactions has a row here (its ids: "
                        f"{_sample(side_ids)}; the interactions': {_sample(raw_ids)}): check data.{key}_column "
                        f"and that both files name the same {key}s")
    _log(f"{table}: {int(found.sum())} of {raw_ids.size} {key}s ({int(events[found].sum())} of "
         f"{int(events.sum())} interactions) have a row")


def _sample(values) -> str:
    return ", ".join(repr(str(v)) for v in list(pd.unique(np.asarray(values)))[:3]) or "none"


def _order_events(inter: pd.DataFrame, name: str, min_interactions: int) -> _Events:
    """Sort by user, time, file order; drop repeated (user, item) pairs and users too short
    for train + validation + test."""
    user_raw_codes, user_uniques = pd.factorize(inter["user"], sort=True)
    timestamp = inter["timestamp"].to_numpy(np.int64)
    order = splits.time_order(user_raw_codes, timestamp)
    # Duplicate rule: a user meets an item once. Later events of the same (user, item) pair
    # are dropped (the first, by time then file order, is kept), so a held-out item is never
    # also in the user's history.
    item_raw_codes = pd.factorize(inter["item"])[0]
    repeated = pd.DataFrame({"u": user_raw_codes[order], "i": item_raw_codes[order]}).duplicated().to_numpy()
    if repeated.any():
        _log(f"dropped {int(repeated.sum())} repeated (user, item) events, keeping each pair's first")
        order = order[~repeated]
    counts = np.bincount(user_raw_codes[order], minlength=len(user_uniques))
    keep_user = counts >= min_interactions
    dropped = int((~keep_user).sum())
    if dropped:
        _log(f"dropped {dropped} of {len(user_uniques)} users with fewer than {min_interactions} interactions")
    order = order[keep_user[user_raw_codes[order]]]
    if order.size == 0:
        raise DataError(f"{name}: no user has {min_interactions} or more interactions")
    new_code = np.cumsum(keep_user)  # raw factor -> 1-based code among kept users
    user = new_code[user_raw_codes[order]].astype(np.int64)
    num_users = int(keep_user.sum())
    return _Events(order, user, num_users, np.asarray(user_uniques)[keep_user],
                   splits.offsets_from_sorted(user, num_users), timestamp)


def _split(events: _Events, data_cfg: DataConfig) -> np.ndarray:
    """``[R]`` split code of every kept event (``data.split``)."""
    if data_cfg.split == "leave_last_out":
        return splits.leave_last_out(events.user_offsets)
    if data_cfg.split == "temporal":
        return splits.temporal(events.timestamp[events.order], events.order, data_cfg.validation_fraction,
                               data_cfg.test_fraction)
    return splits.random_split(events.order.size, data_cfg.validation_fraction, data_cfg.test_fraction,
                               data_cfg.seed)


def _new_cache_folder(final: Path) -> Path:
    """An empty folder beside ``final`` to write the cache into, swapped in at the end
    (``atomic.py``): a crash leaves the old cache whole, and a process still reading the old
    one (memory-mapped) keeps its files. A folder that cannot be made is refused in one line."""
    above = next((p for p in final.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise DataError(f"data.cache_dir {final}: {above} is a file, not a directory: point data.cache_dir at a "
                        "folder outside it")
    try:
        out = atomic.new_folder(final)  # first finishes a swap a kill interrupted
    except OSError as err:
        raise _unwritable(final, err) from None
    is_cache = (final / "feature_spec.json").is_file()
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not is_cache)):
        shutil.rmtree(out)
        raise DataError(f"data.cache_dir {final} exists and is not a prepared cache: point it at a new or empty "
                        "folder (prepare replaces the whole folder)")
    for sub in ("interactions", "users", "items"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    return out


def _write_interactions(out: Path, events: _Events, split: np.ndarray, item: np.ndarray, item_raw: np.ndarray,
                        item_vocab: pd.Index, rating: np.ndarray) -> None:
    """``interactions/*.npy`` and the raw ids of users and items."""
    arrays = {
        "user": events.user, "item": item, "timestamp": events.timestamp[events.order],
        "rating": rating[events.order], "split": split, "user_offsets": events.user_offsets,
    }
    for name, array in arrays.items():
        np.save(out / "interactions" / f"{name}.npy", np.ascontiguousarray(array))
    np.save(out / "raw_user_ids.npy", ids.stored(events.raw_user_ids))
    np.save(out / "raw_item_ids.npy", ids.stored(item_vocab))
    # Items first seen outside training are code 0; keep their raw ids for ranked-list exports.
    oov_rows = np.flatnonzero(item == 0)
    np.save(out / "interactions" / "oov_rows.npy", oov_rows)
    np.save(out / "interactions" / "oov_raw_items.npy", ids.stored(item_raw[oov_rows]))


def _write_user_features(out: Path, raw: RawData, interactions: Interactions, features_cfg: FeaturesConfig,
                         vocabularies: dict[str, list], hash_buckets: dict[str, int],
                         hashing: dict[str, dict]) -> list[Feature]:
    """``user_id`` and each side feature of ``features.user_features`` (``users/<name>.npy``).

    The user-id vocabulary is the users with training events: a user first seen in validation
    or test (temporal split) is the OOV code 0, not an untrained row of the table.
    """
    query_features = []
    if "user_id" in features_cfg.user_features and "user_id" in hash_buckets:
        # Every user gets its hashed row, also one without training events.
        buckets = hash_buckets["user_id"]
        rows = hash_rows(interactions.raw_user_ids, buckets)
        _report_hashing(hashing, "user_id", rows, buckets)
        np.save(out / "users" / "user_id.npy", np.concatenate([[0], rows]))
        query_features.append(Feature("user_id", "query", buckets + 1))
    elif "user_id" in features_cfg.user_features:
        np.save(out / "users" / "user_id.npy", interactions.user_id_codes)
        query_features.append(Feature("user_id", "query", interactions.num_users + 1))
    users = raw.users.drop_duplicates("user", keep="first").set_index("user")
    for name in features_cfg.user_features:
        if name == "user_id":
            continue
        _require_columns(raw.users, [name], f"{raw.users_name} (features.user_features)")
        values = users[name].reindex(interactions.raw_user_ids).to_numpy()
        vocab = build_vocabulary(pd.Series(values))
        np.save(out / "users" / f"{name}.npy", np.concatenate([[0], encode(values, vocab)]))
        vocabularies[name] = vocab.tolist()
        query_features.append(Feature(name, "query", len(vocab) + 1))
    return query_features


def _history_features(features_cfg: FeaturesConfig, num_items: int, has_user_features: bool) -> list[Feature]:
    """``history`` and ``recent_1..k``: one table (the item tower's with ``share_item_table``)."""
    if not has_user_features and features_cfg.history_length == 0:
        raise DataError("the query tower has no features: list some in features.user_features "
                        "or set features.history_length > 0")
    if features_cfg.history_length == 0:
        return []
    if features_cfg.share_item_table and "item_id" not in features_cfg.item_features:
        raise DataError("features.share_item_table needs item_id in features.item_features")
    table = "t_item_id" if features_cfg.share_item_table else ""
    features = [Feature(HISTORY, "query", num_items + 1, pooling="mean", table=table)]
    for m in range(1, features_cfg.recent_items + 1):  # same table as the history bag
        features.append(Feature(f"{RECENT}{m}", "query", num_items + 1, pooling="mean", table=table or f"t_{HISTORY}"))
    return features


def _report_hashing(hashing: dict[str, dict], name: str, rows: np.ndarray, buckets: int) -> None:
    report = collisions(rows, buckets)
    hashing[name] = report
    _log(f"{name}: {report['ids']} ids hashed into {buckets} rows, {report['rows_used']} used; "
         f"{report['colliding_ids']} ids ({100 * report['collision_rate']:.2f}%) share their row with another id")


def _write_item_features(out: Path, raw: RawData, items: pd.DataFrame, features_cfg: FeaturesConfig,
                         vocabularies: dict[str, list], num_items: int, hash_buckets: dict[str, int],
                         hashing: dict[str, dict]) -> list[Feature]:
    """``item_id`` and each feature of ``features.item_features`` (``items/<name>.npy``, or a
    CSR pair for the multi-valued ones)."""
    # A table has one pooling: shared with the (mean-pooled) history, the single-valued item id
    # pools by mean too, which is the same vector.
    shared_pooling = "mean" if features_cfg.share_item_table and features_cfg.history_length > 0 else "sum"
    item_features = ([Feature("item_id", "item", num_items + 1, pooling=shared_pooling)]
                     if "item_id" in features_cfg.item_features else [])
    if item_features and "item_id" in hash_buckets:
        if features_cfg.share_item_table and features_cfg.history_length > 0:
            raise DataError("data.hash_buckets.item_id cannot be combined with features.share_item_table")
        # The catalog row (item code) stays; the item_id feature reads a hashed row by code.
        buckets = hash_buckets["item_id"]
        rows = hash_rows(np.asarray(items.index), buckets)
        _report_hashing(hashing, "item_id", rows, buckets)
        np.save(out / "items" / "item_id.npy", np.concatenate([[0], rows]))
        item_features = [Feature("item_id", "item", buckets + 1)]
    for name in features_cfg.item_features:
        if name == "item_id":
            continue
        _require_columns(items.reset_index(), [name if name != "title_tokens" else "title"],
                         f"{raw.items_name} (features.item_features)")
        if name in MULTI_VALUED_ITEM_FEATURES:
            vocab = _write_multi_valued(out, name, items[name])
            item_features.append(Feature(name, "item", len(vocab) + 1, pooling="mean"))
        else:
            values = items[name].to_numpy()
            if name == "year":
                values = year_bucket(np.nan_to_num(values.astype(float), nan=-1).astype(np.int64))
                values = np.where(values < 0, np.nan, values)
            vocab = build_vocabulary(pd.Series(values))
            np.save(out / "items" / f"{name}.npy", np.concatenate([[0], encode(values, vocab)]))
            item_features.append(Feature(name, "item", len(vocab) + 1))
        vocabularies[name] = [v.item() if isinstance(v, np.generic) else v for v in vocab.tolist()]
    if not item_features:
        raise DataError("the item tower has no sparse features: list some in features.item_features")
    return item_features


def _write_multi_valued(out: Path, name: str, column: pd.Series) -> pd.Index:
    """``items/<name>.offsets.npy`` and ``.values.npy`` (CSR by item code); the vocabulary."""
    lists = column.apply(lambda v: list(v) if isinstance(v, (list, tuple, np.ndarray)) else [])
    lengths = lists.apply(len).to_numpy(np.int64)
    flat = pd.Series(np.concatenate([np.asarray(v, dtype=object) for v in lists] or [[]]))
    vocab = build_vocabulary(flat)
    np.save(out / "items" / f"{name}.offsets.npy", np.concatenate([[0, 0], np.cumsum(lengths)]))
    np.save(out / "items" / f"{name}.values.npy", encode(flat, vocab) if len(flat) else flat.to_numpy(np.int64))
    return vocab


def _write_item_dense(out: Path, raw: RawData, items: pd.DataFrame, features_cfg: FeaturesConfig,
                      num_items: int) -> None:
    """``items/dense.npy`` ``[V + 1, Dd]``: ``year_norm``, the standardised release year."""
    dense_columns = []
    for name in features_cfg.item_dense:
        if name != "year_norm":
            raise DataError(f"features.item_dense: unknown dense feature '{name}' (known: ['year_norm'])")
        _require_columns(raw.items, ["year"], f"{raw.items_name} (features.item_dense)")
        year = items["year"].to_numpy(np.float64)
        year = np.where(year > 0, year, np.nan)
        mean, std = np.nanmean(year), np.nanstd(year) + 1e-6
        dense_columns.append(np.nan_to_num((year - mean) / std, nan=0.0))
    dense = np.zeros((num_items + 1, len(dense_columns)), dtype=np.float32)
    if dense_columns:
        dense[1:] = np.stack(dense_columns, axis=1)
    np.save(out / "items" / "dense.npy", dense)


def _write_item_metadata(out: Path, raw: RawData, items: pd.DataFrame, item_vocab: pd.Index) -> None:
    """``items.parquet``: code, raw id, title, genres, for people rather than the model."""
    metadata = pd.DataFrame({"code": np.arange(1, len(item_vocab) + 1), "item": np.asarray(item_vocab).astype(str)})
    if "title" in raw.items.columns:
        metadata["title"] = items["title"].fillna("").astype(str).to_numpy()
    if "genres" in raw.items.columns:
        metadata["genres"] = items["genres"].apply(
            lambda v: "|".join(v) if isinstance(v, (list, tuple, np.ndarray)) else "").to_numpy()
    metadata.to_parquet(out / "items.parquet", index=False)


@dataclass
class CSR:
    """A jagged column: row ``r`` holds ``values[offsets[r]:offsets[r + 1]]``.

    Args:
        offsets: ``[N + 1]`` int64 where each of the ``N`` rows starts in ``values`` (an item
            column: ``N = V + 1`` rows by item code, row 0 empty).
        values: ``[offsets[N]]`` the rows' values back to back.
    """

    offsets: np.ndarray
    values: np.ndarray


def trained_user_ids(user: np.ndarray, split: np.ndarray, num_users: int) -> np.ndarray:
    """``[U + 1]`` the ``user_id`` feature of each user code: the code itself for a user with
    training events, 0 (OOV) for one without; row 0 is the unknown user.

    Args:
        user: ``[R]`` each event's user code (1-based).
        split: ``[R]`` each event's split code.
        num_users: ``U``, the number of user codes.
    """
    codes = np.zeros(num_users + 1, dtype=np.int64)
    trained = np.unique(user[split == splits.TRAIN])
    codes[trained] = trained
    return codes


def _ids(saved: np.ndarray) -> np.ndarray:
    """Raw ids as read from the cache (int64, or fixed-width text), in memory."""
    return np.array(saved)


class PreparedData:
    """Read-only, memory-mapped view of a prepared cache. Nothing of the interaction columns
    is copied whole: batches gather their rows from the maps, and the statistics below read
    them a chunk at a time, so a process holds the pages it touches, not the columns."""

    def __init__(self, cache_dir: str | Path) -> None:
        """Open the cache: read its feature spec, memory-map its columns.

        Args:
            cache_dir: the folder ``prepare`` wrote (``data.cache_dir``); a swap a kill interrupted
                is finished first.
        """
        self.dir = Path(cache_dir)
        atomic.recover(self.dir)
        spec_path = self.dir / "feature_spec.json"
        if not spec_path.is_file():
            raise DataError(f"no prepared data at {self.dir} (missing feature_spec.json): run `twotower-rec prepare` "
                            "first")
        self.spec = FeatureSpec.from_json(spec_path.read_text())
        self._rows: dict[int, np.ndarray] = {}
        info = self.dir / INFO
        self.info = json.loads(info.read_text()) if info.is_file() else {}  # caches written before it: {}
        if self.info.get("format_version") != FORMAT_VERSION:
            raise DataError(f"prepared data at {self.dir} has format version {self.info.get('format_version', 1)}, "
                            f"this package reads {FORMAT_VERSION}: run `twotower-rec prepare` again")

        def load(*parts: str) -> np.ndarray:
            path = self.dir.joinpath(*parts)
            if not path.is_file():
                raise DataError(f"prepared data at {self.dir} is incomplete: missing {path.relative_to(self.dir)}")
            return np.load(path, mmap_mode="r", allow_pickle=False)

        self.user = load("interactions", "user.npy")
        self.item = load("interactions", "item.npy")
        self.timestamp = load("interactions", "timestamp.npy")
        self.rating = load("interactions", "rating.npy")
        self.split = load("interactions", "split.npy")
        self.user_offsets = np.asarray(load("interactions", "user_offsets.npy"))
        self.raw_user_ids = _ids(load("raw_user_ids.npy"))
        self.raw_item_ids = _ids(load("raw_item_ids.npy"))
        self.user_features = {
            f.name: np.asarray(load("users", f"{f.name}.npy"))
            for f in self.spec.query_features if f.name not in ("user_id", HISTORY) and not f.name.startswith(RECENT)
        }
        if "user_id" in self.spec.query_keys:  # caches written before users/user_id.npy: computed
            path = self.dir / "users" / "user_id.npy"
            self.user_features["user_id"] = (np.load(path) if path.is_file() else trained_user_ids(
                np.asarray(self.user), np.asarray(self.split), self.spec.num_users))
        self.item_single: dict[str, np.ndarray] = {}
        self.item_multi: dict[str, CSR] = {}
        for f in self.spec.item_features:
            if f.name == "item_id":  # the item code itself, unless hashed (items/item_id.npy)
                if f.name in self.spec.hashed:
                    self.item_single[f.name] = np.asarray(load("items", "item_id.npy"))
                continue
            if (self.dir / "items" / f"{f.name}.offsets.npy").is_file():
                self.item_multi[f.name] = CSR(np.asarray(load("items", f"{f.name}.offsets.npy")),
                                              np.asarray(load("items", f"{f.name}.values.npy")))
            else:
                self.item_single[f.name] = np.asarray(load("items", f"{f.name}.npy"))
        self.item_dense = np.asarray(load("items", "dense.npy"))

    def check_config(self, cfg) -> None:
        """Refuse a config whose options fixed at prepare time (:data:`PREPARE_FIXED`) differ
        from those this cache was prepared with (caches of earlier versions are not checked).

        Args:
            cfg: the config of a train, evaluate or export run.
        """
        saved = self.info.get("prepared_with")
        if saved is None:
            return
        now = prepared_with(cfg.data, cfg.features)
        for key in sorted(set(saved) | set(now)):
            if saved.get(key) != now.get(key) and not (key.startswith("data.synthetic.") and key not in now):
                raise ConfigError(f"{key}={now.get(key)!r} differs from the prepared data at {self.dir}, prepared with "
                                  f"{key}={saved.get(key)!r}: prepare fixes it; re-run `twotower-rec prepare` with "
                                  "this value, or leave it as it was")

    @property
    def has_ratings(self) -> bool:
        """Whether the source had ratings (without, every rating is 1.0)."""
        return bool(self.info.get("ratings", True))

    @property
    def num_rows(self) -> int:
        return int(self.user.shape[0])

    def raw_items_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """Raw item ids of interaction rows, including items unseen in training (code 0).

        Args:
            rows: ``[N]`` indices of rows of the interaction columns.

        Returns:
            ``[N]`` object array of the raw item ids.
        """
        codes = np.asarray(self.item)[rows]
        raw = np.where(codes > 0, self.raw_item_ids[np.maximum(codes - 1, 0)], None).astype(object)
        oov_rows = np.load(self.dir / "interactions" / "oov_rows.npy")
        oov_raw = _ids(np.load(self.dir / "interactions" / "oov_raw_items.npy", allow_pickle=False))
        where = np.searchsorted(oov_rows, rows)
        hit = (codes == 0) & (where < oov_rows.size)
        raw[hit] = oov_raw[where[hit]]
        return raw

    def rows(self, split: int) -> np.ndarray:
        """Row indices of one split, in (user, time) order; computed once, a chunk of the
        memory-mapped split column at a time (no whole-column copy).

        Args:
            split: the split's code (``splits.TRAIN``, ``VALIDATION`` or ``TEST``).

        Returns:
            ``[N]`` int64 row indices, read-only: every caller shares the array.
        """
        if split not in self._rows:
            split_column = self.split
            self._rows[split] = np.concatenate(
                [np.flatnonzero(np.asarray(split_column[lo:lo + CHUNK]) == split) + lo
                 for lo in range(0, self.num_rows, CHUNK)] or [np.zeros(0, dtype=np.int64)]).astype(np.int64)
            self._rows[split].flags.writeable = False  # shared by every caller
        return self._rows[split]

    def item_metadata(self) -> pd.DataFrame:
        return pd.read_parquet(self.dir / "items.parquet")

    def item_counts(self) -> np.ndarray:
        """``[V + 1]`` training interaction counts by item code (row 0: OOV), counted a chunk at a time."""
        counts = np.zeros(self.spec.num_items + 1, dtype=np.int64)
        for lo in range(0, self.num_rows, CHUNK):
            item = np.asarray(self.item[lo:lo + CHUNK])
            counts += np.bincount(item[np.asarray(self.split[lo:lo + CHUNK]) == splits.TRAIN],
                                  minlength=counts.size)
        return counts

    def summary(self) -> dict:
        counts = np.zeros(3, dtype=np.int64)
        for lo in range(0, self.num_rows, CHUNK):
            counts += np.bincount(np.asarray(self.split[lo:lo + CHUNK]), minlength=3)
        return {
            "rows": self.num_rows, "users": self.spec.num_users, "items": self.spec.num_items,
            "train": int(counts[splits.TRAIN]), "validation": int(counts[splits.VALIDATION]),
            "test": int(counts[splits.TEST]), "source": self.spec.source,
        }


