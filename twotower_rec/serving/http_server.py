"""A small HTTP JSON endpoint over an export (standard library ``http.server``).

    GET  /health      -> 200 {"status": "ok", "items": N, "users": U, "embedding_dim": D, "ann": "hnsw"}
    POST /recommend   {"user": "42", "k": 10}                           one known user
                      {"users": ["42", "7"], "k": 10}                   a batch of known users
                      {"liked": ["1", "50"], "features": {"gender": "F"}, "k": 10}    a new user
                      optional: "include_seen": true, "ann": true
                   -> 200 {"user": "42", "items": [{"item", "score", "title", "genres"}, ...]}
                      or {"results": [{"user": ..., "items": [...]}, ...]} for a batch

A new user's reply also names the liked ids the catalog lacks, "unknown_liked": [...], and
the side-feature values training never saw, "unknown_features": {"gender": "X"} (they read as
the unknown value; nothing known at all is a 400). Ids follow the id rule (``data/ids.py``).

Errors: 400 (malformed request line or header, malformed or too deeply nested JSON, an integer
of more than 4300 digits, missing or ill-typed fields, a true/false feature value, bad k, a
Content-Length that is not a number), 404 (unknown path or user), 405 (wrong method, HEAD and
TRACE included, with Allow), 408 (a body that did not arrive within the read timeout), 411/413
(no or too large a body), 414/431 (request line or headers too long), 501 (a method HTTP does
not define here), 503 (over the connection cap), 500 (a fault on the server's side, logged there
as one line); the body is always {"error": message}, one line (a HEAD reply has none). A client
that goes away before its answer is not an error. Nothing here imports training code or TorchRec.

Bounds: every connection has a read timeout (``read_timeout``, 10 s by default: an idle
keep-alive connection, or a request whose head or body stops arriving, is closed after it), at
most ``max_connections`` (64) are served at once (one thread each; the next gets 503 at once and
is closed), and the listen backlog is 128.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from twotower_rec.errors import ExportError, TwoTowerError, UnknownUserError
from twotower_rec.serving.exported import ExportedModel

MAX_BODY = 1 << 20
MAX_BATCH = 1000
READ_TIMEOUT = 10.0  # seconds a connection may wait for the next bytes of a request
MAX_CONNECTIONS = 64  # connections served at once (one thread each)
BACKLOG = 128  # connections the kernel queues before accept (the standard library's default is 5)
_DIGITS = re.compile(r"[0-9]+")  # str.isdigit() accepts '²', which int() refuses


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        """A bad request, answered with ``status`` and ``{"error": message}``.

        Args:
            status: the reply's HTTP status.
            message: the reply's error message.
        """
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
    """The JSON reply to one /recommend body (raises RequestError for a bad request).

    Args:
        model: the export to answer from.
        body: the request's parsed JSON (see the module docstring); anything but an object is a bad request.
        max_k: the largest ``k`` a request may ask for.
        ann_default: whether a request without ``"ann"`` searches the faiss index.
    """
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
        if not isinstance(features, dict) or not all(isinstance(v, (str, int)) and not isinstance(v, bool)
                                                     for v in features.values()):
            raise RequestError(HTTPStatus.BAD_REQUEST, "'features' must map feature names to single values (strings "
                                                       "or integers; not true/false)")
        features = {n: str(v) for n, v in features.items()}
        recs = model.recommend_new_user(liked=liked, features=features, k=k, exclude_liked=not include_seen,
                                        ann=use_ann)
        return {"user": None, "items": [r.to_dict() for r in recs], "unknown_liked": model.unknown_items(liked),
                "unknown_features": model.unknown_features(features)}
    except UnknownUserError as err:
        raise RequestError(HTTPStatus.NOT_FOUND, str(err)) from None
    except ExportError as err:  # raw values the pre-processing refuses (serving/query_inputs.py) among them
        raise RequestError(HTTPStatus.BAD_REQUEST, str(err).strip().splitlines()[-1]) from None


class RecommendServer(ThreadingHTTPServer):
    """A threading HTTP server that answers /health and /recommend from one export, with a read
    timeout per connection and a cap on the connections served at once."""

    daemon_threads = True
    request_queue_size = BACKLOG

    def __init__(self, model: ExportedModel, host: str, port: int, ann: bool, max_k: int, quiet: bool,
                 read_timeout: float = READ_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> None:
        """Bind ``(host, port)``; ``serve_forever`` then answers.

        Args:
            model: the export to answer from.
            host, port: the address to listen on (``port`` 0: a free port).
            ann: whether a request without ``"ann"`` searches the faiss index.
            max_k: the largest ``k`` a request may ask for.
            quiet: do not log each request.
            read_timeout: seconds a connection may wait for the next bytes of a request before it is closed.
            max_connections: connections served at once; the next ones get 503 and are closed.
        """
        self.model, self.ann, self.max_k, self.quiet = model, ann, max_k, quiet
        self.read_timeout, self.max_connections = read_timeout, max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__((host, port), _Handler)

    def process_request(self, request, client_address) -> None:
        """Serve the connection on its own thread if a slot is free, else answer 503 and close it.

        Args:
            request: the accepted socket.
            client_address: the client's ``(host, port)``.
        """
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: the slot is not taken
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        """The connection's thread (the base class's), giving its slot back when it ends.

        Args:
            request: the accepted socket.
            client_address: the client's ``(host, port)``.
        """
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """503 and close, on the accepting thread: read what already arrived (at most 50 ms), so
        closing does not reset the connection before the client reads the answer."""
        data = json.dumps({"error": f"the server is at its limit of {self.max_connections} connections; "
                                    "try again shortly"}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(data)}"
                "\r\nConnection: close\r\nRetry-After: 1\r\n\r\n").encode()
        try:
            request.settimeout(0.05)
            try:
                request.recv(1 << 16)
            except (TimeoutError, OSError):
                pass
            request.sendall(head + data)
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """One line, not a traceback; nothing when the client went away before its answer.

        Args:
            request: the request being answered (unused).
            client_address: the client's ``(host, port)``; the line names its host.
        """
        error = sys.exc_info()[1]
        if isinstance(error, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)):
            return
        print(f"serve: error answering {client_address[0]}: {error!r}", file=sys.stderr, flush=True)


class _Handler(BaseHTTPRequestHandler):
    server: RecommendServer
    protocol_version = "HTTP/1.1"  # keep-alive
    # Headers and body leave in two writes: without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK hold the body back about 40 ms on every keep-alive request.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # StreamRequestHandler sets it on the socket
        super().setup()

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if not self.server.quiet:
            super().log_message(format, *args)

    def _send(self, status: HTTPStatus, payload: dict, allow: str | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        if allow:
            self.send_header("Allow", allow)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":  # a reply to HEAD has headers only
            self.wfile.write(data)

    _ERRORS = {HTTPStatus.REQUEST_URI_TOO_LONG: "the request line is too long (at most 65536 bytes)",
               HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE: "a header line is too long, or there are too many headers",
               HTTPStatus.REQUEST_TIMEOUT: "the request did not arrive within the server's read timeout"}

    def send_error(self, code, message=None, explain=None) -> None:
        """What the standard library answers in HTML (a malformed request line or header, an
        unsupported method), as ``{"error": message}`` JSON; the connection is closed.

        Args:
            code: the HTTP status.
            message: the standard library's one-line reason, if any.
            explain: its longer explanation (unused).
        """
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # a request line that did not parse: answer as HTTP/1.1
            self.request_version = self.protocol_version
        status = HTTPStatus(code)
        text = self._ERRORS.get(status) or message or status.phrase
        if status == HTTPStatus.NOT_IMPLEMENTED and self.command:
            text = f"{self.command} is not an HTTP method served here; use GET /health or POST /recommend"
        self._send(status, {"error": " ".join(str(text).split())})

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

    def _not_allowed(self):
        self._drain()
        allowed = "POST" if self.path == "/recommend" else "GET"
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.command} {self.path} is not served; use "
                                                            f"{allowed} (GET /health, POST /recommend)"},
                   allow=allowed)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed  # noqa: N815

    def do_HEAD(self):  # noqa: N802 - http.server's naming
        self.close_connection = True
        self._not_allowed()

    def _drain(self) -> None:
        """Read the body of a request not served, so the connection stays usable."""
        length = (self.headers.get("Content-Length") or "0").strip()
        if _DIGITS.fullmatch(length):
            self.rfile.read(min(int(length), MAX_BODY))
        else:
            self.close_connection = True

    def do_POST(self):  # noqa: N802
        if self.path != "/recommend":
            self._drain()
            status = HTTPStatus.METHOD_NOT_ALLOWED if self.path == "/health" else HTTPStatus.NOT_FOUND
            self._send(status, {"error": f"POST {self.path} is not served; POST /recommend"})
            return
        length = self.headers.get("Content-Length")
        if length is None:
            self._send(HTTPStatus.LENGTH_REQUIRED, {"error": "a Content-Length header is required"})
            return
        if not _DIGITS.fullmatch(length.strip()):
            self.close_connection = True
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"Content-Length must be a number of bytes, got {length!r}"})
            return
        if int(length) > MAX_BODY:
            self.close_connection = True
            self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"the body must be at most {MAX_BODY} bytes"})
            return
        try:
            raw = self.rfile.read(int(length))
        except TimeoutError:  # the body stopped arriving: 408, and the connection is closed
            self.send_error(HTTPStatus.REQUEST_TIMEOUT)
            return
        if len(raw) < int(length):  # the client closed its side before the whole body
            self.close_connection = True
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"the body ended after {len(raw)} of {length} bytes"})
            return
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"the body is not valid JSON: {err}"})
            return
        except RecursionError:
            self._send(HTTPStatus.BAD_REQUEST, {"error": "the body is nested too deeply to read"})
            return
        except ValueError:  # an integer of more digits than Python converts
            self._send(HTTPStatus.BAD_REQUEST, {"error": f"the body holds a number of more than "
                                                         f"{sys.get_int_max_str_digits()} digits"})
            return
        self._answer(body)

    def _answer(self, body) -> None:
        try:
            payload = answer(self.server.model, body, max_k=self.server.max_k, ann_default=self.server.ann)
        except RequestError as err:
            self._send(err.status, {"error": str(err)})
            return
        except Exception as err:  # noqa: BLE001 - a fault on the server's side: 500, and one line in its log
            print(f"serve: internal error answering {self.client_address[0]}: {err!r}", file=sys.stderr, flush=True)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(err).__name__}"})
            return
        self._send(HTTPStatus.OK, payload)


def make_server(model: ExportedModel, host: str = "127.0.0.1", port: int = 0, ann: bool = False,
                max_k: int = 1000, quiet: bool = True, read_timeout: float = READ_TIMEOUT,
                max_connections: int = MAX_CONNECTIONS) -> RecommendServer:
    """A bound, not yet serving, server (``port=0`` picks a free port: ``server.server_address``).

    Args:
        model: the export to answer from.
        host: the address to listen on.
        port: the port to listen on; ``0``: a free one.
        ann: whether a request without ``"ann"`` searches the faiss index.
        max_k: the largest ``k`` a request may ask for.
        quiet: do not log each request.
        read_timeout: seconds a connection may wait for the next bytes of a request before it is closed.
        max_connections: connections served at once; the next ones get 503 and are closed.
    """
    try:
        return RecommendServer(model, host, port, ann, max_k, quiet, read_timeout, max_connections)
    except OSError as err:
        raise TwoTowerError(f"cannot serve on {host}:{port}: {err.strerror or err} (another server may use the "
                            "port: pick another with --port, or 0 for a free one)") from None


def serve(model: ExportedModel, host: str, port: int, ann: bool = False, max_k: int = 1000, threads: int = 1,
          read_timeout: float = READ_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> None:
    """Answer HTTP requests from ``model`` until Ctrl-C, logging each request to stderr.

    Args:
        model: the export to answer from.
        host, port: the address to listen on (``port`` 0: a free port).
        ann: whether a request without ``"ann"`` searches the faiss index.
        max_k: the largest ``k`` a request may ask for.
        threads: torch's intra-op threads (``torch.set_num_threads``).
        read_timeout: seconds a connection may wait for the next bytes of a request before it is closed.
        max_connections: connections served at once; the next ones get 503 and are closed.
    """
    torch.set_num_threads(threads)
    server = make_server(model, host, port, ann=ann, max_k=max_k, quiet=False, read_timeout=read_timeout,
                         max_connections=max_connections)
    bound = server.server_address
    print(f"serving {model.directory} ({model.manifest['num_items']} items, {len(model.user_row)} users) on "
          f"http://{bound[0]}:{bound[1]}  (GET /health, POST /recommend; Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
