"""Prepared data and KeyedJaggedTensor batches, checked against values computed by hand.

A tiny interactions table (plus user and item tables) goes through the real CSV reader and
``prepare``; the batches are compared exactly with codes derived independently below.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twotower_rec.config import DataConfig, FeaturesConfig, SyntheticConfig, load_config
from twotower_rec.data import splits
from twotower_rec.data.batches import Batcher
from twotower_rec.data.prepared import PreparedData, prepare
from twotower_rec.data.raw import RawData
from twotower_rec.data.query_inputs import gather_ranges
from twotower_rec.data.sources import load_raw
from twotower_rec.errors import DataError

# file line 2 is the first data row. Not in time order; ties on purpose:
#   user 10: ts 5 twice (item 100 on line 2 before item 300 on line 5)
#   user 50: its last two rows share ts 7 (item 200 on line 17, then item 300 on line 19)
#   user 40 has 2 rows only (dropped by min_interactions=3); items 500 and 600 are only in test rows.
#   user 20 meets item 200 twice (lines 3 and 20): the later event is dropped (one event per pair).
INTERACTIONS = [
    (10, 100, 5, 4.0),
    (20, 200, 3, 5.0),
    (10, 200, 1, 3.0),
    (10, 300, 5, 2.0),
    (10, 400, 9, 4.0),
    (20, 100, 4, 1.0),
    (20, 300, 8, 2.0),
    (30, 400, 2, 5.0),
    (30, 100, 3, 3.0),
    (30, 500, 7, 4.0),
    (20, 400, 6, 3.0),
    (10, 600, 10, 5.0),
    (40, 200, 1, 1.0),
    (40, 300, 2, 1.0),
    (30, 200, 5, 2.0),
    (50, 200, 7, 1.0),
    (50, 100, 1, 2.0),
    (50, 300, 7, 3.0),
    (20, 200, 9, 4.0),
]
USERS = [  # user 50 is absent: its side features are unknown (code 0)
    (10, "F", 25, 3),
    (20, "M", 35, 7),
    (30, "F", 18, 3),
    (40, "M", 25, 1),
]
ITEMS = [
    (100, "Drama|Comedy", 1994, "A"),
    (200, "Action", 2001, "B"),
    (300, "Comedy", 1994, "C"),
    (400, "Action|Drama", 1988, "D"),
    (500, "Horror", 2010, "E"),
]
USER_FEATURES = ["gender", "age", "occupation"]


def write_tables(root: Path) -> dict[str, Path]:
    paths = {name: root / f"{name}.csv" for name in ("interactions", "users", "items")}
    paths["interactions"].write_text(
        "user,item,timestamp,rating\n" + "".join(f"{u},{i},{t},{r:g}\n" for u, i, t, r in INTERACTIONS))
    paths["users"].write_text("user,gender,age,occupation\n" + "".join(f"{u},{g},{a},{o}\n" for u, g, a, o in USERS))
    paths["items"].write_text("item,genres,year,title\n" + "".join(f"{i},{g},{y},{t}\n" for i, g, y, t in ITEMS))
    return paths


def prepare_hand(root: Path, history_length: int) -> PreparedData:
    paths = write_tables(root)
    cfg = load_config(None, [
        "data.source=interactions",
        f"data.interactions_path={paths['interactions']}",
        f"data.users_path={paths['users']}",
        f"data.items_path={paths['items']}",
        f"data.cache_dir={root / 'cache'}",
        f"features.history_length={history_length}",
    ])
    return prepare(load_raw(cfg.data), cfg.data, cfg.features)


class Reference:
    """An independent, loop-by-loop model of what ``prepare`` + ``Batcher`` must produce."""

    def __init__(self, history_length: int) -> None:
        self.n = history_length
        by_user = defaultdict(list)
        for line_index, (u, i, t, r) in enumerate(INTERACTIONS):
            by_user[u].append((t, line_index, i, r))
        first_events = {}
        for u, rows in by_user.items():  # (time, file line) order; a (user, item) pair's first event only
            seen, kept = set(), []
            for event in sorted(rows):
                if event[2] not in seen:
                    seen.add(event[2])
                    kept.append(event)
            first_events[u] = kept
        self.users = sorted(u for u, rows in first_events.items() if len(rows) >= 3)
        self.user_code = {u: c + 1 for c, u in enumerate(self.users)}
        self.seq = {u: first_events[u] for u in self.users}
        train_items = {i for u in self.users for (_, _, i, _) in self.seq[u][:-2]}
        self.item_code = {item: c + 1 for c, item in enumerate(sorted(train_items))}
        # global rows: (user, position within the user's sequence)
        self.rows = [(u, p) for u in self.users for p in range(len(self.seq[u]))]

        # user side features: vocabulary in first-seen order over kept users sorted by raw id
        table = {u: dict(zip(USER_FEATURES, rest)) for u, *rest in USERS}
        self.user_feature = {}
        for name in USER_FEATURES:
            vocab: list = []
            for u in self.users:
                if u in table and table[u][name] not in vocab:
                    vocab.append(table[u][name])
            self.user_feature[name] = {u: (vocab.index(table[u][name]) + 1 if u in table else 0) for u in self.users}

        # item features over training items in code order
        meta = {i: (g.split("|"), y) for i, g, y, _ in ITEMS}
        genre_vocab, year_vocab = [], []
        for item in sorted(train_items):
            for g in meta[item][0]:
                if g not in genre_vocab:
                    genre_vocab.append(g)
            bucket = meta[item][1] // 5 * 5
            if bucket not in year_vocab:
                year_vocab.append(bucket)
        self.genre_vocab = genre_vocab
        self.genres = {0: []}
        self.year = {0: 0}
        self.year_norm = {0: 0.0}
        years = np.array([meta[item][1] for item in sorted(train_items)], dtype=np.float64)
        mean, std = years.mean(), years.std()
        for item, code in self.item_code.items():
            self.genres[code] = [genre_vocab.index(g) + 1 for g in meta[item][0]]
            self.year[code] = year_vocab.index(meta[item][1] // 5 * 5) + 1
            self.year_norm[code] = (meta[item][1] - mean) / std

    def item_of(self, row: int) -> int:
        u, p = self.rows[row]
        return self.item_code.get(self.seq[u][p][2], 0)

    def rating_of(self, row: int) -> float:
        u, p = self.rows[row]
        return self.seq[u][p][3]

    def history(self, row: int) -> list[int]:
        u, p = self.rows[row]
        earlier = self.seq[u][max(0, p - self.n):p]
        return [self.item_code.get(i, 0) for (_, _, i, _) in earlier]

    def query_kjt(self, rows: list[int]) -> tuple[list[str], list[int], list[int]]:
        keys = ["user_id", *USER_FEATURES] + (["history"] if self.n > 0 else [])
        lengths, values = [], []
        lengths += [1] * len(rows)
        values += [self.user_code[self.rows[r][0]] for r in rows]
        for name in USER_FEATURES:
            lengths += [1] * len(rows)
            values += [self.user_feature[name][self.rows[r][0]] for r in rows]
        if self.n > 0:
            for r in rows:
                h = self.history(r)
                lengths.append(len(h))
                values += h
        return keys, lengths, values

    def item_kjt(self, rows: list[int]) -> tuple[list[str], list[int], list[int]]:
        codes = [self.item_of(r) for r in rows]
        lengths = [1] * len(rows) + [len(self.genres[c]) for c in codes] + [1] * len(rows)
        values = codes + [g for c in codes for g in self.genres[c]] + [self.year[c] for c in codes]
        return ["item_id", "genres", "year"], lengths, values


@pytest.fixture(scope="module")
def hand(tmp_path_factory) -> PreparedData:
    return prepare_hand(tmp_path_factory.mktemp("hand"), history_length=2)


def test_hand_batch_query_kjt_exact(hand):
    # Rows, in (user, time, file order): user 10 -> rows 0-4, user 20 -> 5-8, user 30 -> 9-12, user 50 -> 13-15.
    # Item codes: 100 -> 1, 200 -> 2, 300 -> 3, 400 -> 4 (training items, sorted); 500 -> 0 (test only).
    batch = Batcher(hand).batch(np.array([2, 4, 8, 12, 0, 15]))
    kjt = batch.query_features
    assert kjt.keys() == ["user_id", "gender", "age", "occupation", "history"]
    assert kjt.lengths().tolist() == [1] * 6 + [1] * 6 + [1] * 6 + [1] * 6 + [2, 2, 2, 2, 0, 2]
    assert kjt.values().tolist() == [
        1, 1, 2, 3, 1, 4,  # user codes: 10 -> 1, 20 -> 2, 30 -> 3, 50 -> 4
        1, 1, 2, 1, 1, 0,  # gender: F -> 1, M -> 2, user 50 unknown -> 0
        1, 1, 2, 3, 1, 0,  # age: 25 -> 1, 35 -> 2, 18 -> 3
        1, 1, 2, 1, 1, 0,  # occupation: 3 -> 1, 7 -> 2
        2, 1,  # row 2 (user 10, 3rd event): items 200, 100 (ts 1, ts 5 on line 2)
        3, 4,  # row 4 (user 10, last): the last 2 of 200, 100, 300, 400
        1, 4,  # row 8 (user 20, last): 100, 400
        1, 2,  # row 12 (user 30, last): 100, 200
        # row 0: user 10's first event, no history
        1, 2,  # row 15 (user 50, last): 100, 200 (200 before 300 at the same ts: file order)
    ]


def test_hand_batch_item_kjt_exact(hand):
    batch = Batcher(hand).batch(np.array([2, 4, 8, 12, 0, 15]))
    kjt = batch.item_features
    assert kjt.keys() == ["item_id", "genres", "year"]
    # items of the rows: 300, 600 (OOV), 300, 500 (OOV), 200, 300
    # genres vocabulary over training items in code order: Drama 1, Comedy 2, Action 3
    # 5-year buckets in first-seen order: 1990 -> 1, 2000 -> 2, 1985 -> 3
    assert kjt.lengths().tolist() == [1] * 6 + [1, 0, 1, 0, 1, 1] + [1] * 6
    assert kjt.values().tolist() == [3, 0, 3, 0, 2, 3] + [2, 2, 3, 2] + [1, 0, 1, 0, 2, 1]
    assert batch.item_ids.tolist() == [3, 0, 3, 0, 2, 3]
    assert batch.labels.tolist() == [2.0, 5.0, 2.0, 4.0, 3.0, 3.0]
    years = np.array([1994, 2001, 1994, 1988], dtype=np.float64)  # items 100..400
    norm = (years - years.mean()) / years.std()
    expected_dense = [norm[2], 0.0, norm[2], 0.0, norm[1], norm[2]]
    np.testing.assert_allclose(batch.item_dense[:, 0].numpy(), expected_dense, rtol=1e-4, atol=1e-5)
    assert len(batch) == 6


@pytest.mark.parametrize("history_length", [0, 1, 3, 50])
def test_every_row_matches_the_reference(tmp_path, history_length):
    data = prepare_hand(tmp_path, history_length)
    ref = Reference(history_length)
    assert data.num_rows == len(ref.rows)
    rows = list(np.random.default_rng(history_length).permutation(data.num_rows))
    batch = Batcher(data).batch(np.array(rows))
    keys, lengths, values = ref.query_kjt(rows)
    assert batch.query_features.keys() == keys
    assert batch.query_features.lengths().tolist() == lengths
    assert batch.query_features.values().tolist() == values
    keys, lengths, values = ref.item_kjt(rows)
    assert batch.item_features.keys() == keys
    assert batch.item_features.lengths().tolist() == lengths
    assert batch.item_features.values().tolist() == values
    assert batch.labels.tolist() == [ref.rating_of(r) for r in rows]
    np.testing.assert_allclose(batch.item_dense[:, 0].numpy(), [ref.year_norm[ref.item_of(r)] for r in rows],
                               rtol=1e-4, atol=1e-5)


def test_query_after_all_interactions(hand):
    """position = the user's end offset: the query a recommendation is made from."""
    ref = Reference(2)
    user = np.arange(1, hand.spec.num_users + 1)
    kjt = Batcher(hand).query_features(user, hand.user_offsets[user])
    history = kjt.to_dict()["history"]
    for b, u in enumerate(ref.users):
        expected = [ref.item_code.get(i, 0) for (_, _, i, _) in ref.seq[u][-2:]]
        assert history.values()[history.offsets()[b]:history.offsets()[b + 1]].tolist() == expected


def test_users_items_and_vocabularies(hand):
    ref = Reference(2)
    assert hand.raw_user_ids.tolist() == [10, 20, 30, 50]  # user 40 (2 rows) dropped
    assert hand.raw_item_ids.tolist() == [100, 200, 300, 400]  # training items only, sorted
    assert hand.spec.num_users == 4 and hand.spec.num_items == 4
    assert hand.user_offsets.tolist() == [0, 5, 9, 13, 16]
    assert hand.spec.vocabularies["genres"] == ref.genre_vocab
    assert hand.spec.vocabularies["gender"] == ["F", "M"]


def test_item_only_in_test_split_is_oov(hand):
    item = np.asarray(hand.item)
    split = np.asarray(hand.split)
    # user 30's last event is item 500, user 10's is item 600: the only times they occur
    for code in (1, 3):
        test_row = hand.user_offsets[code] - 1
        assert split[test_row] == splits.TEST
        assert item[test_row] == 0
    assert 500 not in hand.raw_item_ids.tolist() and 600 not in hand.raw_item_ids.tolist()
    assert "Horror" not in hand.spec.vocabularies["genres"]
    # every training row has a real code
    assert (item[split == splits.TRAIN] > 0).all()
    # item_counts row 0 (OOV) counts training rows only: none
    assert hand.item_counts()[0] == 0


def test_leave_last_out_on_hand_data(hand):
    ref = Reference(2)
    split = np.asarray(hand.split)
    rating = np.asarray(hand.rating)
    item = np.asarray(hand.item)
    for code, u in enumerate(ref.users, start=1):
        lo, hi = hand.user_offsets[code - 1], hand.user_offsets[code]
        assert list(split[lo:hi]) == [splits.TRAIN] * (hi - lo - 2) + [splits.VALIDATION, splits.TEST]
        assert [ref.item_code.get(i, 0) for (_, _, i, _) in ref.seq[u]] == item[lo:hi].tolist()
        assert [r for (_, _, _, r) in ref.seq[u]] == rating[lo:hi].tolist()
    # user 20 met item 200 twice: only the first (ts 3) stays; its test item is 300 (ts 8), not 200 (ts 9)
    lo = hand.user_offsets[1]
    assert item[lo:lo + 4].tolist() == [2, 1, 4, 3]
    assert rating[lo:lo + 4].tolist() == [5.0, 1.0, 3.0, 2.0]
    # user 50: items 200 (line 17) and 300 (line 19) share ts 7 -> 200 is validation, 300 test
    lo = hand.user_offsets[3]
    assert item[lo + 1:lo + 3].tolist() == [2, 3]
    assert split[lo + 1:lo + 3].tolist() == [splits.VALIDATION, splits.TEST]


# --- gather_ranges ---------------------------------------------------------------------------


@st.composite
def ranges(draw):
    n = draw(st.integers(0, 40))
    source = np.array(draw(st.lists(st.integers(-1000, 1000), min_size=n, max_size=n)), dtype=np.int64)
    pairs = draw(st.lists(st.tuples(st.integers(0, n), st.integers(0, n)), max_size=12))
    starts = np.array([min(a, b) for a, b in pairs], dtype=np.int64)
    lengths = np.array([abs(a - b) for a, b in pairs], dtype=np.int64)
    return source, starts, lengths


@settings(max_examples=200, deadline=None)
@given(ranges())
def test_gather_ranges_matches_a_python_loop(case):
    source, starts, lengths = case
    expected = []
    for s, n in zip(starts.tolist(), lengths.tolist()):
        expected.extend(source[s:s + n].tolist())
    out = gather_ranges(source, starts, lengths)
    assert out.tolist() == expected
    assert out.dtype == source.dtype


# --- split and leakage properties --------------------------------------------------------------


@st.composite
def event_tables(draw):
    n = draw(st.integers(1, 40))
    users = draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    items = draw(st.lists(st.integers(1, 9), min_size=n, max_size=n))
    times = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))  # many ties
    return users, items, times


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_tables())
def test_leave_last_out_property(table):
    users, items, times = table
    n = len(users)
    inter = pd.DataFrame({"user": np.array(users, dtype=np.int64), "item": np.array(items, dtype=np.int64),
                          "timestamp": np.array(times, dtype=np.int64),
                          "rating": np.arange(n, dtype=np.float32)})  # rating = file position: a row tag
    raw = RawData(inter, pd.DataFrame({"user": sorted(set(users))}), pd.DataFrame({"item": sorted(set(items))}),
                  name="hypothesis")
    by_user = defaultdict(list)
    for position, (u, t) in enumerate(zip(users, times)):
        by_user[u].append((t, position))
    for u, rows in by_user.items():  # time, then file order; each (user, item) pair's first event only
        seen, first = set(), []
        for t, position in sorted(rows):
            if items[position] not in seen:
                seen.add(items[position])
                first.append((t, position))
        by_user[u] = first
    kept = sorted(u for u, rows in by_user.items() if len(rows) >= 3)
    features = FeaturesConfig(user_features=["user_id"], item_features=["item_id"], item_dense=[], history_length=3)
    with tempfile.TemporaryDirectory() as tmp:
        data_cfg = DataConfig(cache_dir=tmp)
        if not kept:
            with pytest.raises(ValueError):
                prepare(raw, data_cfg, features)
            return
        data = prepare(raw, data_cfg, features)
        split = np.asarray(data.split)
        tag = np.asarray(data.rating).astype(np.int64).tolist()
        assert data.raw_user_ids.tolist() == kept
        assert (split == splits.TEST).sum() == len(kept)
        assert (split == splits.VALIDATION).sum() == len(kept)
        for code, u in enumerate(kept, start=1):
            lo, hi = int(data.user_offsets[code - 1]), int(data.user_offsets[code])
            expected = [p for _, p in sorted(by_user[u])]  # time, then file order
            assert tag[lo:hi] == expected
            assert split[hi - 1] == splits.TEST and split[hi - 2] == splits.VALIDATION
            assert (split[lo:hi - 2] == splits.TRAIN).all()
        # items: vocabulary = training items only
        train_items = {items[p] for p, s in zip(tag, split) if s == splits.TRAIN}
        assert sorted(data.raw_item_ids.tolist()) == sorted(train_items)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), num_users=st.integers(5, 30), num_items=st.integers(30, 80),
       per_user=st.integers(8, 20), history_length=st.integers(1, 8))
def test_training_history_is_earlier_interactions_of_the_same_user(seed, num_users, num_items, per_user,
                                                                     history_length):
    syn = SyntheticConfig(num_users=num_users, num_items=num_items, interactions_per_user=per_user,
                          num_clusters=4, clusters_per_user=2, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        data_cfg = DataConfig(source="synthetic", cache_dir=tmp, synthetic=syn)
        features = FeaturesConfig(history_length=history_length)
        raw = load_raw(data_cfg)
        data = prepare(raw, data_cfg, features)
        events = defaultdict(list)
        for u, i, t in raw.interactions[["user", "item", "timestamp"]].itertuples(index=False):
            events[u].append((t, i))
        for u in events:
            events[u].sort()
        rows = data.rows(splits.TRAIN)
        batch = Batcher(data).batch(rows)
        history = batch.query_features.to_dict()["history"]
        offsets = history.offsets().tolist()
        values = history.values().tolist()
        user = np.asarray(data.user)
        timestamp = np.asarray(data.timestamp)
        for b, row in enumerate(rows.tolist()):
            raw_user = data.raw_user_ids[user[row] - 1].item()
            codes = values[offsets[b]:offsets[b + 1]]
            assert all(c > 0 for c in codes)  # earlier rows of a training row are training rows
            got = [data.raw_item_ids[c - 1].item() for c in codes]
            earlier = [i for t, i in events[raw_user] if t < timestamp[row]]
            assert got == earlier[-history_length:]


def _raw(num_users: int, per_user: int = 5) -> RawData:
    rows = [(u, i, t) for u in range(1, num_users + 1) for t, i in enumerate(range(1, per_user + 1))]
    inter = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    inter["rating"] = np.float32(4.0)
    return RawData(inter, pd.DataFrame({"user": range(1, num_users + 1)}), pd.DataFrame({"item": range(1, 6)}),
                   name="small")


def test_prepare_swaps_the_cache_in_and_readers_of_the_old_one_keep_it(tmp_path):
    features = FeaturesConfig(user_features=["user_id"], item_features=["item_id"], item_dense=[], history_length=3)
    cache = tmp_path / "cache"
    old = prepare(_raw(3), DataConfig(cache_dir=str(cache), min_interactions=3), features)
    old_users = old.user  # memory-mapped from the first cache's files
    new = prepare(_raw(4, per_user=4), DataConfig(cache_dir=str(cache), min_interactions=3), features)
    # np.save into the same files would truncate what `old` maps (SIGBUS on the next read)
    assert np.asarray(old_users).tolist() == [1] * 5 + [2] * 5 + [3] * 5
    assert new.spec.num_users == 4 and PreparedData(cache).spec.num_users == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temporary or old folder left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="is not a prepared cache"):
        prepare(_raw(3), DataConfig(cache_dir=str(other), min_interactions=3), features)
    assert (other / "keep.txt").read_text() == "mine"
