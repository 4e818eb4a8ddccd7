"""What ``serve`` bounds and how it answers what it does not serve (issue 30: items 6, 13a, 14, 18):
read timeouts, a cap on connections, JSON for every error (raw sockets), side-feature values."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from twotower_rec.errors import ExportError
from twotower_rec.serving.exported import ExportedModel
from twotower_rec.serving.http_server import make_server


@pytest.fixture(scope="module")
def exported(pipeline):
    return ExportedModel.load(pipeline.export_dir)


def _start(model, **kwargs):
    srv = make_server(model, **kwargs)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture
def quick_server(exported):
    """A server whose read timeout is 1 s."""
    srv = _start(exported, read_timeout=1.0, max_connections=16)
    yield srv.server_address
    srv.shutdown()
    srv.server_close()


def _health(address) -> int:
    conn = http.client.HTTPConnection(*address, timeout=10)
    conn.request("GET", "/health")
    status = conn.getresponse().status
    conn.close()
    return status


def _read_all(sock: socket.socket, seconds: float = 10) -> bytes:
    """Everything the server sends until it closes the connection (``socket.timeout`` if it never does)."""
    sock.settimeout(seconds)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def raw_exchange(address, data: bytes) -> tuple[int, dict, bytes]:
    """Send ``data`` on a fresh connection; the reply's status, headers (lower-case) and body."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        reply = _read_all(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


# --- item 6: timeouts, the connection cap, the backlog -------------------------------------------------


def test_idle_and_slow_connections_are_closed_after_the_read_timeout(quick_server):
    idle = socket.create_connection(quick_server)
    slow = socket.create_connection(quick_server)
    slow.sendall(b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}")  # 98 bytes never come
    started = time.monotonic()
    assert _health(quick_server) == 200  # others are answered meanwhile
    assert time.monotonic() - started < 0.9
    try:
        idle_reply, slow_reply = _read_all(idle, 5), _read_all(slow, 5)  # socket.timeout: never closed
    finally:
        idle.close()
        slow.close()
    assert time.monotonic() - started < 4
    assert idle_reply == b""  # an idle keep-alive connection is just closed
    assert slow_reply.startswith(b"HTTP/1.1 408") and b'"error"' in slow_reply


def test_connections_over_the_cap_get_503_and_are_closed(exported):
    srv = _start(exported, read_timeout=30.0, max_connections=2)
    address = srv.server_address
    held = [socket.create_connection(address) for _ in range(2)]
    try:
        time.sleep(0.3)  # both accepted, each holding a slot
        status, headers, body = raw_exchange(address, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and headers["content-type"] == "application/json"
        assert "connections" in json.loads(body)["error"]
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while _health_or_503(address) == 503 and time.monotonic() < deadline:  # slots come back on close
        time.sleep(0.05)
    assert _health(address) == 200
    assert srv.request_queue_size == 128  # listen backlog (the standard library's is 5)
    srv.shutdown()
    srv.server_close()


def _health_or_503(address) -> int:
    status, _, _ = raw_exchange(address, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return status


# --- item 14: JSON for everything the standard library answered in HTML ---------------------------------


@pytest.fixture(scope="module")
def server(exported):
    srv = _start(exported, max_k=50)
    yield srv.server_address
    srv.shutdown()
    srv.server_close()


_BODY = b'{"user": "1", "k": 1' + b"1" * 5000 + b"}"


# Nothing follows what the server reads before it answers and closes: unread bytes at close would
# reset the connection before the client reads the answer.
@pytest.mark.parametrize("data, status, message", [
    (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n", 400, "Content-Length"),
    (b"POST /recommend HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY),
     400, "digits"),
    (b"TRACE /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 405, "TRACE /health is not served"),
    (b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", 501, "BREW"),
    (b"GARBAGE\r\n", 400, "request"),
    (b"GET /health HTTP/x.y\r\n", 400, "version"),
    (b"GET /" + b"a" * (65537 - 5), 414, "too long"),
    (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", 413, "at most"),
])
def test_errors_are_one_json_object_with_the_right_status(server, data, status, message):
    got, headers, body = raw_exchange(server, data)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert set(payload) == {"error"} and message in payload["error"] and "\n" not in payload["error"]


def test_head_gets_405_with_json_headers_and_no_body(server):
    got, headers, body = raw_exchange(server, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got == 405 and headers["content-type"] == "application/json" and headers["allow"] == "GET"
    assert body == b""


# --- item 13a: side-feature values ---------------------------------------------------------------------


def _post(address, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*address, timeout=30)
    conn.request("POST", "/recommend", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, payload


def test_unknown_feature_values_are_reported_like_unknown_liked_ids(server, exported):
    item = str(exported.item_ids[0])
    status, payload = _post(server, {"liked": [item], "features": {"gender": "X", "age": 25}, "k": 3})
    assert status == 200 and len(payload["items"]) == 3
    assert payload["unknown_features"] == {"gender": "X"}
    status, payload = _post(server, {"liked": [item], "features": {"gender": "F"}, "k": 3})
    assert status == 200 and payload["unknown_features"] == {}
    status, payload = _post(server, {"features": {"gender": "X"}})  # nothing known at all: an error
    assert status == 400 and "gender" in payload["error"] and "'F'" in payload["error"]


@pytest.mark.parametrize("value", [True, 2.5, None, ["F"]])
def test_ill_typed_feature_values_are_a_400(server, exported, value):
    status, payload = _post(server, {"liked": [str(exported.item_ids[0])], "features": {"gender": value}})
    assert status == 400 and "features" in payload["error"]


def test_feature_values_in_process(exported):
    assert exported.unknown_features({"gender": "X", "age": "25", "occupation": 4}) == {"gender": "X"}
    with pytest.raises(ExportError, match="'gender'.*true or false"):
        exported.recommend_new_user(liked=[str(exported.item_ids[0])], features={"gender": True})
    with pytest.raises(ExportError, match="none of the side-feature values"):
        exported.recommend_new_user(features={"gender": "X"})


def test_recommend_cli_warns_about_unknown_feature_values(pipeline, cli):
    item = str(exported_item(pipeline))
    result = cli("recommend", "--export", pipeline.export_dir, "--liked", item, "--feature", "gender=X", "--json")
    assert result.returncode == 0, result.describe()
    assert "warning: unknown value of gender, read as unknown: X" in result.stderr
    assert json.loads(result.stdout)["unknown_features"] == {"gender": "X"}


def exported_item(pipeline):
    import numpy as np

    return np.load(pipeline.export_dir / "item_ids.npy", allow_pickle=False)[0]


# --- item 18: serve's numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "argument --port: 70000 is not a port"),
    (["--port", "-1"], "argument --port: -1 is not a port"),
    (["--threads", "0"], "argument --threads: expected an integer >= 1, got 0"),
    (["--max-k", "0"], "argument --max-k: expected an integer >= 1, got 0"),
    (["--max-connections", "0"], "argument --max-connections: expected an integer >= 1, got 0"),
    (["--timeout", "0"], "argument --timeout: expected a number of seconds > 0, got 0"),
    (["--timeout", "soon"], "argument --timeout: expected a number of seconds > 0, got soon"),
])
def test_serve_numbers_are_checked_by_the_parser(args, message, capsys):
    from twotower_rec.cli import build_parser

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["serve", "--export", "x", *args])
    assert caught.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors


def test_serve_defaults(capsys):
    from twotower_rec.cli import build_parser

    args = build_parser().parse_args(["serve", "--export", "x"])
    assert (args.port, args.threads, args.timeout, args.max_connections) == (8000, 1, 10.0, 64)
