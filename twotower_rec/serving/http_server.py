"""A small HTTP JSON endpoint over an export (standard library ``http.server``).

    GET  /health      -> 200 {"status": "ok", "items": N, "users": U, "embedding_dim": D, "ann": "hnsw"}
    POST /recommend   {"user": "42", "k": 10}                           one known user
                      {"users": ["42", "7"], "k": 10}                   a batch of known users
                      {"liked": ["1", "50"], "features": {"gender": "F"}, "k": 10}    a new user
                      optional: "include_seen": true, "ann": true
                   -> 200 {"user": "42", "items": [{"item", "score", "title", "genres"}, ...]}
                      or {"results": [{"user": ..., "items": [...]}, ...]} for a batch

Errors: 400 (malformed JSON, missing or ill-typed fields, bad k), 404 (unknown path or user),
405 (wrong method), 411/413 (no or too large a body); the body is {"error": message}.
Nothing here imports training code or TorchRec.
"""

from __future__ import annotations

import json
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from twotower_rec.errors import ExportError, UnknownUserError
from twotower_rec.serving.exported import ExportedModel

MAX_BODY = 1 << 20
MAX_BATCH = 1000


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def _k(body: dict, max_k: int) -> int:
    k = body.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max_k:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'k' must be an integer from 1 to {max_k}, got {k!r}")
    return k


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'{name}' must be true or false, got {value!r}")
    return value


def _ids(value, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in value):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"'{name}' must be a list of ids (strings or integers)")
    return [str(x) for x in value]


def answer(model: ExportedModel, body, max_k: int = 1000, ann_default: bool = False) -> dict:
    """The JSON reply to one /recommend body (raises RequestError for a bad request)."""
    if not isinstance(body, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
    known = {"user", "users", "liked", "features", "k", "include_seen", "ann"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown field(s) {unknown}; expected some of {sorted(known)}")
    k = _k(body, max_k)
    include_seen = _flag(body, "include_seen", False)
    use_ann = _flag(body, "ann", ann_default)
    new_user = ["new user"] if "liked" in body or "features" in body else []
    modes = [m for m in ("user", "users") if m in body] + new_user
    if len(modes) != 1:
        raise RequestError(HTTPStatus.BAD_REQUEST, "give exactly one of 'user', 'users', or 'liked'/'features' "
                                                   "(a new user)")
    try:
        if "user" in body:
            if not isinstance(body["user"], (str, int)) or isinstance(body["user"], bool):
                raise RequestError(HTTPStatus.BAD_REQUEST, "'user' must be a string or an integer")
            recs = model.recommend_user(str(body["user"]), k=k, exclude_seen=not include_seen, ann=use_ann)
            return {"user": str(body["user"]), "items": [r.to_dict() for r in recs]}
        if "users" in body:
            users = _ids(body["users"], "users")
            if not 1 <= len(users) <= MAX_BATCH:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"'users' must hold 1 to {MAX_BATCH} ids, got {len(users)}")
            lists = model.recommend_users(users, k=k, exclude_seen=not include_seen, ann=use_ann)
            return {"results": [{"user": u, "items": [r.to_dict() for r in recs]} for u, recs in zip(users, lists)]}
        liked = _ids(body.get("liked", []), "liked")
        features = body.get("features", {})
        if not isinstance(features, dict) or not all(isinstance(v, (str, int)) for v in features.values()):
            raise RequestError(HTTPStatus.BAD_REQUEST, "'features' must map feature names to single values")
        recs = model.recommend_new_user(liked=liked, features={n: str(v) for n, v in features.items()}, k=k,
                                        exclude_liked=not include_seen, ann=use_ann)
        return {"user": None, "items": [r.to_dict() for r in recs]}
    except UnknownUserError as err:
        raise RequestError(HTTPStatus.NOT_FOUND, str(err)) from None
    except (ExportError, torch.jit.Error, RuntimeError) as err:
        raise RequestError(HTTPStatus.BAD_REQUEST, str(err).strip().splitlines()[-1]) from None


class RecommendServer(ThreadingHTTPServer):
    """A threading HTTP server that answers /health and /recommend from one export."""

    daemon_threads = True

    def __init__(self, model: ExportedModel, host: str, port: int, ann: bool, max_k: int, quiet: bool) -> None:
        self.model, self.ann, self.max_k, self.quiet = model, ann, max_k, quiet
        super().__init__((host, port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: RecommendServer
    protocol_version = "HTTP/1.1"  # keep-alive
    # Headers and body leave in two writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK hold the body back about 40 ms on every keep-alive request.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if not self.server.quiet:
            super().log_message(format, *args)

    def _send(self, status: HTTPStatus, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/health":
            manifest = self.server.model.manifest
            self._send(HTTPStatus.OK, {"status": "ok", "items": int(manifest["num_items"]),
                                       "users": len(self.server.model.user_row),
                                       "embedding_dim": int(manifest["embedding_dim"]),
                                       "ann": (manifest.get("ann") or {}).get("kind")})
        elif self.path == "/recommend":
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "use POST for /recommend"})
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such path {self.path}; use /health or /recommend"})

    def do_POST(self):  # noqa: N802
        if self.path != "/recommend":
            # drain the body so the connection stays usable
            self.rfile.read(min(int(self.headers.get("Content-Length") or 0), MAX_BODY))
            status = HTTPStatus.METHOD_NOT_ALLOWED if self.path == "/health" else HTTPStatus.NOT_FOUND
            self._send(status, {"error": f"POST {self.path} is not served; POST /recommend"})
            return
        length = self.headers.get("Content-Length")
        if length is None:
            self._send(HTTPStatus.LENGTH_REQUIRED, {"error": "a Content-Length header is required"})
            return
        if not length.isdigit() or int(length) > MAX_BODY:
            self.close_connection = True
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"the body must be at most {MAX_BODY} bytes"})
            return
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"the body is not valid JSON: {err}"})
            return
        try:
            self._send(HTTPStatus.OK, answer(self.server.model, body, max_k=self.server.max_k,
                                             ann_default=self.server.ann))
        except RequestError as err:
            self._send(err.status, {"error": str(err)})


def make_server(model: ExportedModel, host: str = "127.0.0.1", port: int = 0, ann: bool = False,
                max_k: int = 1000, quiet: bool = True) -> RecommendServer:
    """A bound, not yet serving, server (``port=0`` picks a free port: ``server.server_address``)."""
    return RecommendServer(model, host, port, ann, max_k, quiet)


def serve(model: ExportedModel, host: str, port: int, ann: bool = False, max_k: int = 1000, threads: int = 1) -> None:
    torch.set_num_threads(threads)
    server = make_server(model, host, port, ann=ann, max_k=max_k, quiet=False)
    bound = server.server_address
    print(f"serving {model.directory} ({model.manifest['num_items']} items, {len(model.user_row)} users) on "
          f"http://{bound[0]}:{bound[1]}  (GET /health, POST /recommend; Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
