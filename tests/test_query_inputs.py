"""One implementation of the query inputs: the same raw histories through every path.

Training and evaluation batches (``Batcher.query_features``), serving a known user
(``ExportedModel.user_query``) and the exported TorchScript query tower on raw values
(``QueryEncoder.encode_inputs``) must produce identical codes for every query feature, and
the scripted tower the same embedding from them. The hand-made data has what makes them
differ if one path drifts: histories longer than ``history_length``, users with fewer items
than a ``recent_m`` needs, items unseen in training (code 0) inside histories, a user missing
from the users table, and an unknown side-feature value.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from twotower_rec.config import DataConfig, ExportConfig, FeaturesConfig, ModelConfig
from twotower_rec.data.batches import Batcher
from twotower_rec.data.prepared import prepare
from twotower_rec.data.raw import RawData
from twotower_rec.data.query_inputs import item_before, last_items
from twotower_rec.export.writer import write_export
from twotower_rec.model.factory import new_model
from twotower_rec.serving.exported import ExportedModel

HISTORY_LENGTH, RECENT = 4, 4


def _raw() -> RawData:
    # items 10..19 are seen in training; 90, 91, 92 only as validation / test events (code 0)
    seqs = {
        "u1": [10, 11, 12, 13, 14, 15, 16, 90],  # longer than the history: truncated
        "u2": [12, 10, 91],  # 3 events: fewer than recent_4 needs; its last item is unseen
        "u3": [17, 18, 19, 11, 92, 13],  # an unseen item inside the history of its last event
        "u4": [13, 14, 15, 16, 17],  # not in the users table: unknown side features
    }
    rows = [(u, i, t) for u, items in seqs.items() for t, i in enumerate(items)]
    inter = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    inter["rating"] = np.float32(4.0)
    users = pd.DataFrame({"user": ["u1", "u2", "u3"], "gender": ["F", "M", "X"]})
    items = pd.DataFrame({"item": list(range(10, 20)) + [90, 91, 92], "genres": [["a"]] * 13, "year": 1990,
                          "title": "t"})
    return RawData(inter, users, items, name="hand")


@pytest.fixture(scope="module", params=["bag", "transformer"])
def paths(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"query-inputs-{request.param}")
    features = FeaturesConfig(user_features=["user_id", "gender"], item_features=["item_id", "genres"],
                              item_dense=[], history_length=HISTORY_LENGTH, recent_items=RECENT)
    data = prepare(_raw(), DataConfig(cache_dir=str(root / "data")), features)
    model_cfg = ModelConfig(embedding_dim=8, mlp_dims=[16], output_dim=8, history_encoder=request.param,
                            encoder_heads=2)
    torch.manual_seed(0)
    model = new_model(model_cfg, data.spec, device=torch.device("cpu")).eval()
    write_export(model, data, {}, root / "export", ExportConfig(ann="none"))
    return data, model, ExportedModel.load(root / "export")


def _raw_features(data, names: list[str], user: np.ndarray, position: np.ndarray) -> dict[str, list[list[str]]]:
    """What a client sends for user codes ``user`` as of rows ``position``: the raw ids of the
    user's items strictly before it (unseen ones included), its raw user id and side features."""
    item_raw = data.raw_items_of_rows(np.arange(data.num_rows))
    genders = {"u1": "F", "u2": "M", "u3": "X"}  # u4 has none
    features: dict[str, list[list[str]]] = {name: [] for name in names}
    for code, row in zip(user.tolist(), position.tolist()):
        raw_user = str(data.raw_user_ids[code - 1])
        before = [str(x) for x in item_raw[data.user_offsets[code - 1]:row].tolist()]
        for name in names:
            if name == "user_id":
                features[name].append([raw_user])
            elif name == "gender":
                features[name].append([genders[raw_user]] if raw_user in genders else [])
            else:  # history and recent_m take the whole history
                features[name].append(before)
    return features


def _by_name(kjt) -> dict[str, tuple[list[int], list[int]]]:
    return {k: (v.values().tolist(), v.lengths().tolist()) for k, v in kjt.to_dict().items()}


def test_the_data_has_what_makes_paths_differ(paths):
    data, _, _ = paths
    item, user = np.asarray(data.item), np.asarray(data.user)
    ends = data.user_offsets[1:]
    assert (ends - data.user_offsets[:-1]).max() > HISTORY_LENGTH + 1  # truncated histories
    assert (ends - data.user_offsets[:-1]).min() < RECENT  # a recent_m with nothing to show
    assert (item[:-1][user[:-1] == user[1:]] == 0).any()  # an unseen item inside a history
    assert data.user_features["gender"][1:].min() == 0  # unknown side features


def test_every_training_row_gets_the_same_codes_from_raw_values(paths):
    """Batches (every row: the query as of that event) against the scripted tower on raw ids."""
    data, model, exported = paths
    names = list(model.query_feature_order)
    rows = np.arange(data.num_rows)
    batch = _by_name(Batcher(data).query_features(np.asarray(data.user)[rows], rows))  # as training sees them
    users = np.asarray(data.user)[rows]
    values, lengths = exported.query_tower.encode_inputs(_raw_features(data, names, users, rows))
    for name, v, n in zip(names, values, lengths):
        assert (v.tolist(), n.tolist()) == batch[name], name
    assert max(lengths[names.index("history")].tolist()) == HISTORY_LENGTH  # some histories were cut


def test_known_users_get_the_same_codes_and_embeddings_on_every_path(paths):
    """After all their events: batches, serving a known user, the scripted tower on raw ids."""
    data, model, exported = paths
    names = list(model.query_feature_order)
    codes = np.arange(1, data.spec.num_users + 1, dtype=np.int64)
    ends = data.user_offsets[codes]
    kjt = Batcher(data).query_features(codes, ends)
    batch = _by_name(kjt)
    served_values, served_lengths, _, _ = exported.user_query([str(u) for u in data.raw_user_ids.tolist()])
    raw_values, raw_lengths = exported.query_tower.encode_inputs(_raw_features(data, names, codes, ends))
    assert exported.manifest["query_features"] == names
    for name, sv, sn, rv, rn in zip(names, served_values, served_lengths, raw_values, raw_lengths):
        assert (sv.tolist(), sn.tolist()) == batch[name] == (rv.tolist(), rn.tolist()), name
    with torch.no_grad():
        served = exported.query_tower(served_values, served_lengths)
        from_raw = exported.query_tower.encode_raw(_raw_features(data, names, codes, ends))
        trained = model.encode_query(kjt)
    assert torch.equal(served, from_raw)
    torch.testing.assert_close(served, trained, rtol=1e-5, atol=1e-6)


def test_history_windows_by_hand():
    """The shared functions themselves, eager and compiled, on a case worked out by hand."""
    sequence = torch.tensor([5, 6, 7, 8, 9])
    starts, ends = torch.tensor([0, 0, 4, 4]), torch.tensor([3, 0, 5, 4])
    scripted_last, scripted_before = torch.jit.script(last_items), torch.jit.script(item_before)
    for last in (last_items, scripted_last):
        values, lengths = last(sequence, starts, ends, 2)
        assert values.tolist() == [6, 7, 9] and lengths.tolist() == [2, 0, 1, 0]
    for before in (item_before, scripted_before):
        assert before(sequence, starts, ends, 1).tolist() == [7, 0, 9, 0]
        assert before(sequence, starts, ends, 3).tolist() == [5, 0, 0, 0]
        assert before(torch.zeros(0, dtype=torch.long), torch.tensor([0]), torch.tensor([0]), 1).tolist() == [0]
