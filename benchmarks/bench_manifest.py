"""What the export manifest's SHA-256 checksums cost: writing them and verifying them on load.

    .venv/bin/python benchmarks/bench_manifest.py                   # 1M items x 64 dims
    .venv/bin/python benchmarks/bench_manifest.py --items 100000 --repeats 5

Writes an export-shaped folder of the sizes a catalog of ``--items`` items and ``--users`` users
gives (float32 item embeddings, int64 ids, an exact faiss index over them, users' histories of
``--history`` items each), then times ``manifest.file_entries`` (what export adds) and
``manifest.check`` (what every load adds) over ``--repeats`` runs. Prints a table and writes
benchmarks/results/manifest.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from twotower_rec.serving import ann, manifest

RESULTS = Path(__file__).parent / "results"


def write_export_files(folder: Path, items: int, users: int, history: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((items, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    np.save(folder / "item_embeddings.npy", vectors)
    np.save(folder / "item_ids.npy", np.arange(items, dtype=np.int64))
    ann.write(ann.build_index(vectors, ann.AnnParams(kind="flat")), folder / "items.faiss")
    np.savez(folder / "users.npz", raw_user_ids=np.arange(users, dtype=np.int64),
             history_offsets=np.arange(users + 1, dtype=np.int64) * history,
             history_items=rng.integers(1, items + 1, users * history))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--history", type=int, default=20, help="items per user in users.npz")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "manifest.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_export_files(folder, args.items, args.users, args.history, args.dim)
        total = sum(p.stat().st_size for p in folder.iterdir())
        write_s, check_s = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            files = manifest.file_entries(folder)
            write_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            manifest.check(folder, {"format_version": manifest.FORMAT_VERSION, "metric": manifest.METRIC,
                                    "embedding_dim": args.dim, "num_items": args.items, "query_features": [],
                                    "history_length": 0, "files": files})
            check_s.append(time.perf_counter() - started)
    result = {"benchmark": "manifest_checksums", "items": args.items, "users": args.users, "dim": args.dim,
              "bytes": total, "files": {name: info["bytes"] for name, info in files.items()},
              "median_write_s": statistics.median(write_s), "median_check_s": statistics.median(check_s),
              "check_mb_per_s": total / 2**20 / statistics.median(check_s), "python": platform.python_version(),
              "command": " ".join(["benchmarks/bench_manifest.py", *sys.argv[1:]])}
    print(f"{'items':>10} {'files MiB':>10} {'checksums at export s':>22} {'verify on load s':>17} {'MiB/s':>7}")
    print(f"{args.items:>10,} {total / 2**20:>10,.0f} {result['median_write_s']:>22.2f} "
          f"{result['median_check_s']:>17.2f} {result['check_mb_per_s']:>7,.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
