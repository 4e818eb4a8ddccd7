"""End to end on the session's tiny model: training, evaluation, determinism, export and serving."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from twotower_rec.data.prepared import PreparedData
from twotower_rec.data.splits import TEST, TRAIN


def test_prepare_summary_matches_the_cache(pipeline):
    summary = json.loads(pipeline.prepare.stdout.strip().splitlines()[-1])
    data = PreparedData(pipeline.cache_dir)
    split = np.asarray(data.split)
    assert summary["rows"] == data.num_rows == summary["train"] + summary["validation"] + summary["test"]
    assert summary["train"] == int((split == TRAIN).sum())
    assert summary["users"] == data.spec.num_users == summary["test"] == summary["validation"]
    assert summary["items"] == data.spec.num_items == len(data.raw_item_ids)


def test_training_loss_decreases(pipeline):
    metrics = pipeline.train_metrics
    losses = metrics["losses"]
    cfg = pipeline.load_config()
    train_rows = int((np.asarray(PreparedData(pipeline.cache_dir).split) == TRAIN).sum())
    assert metrics["steps"] == len(losses) == max(1, train_rows // cfg.train.batch_size) * cfg.train.epochs
    assert all(math.isfinite(x) for x in losses)
    assert metrics["final_loss"] == losses[-1]
    n = max(1, len(losses) // 5)
    first, last = np.mean(losses[:n]), np.mean(losses[-n:])
    assert last < first, f"loss did not decrease: first 20% {first:.4f}, last 20% {last:.4f}"
    # a checkpoint was written beside the metrics
    assert (pipeline.out_dir / "checkpoint" / "meta.json").is_file()


def test_model_beats_most_popular(pipeline):
    results = pipeline.eval_results
    cfg = pipeline.load_config()
    assert set(results) == {"model", "popularity", "checkpoint"}  # and the checkpoint it scored
    for name in ("model", "popularity"):
        for k in cfg.eval.ks:
            for metric in ("recall", "hr", "ndcg"):
                assert 0.0 <= results[name][f"{metric}@{k}"] <= 1.0
        assert 0.0 <= results[name]["mrr"] <= 1.0
    assert results["model"]["recall@50"] > results["popularity"]["recall@50"]
    assert "Recall@50" in pipeline.evaluate.stdout
    assert f"{results['model']['recall@50']:.4f}" in pipeline.evaluate.stdout


def _retrievable_fraction(data: PreparedData) -> float:
    """Share of test events whose item can be retrieved at all: known in training (code > 0)
    and not already seen by the user (seen items are filtered)."""
    item = np.asarray(data.item)
    rows = data.rows(TEST)
    ok = 0
    for row in rows.tolist():
        start = data.user_offsets[np.asarray(data.user)[row] - 1]
        target = item[row]
        ok += int(target > 0 and target not in item[start:row])
    return ok / rows.size


def test_metrics_are_consistent_and_bounded_by_what_can_be_retrieved(pipeline):
    results = pipeline.eval_results
    cfg = pipeline.load_config()
    data = PreparedData(pipeline.cache_dir)
    assert cfg.eval.filter_seen
    ks = sorted(cfg.eval.ks)
    bound = _retrievable_fraction(data)
    assert bound < 1.0  # the tiny data has held-out items never seen in training
    for name in ("model", "popularity"):
        m = results[name]
        assert m["users"] == data.rows(TEST).size
        recalls = [m[f"recall@{k}"] for k in ks]
        assert recalls == sorted(recalls), f"{name}: recall not monotone in k"
        for k in ks:
            assert m[f"ndcg@{k}"] <= m[f"recall@{k}"] + 1e-6
            assert m[f"recall@{k}"] <= bound + 1e-6, (
                f"{name} recall@{k} = {m[f'recall@{k}']:.4f} exceeds the share of retrievable "
                f"test items {bound:.4f} (catalog has {data.spec.num_items} items)")


def test_training_is_deterministic_given_the_seed(pipeline, cli, tmp_path):
    runs = []
    for name in ("a", "b"):
        result = cli("train", "--config", pipeline.config_path, "--set", "train.max_steps=6",
                     "--set", f"train.out_dir={tmp_path / name}", cwd=tmp_path)
        assert result.returncode == 0, result.describe()
        runs.append(json.loads((tmp_path / name / "train_metrics.json").read_text())["losses"])
    assert len(runs[0]) == 6
    assert runs[0] == runs[1]
    # max_steps only stops early: the same first steps as the full session run
    assert runs[0] == pipeline.train_metrics["losses"][:6]


# --- in process: the trained model beside the export ----------------------------------------------


@pytest.fixture(scope="module")
def trained(pipeline):
    from twotower_rec.data.batches import Batcher
    from twotower_rec.distributed.env import init_distributed, shutdown
    from twotower_rec.evaluation.ranking import catalog_embeddings
    from twotower_rec.model.factory import towers
    from twotower_rec.train.checkpoint import load_trained

    saved_env = dict(os.environ)
    cfg = pipeline.load_config()
    env = init_distributed()
    try:
        model, data, meta, trained_cfg = load_trained(pipeline.out_dir / "checkpoint", cfg.data.cache_dir, env)
        query_tower, item_tower = towers(model)
        batcher = Batcher(data)
        with torch.no_grad():
            item_emb = catalog_embeddings(item_tower, batcher)
        yield SimpleNamespace(cfg=cfg, model=model, data=data, meta=meta, trained_cfg=trained_cfg,
                              query_tower=query_tower, item_tower=item_tower, batcher=batcher, item_emb=item_emb)
    finally:
        shutdown()
        os.environ.clear()
        os.environ.update(saved_env)


@pytest.fixture(scope="module")
def exported(pipeline):
    from twotower_rec.serving.exported import ExportedModel

    return ExportedModel.load(pipeline.export_dir)


def test_checkpoint_config_is_the_training_config(trained, pipeline):
    assert trained.trained_cfg.model == trained.cfg.model
    assert trained.trained_cfg.features == trained.cfg.features
    # The checkpoint kept is the one best on validation (train.select_metric), not the last step.
    metrics = pipeline.train_metrics
    assert trained.meta["step"] == metrics["best_step"]
    scores = {v["step"]: v["ndcg@10"] for v in metrics["validation"]}
    assert scores[metrics["best_step"]] == max(scores.values())


def test_in_process_evaluation_matches_the_cli_json(trained, pipeline):
    from twotower_rec.evaluation.ranking import evaluate

    results = evaluate(trained.query_tower, trained.item_tower, trained.data, trained.batcher, trained.cfg.eval,
                       TEST, seed=trained.cfg.train.seed)
    saved = pipeline.eval_results
    for name in ("model", "popularity"):
        for key, value in saved[name].items():
            assert results[name][key] == pytest.approx(value, abs=1e-6), (name, key)


def test_export_recommend_equals_evaluation_top_k(trained, exported):
    from twotower_rec.evaluation.ranking import query_embeddings, rank_catalog, seen_items

    data, k = trained.data, 10
    codes = np.arange(1, data.spec.num_users + 1, dtype=np.int64)
    position = data.user_offsets[codes]  # after ALL the user's interactions
    query = query_embeddings(trained.query_tower, trained.batcher, codes, position)
    top = rank_catalog(query, trained.item_emb, k, seen_items(data, codes, position), chunk=37)
    served = exported.recommend_users([data.raw_user_ids[c - 1] for c in codes.tolist()], k=k)
    assert len(served) == codes.size
    for code, row, recs in zip(codes.tolist(), top.tolist(), served):
        expected = [str(data.raw_item_ids[c - 1]) for c in row]
        assert [r.item for r in recs] == expected, f"user code {code}"
        expected_scores = (query[code - 1] @ trained.item_emb[row].t()).tolist()
        np.testing.assert_allclose([r.score for r in recs], expected_scores, rtol=1e-5, atol=1e-6)
        # never an item the user already interacted with
        history = set(np.asarray(data.item)[data.user_offsets[code - 1]:data.user_offsets[code]].tolist())
        assert not {c for c in row} & history

    # a single user by its raw id, given as a string (as on the command line) or as the raw value
    raw = data.raw_user_ids[4]
    by_str = exported.recommend_user(str(raw), k=k)
    assert [r.item for r in by_str] == [r.item for r in served[4]]
    assert [r.item for r in exported.recommend_user(raw, k=3)] == [r.item for r in served[4]][:3]


def test_exported_query_tower_equals_training_query_embedding(trained, exported):
    from twotower_rec.evaluation.ranking import query_embeddings

    data = trained.data
    codes = np.arange(1, data.spec.num_users + 1, dtype=np.int64)
    values, lengths, _, _ = exported.user_query([data.raw_user_ids[c - 1] for c in codes.tolist()])
    with torch.no_grad():
        program = exported.query_tower(values, lengths)  # query_tower.pt2
    training = query_embeddings(trained.query_tower, trained.batcher, codes, data.user_offsets[codes])
    assert program.shape == training.shape == (codes.size, trained.cfg.model.output_dim)
    # nn.EmbeddingBag and TorchRec's kernels round the pooled sums apart: 1 ulp (6e-8) measured, TorchScript too
    torch.testing.assert_close(program, training, rtol=0, atol=1.2e-7)


def _rows(values, lengths, start: int, stop: int):
    """Rows ``start:stop`` of the query tower's inputs (per feature: values back to back, per-row counts)."""
    out_values, out_lengths = [], []
    for value, length in zip(values, lengths):
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(length, 0)])
        out_values.append(value[offsets[start]:offsets[stop]])
        out_lengths.append(length[start:stop])
    return out_values, out_lengths


def test_the_program_equals_its_eager_tower_at_any_batch_size(trained, exported):
    """query_tower.pt2 was traced on EXAMPLE_ROWS rows with a dynamic batch size and value counts: at
    every other batch size, and on a batch without any history value, it computes what the eager
    tower it was exported from computes on the same rows, bit for bit."""
    from twotower_rec.distributed.sharding import full_state_dict
    from twotower_rec.export.query_encoder import EXAMPLE_ROWS, build_query_tower
    from twotower_rec.model.factory import new_model
    from twotower_rec.tasks import make_task

    spec = trained.data.spec
    plain = new_model(trained.trained_cfg.model, spec, make_task(trained.trained_cfg), torch.device("cpu")).eval()
    plain.load_state_dict(full_state_dict(trained.model))
    eager = build_query_tower(plain, spec.query_features)
    users = [str(u) for u in exported.users["raw_user_ids"].tolist()]
    values, lengths, _, _ = exported.user_query(users)
    names = exported.manifest["query_features"]
    assert "history" in names
    start = 0
    with torch.no_grad():
        for size in (1, 2, 5, 8, 64, len(users) - 80):
            assert size != EXAMPLE_ROWS
            part_values, part_lengths = _rows(values, lengths, start, start + size)
            program = exported.query_tower(part_values, part_lengths)
            assert program.shape == (size, exported.manifest["embedding_dim"])
            assert torch.equal(program, eager(part_values, part_lengths)), size
            start = (start + size) % (len(users) - 64)
        empty = [torch.zeros(0, dtype=torch.long) if n == "history" else v[:4] for n, v in zip(names, values)]
        counts = [torch.zeros(4, dtype=torch.long) if n == "history" else c[:4] for n, c in zip(names, lengths)]
        no_history = exported.query_tower(empty, counts)
        assert torch.equal(no_history, eager(empty, counts))
        assert not torch.equal(no_history, exported.query_tower(*_rows(values, lengths, 0, 4)))


def test_exported_item_embeddings_equal_the_evaluation_catalog(trained, exported):
    data = trained.data
    # the exported catalog is the evaluation catalog without the OOV row
    np.testing.assert_allclose(exported.item_embeddings.numpy(), trained.item_emb[1:].numpy(), rtol=1e-5, atol=1e-6)
    assert [str(x) for x in exported.item_ids.tolist()] == [str(x) for x in data.raw_item_ids.tolist()]
    norms = np.linalg.norm(exported.item_embeddings.numpy(), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_sharded_towers_equal_unsharded_towers_with_the_same_weights(trained):
    """Export and serving rebuild the towers unsharded from the gathered weights; the sharded
    (training / evaluation) towers must compute the same function, feature by feature."""
    from twotower_rec.distributed.sharding import full_state_dict
    from twotower_rec.model.factory import new_model
    from twotower_rec.tasks import make_task

    data, spec = trained.data, trained.data.spec
    plain = new_model(trained.trained_cfg.model, spec, make_task(trained.trained_cfg), torch.device("cpu")).eval()
    plain.load_state_dict(full_state_dict(trained.model))
    items = np.arange(spec.num_items + 1, dtype=np.int64)
    kjt, dense = trained.batcher.item_features(items)
    with torch.no_grad():
        sharded_pooled = trained.model.module.item_tower.embedding_bags(kjt)
        if hasattr(sharded_pooled, "wait"):  # a sharded module returns a lazy awaitable
            sharded_pooled = sharded_pooled.wait()
        plain_pooled = plain.item_tower.embedding_bags(kjt)
        for name in spec.item_keys:  # each feature's pooled embedding agrees: the weights are the same
            torch.testing.assert_close(sharded_pooled[name], plain_pooled[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            trained.model.module.item_tower(kjt, dense), plain.item_tower(kjt, dense), rtol=1e-5, atol=1e-6,
            msg=lambda m: (f"{m}\nsharded pooled feature order {sharded_pooled.keys()}, "
                           f"unsharded {plain_pooled.keys()}"))
        codes = np.arange(1, spec.num_users + 1, dtype=np.int64)
        qkjt = trained.batcher.query_features(codes, data.user_offsets[codes])
        no_dense = torch.zeros(codes.size, 0)
        torch.testing.assert_close(trained.model.module.query_tower(qkjt, no_dense), plain.query_tower(qkjt, no_dense),
                                   rtol=1e-5, atol=1e-6)


def test_recommend_cli_json_matches_the_api(pipeline, cli, exported):
    data = PreparedData(pipeline.cache_dir)
    raw = str(data.raw_user_ids[0])
    result = cli("recommend", "--export", pipeline.export_dir, "--user", raw, "-k", "5", "--json")
    assert result.returncode == 0, result.describe()
    payload = json.loads(result.stdout)
    assert payload["user"] == raw
    assert [x["item"] for x in payload["items"]] == [r.item for r in exported.recommend_user(raw, k=5)]
    assert len(payload["items"]) == 5
    scores = [x["score"] for x in payload["items"]]
    assert scores == sorted(scores, reverse=True)


def test_recommend_loads_only_the_export_without_torchrec(pipeline):
    """Serving needs the export directory alone: neither TorchRec nor fbgemm is imported."""
    data = PreparedData(pipeline.cache_dir)
    script = (
        "import sys\n"
        "from twotower_rec.cli import main\n"
        f"code = main(['recommend', '--export', {str(pipeline.export_dir)!r}, '--user', {str(data.raw_user_ids[1])!r}])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torchrec', 'fbgemm_gpu'))\n"
        "print('LOADED', loaded, 'EXIT', code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED [] EXIT 0" in proc.stdout, proc.stdout
    assert "top 10 items for user" in proc.stdout
