"""Load test of `twotower-rec serve` on 127.0.0.1: latency percentiles and queries/s.

    .venv/bin/python benchmarks/load_test.py --export runs/demo/export
    .venv/bin/python benchmarks/load_test.py --export runs/demo/export --requests 5000 --concurrency 8
    .venv/bin/python benchmarks/load_test.py --export runs/demo/export --slow-clients 200 --server-timeout 2

Starts the server as its own process (`python -m twotower_rec serve --port P`), waits for
/health, then for each scenario sends ``--requests`` POST /recommend requests from
``--concurrency`` client threads, each on its own keep-alive connection, with random known
users (fixed seed). Bounded: every scenario stops after ``--requests`` requests or
``--max-seconds``, whichever comes first. Prints a table and writes
benchmarks/results/load_test.json. Latency is the client's wall time per request.

``--slow-clients N`` measures the normal clients alone and then beside N slow ones: each opens
a connection, sends a partial request (its head and 1 of 100 body bytes) and waits; when the
server closes it (its read timeout, ``--server-timeout``) it opens another. The server gets
``--max-connections`` N + concurrency + 16, so the slow ones take threads, not the others' slots.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, log: Path, seconds: float = 120) -> dict:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            return json.loads(conn.getresponse().read())
        except OSError:
            time.sleep(0.2)
    sys.exit("the server did not answer /health in time")


def run_scenario(port: int, bodies: list[dict], concurrency: int, max_seconds: float) -> dict:
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    next_index = [0]
    stop_at = time.perf_counter() + max_seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(bodies) or time.perf_counter() > stop_at:
                break
            data = json.dumps(bodies[i]).encode()
            started = time.perf_counter()
            conn.request("POST", "/recommend", body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            elapsed = time.perf_counter() - started
            with lock:
                latencies.append(elapsed)
                errors[0] += response.status != 200
        conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "errors": errors[0], "seconds": wall, "qps": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


PARTIAL = b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"


def slow_clients(port: int, n: int, stop: threading.Event) -> tuple[list[threading.Thread], dict]:
    """``n`` threads that each hold a connection with a partial request until the server closes it,
    then open another, until ``stop``; the counts of connections opened and closed by the server."""
    counts = {"opened": 0, "closed_by_server": 0, "refused": 0}
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=1)
                sock.sendall(PARTIAL)
            except OSError:
                with lock:
                    counts["refused"] += 1
                time.sleep(0.1)
                continue
            with lock:
                counts["opened"] += 1
            while not stop.is_set():
                try:
                    if not sock.recv(4096):
                        break
                except socket.timeout:
                    continue
                except OSError:
                    break
            else:
                sock.close()
                return
            sock.close()
            with lock:
                counts["closed_by_server"] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="export directory")
    parser.add_argument("--requests", type=int, default=2000, help="requests per scenario (default 2000)")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--max-seconds", type=float, default=60, help="per-scenario time bound (default 60)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--slow-clients", type=int, default=0,
                        help="also measure the normal clients beside this many slow ones (see above)")
    parser.add_argument("--server-timeout", type=float, default=10.0, help="the server's --timeout (default 10)")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/load_test.json, or "
                                                    "load_test_slow.json with --slow-clients)")
    args = parser.parse_args()
    if args.slow_clients:
        return main_slow(args)

    users = np.load(Path(args.export) / "users.npz", allow_pickle=False)["raw_user_ids"]
    items = np.load(Path(args.export) / "item_ids.npy", allow_pickle=False)
    rng = np.random.default_rng(0)

    def pick(n):
        return [str(u) for u in users[rng.integers(0, len(users), n)].tolist()]

    scenarios = {
        "one user, exact": [{"user": u, "k": args.k} for u in pick(args.requests)],
        "one user, ANN": [{"user": u, "k": args.k, "ann": True} for u in pick(args.requests)],
        "batch of 32 users, exact": [{"users": pick(32), "k": args.k} for _ in range(args.requests // 8)],
        "new user (5 liked), exact": [{"liked": [str(i) for i in items[rng.integers(0, len(items), 5)].tolist()],
                                        "k": args.k} for _ in range(args.requests)],
    }
    port, proc, log = start_server(args.export)
    try:
        health = wait_healthy(port, proc, log)
        results = {}
        for name, bodies in scenarios.items():
            run_scenario(port, bodies[:50], args.concurrency, args.max_seconds)  # warm-up
            results[name] = run_scenario(port, bodies, args.concurrency, args.max_seconds)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"\n{args.export}: {health['items']} items, {health['users']} users, ANN {health['ann']}; "
          f"{args.concurrency} client threads, k={args.k}, {os.cpu_count()} cores")
    print(f"{'scenario':<28}{'requests':>9}{'errors':>7}{'q/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}")
    for name, r in results.items():
        print(f"{name:<28}{r['requests']:>9}{r['errors']:>7}{r['qps']:>9.1f}{r['p50_ms']:>9.2f}{r['p90_ms']:>9.2f}"
              f"{r['p99_ms']:>9.2f}")
    out = Path(args.out or RESULTS / "load_test.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"export": str(args.export), "health": health, "concurrency": args.concurrency,
                               "k": args.k, "cores": os.cpu_count(), "python": platform.python_version(),
                               "scenarios": results}, indent=2))
    print(f"written to {out}")


def start_server(export: str, *extra: str) -> tuple[int, subprocess.Popen, Path]:
    """``twotower-rec serve`` on a free port, logging to a file: its port, process and log."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = Path(tempfile.mkdtemp()) / "server.log"  # the server logs every request: never to a pipe nobody reads
    with open(log, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "twotower_rec", "serve", "--export", export, "--port",
                                 str(port), *extra], stderr=log_file, env=env)
    return port, proc, log


def main_slow(args) -> None:
    """Normal clients alone, then beside ``args.slow_clients`` slow ones: the table and the JSON."""
    users = np.load(Path(args.export) / "users.npz", allow_pickle=False)["raw_user_ids"]
    rng = np.random.default_rng(0)
    bodies = [{"user": str(u), "k": args.k} for u in users[rng.integers(0, len(users), args.requests)].tolist()]
    cap = args.slow_clients + args.concurrency + 16
    port, proc, log = start_server(args.export, "--timeout", str(args.server_timeout), "--max-connections", str(cap))
    stop = threading.Event()
    try:
        health = wait_healthy(port, proc, log)
        run_scenario(port, bodies[:50], args.concurrency, args.max_seconds)  # warm-up
        alone = run_scenario(port, bodies, args.concurrency, args.max_seconds)
        threads, counts = slow_clients(port, args.slow_clients, stop)
        time.sleep(1.0)  # every slow client connected and waiting
        beside = run_scenario(port, bodies, args.concurrency, args.max_seconds)
        time.sleep(args.server_timeout + 1.0)  # at least one round of server-side closes
        stop.set()
        for t in threads:
            t.join(timeout=5)
    finally:
        stop.set()
        proc.terminate()
        proc.wait(timeout=30)
    results = {"alone": alone, f"beside {args.slow_clients} slow clients": beside}
    print(f"\n{args.export}: {health['items']} items, {health['users']} users; {args.concurrency} client threads, "
          f"one user exact, k={args.k}; server --timeout {args.server_timeout} --max-connections {cap}; "
          f"{os.cpu_count()} cores")
    print(f"{'normal clients':<30}{'requests':>9}{'errors':>7}{'q/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}")
    for name, r in results.items():
        print(f"{name:<30}{r['requests']:>9}{r['errors']:>7}{r['qps']:>9.1f}{r['p50_ms']:>9.2f}{r['p90_ms']:>9.2f}"
              f"{r['p99_ms']:>9.2f}")
    print(f"slow connections: {counts['opened']} opened, {counts['closed_by_server']} closed by the server's "
          f"timeout, {counts['refused']} refused")
    out = Path(args.out or RESULTS / "load_test_slow.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"export": str(args.export), "health": health, "concurrency": args.concurrency,
                               "k": args.k, "slow_clients": args.slow_clients, "server_timeout": args.server_timeout,
                               "max_connections": cap, "slow_connections": counts, "cores": os.cpu_count(),
                               "python": platform.python_version(), "normal_clients": results}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
