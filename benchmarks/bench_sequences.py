"""Training speed of the sequence mode beside the event mode: examples/s and peak memory.

An example is one (query, target) pair: one training event in the event mode, one position of
a window in the sequence mode (``task: next_item``). Each variant runs in a process
of its own (so its peak RSS is its own): it prepares the data of its config into a temporary
cache, builds the sharded model (a world of one), trains ``--warmup`` steps, then times
``--steps`` steps one by one; the table shows the median over ``--rounds`` rounds, the
variants taking turns in each round (the machine is shared: side by side in one run).

    .venv/bin/python benchmarks/bench_sequences.py --data-dir ../shared/datasets/ml-latest-small

Variants: the pooled bag (configs/ml_latest_small.yaml, one member), the per-event sequence
encoder (the same with model.history_encoder=transformer) and the sequence mode
(configs/ml_latest_small_sequences.yaml). Writes benchmarks/results/sequences.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "pooled bag (events)": ("configs/ml_latest_small.yaml", ["model.members=1"]),
    "per-event transformer (events)": ("configs/ml_latest_small.yaml",
                                            ["model.members=1", "model.history_encoder=transformer"]),
    "causal, task next_item": ("configs/ml_latest_small_sequences.yaml", []),
}


def worker(config: str, overrides: list[str], data_dir: str, steps: int, warmup: int, threads: int) -> dict:
    """Prepare, build, warm up, time ``steps`` steps; the numbers of this process."""
    import torch

    from twotower_rec.config import load_config
    from twotower_rec.data.batches import Batcher
    from twotower_rec.data.prepared import PreparedData, prepare
    from twotower_rec.data.sources import load_raw
    from twotower_rec.distributed.env import init_distributed
    from twotower_rec.model.factory import build_model
    from twotower_rec.tasks import make_task
    from twotower_rec.train.batch_order import local_batches
    from twotower_rec.train.optim import build_optimizer
    from twotower_rec.train.step import train_step

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as cache:
        cfg = load_config(REPO / config, [*overrides, f"data.data_dir={data_dir}", f"data.cache_dir={cache}/data"])
        prepare(load_raw(cfg.data), cfg.data, cfg.features)
        data = PreparedData(cfg.data.cache_dir)
        env = init_distributed()
        task = make_task(cfg)
        model = build_model(cfg, task, data, env)
        optimizer = build_optimizer(model, cfg.train)
        batcher = Batcher(data)
        batches = local_batches(lambda examples, negatives: task.batch(batcher, examples, negatives, env),
                                task.training_examples(batcher), cfg.train.batch_size, 1000, 0,
                                task.negatives_per_batch(), data.spec.num_items, env)
        task.start(data, env, 0)
        model.train()
        seconds, examples = [], []
        for step in range(warmup + steps):
            batch = next(batches)
            started = time.perf_counter()
            train_step(model, optimizer, batch, task)
            if step >= warmup:
                seconds.append(time.perf_counter() - started)
                examples.append(task.step_examples(batch))
    step_s = float(np.median(seconds))
    return {"median_step_ms": 1000 * step_s, "examples_per_step": float(np.mean(examples)),
            "examples_per_second": float(np.sum(examples) / np.sum(seconds)),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the unpacked ml-latest-small archive")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="an override for the sequence-mode variant")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sequences.json"))
    args = parser.parse_args()
    if args.worker:
        config, overrides = VARIANTS[args.worker]
        overrides = overrides + (args.set if args.worker == "causal, task next_item" else [])
        print(json.dumps(worker(config, overrides, args.data_dir, args.steps, args.warmup, args.threads)))
        return
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            command = [sys.executable, __file__, "--worker", name, "--data-dir", args.data_dir, "--steps",
                       str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            command += [x for s in args.set for x in ("--set", s)]
            out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    bag = float(np.median([r["examples_per_second"] for r in runs["pooled bag (events)"]]))
    print(f"| variant | examples / step | median step (ms) | examples/s (median of {args.rounds}) | vs bag | "
          "peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    table = {}
    for name, rounds in runs.items():
        rate = float(np.median([r["examples_per_second"] for r in rounds]))
        row = {"examples_per_step": float(np.median([r["examples_per_step"] for r in rounds])),
               "median_step_ms": float(np.median([r["median_step_ms"] for r in rounds])),
               "examples_per_second": rate, "vs_bag": rate / bag,
               "peak_rss_mib": float(max(r["peak_rss_mib"] for r in rounds)), "rounds": rounds}
        table[name] = row
        print(f"| {name} | {row['examples_per_step']:,.0f} | {row['median_step_ms']:,.0f} | {rate:,.0f} | "
              f"{rate / bag:.2f}x | {row['peak_rss_mib']:,.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "variants": table}, indent=2))


if __name__ == "__main__":
    main()
