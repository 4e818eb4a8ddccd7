"""Batch-building throughput: prepared columns -> Batch (query KJT, item KJT, dense, labels).

    .venv/bin/python benchmarks/bench_batches.py            # default features, 1 thread
    .venv/bin/python benchmarks/bench_batches.py --users 20000 --repeats 50

Prints a table and writes benchmarks/results/batches.json. Prepares a synthetic data set
in a temporary directory first (not timed). Times only ``Batcher.batch(rows)`` on random
training rows, after warm-up; reports the median and the 10th/90th percentiles.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from twotower_rec.config import load_config
from twotower_rec.data.batches import Batcher
from twotower_rec.data.prepared import prepare
from twotower_rec.data.sources import load_raw
from twotower_rec.data.splits import TRAIN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20000)
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "batches.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"data.cache_dir={tmp}", f"data.synthetic.num_users={args.users}",
                                 f"data.synthetic.num_items={args.items}"])
        data = prepare(load_raw(cfg.data), cfg.data, cfg.features)
        batcher = Batcher(data)
        rows = data.rows(TRAIN)
        rng = np.random.default_rng(0)
        results = []
        for batch_size in args.batch_sizes:
            for _ in range(5):
                batcher.batch(rng.choice(rows, batch_size))
            seconds = []
            for _ in range(args.repeats):
                picked = rng.choice(rows, batch_size)
                start = time.perf_counter()
                batch = batcher.batch(picked)
                seconds.append(time.perf_counter() - start)
            rates = batch_size / np.asarray(seconds)
            history = batch.query_features["history"].lengths().float().mean().item()
            results.append({"batch_size": batch_size, "median_examples_per_s": float(np.median(rates)),
                            "p10_examples_per_s": float(np.percentile(rates, 10)),
                            "p90_examples_per_s": float(np.percentile(rates, 90)),
                            "mean_history_length": history})

    print(f"batch building, {args.threads} thread(s), {data.num_rows:,} interactions, "
          f"query keys {data.spec.query_keys}, item keys {data.spec.item_keys}")
    print(f"{'batch':>7} {'median ex/s':>14} {'p10 ex/s':>14} {'p90 ex/s':>14} {'mean history':>13}")
    for r in results:
        print(f"{r['batch_size']:>7} {r['median_examples_per_s']:>14,.0f} {r['p10_examples_per_s']:>14,.0f} "
              f"{r['p90_examples_per_s']:>14,.0f} {r['mean_history_length']:>13.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "batch_building", "threads": args.threads,
                               "interactions": data.num_rows, "python": platform.python_version(),
                               "torch": torch.__version__, "command": " ".join(sys.argv), "results": results},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
