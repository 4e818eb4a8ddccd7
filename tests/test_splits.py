"""Temporal and random splits, histories under them, title tokens, --save-topk and early stopping."""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from twotower_rec.config import DataConfig, FeaturesConfig, SyntheticConfig
from twotower_rec.data import splits
from twotower_rec.data.batches import Batcher
from twotower_rec.data.prepared import prepare, title_tokens
from twotower_rec.data.sources import load_raw

T, V, X = splits.TRAIN, splits.VALIDATION, splits.TEST


def test_temporal_split_by_hand():
    timestamp = np.array([5, 1, 3, 3, 9, 7, 2, 8, 6, 4])
    got = splits.temporal(timestamp, np.arange(10), validation_fraction=0.2, test_fraction=0.2)
    # latest two (9 at 4, 8 at 7) test; the two before them (7 at 5, 6 at 8) validation
    assert got.tolist() == [T, T, T, T, X, V, T, X, V, T]


def test_temporal_split_breaks_ties_by_file_order():
    got = splits.temporal(np.ones(5, dtype=np.int64), np.arange(5), validation_fraction=0.2, test_fraction=0.4)
    assert got.tolist() == [T, T, V, X, X]


def test_random_split_is_seeded_and_has_the_fractions():
    a = splits.random_split(100_000, 0.1, 0.2, seed=7)
    assert np.array_equal(a, splits.random_split(100_000, 0.1, 0.2, seed=7))
    assert not np.array_equal(a, splits.random_split(100_000, 0.1, 0.2, seed=8))
    assert abs((a == X).mean() - 0.2) < 0.01
    assert abs((a == V).mean() - 0.1) < 0.01


def _prepared(tmp, split: str, history_length: int = 5):
    syn = SyntheticConfig(num_users=40, num_items=60, interactions_per_user=15, num_clusters=4, seed=3)
    data_cfg = DataConfig(source="synthetic", cache_dir=tmp, synthetic=syn, split=split,
                          validation_fraction=0.15, test_fraction=0.15, seed=5)
    raw = load_raw(data_cfg)
    return raw, prepare(raw, data_cfg, FeaturesConfig(history_length=history_length))


def test_prepared_temporal_split_puts_every_test_event_after_every_training_event():
    with tempfile.TemporaryDirectory() as tmp:
        _, data = _prepared(tmp, "temporal")
        split, ts = np.asarray(data.split), np.asarray(data.timestamp)
        assert (split == X).any() and (split == V).any()
        assert ts[split == T].max() <= ts[split == V].min()
        assert ts[split == V].max() <= ts[split == X].min()


@pytest.mark.parametrize("split", ["random", "temporal"])
def test_history_of_held_out_events_is_the_users_earlier_events(split):
    """Under any split a query sees only its user's events strictly earlier in time, whatever
    split those fell in; items unknown to training are the OOV code 0."""
    with tempfile.TemporaryDirectory() as tmp:
        raw, data = _prepared(tmp, split, history_length=5)
        events = defaultdict(list)
        for u, i, t in raw.interactions[["user", "item", "timestamp"]].itertuples(index=False):
            events[u].append((t, i))
        code_of = {raw_id: c for c, raw_id in enumerate(data.raw_item_ids.tolist(), start=1)}
        rows = np.flatnonzero(np.asarray(data.split) != T)
        history = Batcher(data).batch(rows).query_features.to_dict()["history"]
        offsets, values = history.offsets().tolist(), history.values().tolist()
        user, ts = np.asarray(data.user), np.asarray(data.timestamp)
        for b, row in enumerate(rows.tolist()):
            raw_user = data.raw_user_ids[user[row] - 1].item()
            earlier = [i for t, i in sorted(events[raw_user]) if t < ts[row]][-5:]
            assert values[offsets[b]:offsets[b + 1]] == [code_of.get(i, 0) for i in earlier]


@pytest.mark.parametrize("split", ["random", "temporal"])
def test_training_rows_see_only_training_events(split):
    """A training row's features hold only training events: under a random or temporal split
    a user's validation and test events can come before some of its training rows, and they
    must not be training inputs (the held-out items would be seen in training)."""
    with tempfile.TemporaryDirectory() as tmp:
        _, data = _prepared(tmp, split, history_length=5)
        item, user, split_of = np.asarray(data.item), np.asarray(data.user), np.asarray(data.split)
        rows = np.flatnonzero(split_of == T)
        leaks = 0
        history = Batcher(data).batch(rows, training=True).query_features.to_dict()["history"]
        offsets, values = history.offsets().tolist(), history.values().tolist()
        for b, row in enumerate(rows.tolist()):
            start = data.user_offsets[user[row] - 1]
            earlier = [r for r in range(start, row)]
            expected = [item[r] for r in earlier if split_of[r] == T][-5:]
            leaks += any(split_of[r] != T for r in earlier)
            assert values[offsets[b]:offsets[b + 1]] == expected, row
        # a random split puts held-out events before training rows (the test can fail there); a
        # temporal one never does, and the training view is then the plain history
        assert (leaks > 0) == (split == "random")


def test_users_without_training_events_are_out_of_vocabulary():
    """Under a temporal split a user first seen after the cut has no trained user-id row: its
    user_id is the OOV code 0, in training, evaluation and the export alike."""
    with tempfile.TemporaryDirectory() as tmp:
        _, data = _prepared(tmp, "temporal", history_length=5)
        user, split_of = np.asarray(data.user), np.asarray(data.split)
        trained = set(user[split_of == T].tolist())
        untrained = sorted(set(user.tolist()) - trained)
        assert untrained  # there are such users: the test can fail
        codes = np.arange(1, data.spec.num_users + 1)
        kjt = Batcher(data).query_features(codes, data.user_offsets[codes])
        user_id = kjt.to_dict()["user_id"].values().tolist()
        assert [c for c, v in zip(codes.tolist(), user_id) if v == 0] == untrained
        assert all(v == c for c, v in zip(codes.tolist(), user_id) if c in trained)


def test_title_tokens():
    got = title_tokens(pd.Series(["Toy Story (1995)", "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)", None]))
    assert got.tolist() == [["toy", "story"], ["amélie", "fabuleux", "destin", "d", "amélie", "poulain", "le"], []]


# --- CLI: --save-topk and early stopping on the session's pipeline ---------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_save_topk_agrees_with_the_reported_metrics(pipeline, cli, tmp_path, suffix):
    from twotower_rec.data.prepared import PreparedData

    path = tmp_path / f"top{suffix}"
    result = cli("evaluate", "--config", pipeline.config_path, "--output", tmp_path / "m.json",
                 "--save-topk", path, cwd=pipeline.root)
    assert result.returncode == 0, result.describe()
    metrics = json.loads((tmp_path / "m.json").read_text())["model"]
    data = PreparedData(pipeline.cache_dir)
    if suffix == ".npz":
        saved = np.load(path)  # no allow_pickle: plain arrays only
        users, held_out, top = saved["user"], saved["held_out_item"], saved["top_items"]
        # depth max(eval.ks) = 200, cut to the catalog; seen items filtered leave -1 pads at the end
        assert top.shape == (users.size, min(200, data.spec.num_items))
        assert (top[:, -1] == -1).any()
        lists = [[x for x in row if x != -1] for row in top.tolist()]
    else:
        frame = pd.read_parquet(path)
        users, held_out, lists = frame["user"].to_numpy(), frame["held_out_item"].to_numpy(), frame["top_items"]
        lists = [list(x) for x in lists]
    test_rows = data.rows(X)
    assert users.size == test_rows.size
    assert sorted(held_out.tolist()) == sorted(data.raw_items_of_rows(test_rows).tolist())
    hits = np.mean([h in row[:10] for h, row in zip(held_out.tolist(), lists)])
    assert hits == pytest.approx(metrics["recall@10"], abs=1e-6)
    assert all(len(set(row)) == len(row) for row in lists)


def test_save_topk_rejects_other_file_types(pipeline, cli, tmp_path):
    result = cli("evaluate", "--config", pipeline.config_path, "--output", tmp_path / "m.json",
                 "--save-topk", tmp_path / "top.csv", cwd=pipeline.root)
    assert result.returncode == 2, result.describe()
    assert "top.csv" in result.stderr and ".npz or .parquet" in result.stderr


def test_early_stopping_stops_after_patience_validations_without_improvement(pipeline, cli, tmp_path):
    # With both learning rates 0 the validation metric never moves: the first validation is the
    # best, then `patience` more without improvement stop the run.
    result = cli("train", "--config", pipeline.config_path, "--set", f"train.out_dir={tmp_path}",
                 "--set", "train.dense_lr=0", "--set", "train.sparse_lr=0", "--set", "train.val_every_steps=1",
                 "--set", "train.early_stopping_patience=2", cwd=pipeline.root)
    assert result.returncode == 0, result.describe()
    metrics = json.loads((tmp_path / "train_metrics.json").read_text())
    assert metrics["stopped_early"] is True
    assert [v["step"] for v in metrics["validation"]] == [1, 2, 3]
    assert metrics["best_step"] == 1
    assert "stopped early" in result.stderr


@pytest.mark.parametrize("split", ["random", "leave_last_out"])
def test_the_training_events_index_is_start_up_work(split):
    """Which rows a training row may see is one scan of the split column (1.3 s at 1.1e8
    rows): it is done when the trainer makes its batch iterator, before the clock of
    examples/s starts, not in the first step. The batches are the same either way."""
    import torch

    from twotower_rec.distributed.env import DistEnv
    from twotower_rec.config import load_config
    from twotower_rec.tasks import make_task
    from twotower_rec.train.batch_order import local_batches

    class Unreadable:  # the split column, once start-up is over
        def __array__(self, *args, **kwargs):
            raise AssertionError("a training step scanned the split column")

        def __getitem__(self, key):
            raise AssertionError("a training step read the split column")

    with tempfile.TemporaryDirectory() as tmp:
        _, data = _prepared(tmp, split)
        rows = data.rows(T)
        env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
        batcher, task = Batcher(data), make_task(load_config(None, []))
        batches = local_batches(lambda examples, negatives: task.batch(batcher, examples, negatives, env),
                                task.training_examples(batcher), 4, 1, 0, 0, data.spec.num_items, env)
        order = np.random.default_rng([0, 0]).permutation(rows.size)[:4]
        expected = Batcher(data).batch(rows[order], training=True)
        data.split = Unreadable()
        first = next(batches)
        for name in ("query_features", "item_features"):
            got, want = getattr(first, name).to_dict(), getattr(expected, name).to_dict()
            assert sorted(got) == sorted(want)
            for key in want:
                assert torch.equal(got[key].values(), want[key].values()), (name, key)
                assert torch.equal(got[key].lengths(), want[key].lengths()), (name, key)
