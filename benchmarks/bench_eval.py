"""Full-catalog evaluation throughput: users scored per second against catalogs of 1e4..1e6 items.

    .venv/bin/python benchmarks/bench_eval.py                       # 1e5 users x 1e4 / 1e5 items, 1e4 users x 1e6
    .venv/bin/python benchmarks/bench_eval.py --users 100000 --items 100000

Times the package's own exact top-K (``retrieval.chunked_topk``, the code evaluation and
serving use) with 50 seen items excluded per user, k = 200, 64-dim unit vectors. Memory
is bounded by the score block of ``chunk x items`` float32 (reported), not by users x items.
Prints a table and writes benchmarks/results/eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from twotower_rec.evaluation.topk import chunked_topk

RESULTS = Path(__file__).parent / "results"


def run(users: int, items: int, dim: int, k: int, chunk: int, seen: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    queries = F.normalize(torch.randn(users, dim, generator=gen), dim=-1)
    catalog = F.normalize(torch.randn(items, dim, generator=gen), dim=-1)
    rng = np.random.default_rng(0)
    offsets = np.arange(users + 1, dtype=np.int64) * seen
    values = rng.integers(0, items, users * seen)
    started = time.perf_counter()
    scores, top = chunked_topk(queries, catalog, k, offsets, values, chunk=chunk)
    seconds = time.perf_counter() - started
    assert top.shape == (users, min(k, items))
    return {"users": users, "items": items, "seconds": seconds, "users_per_s": users / seconds,
            "score_block_mib": chunk * items * 4 / 2**20,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["100000x10000", "100000x100000", "10000x1000000"],
                        help="USERSxITEMS")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--chunk", type=int, default=1024, help="queries per score block (eval.user_chunk)")
    parser.add_argument("--seen", type=int, default=50, help="items excluded per user")
    parser.add_argument("--out", default=str(RESULTS / "eval.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'users':>9}{'items':>11}{'seconds':>10}{'users/s':>11}{'block MiB':>11}{'peak RSS GiB':>14}", flush=True)
    for case in args.cases:
        users, items = (int(x) for x in case.split("x"))
        r = run(users, items, args.dim, args.k, args.chunk, args.seen)
        rows.append(r)
        print(f"{users:>9,}{items:>11,}{r['seconds']:>10.1f}{r['users_per_s']:>11,.0f}{r['score_block_mib']:>11.0f}"
              f"{r['peak_rss_gib']:>14.2f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dim": args.dim, "k": args.k, "chunk": args.chunk, "seen": args.seen,
                               "threads": torch.get_num_threads(), "cores": os.cpu_count(), "results": rows}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
