"""What each option that no shipped config sets does (the others are shown by their own tests):
every test here fails when its option stops having its effect."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import run_cli, tiny_config

from twotower_rec.config import DataConfig, EvalConfig, LossConfig, ShardingConfig, SyntheticConfig, TrainConfig
from twotower_rec.data.synthetic import synthetic


def test_data_genres_separator_splits_the_genres_column(tmp_path):
    from twotower_rec.data.sources import load_raw

    pd.DataFrame({"user": [1, 1, 2], "item": [10, 11, 10], "timestamp": [1, 2, 3]}).to_csv(tmp_path / "e.csv",
                                                                                           index=False)
    pd.DataFrame({"item": [10, 11], "genres": ["a;b", "c|d"]}).to_csv(tmp_path / "i.csv", index=False)
    cfg = DataConfig(source="interactions", interactions_path=str(tmp_path / "e.csv"),
                     items_path=str(tmp_path / "i.csv"), genres_separator=";")
    genres = load_raw(cfg).items.set_index("item")["genres"]
    assert list(genres[10]) == ["a", "b"] and list(genres[11]) == ["c|d"]


def test_synthetic_num_genres_bounds_the_genre_vocabulary():
    items = synthetic(SyntheticConfig(num_users=30, num_items=200, num_genres=5)).items
    assert {g for row in items["genres"] for g in row} <= {f"genre_{g:02d}" for g in range(5)}
    assert len({g for row in synthetic(SyntheticConfig(num_users=30, num_items=200)).items["genres"]
                for g in row}) > 5


@pytest.mark.parametrize("stay", [0.0, 1.0])
def test_synthetic_stay_probability_keeps_a_user_in_one_cluster(stay):
    """Every item of a cluster carries its primary genre: with stay_probability 1 each user's
    events all come from the cluster drawn first, so they share a genre; with 0 they mix."""
    raw = synthetic(SyntheticConfig(num_users=60, num_items=400, num_clusters=6, clusters_per_user=2,
                                    stay_probability=stay, seed=1))
    genres = raw.items.set_index("item")["genres"].map(set)
    shared = raw.interactions.groupby("user")["item"].apply(lambda items: bool(set.intersection(*genres[items])))
    assert shared.all() if stay == 1.0 else shared.mean() < 0.8


def test_loss_streaming_hash_size_is_the_estimator_table():
    from twotower_rec.losses.softmax import LossContext

    ctx = LossContext(LossConfig(logq="streaming", streaming_hash_size=4), np.ones(10), 4, torch.device("cpu"))
    assert ctx.streaming.gap.numel() == 4
    ctx.streaming.update(torch.tensor([1]), 1)
    ctx.streaming.update(torch.tensor([1]), 3)
    ids = torch.tensor([1, 5])  # 5 lands in 1's slot of a 4-slot table (Knuth's hash is odd)
    assert int(ctx.streaming._slots(ids)[0]) == int(ctx.streaming._slots(ids)[1])
    assert torch.equal(ctx.streaming.probability(ids)[0], ctx.streaming.probability(ids)[1])


def test_train_warmup_steps_and_lr_schedule_shape_the_dense_learning_rate():
    from twotower_rec.train.optim import lr_factor

    warm = TrainConfig(warmup_steps=4)
    assert [lr_factor(s, 10, warm) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cosine = TrainConfig(lr_schedule="cosine")
    factors = [lr_factor(s, 10, cosine) for s in range(10)]
    assert factors[0] == 1.0 and all(a > b for a, b in zip(factors, factors[1:])) and factors[-1] < 0.05


def test_sharding_cache_load_factor_is_the_uvm_cache_share():
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from twotower_rec.distributed.sharding import _constraints

    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10,
                                                            feature_names=["f"])], device=torch.device("meta"))
    constraints = _constraints({"ebc": ebc}, ShardingConfig(compute_kernel="fused_uvm_caching",
                                                            cache_load_factor=0.35))
    assert constraints["t"].cache_params.load_factor == 0.35
    assert _constraints({"ebc": ebc}, ShardingConfig())["t"].cache_params is None


def test_eval_user_chunk_changes_no_ranking():
    """eval.user_chunk bounds how many queries are scored against the catalog at once (memory):
    the ranked lists are the same at any chunk."""
    from twotower_rec.evaluation.ranking import rank_catalog

    torch.manual_seed(0)
    query, items = torch.randn(23, 4), torch.randn(40, 4)
    seen = (np.arange(24) * 2, np.arange(1, 47) % 40)
    assert EvalConfig().user_chunk == 1024
    assert torch.equal(rank_catalog(query, items, 5, seen, chunk=3), rank_catalog(query, items, 5, seen, chunk=1024))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny config, prepared once."""
    root = tmp_path_factory.mktemp("options")
    cfg = tiny_config(root)
    cfg["train"].update({"epochs": 1, "max_steps": 6})
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    result = run_cli("prepare", "--config", path, cwd=root)
    assert result.returncode == 0, result.describe()
    return root, path


def _losses(root, path, name: str, *sets: str) -> tuple[list[float], str]:
    out = root / name
    args = [a for s in (f"train.out_dir={out}", *sets) for a in ("--set", s)]
    result = run_cli("train", "--config", path, *args, cwd=root)
    assert result.returncode == 0, result.describe()
    return json.loads((out / "train_metrics.json").read_text())["losses"], result.stderr


def test_train_bf16_and_warmup_change_the_steps_and_num_threads_is_used(tiny):
    root, path = tiny
    plain, log = _losses(root, path, "plain")
    assert "2 threads" in log.splitlines()[0]  # the device line: torch's default here (OMP_NUM_THREADS=2)
    bf16, _ = _losses(root, path, "bf16", "train.bf16=true")
    assert bf16 != plain and np.allclose(bf16, plain, rtol=5e-2)  # rounded towers, the same training
    warm, _ = _losses(root, path, "warm", "train.warmup_steps=6")
    assert warm[0] == plain[0] and warm[1:] != plain[1:]  # the first step's loss is before any update
    _, log = _losses(root, path, "one-thread", "train.num_threads=1")
    assert "1 thread" in log.splitlines()[0]


def test_eval_max_users_samples_the_events(tiny, cli):
    root, path = tiny
    _losses(root, path, "for-eval")
    out = root / "sample.json"
    result = cli("evaluate", "--config", path, "--set", f"train.out_dir={root / 'for-eval'}", "--set",
                 "eval.max_users=40", "--output", out, cwd=root)
    assert result.returncode == 0, result.describe()
    assert json.loads(out.read_text())["model"]["events"] == 40


def test_export_hnsw_parameters_and_recall_queries_reach_the_index_and_manifest(tiny, cli):
    from twotower_rec.serving import ann

    root, path = tiny
    _losses(root, path, "for-export")
    export = root / "hnsw-export"
    result = cli("export", "--config", path, "--set", f"train.out_dir={root / 'for-export'}", "--out", export,
                 "--set", "export.hnsw_m=8", "--set", "export.hnsw_ef_construction=20", "--set",
                 "export.hnsw_ef_search=9", "--set", "export.recall_queries=17", cwd=root)
    assert result.returncode == 0, result.describe()
    manifest = json.loads((export / "manifest.json").read_text())["ann"]
    assert manifest["recall_queries"] == 17
    assert (manifest["params"]["hnsw_m"], manifest["params"]["hnsw_ef_construction"]) == (8, 20)
    index = ann.read(export / "items.faiss", manifest["params"])
    assert index.hnsw.efSearch == 9 and index.hnsw.efConstruction == 20
