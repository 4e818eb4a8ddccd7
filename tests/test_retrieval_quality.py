"""logQ correction, mixed negatives, the streaming frequency estimator, recent-item features
and the classic baselines, each against a hand computation."""

from __future__ import annotations

import math
import tempfile

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from twotower_rec.config import DataConfig, EvalConfig, FeaturesConfig, LossConfig
from twotower_rec.data import splits
from twotower_rec.data.batches import Batcher
from twotower_rec.data.prepared import prepare
from twotower_rec.data.raw import RawData
from twotower_rec.evaluation import baselines
from twotower_rec.losses.softmax import LossContext, StreamingFrequency, in_batch_softmax


def test_logq_changes_the_loss_exactly_as_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    i = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    log_q = torch.tensor([math.log(0.5), math.log(0.1)], dtype=torch.float64)
    # t = 1: row 0 logits [1 - ln .5, .6 - ln .1], row 1 [0 - ln .5, .8 - ln .1]; positives on the diagonal
    r0 = [1 - math.log(0.5), 0.6 - math.log(0.1)]
    r1 = [0 - math.log(0.5), 0.8 - math.log(0.1)]
    expected = 0.5 * (-(r0[0] - math.log(math.exp(r0[0]) + math.exp(r0[1])))
                      - (r1[1] - math.log(math.exp(r1[0]) + math.exp(r1[1]))))
    got = in_batch_softmax(q, i, 1.0, log_q=log_q).item()
    assert got == pytest.approx(expected, rel=1e-12)
    assert got != pytest.approx(in_batch_softmax(q, i, 1.0).item(), rel=1e-3)
    # a constant log_q shifts every logit alike: no change
    same = in_batch_softmax(q, i, 1.0, log_q=torch.full((2,), 3.0, dtype=torch.float64)).item()
    assert same == pytest.approx(in_batch_softmax(q, i, 1.0).item(), rel=1e-12)


def test_logq_and_masking_together_with_extra_uniform_candidates():
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 4, generator=gen, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(5, 4, generator=gen, dtype=torch.float64), dim=-1)  # 3 in-batch + 2 uniform
    ids = torch.tensor([7, 8, 7, 9, 8])
    log_q = torch.tensor([-1.0, -2.0, -1.0, -3.0, -3.0], dtype=torch.float64)
    t = 0.5
    total = 0.0
    for b in range(3):
        kept = [j for j in range(5) if j == b or ids[j] != ids[b]]
        logits = [(q[b] @ c[j]).item() / t - log_q[j].item() for j in kept]
        pos = (q[b] @ c[b]).item() / t - log_q[b].item()
        total += -(pos - math.log(sum(math.exp(x) for x in logits)))
    assert in_batch_softmax(q, c, t, ids, 0, log_q).item() == pytest.approx(total / 3, rel=1e-12)


def _context(counts, logq="counts", batch_size=4, uniform=2):
    cfg = LossConfig(logq=logq, uniform_negatives=uniform)
    return LossContext(cfg, np.asarray(counts), batch_size, torch.device("cpu"))


def test_mixed_negatives_carry_their_own_sampling_probabilities():
    counts = [0, 6, 3, 1]  # code 0 is OOV; 10 training events
    ctx = _context(counts, batch_size=4, uniform=2)
    got = ctx.candidate_log_q(torch.tensor([1, 2, 1, 3]), num_uniform=2)
    # in-batch: expected count in a global batch of 4 = 4 * count / 10; uniform: 2 / 3 items
    expected = [math.log(4 * 6 / 10), math.log(4 * 3 / 10), math.log(4 * 6 / 10), math.log(4 * 1 / 10),
                math.log(2 / 3), math.log(2 / 3)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    assert _context(counts, logq="none").candidate_log_q(torch.tensor([1]), 0) is None


def test_streaming_estimator_learns_the_gap():
    est = StreamingFrequency(hash_size=1 << 10, alpha=0.1)
    for step in range(1, 201):
        ids = [5] + ([6] if step % 4 == 0 else [])
        est.update(torch.tensor(ids), step)
    p = est.probability(torch.tensor([5, 6, 99]))
    assert p[0].item() == pytest.approx(1.0, abs=1e-9)  # every step
    assert p[1].item() == pytest.approx(0.25, rel=1e-6)  # every 4th step
    assert p[2].item() == 1.0  # never seen: no correction information yet


# --- data with a known answer ----------------------------------------------------------------


def _hand_data(tmp: str, recent: int = 0):
    # user 1: a b c d e ; user 2: a c b d e ; user 3: b c a e d (times ascending, items a..e = 1..5)
    seqs = {1: [1, 2, 3, 4, 5], 2: [1, 3, 2, 4, 5], 3: [2, 3, 1, 5, 4]}
    rows = [(u, i, t) for u, items in seqs.items() for t, i in enumerate(items)]
    inter = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    inter["rating"] = np.float32(4.0)
    raw = RawData(inter, pd.DataFrame({"user": [1, 2, 3]}), pd.DataFrame({"item": [1, 2, 3, 4, 5]}), name="hand")
    features = FeaturesConfig(user_features=["user_id"], item_features=["item_id"], item_dense=[], history_length=3,
                              recent_items=recent)
    return prepare(raw, DataConfig(cache_dir=tmp, min_interactions=3), features)


def test_recent_item_features_are_the_last_items_before_the_event():
    with tempfile.TemporaryDirectory() as tmp:
        data = _hand_data(tmp, recent=2)
        assert [f.name for f in data.spec.query_features] == ["user_id", "history", "recent_1", "recent_2"]
        assert {f.table for f in data.spec.query_features[1:]} == {"t_history"}
        rows = np.arange(data.num_rows)
        feats = Batcher(data).batch(rows).query_features.to_dict()
        item, user = np.asarray(data.item), np.asarray(data.user)
        for b, row in enumerate(rows.tolist()):
            start = data.user_offsets[user[row] - 1]
            before = item[start:row].tolist()
            for m in (1, 2):
                got = feats[f"recent_{m}"].values()[feats[f"recent_{m}"].offsets()[b]].item()
                assert got == (before[-m] if len(before) >= m else 0), (row, m)


def test_baselines_against_hand_computations():
    with tempfile.TemporaryDirectory() as tmp:
        data = _hand_data(tmp)
        cfg = EvalConfig(ease_lambda=1.0, transition_last=2, transition_decay=0.5)
        train = np.asarray(data.split) == splits.TRAIN
        item, user = np.asarray(data.item), np.asarray(data.user)
        v = data.spec.num_items
        x = np.zeros((data.spec.num_users + 1, v + 1))
        x[user[train], item[train]] = 1
        # item-kNN: cosine of item columns, no self-similarity
        gram = x.T @ x
        norms = np.sqrt(np.maximum(np.diag(gram), 1e-12))
        knn = gram / norms[None] / norms[:, None]
        np.fill_diagonal(knn, 0)
        np.testing.assert_allclose(baselines.item_item("itemknn", data, cfg).numpy(), knn, atol=1e-6)
        # EASE closed form
        p = np.linalg.inv(gram + 1.0 * np.eye(v + 1))
        b = -p / np.diag(p)[None]
        np.fill_diagonal(b, 0)
        np.testing.assert_allclose(baselines.item_item("ease", data, cfg).numpy(), b, atol=1e-5)
        # transitions: training pairs (a->b, b->c) (a->c, c->b) (b->c, c->a) in raw ids
        t = baselines.item_item("transition", data, cfg).numpy()
        code = {raw: c for c, raw in enumerate(data.raw_item_ids.tolist(), start=1)}
        assert t[code[2], code[3]] == pytest.approx(1.0)  # b is always followed by c
        assert t[code[1], code[2]] == pytest.approx(0.5) and t[code[1], code[3]] == pytest.approx(0.5)
        assert t[code[3], code[2]] == pytest.approx(0.5) and t[code[3], code[1]] == pytest.approx(0.5)
        # ranking: user 1's test event (e) after history a b c d. d is unknown to training
        # (code 0, never scored), so with the last 2 items the transition query is c at 0.5.
        rows = data.rows(splits.TEST)
        first = rows[:1]
        h = baselines._history_weights("transition", data, user[first], first, cfg)
        assert h[0, code[3]].item() == pytest.approx(0.5) and h.sum().item() == pytest.approx(0.5)
        binary = baselines._history_weights("itemknn", data, user[first], first, cfg)
        assert sorted(torch.nonzero(binary[0]).flatten().tolist()) == sorted(code[i] for i in (1, 2, 3))
        top = baselines.rank_baseline("transition", data, rows, cfg, k=5)
        assert top.shape[0] == 3
        for r, ranked in zip(rows.tolist(), top.tolist()):
            seen = set(item[data.user_offsets[user[r] - 1]:r].tolist())
            assert not seen & {c for c in ranked if c > 0}


@pytest.mark.parametrize("objective, metric", [("bce", "auroc"), ("mse", "rmse")])
def test_pointwise_objectives_train_and_their_metric_improves(pipeline, cli, tmp_path, objective, metric):
    import json

    out = tmp_path / objective
    result = cli("train", "--config", pipeline.config_path, "--set", f"train.out_dir={out}",
                 "--set", "task=pointwise", "--set", f"pointwise.objective={objective}", "--set", "train.max_steps=0",
                 "--set", "train.val_every_steps=20", "--set", "train.dense_lr=0.01",
                 "--set", f"train.select_metric={'auroc' if objective == 'bce' else 'neg_rmse'}", cwd=pipeline.root)
    assert result.returncode == 0, result.describe()
    trained = json.loads((out / "train_metrics.json").read_text())
    losses = trained["losses"]  # BCE, or MSE = RMSE^2 on the training batches
    assert np.mean(losses[-5:]) < 0.95 * np.mean(losses[:5]), losses
    if objective == "bce":  # held-out AUROC improves too (the tiny data's ratings are too noisy for RMSE)
        history = [v[metric] for v in trained["validation"]]
        assert len(history) >= 2 and history[-1] > history[0], history
    evaluated = cli("evaluate", "--config", pipeline.config_path, "--set", f"train.out_dir={out}", cwd=pipeline.root)
    assert evaluated.returncode == 0, evaluated.describe()
    assert f"pointwise ({objective})" in evaluated.stdout
    pointwise = json.loads((out / "eval_test.json").read_text())["pointwise"]
    assert metric in pointwise and pointwise["pairs"] > 0


def test_learned_temperature_moves_and_masking_can_be_turned_off(pipeline, cli, tmp_path):
    import json

    runs = {}
    for name, extra in {"learned": ["--set", "loss.learn_temperature=true"],
                        "unmasked": ["--set", "loss.mask_accidental_hits=false"]}.items():
        out = tmp_path / name
        result = cli("train", "--config", pipeline.config_path, "--set", f"train.out_dir={out}",
                     "--set", "train.max_steps=6", "--set", "train.dense_lr=0.01", *extra, cwd=pipeline.root)
        assert result.returncode == 0, result.describe()
        runs[name] = json.loads((out / "train_metrics.json").read_text())
    learned = runs["learned"]["learned_temperature"]
    assert 0.01 <= learned <= 1.0 and learned != pytest.approx(0.05, rel=1e-4)  # tiny config starts at 0.05
    # same seed, same batches: only the masking differs, so the losses differ (the tiny catalog repeats items)
    assert runs["unmasked"]["losses"] != pipeline.train_metrics["losses"][:6]


def test_logq_weight_scales_the_correction():
    counts = [0, 6, 3, 1]
    ids = torch.tensor([1, 2, 1, 3])
    full = _context(counts).candidate_log_q(ids, num_uniform=2)
    ctx = _context(counts)
    ctx.cfg.logq_weight = 0.5
    np.testing.assert_allclose(ctx.candidate_log_q(ids, num_uniform=2).numpy(), 0.5 * full.numpy(), rtol=1e-6)


def _shard_one_table(features: list[str], decay: float, table: str = "t_h"):
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    from twotower_rec.config import ShardingConfig, TrainConfig
    from twotower_rec.distributed.env import init_distributed
    from twotower_rec.distributed.sharding import shard_model

    env = init_distributed()
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t_h", embedding_dim=8, num_embeddings=6,
                                                            feature_names=features)], device=torch.device("meta"))
    return shard_model(ebc, env, ShardingConfig(), TrainConfig(sparse_lr=0.1, table_weight_decay={table: decay}))


@pytest.fixture
def process_group():
    import os

    from twotower_rec.distributed.env import shutdown

    saved_env = dict(os.environ)
    yield
    shutdown()
    os.environ.clear()
    os.environ.update(saved_env)


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_table_weight_decay_is_applied_by_the_fused_row_update(process_group, decay):
    """With a zero loss gradient the L2 term is the whole gradient, g = decay * w, and the
    row-wise Adagrad step is lr * g / sqrt(mean(g^2)) = lr * w / rms(w) for each touched row;
    rows the batch does not touch, and every row without decay, keep their values."""
    from torchrec import KeyedJaggedTensor

    from twotower_rec.distributed.sharding import full_state_dict

    model = _shard_one_table(["history", "recent_1"], decay)
    key = next(k for k in full_state_dict(model) if k.endswith("t_h.weight"))
    before = full_state_dict(model)[key].clone()
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["history", "recent_1"], values=torch.tensor([1, 3, 3, 4]),
                                              lengths=torch.tensor([2, 0, 1, 1]))
    (model(kjt).values() * 0.0).sum().backward()
    after = full_state_dict(model)[key]
    expected = before.clone()
    if decay > 0:
        for row in (1, 3, 4):
            w = before[row]
            expected[row] = w - 0.1 * w / w.pow(2).mean().sqrt()
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-6)


def test_table_weight_decay_names_what_fbgemm_on_cpu_would_ignore(process_group):
    from twotower_rec.errors import ConfigError

    with pytest.raises(ConfigError, match="read by one feature"):
        _shard_one_table(["history"], 0.01)
    with pytest.raises(ConfigError, match="no table 't_x'; the tables are \\['t_h'\\]"):
        _shard_one_table(["history", "recent_1"], 0.01, table="t_x")
