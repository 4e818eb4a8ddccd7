"""Model variants end to end: a shared item-id table, the history encoders, an ensemble.

``shared``: features.share_item_table, the history bag and the item tower look items up in
ONE table. ``transformer``: model.history_encoder=transformer (EmbeddingCollection + transformer over
the history) with features.recent_items=3. ``ensemble``: model.members=3 with
features.recent_items=2 (three runs, loaded side by side). ``causal`` / ``causal_shared``:
task=next_item with the causal encoder over a table of its own / the item tower's
item-id table; ``causal_add``: its user features added to the causal state and the
history's mean (model.user_join=add, model.history_mean). For each, the exported TorchScript
query tower and `recommend` must reproduce the training model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config

VARIANTS = {
    "shared": {"features": {"share_item_table": True}},
    "transformer": {"features": {"recent_items": 3}, "model": {"history_encoder": "transformer"}},
    "ensemble": {"features": {"recent_items": 2}, "model": {"members": 3}},
    # task=next_item, its causal encoder reading a table of its own / the item tower's
    "causal": {"task": "next_item", "model": {"history_encoder": "causal"}, "train": {"batch_size": 32},
               "loss": {"uniform_negatives": 16}},
    "causal_shared": {"task": "next_item", "features": {"share_item_table": True},
                      "model": {"history_encoder": "causal"}, "train": {"batch_size": 32}},
    # the user features added to the causal state instead of concatenated (model.user_join), the
    # history's mean beside it (model.history_mean)
    "causal_add": {"task": "next_item", "model": {"history_encoder": "causal", "user_join": "add",
                                                  "history_mean": True}, "train": {"batch_size": 32}},
}


_BUILT: dict[str, Path] = {}  # variant -> its config; each variant is trained once per session


def _build(tmp_path_factory, cli, name: str) -> Path:
    if name in _BUILT:
        return _BUILT[name]
    root = tmp_path_factory.mktemp(name)
    cfg = tiny_config(root)
    for section, values in VARIANTS[name].items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    cfg["train"]["epochs"] = 1
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    for verb in ("prepare", "train", "export"):
        # export.torchscript: the deprecated TorchScript tower beside query_tower.pt2, to compare the two
        result = cli(verb, "--config", path, *(("--set", "export.torchscript=true") if verb == "export" else ()),
                     cwd=root)
        assert result.returncode == 0, result.describe()
        if verb == "export":
            assert "query_tower.pt (TorchScript), which is deprecated" in result.stderr, result.describe()
    _BUILT[name] = path
    return path


def _variant(tmp_path_factory, cli, name: str):
    path = _build(tmp_path_factory, cli, name)
    root = path.parent

    from twotower_rec.config import load_config
    from twotower_rec.distributed.env import init_distributed, shutdown
    from twotower_rec.serving.exported import ExportedModel
    from twotower_rec.train.checkpoint import load_trained

    saved_env = dict(os.environ)
    env = init_distributed()
    try:
        model, data, _, trained_cfg = load_trained(root / "run" / "checkpoint", load_config(path).data.cache_dir, env)
        yield model, data, ExportedModel.load(root / "export"), trained_cfg
    finally:
        shutdown()
        os.environ.clear()
        os.environ.update(saved_env)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, cli):
    yield from _variant(tmp_path_factory, cli, "shared")


@pytest.fixture(scope="module")
def transformer(tmp_path_factory, cli):
    yield from _variant(tmp_path_factory, cli, "transformer")


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory, cli):
    yield from _variant(tmp_path_factory, cli, "ensemble")


@pytest.fixture(scope="module", params=["causal", "causal_shared", "causal_add"])
def causal(request, tmp_path_factory, cli):
    yield from _variant(tmp_path_factory, cli, request.param)


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory, cli):
    yield from _variant(tmp_path_factory, cli, request.param)


def test_history_uses_the_item_towers_item_id_table(shared):
    from twotower_rec.distributed.sharding import full_state_dict
    from twotower_rec.model.factory import new_model
    from twotower_rec.tasks import make_task

    model, data, _, trained_cfg = shared
    names = list(full_state_dict(model))
    assert any("t_item_id" in n for n in names), names
    assert not any("t_history" in n for n in names), names
    plain = new_model(trained_cfg.model, data.spec, make_task(trained_cfg), torch.device("cpu"))
    configs = {c.name: c.feature_names for c in plain.item_tower.embedding_bags.embedding_bag_configs()}
    assert configs["t_item_id"] == ["item_id", "history"]
    query_tables = {c.name for c in plain.query_tower.embedding_bags.embedding_bag_configs()}
    assert "t_item_id" not in query_tables
    assert plain.query_feature_order[-1] == "history"


def test_shared_table_gets_gradients_from_both_towers(shared):
    from twotower_rec.data.batches import Batcher
    from twotower_rec.distributed.sharding import full_state_dict
    from twotower_rec.model.factory import new_model
    from twotower_rec.tasks import make_task

    model, data, _, trained_cfg = shared
    plain = new_model(trained_cfg.model, data.spec, make_task(trained_cfg), torch.device("cpu"))
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


def test_exported_query_tower_and_recommend_equal_the_training_model(variant):
    from twotower_rec.data.batches import Batcher
    from twotower_rec.evaluation.ranking import catalog_embeddings, query_embeddings, rank_catalog, seen_items
    from twotower_rec.model.factory import towers

    model, data, exported, _ = variant
    encode_query, encode_items = towers(model)
    batcher = Batcher(data)
    codes = np.arange(1, data.spec.num_users + 1, dtype=np.int64)
    position = data.user_offsets[codes]
    with torch.no_grad():
        training = query_embeddings(encode_query, batcher, codes, position)
        item_emb = catalog_embeddings(encode_items, batcher)
        values, lengths, _, _ = exported.user_query([data.raw_user_ids[c - 1] for c in codes.tolist()])
        program = exported.query_tower(values, lengths)  # query_tower.pt2
        scripted = torch.jit.load(str(exported.directory / "query_tower.pt"))(values, lengths)  # export.torchscript
    assert torch.equal(program, scripted)  # torch.export computes what TorchScript did, bit for bit
    if exported.manifest["config"]["model"]["history_encoder"] == "bag":
        # nn.EmbeddingBag and TorchRec's kernels round the pooled sums apart: 6e-8 (1 ulp), TorchScript too
        torch.testing.assert_close(program, training, rtol=0, atol=1.2e-7)
    else:  # the transformer's fused layers (FusedTransformerPooling) and the causal encoder: bit for bit
        assert torch.equal(program, training)
    np.testing.assert_allclose(exported.item_embeddings.numpy(), item_emb[1:].numpy(), rtol=1e-5, atol=1e-6)

    top = rank_catalog(training, item_emb, 5, seen_items(data, codes, position), chunk=50)
    served = exported.recommend_users([data.raw_user_ids[c - 1] for c in codes.tolist()], k=5)
    for row, recs in zip(top.tolist(), served):
        assert [r.item for r in recs] == [str(data.raw_item_ids[c - 1]) for c in row]


def test_transformer_encoder_reads_the_history_through_an_embedding_collection(transformer):
    from twotower_rec.model.factory import new_model
    from twotower_rec.tasks import make_task

    model, data, exported, trained_cfg = transformer
    plain = new_model(trained_cfg.model, data.spec, make_task(trained_cfg), torch.device("cpu"))
    assert plain.query_feature_order[-1] == "history" and "recent_3" in plain.query_feature_order
    assert "history" not in plain.query_tower.feature_names
    assert exported.manifest["query_features"] == plain.query_feature_order
    # the raw-value path: a new user's liked items, oldest first, move the recommendation
    items = [str(x) for x in exported.item_ids.tolist()]
    a = exported.recommend_new_user(liked=items[:4], k=5)
    b = exported.recommend_new_user(liked=items[:4][::-1], k=5)  # same items, other order
    assert len(a) == 5 and [r.score for r in a] != [r.score for r in b]


def test_ensemble_serves_its_members_side_by_side(ensemble):
    """[B, K * D] embeddings: each member's unit vector / sqrt(K), so a score is the mean of the
    members' cosines; the export says how many members its vectors hold."""
    from twotower_rec.data.batches import Batcher
    from twotower_rec.evaluation.ranking import catalog_embeddings, query_embeddings

    model, data, exported, trained_cfg = ensemble
    inner = model.module
    members, dim = trained_cfg.model.members, trained_cfg.model.output_dim
    batcher = Batcher(data)
    codes = np.arange(1, data.spec.num_users + 1, dtype=np.int64)
    with torch.no_grad():
        query = query_embeddings(inner.encode_query, batcher, codes, data.user_offsets[codes])
        items = catalog_embeddings(inner.encode_items, batcher)[1:]
        own_query = [query_embeddings(m.encode_query, batcher, codes, data.user_offsets[codes]) for m in inner.members]
        own_items = [catalog_embeddings(m.encode_items, batcher)[1:] for m in inner.members]
    assert query.shape == (codes.size, members * dim) and items.shape[1] == members * dim
    torch.testing.assert_close(query.norm(dim=1), torch.ones(codes.size))
    mean_cosine = sum(q @ i.t() for q, i in zip(own_query, own_items)) / members
    torch.testing.assert_close(query @ items.t(), mean_cosine, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(own_query[0], own_query[1], atol=1e-3)  # members differ
    assert exported.manifest["members"] == members and exported.manifest["embedding_dim"] == members * dim


def test_ensemble_members_are_ordinary_runs_loaded_side_by_side(ensemble):
    """Member k is the run in <out_dir>/member<k> (seed train.seed + k, its own early stop);
    its best checkpoint, loaded alone, gives the k-th slice of the ensemble's embeddings."""
    from twotower_rec.data.batches import Batcher
    from twotower_rec.distributed.env import DistEnv
    from twotower_rec.evaluation.ranking import catalog_embeddings, query_embeddings
    from twotower_rec.train.checkpoint import load_trained

    model, data, _, trained_cfg = ensemble
    members, dim = trained_cfg.model.members, trained_cfg.model.output_dim
    out = Path(trained_cfg.train.out_dir)
    runs = [json.loads((out / "train_metrics.json").read_text())["member_runs"][k] for k in range(members)]
    assert [r["seed"] for r in runs] == [trained_cfg.train.seed + k for k in range(members)]
    batcher = Batcher(data)
    codes = np.arange(1, data.spec.num_users + 1, dtype=np.int64)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    with torch.no_grad():
        query = query_embeddings(model.module.encode_query, batcher, codes, data.user_offsets[codes])
        items = catalog_embeddings(model.module.encode_items, batcher)
    for k in range(members):
        member, _, meta, member_cfg = load_trained(out / f"member{k}" / "checkpoint", trained_cfg.data.cache_dir, env)
        assert member_cfg.model.members == 1 and member_cfg.train.seed == trained_cfg.train.seed + k
        assert meta["step"] == runs[k]["best_step"]
        with torch.no_grad():
            own_query = query_embeddings(member.module.encode_query, batcher, codes, data.user_offsets[codes])
            own_items = catalog_embeddings(member.module.encode_items, batcher)
            scale = members ** -0.5
            torch.testing.assert_close(query[:, k * dim:(k + 1) * dim], own_query * scale, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(items[:, k * dim:(k + 1) * dim], own_items * scale, rtol=1e-5, atol=1e-6)


def test_ensemble_resume_keeps_finished_members_and_retrains_changed_ones(cli, tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["model"]["members"] = 2
    cfg["train"].update({"max_steps": 6, "val_every_steps": 3})
    path = tmp_path / "ens.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    for args in (("prepare",), ("train",)):
        result = cli(*args, "--config", path, cwd=tmp_path)
        assert result.returncode == 0, result.describe()
    first = (tmp_path / "run" / "member1" / "checkpoint" / "meta.json").stat().st_mtime_ns
    result = cli("train", "--config", path, "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    assert result.stderr.count("finished earlier") == 2, result.stderr
    assert (tmp_path / "run" / "member1" / "checkpoint" / "meta.json").stat().st_mtime_ns == first
    result = cli("train", "--config", path, "--resume", "--set", "train.dense_lr=0.002", cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    assert "finished earlier" not in result.stderr
    assert (tmp_path / "run" / "member1" / "checkpoint" / "meta.json").stat().st_mtime_ns != first
    # the same config over re-prepared (different) data: the members are trained again
    result = cli("prepare", "--config", path, "--set", "data.synthetic.num_items=160", cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    result = cli("train", "--config", path, "--resume", "--set", "train.dense_lr=0.002", "--set",
                 "data.synthetic.num_items=160", cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    assert "finished earlier" not in result.stderr
    result = cli("train", "--config", path, "--resume", tmp_path / "run" / "last", cwd=tmp_path)
    assert result.returncode == 2 and "give --resume without a path" in result.stderr, result.describe()


def test_scripted_causal_tower_reproduces_evaluates_queries_exactly(causal):
    """The exported TorchScript tower runs the same causal encoder over the user's last events
    and takes the last position: bit for bit the query embeddings ``evaluate`` ranks with, for
    each test event (history strictly before it, given as raw values) and for known users
    served after all their events."""
    from twotower_rec.data.batches import Batcher
    from twotower_rec.data.splits import TEST
    from twotower_rec.evaluation.ranking import query_embeddings
    from twotower_rec.model.factory import towers

    model, data, exported, trained_cfg = causal
    assert trained_cfg.task == "next_item" and model.module.history.vectors > 0
    assert (model.module.history.shared_table is not None) == trained_cfg.features.share_item_table
    encode_query, _ = towers(model)
    batcher = Batcher(data)
    rows = data.rows(TEST)
    user = np.asarray(data.user)[rows]
    raw = {}
    for name in exported.manifest["query_features"]:
        if name == "user_id":
            raw[name] = [[str(data.raw_user_ids[u - 1])] for u in user.tolist()]
        elif name == "history":
            # raw ids of the events before the test one (a validation item unseen in training too)
            raw[name] = [[str(i) for i in data.raw_items_of_rows(np.arange(start, row)).tolist()]
                         for start, row in zip(data.user_offsets[user - 1], rows)]
        else:
            vocabulary = data.spec.vocabularies[name]
            raw[name] = [[str(vocabulary[c - 1])] if c > 0 else [] for c in data.user_features[name][user].tolist()]
    codes = np.arange(1, data.spec.num_users + 1, dtype=np.int64)
    with torch.no_grad():
        evaluated = query_embeddings(encode_query, batcher, user, rows)
        scripted = exported.query_tower.encode_raw(raw)
        known = query_embeddings(encode_query, batcher, codes, data.user_offsets[codes])
        values, lengths, _, _ = exported.user_query([data.raw_user_ids[c - 1] for c in codes.tolist()])
        served = exported.query_tower(values, lengths)
    assert torch.equal(scripted, evaluated), float((scripted - evaluated).abs().max())
    assert torch.equal(served, known), float((served - known).abs().max())
