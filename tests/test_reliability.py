"""The cases a hostile tester found: wrong data or answers given silently, lost folders after a
kill, tracebacks instead of one `error:` line. Each test failed before its fix.

MovieLens id parsing is tested with the other MovieLens readers (test_sources_movielens.py).
"""

from __future__ import annotations

import pandas as pd
import pytest

from twotower_rec.config import load_config
from twotower_rec.data.sources import load_raw
from twotower_rec.errors import DataError
from test_cli_errors import assert_user_error


def _interactions(tmp_path, rows: list[tuple], *overrides: str):
    path = tmp_path / "events.csv"
    pd.DataFrame(rows, columns=["user", "item", "timestamp"]).to_csv(path, index=False)
    cfg = load_config(None, ["data.source=interactions", f"data.interactions_path={path}", *overrides])
    return path, cfg


# --- 2. dates: one format for the whole column ---------------------------------------------------


def test_day_first_dates_are_read_with_one_format_for_the_column(tmp_path):
    """30/07/2000 can only be day-first, so 05/07/2000 is the 5th of July, not May 7."""
    rows = [(1, 10, "05/07/2000"), (1, 11, "30/07/2000"), (1, 12, "12/08/2000"), (2, 10, "01/02/2001")]
    _, cfg = _interactions(tmp_path, rows)
    seconds = load_raw(cfg.data).interactions["timestamp"].tolist()
    expected = pd.to_datetime(["2000-07-05", "2000-07-30", "2000-08-12", "2001-02-01"], utc=True)
    assert seconds == [int(t.timestamp()) for t in expected]


def test_dates_that_fit_day_first_and_month_first_alike_are_refused(tmp_path):
    rows = [(1, 10, "05/07/2000"), (1, 11, "06/07/2000"), (2, 12, "01/02/2001")]
    path, cfg = _interactions(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_raw(cfg.data)
    message = str(err.value)
    assert str(path) in message and "ambiguous" in message and "data.timestamp_format" in message
    # the option settles it
    _, cfg = _interactions(tmp_path, rows, "data.timestamp_format=%d/%m/%Y")
    first = load_raw(cfg.data).interactions["timestamp"].iloc[0]
    assert first == int(pd.Timestamp("2000-07-05", tz="UTC").timestamp())


def test_a_date_in_another_format_names_its_line(tmp_path):
    rows = [(1, 10, "2000-07-05"), (1, 11, "2000-07-06"), (1, 12, "07/08/2000"), (2, 10, "2000-07-09")]
    path, cfg = _interactions(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_raw(cfg.data)
    message = str(err.value)
    assert str(path) in message and "line 4" in message and "'07/08/2000'" in message and "%Y-%m-%d" in message
    _, cfg = _interactions(tmp_path, rows, "data.timestamp_format=%Y-%m-%d")
    with pytest.raises(DataError, match="line 4"):
        load_raw(cfg.data)


# --- 8. the logQ correction's scale ----------------------------------------------------------------


def test_streaming_logq_is_the_log_of_a_per_step_probability():
    """An item in every step's batch has probability 1 of being a candidate: its correction
    is log 1 = 0, the same scale as the counts' log(expected count) and the uniform negatives'."""
    import numpy as np
    import torch

    from twotower_rec.config import LossConfig
    from twotower_rec.losses.softmax import LossContext

    ctx = LossContext(LossConfig(logq="streaming", streaming_alpha=0.5), np.ones(6), 4, torch.device("cpu"))
    for step in range(1, 30):
        ctx.step = step
        got = ctx.candidate_log_q(torch.tensor([1, 2, 3, 4]), num_uniform=0)
    assert got.tolist() == pytest.approx([0.0] * 4, abs=1e-6)


def test_local_negatives_expect_the_local_batch():
    """Without global negatives a rank scores its own slice of the batch: an item's expected
    count among those candidates is world_size times smaller than in the global batch."""
    import math

    import numpy as np
    import torch

    from twotower_rec.config import LossConfig
    from twotower_rec.losses.softmax import LossContext, positives_per_step

    counts = np.array([0, 6, 3, 1])
    for global_negatives, per_step in ((True, 8), (False, 4)):
        cfg = LossConfig(global_negatives=global_negatives)
        assert positives_per_step(cfg, batch_size=8, world_size=2) == per_step
        ctx = LossContext(cfg, counts, positives_per_step(cfg, 8, 2), torch.device("cpu"))
        assert ctx.candidate_log_q(torch.tensor([1]), 0).item() == pytest.approx(math.log(per_step * 6 / 10))


# --- 9, 11. configs the data or the world size cannot honour ---------------------------------------


def _prepared_interactions(tmp_path, with_ratings: bool):
    from twotower_rec.data.prepared import prepare

    rows = [(u, 10 + (u + k) % 7, 100 * u + k) for u in range(1, 7) for k in range(5)]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    if with_ratings:
        frame["rating"] = 4.0
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "events.csv"
    frame.to_csv(path, index=False)
    cfg = load_config(None, ["data.source=interactions", f"data.interactions_path={path}",
                             f"data.cache_dir={tmp_path / 'cache'}", "features.user_features=[user_id]",
                             "features.item_features=[item_id]", "features.item_dense=[]"])
    return path, prepare(load_raw(cfg.data), cfg.data, cfg.features)


@pytest.mark.parametrize("objective", ["bce", "mse"])
def test_rating_objectives_need_ratings(objective, tmp_path):
    from twotower_rec.distributed.env import DistEnv
    from twotower_rec.errors import ConfigError
    from twotower_rec.tasks import make_task

    import torch

    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    path, data = _prepared_interactions(tmp_path / "no-ratings", with_ratings=False)
    task = make_task(load_config(None, ["task=pointwise", f"pointwise.objective={objective}"]))
    with pytest.raises(ConfigError) as err:
        task.check_data(data, env)
    assert str(path) in str(err.value) and "rating" in str(err.value)
    make_task(load_config(None, [])).check_data(data, env)  # the retrieval task needs no ratings
    _, rated = _prepared_interactions(tmp_path / "ratings", with_ratings=True)
    task.check_data(rated, env)


def test_uniform_negatives_must_split_evenly_over_the_processes(tmp_path):
    from twotower_rec.distributed.env import DistEnv
    from twotower_rec.errors import ConfigError
    from twotower_rec.tasks import make_task

    import torch

    _, data = _prepared_interactions(tmp_path, with_ratings=True)
    two = DistEnv(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"), backend="gloo")
    for task in ("retrieval", "next_item", "bpr"):
        for uniform in (1, 3):
            cfg = load_config(None, [f"task={task}", "model.history_encoder=causal", "train.batch_size=4",
                                     f"loss.uniform_negatives={uniform}"])
            with pytest.raises(ConfigError, match="loss.uniform_negatives"):
                make_task(cfg).check_data(data, two)
    make_task(load_config(None, ["train.batch_size=4", "loss.uniform_negatives=4"])).check_data(data, two)


# --- 10. evaluation counts events and users apart -------------------------------------------------


def test_evaluation_reports_events_and_users(tmp_path):
    """Under a random split a user has several test events: the report must not call them users."""
    import numpy as np
    import torch

    from twotower_rec.config import DataConfig, EvalConfig, FeaturesConfig, SyntheticConfig
    from twotower_rec.data.batches import Batcher
    from twotower_rec.data.prepared import prepare
    from twotower_rec.data.splits import TEST
    from twotower_rec.evaluation.ranking import evaluate

    data_cfg = DataConfig(cache_dir=str(tmp_path / "data"), split="random", test_fraction=0.3,
                          synthetic=SyntheticConfig(num_users=30, num_items=40, num_clusters=3))
    data = prepare(load_raw(data_cfg), data_cfg, FeaturesConfig(history_length=5))
    def encode_query(kjt):  # any towers will do: only the counts are checked
        return torch.ones(kjt.stride(), 4)

    def encode_items(kjt, dense):
        return torch.ones(kjt.stride(), 4)

    results = evaluate(encode_query, encode_items, data, Batcher(data), EvalConfig(ks=[10]), TEST)
    rows = data.rows(TEST)
    assert results["model"]["events"] == rows.size
    assert results["model"]["users"] == np.unique(np.asarray(data.user)[rows]).size < rows.size


# --- 4. a folder swap killed between its two renames ---------------------------------------------


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_an_interrupted_swap_is_finished_or_rolled_back(tmp_path):
    """Stopped between the renames, with the new folder complete the swap is finished; with it
    incomplete the old folder is put back. Folders of writers that are gone are deleted; those
    of a live writer are left alone."""
    import os
    import socket

    from twotower_rec import atomic

    host = socket.gethostname()
    for complete in (True, False):
        root = tmp_path / f"complete-{complete}"
        final = root / "export"
        final.mkdir(parents=True)
        (final / "version").write_text("old")
        dead = _dead_pid()
        new = root / f".export.tmp-{host}-{dead}"
        new.mkdir()
        (new / "version").write_text("new")
        if complete:
            (new / atomic.COMPLETE).touch()
        os.replace(final, root / f".export.old-{host}-{dead}")  # the kill came here
        live = root / f".export.tmp-{host}-{os.getpid()}"
        live.mkdir()
        atomic.recover(final)
        assert (final / "version").read_text() == ("new" if complete else "old")
        assert sorted(p.name for p in root.iterdir()) == sorted(["export", live.name])
        assert not (final / atomic.COMPLETE).exists()


def test_prepare_killed_between_its_renames_loses_no_cache(cli, tmp_path):
    from twotower_rec.data.prepared import PreparedData

    args = ["prepare", "--config", "configs/tiny.yaml", "--set", f"data.cache_dir={tmp_path / 'data'}"]
    from conftest import REPO

    assert cli(*args, cwd=REPO).returncode == 0
    killed = cli(*args, cwd=REPO, env={"TWOTOWER_KILL_DURING_SAVE": "between_renames"})
    assert killed.returncode == -9, killed.describe()
    assert not (tmp_path / "data").exists()  # the kill left no folder under the name
    data = PreparedData(tmp_path / "data")
    assert data.num_rows > 0 and [p.name for p in tmp_path.iterdir()] == ["data"]


def test_export_killed_between_its_renames_is_served(cli, pipeline, tmp_path):
    import shutil

    out = tmp_path / "export"
    shutil.copytree(pipeline.export_dir, out)
    killed = cli("export", "--config", pipeline.config_path, "--out", out, cwd=pipeline.root,
                 env={"TWOTOWER_KILL_DURING_SAVE": "between_renames"})
    assert killed.returncode == -9, killed.describe()
    assert not out.exists()
    from twotower_rec.data.prepared import PreparedData

    user = str(PreparedData(pipeline.cache_dir).raw_user_ids[0])
    result = cli("recommend", "--export", out, "--user", user, cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


# --- 3. an export file swapped for another of the same size ---------------------------------------


@pytest.mark.parametrize("name", ["item_embeddings.npy", "item_ids.npy", "users.npz"])
def test_a_file_swapped_for_one_of_the_same_size_is_refused(pipeline, tmp_path, name):
    """Rows of the embeddings or ids reordered (what another run's export looks like), or a
    user's history changed: the size is the same, the checksum is not."""
    import shutil

    import numpy as np

    from twotower_rec.errors import ExportError
    from twotower_rec.serving.exported import ExportedModel

    copy = tmp_path / "export"
    shutil.copytree(pipeline.export_dir, copy)
    path = copy / name
    size = path.stat().st_size
    if name == "users.npz":
        arrays = dict(np.load(path, allow_pickle=False))
        arrays["history_items"] = arrays["history_items"][::-1].copy()
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)
    else:
        array = np.load(path, allow_pickle=False)
        np.save(path, array[::-1].copy())
    assert path.stat().st_size == size
    with pytest.raises(ExportError) as err:
        ExportedModel.load(copy)
    assert name in str(err.value) and "SHA-256" in str(err.value)


# --- 5. recommend --liked with ids the catalog does not have ---------------------------------------


def test_liked_ids_none_of_which_is_known_are_an_error(cli, pipeline, tmp_path):
    result = cli("recommend", "--export", pipeline.export_dir, "--liked", "abc,no-such-item", cwd=tmp_path)
    assert_user_error(result, "abc", "no-such-item")


def test_unknown_liked_ids_are_named(cli, pipeline, tmp_path):
    import json

    from twotower_rec.serving.exported import ExportedModel

    known = str(ExportedModel.load(pipeline.export_dir).item_ids[0])
    result = cli("recommend", "--export", pipeline.export_dir, "--liked", f"{known},abc", "-k", "3", cwd=tmp_path)
    assert result.returncode == 0, result.describe()
    assert "abc" in result.stderr and "warning" in result.stderr
    result = cli("recommend", "--export", pipeline.export_dir, "--liked", f"{known},abc", "-k", "3", "--json",
                 cwd=tmp_path)
    payload = json.loads(result.stdout)
    assert payload["unknown_liked"] == ["abc"] and len(payload["items"]) == 3


# --- 15. the ANN index returning fewer than k -------------------------------------------------------


def test_ann_with_k_beyond_what_the_index_returns_falls_back_to_exact(pipeline):
    """An HNSW search with a small ef returns at most ef results: ask for more than that and
    the answer must still hold k items, the same ones exact search ranks."""
    from twotower_rec.serving.exported import ExportedModel

    model = ExportedModel.load(pipeline.export_dir)
    model.index.hnsw.efSearch = 16
    user = str(model.users["raw_user_ids"][0])
    k = model.manifest["num_items"] - 40  # more than the index hands back, fewer than the unseen items
    got = model.recommend_user(user, k=k, ann=True)
    exact = model.recommend_user(user, k=k)
    assert len(exact) == k and len(got) == k
    assert set(r.item for r in got) == set(r.item for r in exact)


# --- 12, 13. one error line, not a traceback --------------------------------------------------------


def test_serve_on_a_port_in_use(cli, pipeline, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", "--export", pipeline.export_dir, "--port", str(port), cwd=tmp_path, timeout=60)
    assert_user_error(result, str(port), "in use")


def test_a_config_file_that_is_not_utf8(cli, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  out_dir: runs/caf\xe9\n".encode("latin-1"))
    assert_user_error(cli("prepare", "--config", path, cwd=tmp_path), str(path), "UTF-8", "line 2")


# --- 14. the HTTP endpoint under a misbehaving client ------------------------------------------------


@pytest.fixture(scope="module")
def endpoint(pipeline):
    import threading

    from twotower_rec.serving.exported import ExportedModel
    from twotower_rec.serving.http_server import make_server

    model = ExportedModel.load(pipeline.export_dir)
    server = make_server(model, max_k=50)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, model
    server.shutdown()
    server.server_close()


def _raw_request(address, data: bytes) -> tuple[int, dict, bytes]:
    """Send bytes as they are; the status, headers and body of the reply."""
    import socket

    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(data)
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection without an answer (got {reply!r})"
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("data, status, message", [
    (b'POST /recommend HTTP/1.1\r\nContent-Length: abc\r\n\r\n', 400, "Content-Length"),
    (b"PUT /recommend HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 405, "POST"),
    (b"DELETE /recommend HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405, "POST"),
    (b"PATCH /health HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405, "GET"),
])
def test_http_malformed_requests_get_json_errors(endpoint, data, status, message):
    got, headers, body = _raw_request(endpoint[0].server_address, data)
    assert got == status and headers["content-type"] == "application/json"
    import json

    assert message in json.loads(body)["error"]


def test_http_deeply_nested_json_is_a_bad_request(endpoint):
    import json

    body = b"[" * 100_000 + b"]" * 100_000
    got, _, reply = _raw_request(endpoint[0].server_address,
                                 b"POST /recommend HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert got == 400 and "nested" in json.loads(reply)["error"]


def test_http_server_faults_are_500_and_client_disconnects_are_quiet(endpoint, capfd):
    import http.client
    import json
    import socket
    import time

    server, model = endpoint
    user = str(model.users["raw_user_ids"][0])
    original = model.recommend_users

    def broken(*args, **kwargs):
        raise RuntimeError("a bug on the server's side")

    model.recommend_users = broken
    try:
        conn = http.client.HTTPConnection(*server.server_address, timeout=30)
        conn.request("POST", "/recommend", body=json.dumps({"user": user}))
        response = conn.getresponse()
        assert response.status == 500 and "internal error" in json.loads(response.read())["error"]
        conn.close()
    finally:
        model.recommend_users = original
    body = json.dumps({"users": [user] * 200, "k": 50}).encode()
    for linger in (False, True):  # clients that send a request and go away before the answer
        with socket.create_connection(server.server_address) as sock:
            sock.sendall(b"POST /recommend HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            if linger:  # reset the connection rather than close it
                time.sleep(0.05)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    time.sleep(3)  # the server answers into the closed connections
    err = capfd.readouterr().err
    assert "Traceback" not in err and "BrokenPipe" not in err and "ConnectionReset" not in err, err


# --- 16. progress into a file or a pipe ---------------------------------------------------------------


def test_progress_into_a_pipe_is_plain_lines(cli, pipeline, tmp_path):
    """stderr is a pipe here, as under nohup, Slurm or CI: no carriage-return bar updates, a
    plain line every train.progress_every_seconds and the validation lines."""
    result = cli("train", "--config", pipeline.config_path, "--set", f"train.out_dir={tmp_path}",
                 "--set", "train.progress=true", "--set", "train.progress_every_seconds=0",
                 "--set", "train.val_every_steps=4", cwd=pipeline.root)
    assert result.returncode == 0, result.describe()
    assert "\r" not in result.stderr and "\r" not in result.stdout
    steps = [line for line in result.stderr.splitlines() if line.startswith("train: step ")]
    assert len(steps) >= 3 and "examples/s" in steps[-1] and "loss" in steps[-1], result.stderr
    assert "validation recall@10" in result.stdout + result.stderr


# --- 17. a bad byte in your own CSV ---------------------------------------------------------------------


def test_a_bad_byte_in_an_interactions_csv_names_its_line(tmp_path):
    path = tmp_path / "events.csv"
    path.write_bytes(b"user,item,timestamp\n1,10,100\n1,11,101\n1,caf\xe9,102\n")
    cfg = load_config(None, ["data.source=interactions", f"data.interactions_path={path}"])
    with pytest.raises(DataError) as err:
        load_raw(cfg.data)
    assert str(path) in str(err.value) and "line 4" in str(err.value) and "utf-8" in str(err.value).lower()
