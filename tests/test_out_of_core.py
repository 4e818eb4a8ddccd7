"""Out-of-core prepare (data.engine=duckdb): the cache equals the in-memory path's byte for byte,
also when DuckDB must spill to disk, and from a directory of Parquet files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower_rec.config import DataConfig, FeaturesConfig, SyntheticConfig
from twotower_rec.data.prepared import prepare
from twotower_rec.data.raw import RawData
from twotower_rec.data.sources import load_raw
from twotower_rec.data.synthetic import synthetic
from twotower_rec.errors import DataError


def _raw(num_users: int, seed: int = 1) -> RawData:
    """Synthetic events plus what prepare must handle: repeated (user, item) pairs (some at
    the same second, decided by file order), users too short to keep, items seen only in
    held-out rows (out of vocabulary), and rows out of time order in the file."""
    raw = synthetic(SyntheticConfig(num_users=num_users, num_items=300, interactions_per_user=12, num_clusters=6,
                                    seed=seed))
    inter = raw.interactions
    rng = np.random.default_rng(seed)
    repeats = inter.sample(n=len(inter) // 20, random_state=seed).copy()
    repeats["timestamp"] += rng.integers(-1, 2, len(repeats)) * rng.integers(0, 5000, len(repeats))
    repeats["rating"] = 9.0  # a kept repeat would show in rating.npy
    short = pd.DataFrame({"user": [10**6, 10**6 + 1, 10**6 + 1], "item": [1000, 1001, 1002],
                          "timestamp": [5, 6, 7], "rating": np.float32(3.0)})
    last = inter.groupby("user")["timestamp"].transform("max") == inter["timestamp"]
    fresh = inter[last].head(5).assign(item=np.arange(5) + 99_000, timestamp=lambda f: f["timestamp"] + 1)
    inter = pd.concat([inter, repeats, short, fresh], ignore_index=True).sample(frac=1.0, random_state=seed)
    inter = inter.reset_index(drop=True)
    inter["rating"] = inter["rating"].astype(np.float32)
    return RawData(inter, raw.users, raw.items, name="test events")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_same_cache(a: Path, b: Path, same_source: bool = True) -> None:
    first, second = _files(a), _files(b)
    if not same_source:  # feature_spec.json names where the events came from
        for files in (first, second):
            spec = json.loads(files["feature_spec.json"])
            files["feature_spec.json"] = json.dumps({**spec, "source": ""}).encode()
    assert sorted(first) == sorted(second)
    differ = [name for name in first if first[name] != second[name]]
    assert not differ, f"files differ between the two caches: {differ}"


@pytest.mark.parametrize("split", ["leave_last_out", "temporal", "random"])
def test_duckdb_cache_equals_the_in_memory_cache(tmp_path, split):
    raw = _raw(600)
    features = FeaturesConfig(item_features=["item_id", "genres", "year"])
    for engine in ("pandas", "duckdb"):
        cfg = DataConfig(cache_dir=str(tmp_path / engine), engine=engine, split=split, seed=3, threads=1)
        prepare(raw, cfg, features)
    _assert_same_cache(tmp_path / "pandas", tmp_path / "duckdb")
    assert len(np.load(tmp_path / "duckdb" / "interactions" / "oov_rows.npy")) > 0  # the case is exercised


def test_duckdb_spills_past_its_memory_limit_and_writes_the_same_cache(tmp_path, capfd):
    raw = _raw(40_000, seed=2)
    features = FeaturesConfig()
    prepare(raw, DataConfig(cache_dir=str(tmp_path / "pandas"), engine="pandas"), features)
    capfd.readouterr()
    prepare(raw, DataConfig(cache_dir=str(tmp_path / "duckdb"), engine="duckdb", memory_limit="24MB", threads=1,
                            spill_dir=str(tmp_path / "spill")), features)
    log = capfd.readouterr().err
    assert "duckdb spilled" in log, log
    _assert_same_cache(tmp_path / "pandas", tmp_path / "duckdb")
    assert list((tmp_path / "spill").iterdir()) == []  # the spill folder is removed


def test_a_memory_limit_too_small_is_a_data_error_naming_the_setting(tmp_path):
    with pytest.raises(DataError, match="data.memory_limit=2MB is too small"):
        prepare(_raw(3000), DataConfig(cache_dir=str(tmp_path / "c"), engine="duckdb", memory_limit="2MB",
                                       threads=1), FeaturesConfig())
    assert not (tmp_path / "c").exists()


def _write_parquet_parts(inter: pd.DataFrame, folder: Path, parts: int) -> None:
    folder.mkdir(parents=True)
    for k, chunk in enumerate(np.array_split(np.arange(len(inter)), parts)):
        table = pa.Table.from_pandas(inter.iloc[chunk].rename(columns={"user": "uid", "timestamp": "ts"}),
                                     preserve_index=False)
        pq.write_table(table, folder / f"part-{k:03d}.parquet")


def test_a_directory_of_parquet_files_prepares_like_one_file(tmp_path):
    raw = _raw(400, seed=4)
    _write_parquet_parts(raw.interactions, tmp_path / "events", parts=3)
    pq.write_table(pa.Table.from_pandas(raw.interactions.rename(columns={"user": "uid", "timestamp": "ts"}),
                                        preserve_index=False), tmp_path / "events.parquet")
    raw.users.rename(columns={"user": "uid"}).to_parquet(tmp_path / "users.parquet")
    common = dict(source="interactions", users_path=str(tmp_path / "users.parquet"), user_column="uid",
                  timestamp_column="ts")
    features = FeaturesConfig(user_features=["user_id", "gender", "age"], item_features=["item_id"], item_dense=[])
    one = DataConfig(interactions_path=str(tmp_path / "events.parquet"), cache_dir=str(tmp_path / "one"), **common)
    many = DataConfig(interactions_path=str(tmp_path / "events"), cache_dir=str(tmp_path / "many"),
                      memory_limit="200MB", **common)
    prepare(load_raw(one), one, features)
    prepare(load_raw(many), many, features)  # engine auto: duckdb for a directory
    _assert_same_cache(tmp_path / "one", tmp_path / "many", same_source=False)


def test_a_parquet_directory_with_a_missing_id_names_the_file_and_row(tmp_path):
    inter = _raw(50).interactions.head(40).copy()
    inter["item"] = inter["item"].astype("Int64")
    inter.loc[inter.index[25], "item"] = pd.NA
    _write_parquet_parts(inter, tmp_path / "events", parts=2)  # rows 0-19 and 20-39
    cfg = DataConfig(source="interactions", interactions_path=str(tmp_path / "events"), user_column="uid",
                     timestamp_column="ts", cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"part-001\.parquet: row 6: empty item id \(1 such rows\)"):
        prepare(load_raw(cfg), cfg, FeaturesConfig(user_features=["user_id"], item_features=["item_id"],
                                                   item_dense=[]))


def test_a_parquet_directory_needs_the_out_of_core_engine(tmp_path):
    _write_parquet_parts(_raw(50).interactions.head(10), tmp_path / "events", parts=1)
    cfg = DataConfig(source="interactions", interactions_path=str(tmp_path / "events"), engine="pandas",
                     user_column="uid", timestamp_column="ts")
    with pytest.raises(DataError, match="data.engine=duckdb"):
        load_raw(cfg)


def test_the_first_epochs_shuffle_is_start_up_work(monkeypatch):
    """At 10^8 rows one epoch's shuffle takes seconds (5.9 s for 9e7 rows): it is done when the
    trainer makes its batch iterator, before the clock of examples/s starts, not in the first
    step; the batches are the same either way."""
    import torch

    from twotower_rec.distributed.env import DistEnv
    from twotower_rec.train import batch_order

    shuffled = []
    real = batch_order.global_batches
    monkeypatch.setattr(batch_order, "global_batches", lambda *a: shuffled.append(a[3]) or real(*a))
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    rows = np.arange(100, 200)
    batches = batch_order.local_batches(lambda examples, negatives: rows[examples], rows.size, 10, 2, 0, 0, 0, env)
    assert shuffled == [0]  # before the first batch is asked for
    got = list(batches)
    assert shuffled == [0, 1]
    expected = [rows[b] for e in range(2) for b in real(100, 10, 0, e)]
    assert len(got) == 20 and all(np.array_equal(g, x) for g, x in zip(got, expected))
