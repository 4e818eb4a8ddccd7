"""Model variants end to end: a shared item-id table, and the sequence encoder with recent items.

``shared``: features.share_item_table, the history bag and the item tower look items up in
ONE table. ``sequence``: model.user_encoder=sequence (EmbeddingCollection + transformer over
the history) with features.recent_items=3. For each, the exported TorchScript query tower and
`recommend` must reproduce the training model.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml

from conftest import tiny_config


VARIANTS = {
    "shared": {"features": {"share_item_table": True}},
    "sequence": {"features": {"recent_items": 3}, "model": {"user_encoder": "sequence"}},
}


def _variant(tmp_path_factory, cli, name: str):
    root = tmp_path_factory.mktemp(name)
    cfg = tiny_config(root)
    for section, values in VARIANTS[name].items():
        cfg[section].update(values)
    cfg["train"]["epochs"] = 1
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    for verb in ("prepare", "train", "export"):
        result = cli(verb, "--config", path, cwd=root)
        assert result.returncode == 0, result.describe()

    from twotower_rec.cli import _load_trained
    from twotower_rec.config import load_config
    from twotower_rec.distributed.env import init_distributed, shutdown
    from twotower_rec.serving import ExportedModel

    saved_env = dict(os.environ)
    env = init_distributed()
    try:
        model, data, _, trained_cfg = _load_trained(load_config(path), root / "run" / "checkpoint", env)
        yield model, data, ExportedModel.load(root / "export"), trained_cfg
    finally:
        shutdown()
        os.environ.clear()
        os.environ.update(saved_env)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, cli):
    yield from _variant(tmp_path_factory, cli, "shared")


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory, cli):
    yield from _variant(tmp_path_factory, cli, request.param)


def test_history_uses_the_item_towers_item_id_table(shared):
    from twotower_rec.distributed.sharding import full_state_dict
    from twotower_rec.model.two_tower import TwoTower

    model, data, _, trained_cfg = shared
    names = list(full_state_dict(model))
    assert any("t_item_id" in n for n in names), names
    assert not any("t_history" in n for n in names), names
    plain = TwoTower(data.spec, trained_cfg.model, device=torch.device("cpu"))
    configs = {c.name: c.feature_names for c in plain.item_tower.embedding_bags.embedding_bag_configs()}
    assert configs["t_item_id"] == ["item_id", "history"]
    query_tables = {c.name for c in plain.query_tower.embedding_bags.embedding_bag_configs()}
    assert "t_item_id" not in query_tables
    assert plain.query_feature_order[-1] == "history"


def test_shared_table_gets_gradients_from_both_towers(shared):
    from twotower_rec.data.batches import Batcher
    from twotower_rec.model.two_tower import TwoTower
    from twotower_rec.distributed.sharding import full_state_dict

    model, data, _, trained_cfg = shared
    plain = TwoTower(data.spec, trained_cfg.model, device=torch.device("cpu"))
    plain.load_state_dict(full_state_dict(model))
    batcher = Batcher(data)
    rows = np.arange(16)
    batch = batcher.batch(rows)
    assert int(batch.query_features["history"].lengths().sum()) > 0
    # The query side alone must move the shared table: history is looked up there.
    query = plain.encode_query(batch.query_features)
    query.sum().backward()
    grad = plain.item_tower.embedding_bags.embedding_bags["t_item_id"].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_scripted_query_tower_and_recommend_equal_the_training_model(variant):
    from twotower_rec.data.batches import Batcher
    from twotower_rec.evaluation import catalog_embeddings, query_embeddings, rank_catalog, seen_items
    from twotower_rec.train.trainer import towers

    model, data, exported, _ = variant
    encode_query, encode_items = towers(model)
    batcher = Batcher(data)
    codes = np.arange(1, data.spec.num_users + 1, dtype=np.int64)
    position = data.user_offsets[codes]
    with torch.no_grad():
        training = query_embeddings(encode_query, batcher, codes, position)
        item_emb = catalog_embeddings(encode_items, batcher)
        values, lengths, _, _ = exported.user_query([data.raw_user_ids[c - 1] for c in codes.tolist()])
        scripted = exported.query_tower(values, lengths)
    torch.testing.assert_close(scripted, training, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(exported.item_embeddings.numpy(), item_emb[1:].numpy(), rtol=1e-5, atol=1e-6)

    top = rank_catalog(training, item_emb, 5, seen_items(data, codes, position), chunk=50)
    served = exported.recommend_users([data.raw_user_ids[c - 1] for c in codes.tolist()], k=5)
    for row, recs in zip(top.tolist(), served):
        assert [r.item for r in recs] == [str(data.raw_item_ids[c - 1]) for c in row]


def test_sequence_encoder_reads_the_history_through_an_embedding_collection(variant):
    from twotower_rec.model.two_tower import TwoTower

    model, data, exported, trained_cfg = variant
    if trained_cfg.model.user_encoder != "sequence":
        pytest.skip("the sequence variant only")
    plain = TwoTower(data.spec, trained_cfg.model, device=torch.device("cpu"))
    assert plain.query_feature_order[-1] == "history" and "recent_3" in plain.query_feature_order
    assert "history" not in plain.query_tower.feature_names
    assert exported.manifest["query_features"] == plain.query_feature_order
    # the raw-value path: a new user's liked items, oldest first, move the recommendation
    items = [str(x) for x in exported.item_ids.tolist()]
    a = exported.recommend_new_user(liked=items[:4], k=5)
    b = exported.recommend_new_user(liked=items[:4][::-1], k=5)  # same items, other order
    assert len(a) == 5 and [r.score for r in a] != [r.score for r in b]
