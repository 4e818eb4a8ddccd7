"""Training throughput at world size 1 and 2 on CPU (gloo) with a 10-million-row item table.

    .venv/bin/python benchmarks/bench_distributed.py                      # 10M rows, row_wise, ws 1 and 2
    .venv/bin/python benchmarks/bench_distributed.py --rows 1000000 --rounds 3 --sharding table_wise

The driver launches ``torchrun --standalone --nproc_per_node=N benchmarks/bench_distributed.py
--worker ...`` for each world size, alternating them for ``--rounds`` rounds so both see the
same machine load, and reports the median over rounds. Each worker builds the package's own
TwoTower (history bag sharing the item-id table, so ONE table of ``--rows`` rows), shards it
with the package's planner (rank 0 prints the plan), and times the package's ``train_step``
(global in-batch negatives) on random global batches of ``--batch-size`` examples, each rank
taking its slice. Both world sizes use the machine's cores: 1 process x C threads against
2 processes x C/2 threads. Prints a table and writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def worker(args) -> None:
    import numpy as np
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from twotower_rec.config import Config, ModelConfig, ShardingConfig, TrainConfig
    from twotower_rec.data.batches import Batch
    from twotower_rec.data.features import HISTORY, Feature, FeatureSpec
    from twotower_rec.distributed import sharding
    from twotower_rec.distributed.env import init_distributed, shutdown, synchronize
    from twotower_rec.model.factory import new_model
    from twotower_rec.tasks import make_task
    from twotower_rec.cli import quiet_library_warnings
    from twotower_rec.losses.softmax import LossContext
    from twotower_rec.train.optim import build_optimizer
    from twotower_rec.train.step import train_step

    quiet_library_warnings()
    env = init_distributed()
    rows, users, hist = args.rows, 100_000, args.history
    spec = FeatureSpec(
        query_features=[Feature("user_id", "query", users + 1),
                        Feature(HISTORY, "query", rows + 1, pooling="mean", table="t_item_id")],
        item_features=[Feature("item_id", "item", rows + 1, pooling="mean"),
                       Feature("genres", "item", 21, pooling="mean")],
        item_dense=[], history_length=hist, num_users=users, num_items=rows)
    cfg = Config()
    cfg.model = ModelConfig(embedding_dim=args.dim, mlp_dims=[128], output_dim=64)
    cfg.train = TrainConfig(batch_size=args.batch_size, seed=0)
    cfg.sharding = ShardingConfig(sharding_types=[args.sharding])
    started = time.perf_counter()
    model = sharding.shard_model(new_model(cfg.model, spec), env, cfg.sharding, cfg.train)
    optimizer = build_optimizer(model, cfg.train)
    task = make_task(cfg)  # retrieval; its loss state by hand (this spec has no prepared data)
    task.ctx = LossContext(cfg.loss, np.ones(rows + 1), args.batch_size, env.device)
    build_s = time.perf_counter() - started
    if env.is_main:
        print(sharding.describe_plan(model), file=sys.stderr, flush=True)

    local = args.batch_size // env.world_size
    rng = np.random.default_rng([7, env.rank])

    def batch() -> Batch:
        hist_len = rng.integers(0, hist + 1, local)
        genre_len = rng.integers(1, 4, local)
        query = KeyedJaggedTensor(
            keys=["user_id", HISTORY],
            values=torch.from_numpy(np.concatenate([rng.integers(1, users + 1, local),
                                                    rng.integers(1, rows + 1, int(hist_len.sum()))])),
            lengths=torch.from_numpy(np.concatenate([np.ones(local, np.int64), hist_len])))
        items = rng.integers(1, rows + 1, local)
        item = KeyedJaggedTensor(
            keys=["item_id", "genres"],
            values=torch.from_numpy(np.concatenate([items, rng.integers(1, 21, int(genre_len.sum()))])),
            lengths=torch.from_numpy(np.concatenate([np.ones(local, np.int64), genre_len])))
        return Batch(query, item, torch.zeros(local, 0), torch.ones(local), torch.from_numpy(items))

    times = []
    for step in range(args.warmup + args.steps):
        b = batch().to(env.device)
        synchronize(env.device)
        started = time.perf_counter()
        train_step(model, optimizer, b, task)
        synchronize(env.device)  # CUDA returns before the step is done
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    # the slowest rank sets the pace
    step_s = torch.tensor([statistics.median(times)], dtype=torch.float64)
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20], dtype=torch.float64)
    torch.distributed.all_reduce(step_s, op=torch.distributed.ReduceOp.MAX)
    peaks = [torch.zeros(1, dtype=torch.float64) for _ in range(env.world_size)]
    torch.distributed.all_gather(peaks, peak)
    if env.is_main:
        print("RESULT " + json.dumps({
            "world_size": env.world_size, "threads_per_process": torch.get_num_threads(),
            "median_step_s": float(step_s), "examples_per_s": args.batch_size / float(step_s),
            "build_and_init_s": build_s, "peak_rss_gib_per_rank": [round(float(p), 2) for p in peaks],
            "plan": sharding.describe_plan(model)}), flush=True)
    shutdown()


def launch(args, world_size: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
           __file__, "--worker", "--rows", str(args.rows), "--dim", str(args.dim), "--batch-size",
           str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--sharding", args.sharding, "--history", str(args.history)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"world size {world_size} failed:\n{proc.stderr[-3000:]}")
    sys.stderr.write(proc.stderr.split("sharding plan:")[-1][:2000] if "sharding plan:" in proc.stderr else "")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="item-id table rows")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4096, help="global batch")
    parser.add_argument("--history", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sharding", default="row_wise")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "distributed.json"))
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    cores = os.cpu_count() or 1
    runs: dict[int, list[dict]] = {ws: [] for ws in args.world_sizes}
    for round_ in range(args.rounds):
        for ws in args.world_sizes:
            result = launch(args, ws, max(1, cores // ws))
            runs[ws].append(result)
            print(f"round {round_ + 1} world size {ws}: {result['examples_per_s']:,.0f} examples/s", file=sys.stderr)
    base = statistics.median(r["examples_per_s"] for r in runs[args.world_sizes[0]])
    rows = []
    print(f"\n{args.rows:,}-row item table x {args.dim} dims, global batch {args.batch_size}, {args.sharding}, "
          f"{cores} cores, median of {args.rounds} rounds")
    print(f"{'world size':>10} {'threads/proc':>12} {'examples/s':>12} {'vs ws ' + str(args.world_sizes[0]):>9} "
          f"{'step ms':>8} {'peak RSS GiB/rank':>18}")
    for ws, results in runs.items():
        rate = statistics.median(r["examples_per_s"] for r in results)
        step_ms = 1000 * statistics.median(r["median_step_s"] for r in results)
        peak = max(max(r["peak_rss_gib_per_rank"]) for r in results)
        rows.append({"world_size": ws, "threads_per_process": results[0]["threads_per_process"],
                     "examples_per_s": rate, "ratio": rate / base, "median_step_ms": step_ms,
                     "peak_rss_gib_per_rank": peak, "rounds": results})
        print(f"{ws:>10} {results[0]['threads_per_process']:>12} {rate:>12,.0f} {rate / base:>8.2f}x "
              f"{step_ms:>8.1f} {peak:>18.2f}")
    print("\nplan at world size", args.world_sizes[-1], ":\n" + runs[args.world_sizes[-1]][0]["plan"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": args.rows, "dim": args.dim, "batch_size": args.batch_size,
                               "sharding": args.sharding, "history": args.history, "cores": cores,
                               "python": platform.python_version(), "results": rows}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
