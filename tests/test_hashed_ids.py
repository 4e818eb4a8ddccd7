"""Hashed id features (data.hash_buckets): rows, collision report, unseen ids, the served tower."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from twotower_rec.config import ConfigError, DataConfig, FeaturesConfig, SyntheticConfig, load_config
from twotower_rec.data.batches import Batcher
from twotower_rec.data.features import collisions, hash_rows
from twotower_rec.data.prepared import prepare
from twotower_rec.data.raw import RawData
from twotower_rec.data.splits import TRAIN
from twotower_rec.data.synthetic import synthetic
from twotower_rec.export.query_encoder import hash_row


def test_hash_rows_are_in_range_spread_and_stable():
    rows = hash_rows(np.arange(100_000, dtype=np.int64), 1000)
    assert rows.min() >= 1 and rows.max() <= 1000
    counts = np.bincount(rows, minlength=1001)[1:]
    assert counts.min() > 50 and counts.max() < 150  # about 100 each: consecutive ids spread
    assert np.array_equal(rows, hash_rows(np.arange(100_000, dtype=np.int64), 1000))
    assert not np.array_equal(rows, hash_rows(np.arange(100_000, dtype=np.int64), 999))


def test_prepare_and_the_served_tower_hash_an_id_alike():
    """prepare hashes ids as numbers or text, vectorized; the TorchScript tower hashes the raw
    string one at a time: the same row for the same id, ASCII or not, beyond 64 bits too."""
    text = ["42", "0", "-7", "user-α", "漢字", "18446744073709551617", ""]
    scripted = torch.jit.script(hash_row)
    expected = [scripted(t, 977) for t in text]
    assert hash_rows(np.array(text, dtype=object), 977).tolist() == expected
    assert [hash_row(t, 977) for t in text] == expected  # the eager function too
    assert hash_rows(np.array([42, 0, -7], dtype=np.int64), 977).tolist() == expected[:3]
    assert hash_rows(np.array([2**64 + 1], dtype=object), 977).tolist() == expected[5:6]


def test_collision_report_counts_ids_that_share_a_row():
    report = collisions(np.array([1, 2, 2, 3, 3, 3, 5]), buckets=5)
    assert report == {"buckets": 5, "ids": 7, "rows_used": 4, "colliding_ids": 5, "collision_rate": round(5 / 7, 6)}


def _raw() -> RawData:
    raw = synthetic(SyntheticConfig(num_users=300, num_items=120, interactions_per_user=10, num_clusters=4, seed=2))
    return raw


def test_hashed_user_and_item_ids_in_the_cache_and_batches(tmp_path):
    raw = _raw()
    cfg = DataConfig(cache_dir=str(tmp_path / "c"), split="temporal", hash_buckets={"user_id": 64, "item_id": 50})
    data = prepare(raw, cfg, FeaturesConfig())
    spec = data.spec
    assert spec.hashed == {"user_id": 64, "item_id": 50}
    by_name = {f.name: f for f in spec.query_features + spec.item_features}
    assert by_name["user_id"].num_embeddings == 65 and by_name["item_id"].num_embeddings == 51
    user_rows = data.user_features["user_id"]
    assert np.array_equal(user_rows[1:], hash_rows(data.raw_user_ids, 64))
    # Under a temporal split some users have no training events: with a vocabulary they read
    # the OOV row 0; hashed, they get their own row.
    trained = np.zeros(spec.num_users + 1, dtype=bool)
    trained[np.asarray(data.user)[np.asarray(data.split) == TRAIN]] = True
    assert (~trained[1:]).any() and (user_rows[1:][~trained[1:]] > 0).all()
    item_rows = data.item_single["item_id"]
    assert item_rows[0] == 0 and np.array_equal(item_rows[1:], hash_rows(data.raw_item_ids, 50))
    batch = Batcher(data).batch(data.rows(TRAIN)[:32])
    item_ids = batch.item_features.to_dict()["item_id"].values().numpy()
    assert np.array_equal(item_ids, item_rows[batch.item_ids.numpy()])  # the hashed row, not the code
    assert item_ids.max() <= 50
    info = json.loads((tmp_path / "c" / "prepared.json").read_text())
    assert info["hashing"]["user_id"]["ids"] == spec.num_users
    assert info["hashing"]["item_id"]["buckets"] == 50 and info["hashing"]["item_id"]["colliding_ids"] > 0


def test_without_hashing_the_cache_has_no_hashing_report(tmp_path):
    data = prepare(_raw(), DataConfig(cache_dir=str(tmp_path / "c")), FeaturesConfig())
    assert "hashing" not in json.loads((tmp_path / "c" / "prepared.json").read_text())
    assert "hashed" not in json.loads((tmp_path / "c" / "feature_spec.json").read_text())
    assert "item_id" not in data.item_single


def test_hash_buckets_config_is_checked():
    with pytest.raises(ConfigError, match="'genres' cannot be hashed"):
        load_config(overrides=["data.hash_buckets={genres: 10}"])
    with pytest.raises(ConfigError, match="data.hash_buckets.user_id: must be at least 1"):
        load_config(overrides=["data.hash_buckets={user_id: 0}"])
    with pytest.raises(ConfigError, match="share_item_table"):
        load_config(overrides=["data.hash_buckets={item_id: 100}", "features.share_item_table=true"])


def test_hashed_ids_train_export_and_serve_an_unseen_user(tmp_path, cli):
    """Through the CLI: a hashed user_id trains and exports; the served tower hashes a raw id
    itself, so a known user's raw path equals its code path and a user id never seen in
    training reads a trained row rather than the unknown-user row."""
    import yaml

    from conftest import tiny_config
    from twotower_rec.data.prepared import PreparedData
    from twotower_rec.serving.exported import ExportedModel

    cfg = tiny_config(tmp_path)
    cfg["data"]["hash_buckets"] = {"user_id": 64, "item_id": 100}
    cfg["features"] = {"history_length": 10, "user_features": ["user_id"], "item_features": ["item_id", "genres"],
                       "item_dense": []}
    cfg["train"].update(max_steps=10)
    cfg["export"]["ann"] = "flat"
    path = tmp_path / "hashed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    results = {verb: cli(verb, "--config", path, cwd=tmp_path) for verb in ("prepare", "train", "export")}
    for result in results.values():
        assert result.returncode == 0, result.describe()
    assert "share their row with another id" in results["prepare"].stderr
    exported, data = ExportedModel.load(tmp_path / "export"), PreparedData(tmp_path / "data")
    users = [str(u) for u in data.raw_user_ids.tolist()[:20]]
    rows = []
    for code, raw in enumerate(users, start=1):
        lo, hi = data.user_offsets[code - 1], data.user_offsets[code]
        rows.append({"user": raw, "liked": [str(x) for x in data.raw_items_of_rows(np.arange(lo, hi)).tolist()]})
    with torch.no_grad():
        values, lengths, _, _ = exported.user_query(users)
        torch.testing.assert_close(exported.encode_new_users(rows), exported.query_tower(values, lengths),
                                   rtol=1e-5, atol=1e-6)
        unseen = exported.encode_new_users([{"user": "never-seen-user", "liked": ["1000"]}])
        anonymous = exported.encode_new_users([{"liked": ["1000"]}])
        codes, _ = exported.query_tower.encode_inputs({"user_id": [["never-seen-user"]], "history": [["1000"]]})
    assert int(codes[0][0]) == hash_row("never-seen-user", 64) > 0
    assert not torch.allclose(unseen, anonymous)
