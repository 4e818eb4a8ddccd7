"""Serving: ANN index recall, raw-value query tower, cold start, the HTTP endpoint, export checks."""

from __future__ import annotations

import http.client
import json
import shutil
import threading

import numpy as np
import pytest
import torch

from twotower_rec.data.prepared import PreparedData
from twotower_rec.errors import ExportError
from twotower_rec.serving import ann
from twotower_rec.serving.exported import ExportedModel


@pytest.fixture(scope="module")
def exported(pipeline):
    return ExportedModel.load(pipeline.export_dir)


@pytest.fixture(scope="module")
def data(pipeline):
    return PreparedData(pipeline.cache_dir)


# --- ANN -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "flat"])
def test_index_recall_against_exact_search_on_a_larger_catalog(kind):
    """20,000 clustered unit vectors (like trained item embeddings): recall@10 >= 0.95."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, 32))
    vectors = centres[rng.integers(0, 50, 20_000)] + 0.5 * rng.normal(size=(20_000, 32))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    queries = vectors[rng.choice(20_000, 300, replace=False)] + 0.1 * rng.normal(size=(300, 32)).astype(np.float32)
    index = ann.build_index(vectors, ann.AnnParams(kind=kind, ivf_nprobe=32))
    recall = ann.recall_against_exact(index, vectors, queries)
    assert recall["recall@10"] >= 0.95, recall
    if kind == "flat":
        assert recall == {"recall@10": 1.0, "recall@100": 1.0}


def test_recall_in_blocks_of_queries_equals_recall_in_one_block():
    """Exact scores are computed a block of queries at a time (a 1e6-item catalog would need
    gigabytes at once); the blocks change no number."""
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(3000, 16)).astype(np.float32)
    index = ann.build_index(vectors, ann.AnnParams(kind="ivf", ivf_nlist=30, ivf_nprobe=2))
    queries = rng.normal(size=(101, 16)).astype(np.float32)
    whole = ann.recall_against_exact(index, vectors, queries, chunk_scores=10**9)
    assert ann.recall_against_exact(index, vectors, queries, chunk_scores=3000 * 7) == whole
    assert 0.2 < whole["recall@10"] < 1.0  # a starved index: blocks that lost hits would show


def test_recall_is_measured_not_assumed():
    """A deliberately starved index (IVF probing 1 of many lists) must report low recall."""
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(5000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = ann.build_index(vectors, ann.AnnParams(kind="ivf", ivf_nlist=100, ivf_nprobe=1))
    assert ann.recall_against_exact(index, vectors, vectors[:200])["recall@10"] < 0.9


def test_export_manifest_recall_matches_a_recomputation(exported, pipeline):
    info = exported.manifest["ann"]
    assert info["kind"] == "hnsw" and info["recall@10"] >= 0.95
    assert exported.index.ntotal == exported.manifest["num_items"]
    users = [str(u) for u in exported.users["raw_user_ids"].tolist()]
    with torch.no_grad():
        values, lengths, _, _ = exported.user_query(users)
        queries = exported.query_tower(values, lengths).numpy()
    recomputed = ann.recall_against_exact(exported.index, exported.item_embeddings.numpy(), queries)
    assert recomputed["recall@10"] == pytest.approx(info["recall@10"], abs=0.02)


def test_ann_recommendations_agree_with_exact_ones(exported):
    user = str(exported.users["raw_user_ids"][3])
    exact = [r.item for r in exported.recommend_user(user, k=10)]
    approx = [r.item for r in exported.recommend_user(user, k=10, ann=True)]
    assert len(set(exact) & set(approx)) >= 9


# --- the query tower on raw values, cold start ---------------------------------------------------


def test_encode_raw_equals_the_encoded_path_for_known_users(exported, data):
    """The documented raw signature gives the same embedding as the code path for known users."""
    names = exported.manifest["query_features"]
    users = [str(u) for u in data.raw_user_ids.tolist()[:25]]
    rows = []
    n = exported.manifest["history_length"]
    for code, raw in enumerate(users, start=1):
        lo, hi = data.user_offsets[code - 1], data.user_offsets[code]
        # raw ids of every event, items unknown to training included (they map to the OOV code)
        history = [str(x) for x in data.raw_items_of_rows(np.arange(lo, hi)).tolist()]
        features = {}
        for name in names:
            if name not in ("user_id", "history"):
                vocab = data.spec.vocabularies[name]
                c = int(np.asarray(data.user_features[name])[code])
                if c > 0:
                    features[name] = str(vocab[c - 1])
        rows.append({"user": raw, "liked": history, "features": features})
    with torch.no_grad():
        raw_path = exported.encode_new_users(rows)
        values, lengths, _, _ = exported.user_query(users)
        code_path = exported.query_tower(values, lengths)
    assert "history" in names and n > 0
    torch.testing.assert_close(raw_path, code_path, rtol=1e-5, atol=1e-6)


def test_the_program_loads_and_runs_with_torch_alone(exported, pipeline):
    """``torch.export.load`` in a fresh interpreter that imports neither TorchRec nor this package
    gives the embedding this package's loader gives."""
    import subprocess
    import sys

    names = exported.manifest["query_features"]
    user = str(exported.users["raw_user_ids"][0])
    values, lengths, _, _ = exported.user_query([user])
    code = (
        "import json, sys, torch\n"
        "program = torch.export.load(sys.argv[1]).module()\n"
        "inputs = json.loads(sys.argv[2])\n"
        "values = [torch.tensor(v, dtype=torch.int64) for v in inputs['values']]\n"
        "lengths = [torch.tensor(n, dtype=torch.int64) for n in inputs['lengths']]\n"
        "with torch.no_grad():\n"
        "    out = program(values, lengths)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torchrec', 'twotower_rec', 'fbgemm_gpu'))\n"
        "print(json.dumps({'embedding': out.tolist(), 'dtype': str(out.dtype), 'loaded': loaded}))\n"
    )
    inputs = json.dumps({"values": [v.tolist() for v in values], "lengths": [n.tolist() for n in lengths]})
    result = subprocess.run([sys.executable, "-c", code, str(pipeline.export_dir / "query_tower.pt2"), inputs],
                            capture_output=True, text=True, timeout=120, cwd=pipeline.root)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["loaded"] == [] and payload["dtype"] == "torch.float32"
    assert len(names) == len(values)
    assert torch.equal(torch.tensor(payload["embedding"]), exported.query_tower(values, lengths))


def test_the_export_writes_no_torchscript_by_default(exported, pipeline):
    assert not (pipeline.export_dir / "query_tower.pt").exists()
    assert "query_tower.pt" not in exported.manifest["files"] and "query_tower.pt2" in exported.manifest["files"]
    assert exported.manifest["query_tower"] == {"file": "query_tower.pt2", "format": "torch.export",
                                                "torchscript": None}
    assert "deprecated" not in pipeline.export.stderr


def test_cold_start_returns_items_and_not_the_liked_ones(exported):
    liked = [str(x) for x in exported.item_ids[:5].tolist()]
    recs = exported.recommend_new_user(liked=liked, k=10)
    assert len(recs) == 10
    assert not {r.item for r in recs} & set(liked)
    scores = [r.score for r in recs]
    assert scores == sorted(scores, reverse=True)
    # the liked items move the query: a different history gives a different list
    other = exported.recommend_new_user(liked=[str(x) for x in exported.item_ids[-5:].tolist()], k=10)
    assert [r.item for r in other] != [r.item for r in recs]
    with pytest.raises(ExportError, match="liked items or side features"):
        exported.recommend_new_user(liked=[], features={})
    with pytest.raises(ExportError, match="unknown feature"):
        exported.recommend_new_user(liked=liked, features={"shoe_size": "44"})


def test_cold_start_cli(pipeline, cli):
    items = np.load(pipeline.export_dir / "item_ids.npy", allow_pickle=False)
    result = cli("recommend", "--export", pipeline.export_dir, "--liked", ",".join(map(str, items[:3])), "-k", "4",
                 "--json")
    assert result.returncode == 0, result.describe()
    payload = json.loads(result.stdout)
    assert len(payload["items"]) == 4
    both = cli("recommend", "--export", pipeline.export_dir, "--user", "1", "--liked", "5")
    assert both.returncode == 2 and "not both" in both.stderr


# --- HTTP ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(exported):
    """The endpoint on a free port, serving from a daemon thread."""
    from twotower_rec.serving.http_server import make_server

    srv = make_server(exported, max_k=50)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address
    srv.shutdown()
    srv.server_close()


def request(address, method: str, path: str, body=None, raw: bytes | None = None):
    conn = http.client.HTTPConnection(*address, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, payload


def test_http_health_and_recommend(server, exported):
    status, health = request(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["items"] == exported.manifest["num_items"]
    user = str(exported.users["raw_user_ids"][0])
    status, payload = request(server, "POST", "/recommend", {"user": user, "k": 5})
    assert status == 200
    assert [x["item"] for x in payload["items"]] == [r.item for r in exported.recommend_user(user, k=5)]
    users = [str(u) for u in exported.users["raw_user_ids"][:3].tolist()]
    status, batch = request(server, "POST", "/recommend", {"users": users, "k": 3})
    assert status == 200 and [r["user"] for r in batch["results"]] == users
    assert all(len(r["items"]) == 3 for r in batch["results"])
    status, cold = request(server, "POST", "/recommend", {"liked": [str(exported.item_ids[0])], "k": 3})
    assert status == 200 and len(cold["items"]) == 3


@pytest.mark.parametrize("method, path, body, raw, status, message", [
    ("POST", "/recommend", None, b"{not json", 400, "not valid JSON"),
    ("POST", "/recommend", [1, 2], None, 400, "JSON object"),
    ("POST", "/recommend", {"k": 5}, None, 400, "exactly one of"),
    ("POST", "/recommend", {"user": "1", "users": ["1"]}, None, 400, "exactly one of"),
    ("POST", "/recommend", {"user": "no-such-user"}, None, 404, "unknown user"),
    ("POST", "/recommend", {"user": "1", "k": 0}, None, 400, "'k' must be an integer"),
    ("POST", "/recommend", {"user": "1", "k": 51}, None, 400, "from 1 to 50"),
    ("POST", "/recommend", {"user": "1", "k": "ten"}, None, 400, "'k' must be an integer"),
    ("POST", "/recommend", {"user": "1", "colour": "red"}, None, 400, "unknown field"),
    ("POST", "/recommend", {"users": "1"}, None, 400, "list of ids"),
    ("POST", "/recommend", {"liked": ["x"], "features": {"shoe_size": "44"}}, None, 400, "unknown feature"),
    ("POST", "/recommend", {"user": "1", "include_seen": "yes"}, None, 400, "true or false"),
    ("GET", "/recommend", None, None, 405, "use POST"),
    ("GET", "/nowhere", None, None, 404, "no such path"),
    ("POST", "/health", {}, None, 405, "not served"),
])
def test_http_bad_requests_get_4xx_with_a_message(server, method, path, body, raw, status, message):
    got_status, payload = request(server, method, path, body, raw)
    assert got_status == status, payload
    assert message in payload["error"]


# --- export checks ---------------------------------------------------------------------------------


@pytest.fixture
def copy(pipeline, tmp_path):
    target = tmp_path / "export"
    shutil.copytree(pipeline.export_dir, target)
    return target


def test_truncated_embeddings_are_refused(copy):
    path = copy / "item_embeddings.npy"
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ExportError, match="item_embeddings.npy.*truncated"):
        ExportedModel.load(copy)


def test_missing_index_is_refused(copy):
    (copy / "items.faiss").unlink()
    with pytest.raises(ExportError, match="items.faiss is missing"):
        ExportedModel.load(copy)


@pytest.mark.parametrize("key, value, message", [
    ("format_version", 1, "format version 1"),
    ("metric", "l2", "metric 'l2'"),
    ("embedding_dim", 999, "embedding_dim 999"),
    ("num_items", 3, "manifest says 3 items"),
])
def test_mismatched_manifest_is_refused(copy, key, value, message):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest[key] = value
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=message):
        ExportedModel.load(copy)


def test_a_corrupt_query_tower_is_refused(copy):
    from twotower_rec.serving.manifest import sha256

    path = copy / "query_tower.pt2"
    size = path.stat().st_size
    path.write_bytes(b"\0" * size)  # same size, wrong content
    with pytest.raises(ExportError, match="query_tower.pt2: its SHA-256"):
        ExportedModel.load(copy)
    manifest = json.loads((copy / "manifest.json").read_text())  # a manifest written for the broken file
    manifest["files"]["query_tower.pt2"]["sha256"] = sha256(path)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="query_tower.pt2: cannot load"):
        ExportedModel.load(copy)


def test_float16_export_scores_like_float32(pipeline, cli, tmp_path, exported):
    out = tmp_path / "half"
    result = cli("export", "--config", pipeline.config_path, "--set", "export.dtype=float16", "--set",
                 "export.ann=none", "--out", out, cwd=pipeline.root)
    assert result.returncode == 0, result.describe()
    half = ExportedModel.load(out)
    assert np.load(out / "item_embeddings.npy").dtype == np.float16
    assert half.index is None and not (out / "items.faiss").exists()
    np.testing.assert_allclose(half.item_embeddings.numpy(), exported.item_embeddings.numpy(), atol=2e-3)
    with pytest.raises(ExportError, match="no ANN index"):
        half.recommend_user(str(exported.users["raw_user_ids"][0]), ann=True)
