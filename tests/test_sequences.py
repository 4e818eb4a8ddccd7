"""The next-item task (``task: next_item``, ``model.history_encoder: causal``).

No leak: the causal encoder's output at position t does not move when later items change, and
no validation or test event enters a training window; the training computation at a position
is the query evaluation builds from the events before it; the loss over all positions equals a
position-by-position hand computation (logQ per source, padding and accidental hits masked);
the global batch's candidates do not depend on the number of ranks; and on synthetic data with
a planted order signal the sequence mode beats the pooled bag, which beats most-popular.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config

from twotower_rec.config import DataConfig, FeaturesConfig, LossConfig, ModelConfig, SyntheticConfig, load_config
from twotower_rec.data import splits
from twotower_rec.data.batches import Batcher
from twotower_rec.data.prepared import prepare
from twotower_rec.data.synthetic import synthetic
from twotower_rec.errors import ConfigError, ConfigWarning
from twotower_rec.losses.softmax import LossContext, future_positives, sequence_loss
from twotower_rec.model.causal import CausalEncoder
from twotower_rec.tasks import make_task

HISTORY = 6


def _prepared(tmp_path, split: str = "leave_last_out", share: bool = False):
    synthetic_cfg = SyntheticConfig(num_users=60, num_items=80, interactions_per_user=14, num_clusters=5, seed=3)
    data_cfg = DataConfig(cache_dir=str(tmp_path / f"data-{split}-{share}"), split=split, synthetic=synthetic_cfg,
                          min_interactions=3)
    features = FeaturesConfig(history_length=HISTORY, share_item_table=share)
    return prepare(synthetic(synthetic_cfg), data_cfg, features)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _prepared(tmp_path_factory.mktemp("seq"))


def _task(*overrides: str):
    """A next_item task (its loss state made by hand, as ``start`` makes it from the data)."""
    return make_task(load_config(None, ["task=next_item", "model.history_encoder=causal",
                                        f"features.history_length={HISTORY}", *overrides]))


def _model(data, user_join: str = "concat", history_mean: bool = False):
    from twotower_rec.model.factory import new_model

    torch.manual_seed(0)
    cfg = ModelConfig(embedding_dim=8, mlp_dims=[16], output_dim=8, history_encoder="causal", encoder_layers=2,
                      encoder_dropout=0.0, user_join=user_join, history_mean=history_mean)
    return new_model(cfg, data.spec, _task(), torch.device("cpu")).eval()


@pytest.mark.parametrize("overrides, message", [
    (["task=next_item"], "needs model.history_encoder=causal"),
    (["model.history_encoder=causal", "features.recent_items=2"], "features.recent_items=0"),
    (["model.history_encoder=causal", "features.history_length=0"], "history_length > 0"),
    (["model.history_encoder=causal", "task=next_item", "loss.global_negatives=false"], "global_negatives"),
    (["model.history_encoder=causal", "task=next_item", "loss.logq=streaming"], "streaming"),
    (["next_item.windows=random"], "next_item.windows"),
    (["model.user_join=add"], "needs model.history_encoder=causal"),
    (["model.user_join=sum"], "model.user_join"),
    (["model.history_mean=true"], "needs model.history_encoder=causal"),
    (["model.history_encoder=causal", "task=next_item", "train.pipeline=always"], "one by one"),
    (["model.history_encoder=causal", "task=next_item", "next_item.future_targets=0"], "must be positive"),
])
def test_config_refuses_what_the_next_item_task_cannot_do(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("override", ["next_item.mask_window_items=true", "next_item.future_targets=3"])
def test_next_item_options_under_another_task_are_reported(override):
    with pytest.warns(ConfigWarning, match=rf"{override.split('=')[0]}=.* is read by task=next_item only; "
                                           "task=retrieval ignores it"):
        load_config(None, [override])


@pytest.mark.parametrize("with_mean", [False, True])
def test_causal_encoder_output_at_t_ignores_later_items(with_mean):
    torch.manual_seed(0)
    encoder = CausalEncoder(dim=8, max_length=7, layers=2, heads=2, dropout=0.0, with_mean=with_mean).eval()
    padded = torch.randn(3, 7, 8)
    before = encoder.encode(padded)
    changed = padded.clone()
    changed[:, 3:] = torch.randn(3, 4, 8)  # every slot from 3 on
    after = encoder.encode(changed)
    assert torch.equal(before[:, :3], after[:, :3])
    assert not torch.allclose(before[0, 3:], after[0, 3:])  # the later outputs do read them
    if with_mean:  # the second half of a slot's output: the mean of the items up to it
        assert before.shape == (3, 7, 16)
        torch.testing.assert_close(before[0, 4, 8:], padded[0, :5].mean(0))
    # the last-position read equals the slot it names, and an empty row gives zeros
    values = torch.randn(5, 8)
    last = encoder(values, torch.tensor([3, 0, 2]))
    torch.testing.assert_close(last[0], encoder(values[:3], torch.tensor([3]))[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(last[1], torch.zeros(16 if with_mean else 8))


def test_causal_encoder_equals_torch_transformer_at_every_valid_slot():
    """The encoder's own pass over its ``nn.TransformerEncoder`` parameters (causal mask only,
    fast dropout) computes what torch's encoder computes with the causal and padding masks, at
    every slot that holds an item; checkpoints of either load into the other."""
    torch.manual_seed(0)
    encoder = CausalEncoder(dim=8, max_length=6, layers=2, heads=2, dropout=0.3).eval()
    padded = torch.randn(4, 6, 8)
    lengths = torch.tensor([6, 3, 1, 0])
    slots = torch.arange(6)
    padded = padded * (slots.view(1, -1, 1) < lengths.view(-1, 1, 1))  # zeros after each row's items
    x = encoder.input_norm(padded + encoder.positions(slots).unsqueeze(0))
    pad = slots.unsqueeze(0) >= lengths.unsqueeze(1)
    pad[:, 0] = pad[:, 0] & (lengths > 0)
    expected = encoder.norm(encoder.encoder(x, mask=slots.unsqueeze(0) > slots.unsqueeze(1), src_key_padding_mask=pad))
    got = encoder.encode(padded)
    valid = slots.unsqueeze(0) < lengths.unsqueeze(1)
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got).all()  # the empty row and the pad slots too


def test_causal_encoders_of_different_shapes_script_in_one_process():
    """TorchScript compiles a module class once per set of attribute types: an export of two
    differently shaped causal encoders (ensemble members, or one after another in a process)
    scripts both, and each scripted copy computes what its eager module does."""
    torch.manual_seed(0)
    small = CausalEncoder(dim=8, max_length=4, layers=1, heads=2, dropout=0.0).eval()
    large = CausalEncoder(dim=8, max_length=5, layers=2, heads=4, dropout=0.1, with_mean=True).eval()
    values, lengths = torch.randn(5, 8), torch.tensor([3, 0, 2])
    for encoder in (small, large):
        scripted = torch.jit.script(encoder)
        torch.testing.assert_close(scripted(values, lengths), encoder(values, lengths), rtol=0, atol=0)


def test_causal_encoder_dropout_keeps_the_expected_value():
    """Training-mode dropout zeroes a share ``p`` of the entries and scales the rest by
    1 / (1 - p); evaluation is untouched; the mask is drawn from torch's seeded generator."""
    encoder = CausalEncoder(dim=8, max_length=4, layers=1, heads=2, dropout=0.25)
    x = torch.ones(200, 50, 8, requires_grad=True)
    torch.manual_seed(1)
    out = encoder.drop(x)
    assert abs((out == 0).float().mean().item() - 0.25) < 0.01
    assert torch.equal(out[out != 0], torch.full_like(out[out != 0], 1 / 0.75))
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # the gradient goes through the same mask
    torch.manual_seed(1)
    assert torch.equal(encoder.drop(x), out)
    assert torch.equal(encoder.eval().drop(x), x)


@pytest.mark.parametrize("shared", [False, True])
def test_queries_at_earlier_positions_do_not_see_the_future(tmp_path, shared):
    data = _prepared(tmp_path, share=shared)
    model = _model(data)
    assert (model.history.shared_table is not None) == shared
    batcher = Batcher(data)
    windows = batcher.training_windows(HISTORY, "tiled")[:8]
    batch = batcher.window_batch(windows, 0, 1)
    history = batch.query_features["history"]
    lengths = history.lengths().long()
    row = int(torch.argmax(lengths))  # a window with several inputs
    start, n = int(lengths[:row].sum()), int(lengths[row])
    keep = n // 2
    values = history.values().clone()
    values[start + keep:start + n] = torch.randint(1, data.spec.num_items + 1, (n - keep,))
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    changed = KeyedJaggedTensor(keys=batch.query_features.keys(),
                                values=torch.cat([batch.query_features[k].values() if k != "history" else values
                                                  for k in batch.query_features.keys()]),
                                lengths=batch.query_features.lengths())
    with torch.no_grad():
        a, b = model.encode_positions(batch.query_features), model.encode_positions(changed)
    assert a.shape == (int(lengths.sum()), 8)
    first = start  # positions are windows in order, then oldest first
    assert torch.equal(a[:first + keep], b[:first + keep])
    assert torch.equal(a[first + n:], b[first + n:])  # other windows
    assert not torch.allclose(a[first + keep:first + n], b[first + keep:first + n])


@pytest.mark.parametrize("user_join, history_mean", [("concat", False), ("add", False), ("concat", True),
                                                      ("add", True)])
def test_a_training_position_is_the_query_evaluation_builds(data, user_join, history_mean):
    """The query evaluation and serving build for an event (history strictly before it, last
    position) is the training computation at the position before that event, whether the user
    features are concatenated to the causal state or added to it, with the history's mean or not."""
    model = _model(data, user_join, history_mean)
    # add: the query MLP reads one E-wide sum (concat: each user feature's E, then the state's E
    # and with history_mean the mean's E)
    features = len(model.query_tower.feature_names) + 1 + history_mean
    assert features >= 3 and model.query_tower.mlp[0].in_features == (8 if user_join == "add" else 8 * features)
    batcher = Batcher(data)
    windows = batcher.training_windows(HISTORY, "tiled")
    batch = batcher.window_batch(windows, 0, 1)
    sequence, offsets = batcher.training_sequences
    train_rows = data.rows(splits.TRAIN)
    with torch.no_grad():
        positions = model.encode_positions(batch.query_features)
        lengths = (windows[:, 2] - windows[:, 1] - 1)
        last = np.cumsum(lengths) - 1  # each window's last position: the query for its last item
        target_rows = train_rows[windows[:, 2] - 1]  # that item's row (leave-last-out: rows = positions)
        assert (np.asarray(data.item)[target_rows] == sequence[windows[:, 2] - 1]).all()
        queries = model.encode_query(batcher.query_features(windows[:, 0], target_rows))
    torch.testing.assert_close(positions[last], queries, rtol=1e-5, atol=1e-6)


def test_context_positions_are_read_but_not_scored(data):
    """next_item.window_context: the queries of a window's scored positions are the full pass's at
    those positions (the context positions are read by the encoder, then dropped)."""
    model = _model(data)
    batcher = Batcher(data)
    windows = batcher.training_windows(HISTORY, "tiled", 3)
    windows = np.concatenate([windows[windows[:, 3] == 3][:6], windows[windows[:, 3] == 0][:4]])
    assert (windows[:, 3] == 3).sum() == 6 and (windows[:, 3] == 0).sum() == 4
    batch = batcher.window_batch(windows, 0, 1)
    with torch.no_grad():
        everything = model.encode_positions(batch.query_features)
        scored, _ = model(batch)
    lengths = windows[:, 2] - windows[:, 1] - 1
    keep = np.concatenate([np.arange(n) >= k for n, k in zip(lengths, windows[:, 3])])
    assert scored.shape[0] == len(batch) == keep.sum() < keep.size
    assert torch.equal(scored, everything[torch.from_numpy(keep)])


@pytest.mark.parametrize("split", ["leave_last_out", "random"])
@pytest.mark.parametrize("kind, context", [("last", 0), ("tiled", 0), ("tiled", 4)])
def test_training_windows_hold_training_events_only(tmp_path, split, kind, context):
    data = _prepared(tmp_path, split)
    batcher = Batcher(data)
    windows = batcher.training_windows(HISTORY, kind, context)
    is_train = np.asarray(data.split) == splits.TRAIN
    train_rows = np.flatnonzero(is_train)
    user, split_of = np.asarray(data.user), np.asarray(data.split)
    if split == "random":
        assert (np.diff(is_train.astype(int)) > 0).any()  # held-out events do come before training ones
    first = {}
    for r in train_rows:
        first.setdefault(user[r], r)
    targets = []
    for u, start, end, skip in windows:
        rows = train_rows[start:end]
        assert 2 <= rows.size <= HISTORY + 1
        assert (split_of[rows] == splits.TRAIN).all() and (user[rows] == u).all() and (np.diff(rows) > 0).all()
        # a target is scored with all of the user's earlier items in its window, or at least `context`
        assert skip < rows.size - 1 and (rows[0] == first[u] or skip == context)
        targets += rows[1 + skip:].tolist()
    # every user with two or more training events: tiled windows predict each of its training
    # events but the first exactly once; last windows end at its last training event
    every = sorted(r for r in train_rows if first[user[r]] != r)
    if kind == "tiled":
        assert sorted(targets) == every
        assert (windows[:, 3] > 0).any() == (context > 0)
    else:
        assert len(set(windows[:, 0])) == windows.shape[0]
        last_train = {user[r]: r for r in train_rows}
        assert all(train_rows[end - 1] == last_train[u] for u, _, end, _ in windows)
    # a batch's query history is exactly the window's inputs, its targets the scored positions'
    batch = batcher.window_batch(windows[:5], 0, 1)
    sequence, _ = batcher.training_sequences
    expected = np.concatenate([sequence[s:e - 1] for _, s, e, _ in windows[:5]])
    assert np.array_equal(batch.query_features["history"].values().numpy(), expected)
    scored = np.concatenate([sequence[s + 1 + k:e] for _, s, e, k in windows[:5]])
    assert np.array_equal(batch.item_ids[batch.target_index].numpy(), scored)
    assert np.array_equal(batch.first_position.numpy(), windows[:5, 3]) and len(batch) == scored.size
    # each window's row of window_items marks the batch's targets that are items of the window
    targets_of_batch = batch.item_ids[:batch.num_targets].tolist()
    for w, (_, s, e, _) in enumerate(windows[:5]):
        held = set(sequence[s:e].tolist())
        assert batch.window_items[w].tolist() == [i > 0 and i in held for i in targets_of_batch]


def test_the_global_candidates_do_not_depend_on_the_world_size(data):
    batcher = Batcher(data)
    windows = batcher.training_windows(HISTORY, "tiled")[:12]
    one = batcher.window_batch(windows, 0, 1)
    two = [batcher.window_batch(windows, r, 2) for r in range(2)]
    gathered = torch.cat([b.item_ids[:b.num_targets] for b in two])
    assert torch.equal(gathered[gathered > 0], one.item_ids[:one.num_targets])
    assert (gathered[one.num_targets:] == 0).all()  # padding only at the end
    sequence, _ = batcher.training_sequences
    expected = np.concatenate([sequence[s + 1:e] for _, s, e, _ in windows])
    assert np.array_equal(one.item_ids[one.target_index].numpy(), expected)
    assert np.array_equal(torch.cat([gathered[b.target_index] for b in two]).numpy(), expected)
    assert one.global_positions == two[0].global_positions == two[1].global_positions == expected.size
    assert len(two[0]) + len(two[1]) == expected.size


@pytest.mark.parametrize("window_mask, future", [(False, False), (True, False), (False, True), (True, True)])
def test_sequence_loss_equals_a_position_by_position_hand_computation(window_mask, future):
    torch.manual_seed(1)
    counts = np.array([0, 5, 1, 3, 8, 2, 1], dtype=np.int64)  # item codes 1..6
    cfg = LossConfig(temperature=0.5, uniform_negatives=3)
    ctx = LossContext(cfg, counts, batch_size=1, device=torch.device("cpu"))
    target_ids = torch.tensor([1, 3, 4, 0])  # deduplicated targets, one padding slot
    negative_ids = torch.tensor([3, 6, 2])  # item 3 is also a target: an accidental hit for its positions
    ids = torch.cat([target_ids, negative_ids])
    items = torch.nn.functional.normalize(torch.randn(7, 4, dtype=torch.float64), dim=1)
    query = torch.nn.functional.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1)
    target_index = torch.tensor([0, 1, 1, 2, 0])
    positions = 5
    # positions 0-2 come from a window holding targets 0 and 1, 3-4 from one holding targets 1
    # and 2 (and 0 as an input): next_item.mask_window_items masks those, next_item.future_targets=2 makes
    # each position's next two targets in its window its positives
    windows = torch.tensor([[True, True, False, False], [True, True, True, False]])
    in_window = windows[torch.tensor([0, 0, 0, 1, 1])] if window_mask else None
    positives = future_positives(target_index, torch.tensor([3, 2]), 2) if future else None
    if future:
        assert positives.tolist() == [[0, 1], [1, 1], [1, -1], [2, 0], [0, -1]]
    got = sequence_loss(query, items, ids, 4, target_index, positions, 0.5, cfg, ctx, in_window, positives)

    q = counts / counts.sum()
    expected = 0.0
    for p in range(positions):
        own = [int(t) for t in positives[p] if t >= 0] if future else [int(target_index[p])]
        own_ids = {int(target_ids[t]) for t in own}
        scores = []
        for j in range(7):
            if int(ids[j]) == 0 or (j >= 4 and int(ids[j]) in own_ids):
                continue  # padding, or one of the position's own targets drawn as a uniform negative
            if window_mask and j < 4 and j not in own and bool(in_window[p, j]):
                continue  # another item of the position's own window
            log_q = (math.log(1 - (1 - q[int(ids[j])]) ** positions) if j < 4 else math.log(3 / 6))
            scores.append((j, float(query[p] @ items[j]) / 0.5 - log_q))
        logits = dict(scores)
        norm = math.log(sum(math.exp(v) for _, v in scores))
        expected += -sum(logits[t] - norm for t in own) / len(own)
    assert float(got) == pytest.approx(expected / positions, rel=1e-7)  # logQ is float32
    # masking matters here: without it the loss is different
    unmasked = sequence_loss(query, items, ids, 4, target_index, positions, 0.5,
                             LossConfig(temperature=0.5, uniform_negatives=3, mask_accidental_hits=False), ctx,
                             in_window, positives)
    assert float(unmasked) != pytest.approx(float(got), rel=1e-6)


def test_the_step_scores_each_position_against_its_next_targets(data):
    """next_item.future_targets=k: the training step hands the loss each position's next k targets
    in its own window (the hand computation above checks the loss itself)."""
    from twotower_rec.train.step import forward_loss

    model = _model(data)
    batcher = Batcher(data)
    batch = batcher.window_batch(batcher.training_windows(HISTORY, "tiled")[:8], 0, 1)
    three_ahead, next_one = _task("loss.temperature=0.5", "next_item.future_targets=3"), _task("loss.temperature=0.5")
    cfg = three_ahead.cfg.loss
    ctx = LossContext(cfg, data.item_counts(), 8, torch.device("cpu"))
    three_ahead.ctx = next_one.ctx = ctx
    three, _ = forward_loss(model, batch, three_ahead)
    next_only, _ = forward_loss(model, batch, next_one)
    query, item = model(batch)
    scored = batch.query_features["history"].lengths().long() - batch.first_position
    positives = future_positives(batch.target_index, scored, 3)
    assert (positives[:, 0] == batch.target_index).all() and (positives[:, 1:] >= 0).any()
    expected = sequence_loss(query, item, batch.item_ids, batch.num_targets, batch.target_index,
                             batch.global_positions, 0.5, cfg, ctx, None, positives)
    assert float(three) == pytest.approx(float(expected), rel=1e-6)
    assert float(three) != pytest.approx(float(next_only), rel=1e-3)


def _run(cli, root, path, *extra):
    for verb in ("train", "evaluate"):
        result = cli(verb, "--config", path, *extra, cwd=root)
        assert result.returncode == 0, result.describe()


def test_order_signal_sequence_mode_beats_the_bag_which_beats_popularity(cli, tmp_path):
    """Synthetic data with a planted Markov chain over clusters: the sequence mode reads which
    cluster came last; a pooled bag of the history cannot (but still knows the user's taste)."""
    cfg = tiny_config(tmp_path)
    cfg["data"]["synthetic"] = {"num_users": 400, "num_items": 400, "interactions_per_user": 20,
                                "num_clusters": 20, "transition_probability": 0.5, "seed": 0}
    cfg["loss"]["temperature"] = 0.1
    cfg["train"].update({"epochs": 4, "val_max_users": 400})
    cfg["eval"]["ks"] = [10, 50]
    path = tmp_path / "planted.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    result = cli("prepare", "--config", path, cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    _run(cli, tmp_path, path)
    bag = json.loads((tmp_path / "run" / "eval_test.json").read_text())
    seq_out = tmp_path / "run-seq"
    _run(cli, tmp_path, path, "--set", "model.history_encoder=causal", "--set", "task=next_item",
         "--set", "train.batch_size=32", "--set", "loss.uniform_negatives=32", "--set", f"train.out_dir={seq_out}")
    seq = json.loads((seq_out / "eval_test.json").read_text())
    metrics = json.loads((seq_out / "train_metrics.json").read_text())
    assert metrics["examples_per_second"] > 0
    bag_hr, seq_hr, pop_hr = bag["model"]["recall@10"], seq["model"]["recall@10"], bag["popularity"]["recall@10"]
    assert seq_hr >= 1.2 * bag_hr, (seq_hr, bag_hr)
    assert bag_hr >= 1.5 * pop_hr, (bag_hr, pop_hr)


def test_planted_signal_leaves_the_default_draws_unchanged():
    base = synthetic(SyntheticConfig(num_users=50, num_items=60, seed=4)).interactions
    again = synthetic(SyntheticConfig(num_users=50, num_items=60, seed=4, transition_probability=0.0)).interactions
    planted = synthetic(SyntheticConfig(num_users=50, num_items=60, seed=4, transition_probability=0.8)).interactions
    assert base.equals(again)
    assert len(base) != len(planted) or not base["item"].equals(planted["item"])


def test_without_user_features_the_causal_state_is_the_whole_query(tmp_path):
    """features.user_features=[] (the ablation): no query-side collection; training positions,
    evaluation queries and the scripted tower still agree."""
    from twotower_rec.export.query_encoder import build_query_encoder

    synthetic_cfg = SyntheticConfig(num_users=40, num_items=50, interactions_per_user=10, num_clusters=4, seed=5)
    data = prepare(synthetic(synthetic_cfg), DataConfig(cache_dir=str(tmp_path / "data"), synthetic=synthetic_cfg),
                   FeaturesConfig(user_features=[], history_length=HISTORY))
    model = _model(data)
    assert model.query_tower.embedding_bags is None and model.query_feature_order == ["history"]
    batcher = Batcher(data)
    windows = batcher.training_windows(HISTORY, "tiled")[:6]
    users = np.arange(1, data.spec.num_users + 1)
    kjt = batcher.query_features(users, data.user_offsets[users])
    with torch.no_grad():
        assert model.encode_positions(batcher.window_batch(windows, 0, 1).query_features).shape[1] == 8
        expected = model.encode_query(kjt)
        scripted = torch.jit.script(build_query_encoder(model, data.spec.query_features, data))
        got = scripted([kjt["history"].values()], [kjt["history"].lengths().long()])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("override", ["task=retrieval", "next_item.windows=last", "next_item.window_context=3"])
def test_resume_refuses_other_training_windows(override):
    """What a step's rows are (events or windows, and which windows) is fixed for a run: a
    resumption under another would continue a different batch order from the saved step."""
    from twotower_rec.config import to_dict
    from twotower_rec.errors import CheckpointError
    from twotower_rec.train.checkpoint import check_resumable

    base = ["model.history_encoder=causal", "task=next_item", "features.history_length=6"]
    saved = to_dict(load_config(None, base))
    check_resumable(saved, load_config(None, base))
    with pytest.raises(CheckpointError, match=override.split("=")[0]):
        check_resumable(saved, load_config(None, [*base, override]))
