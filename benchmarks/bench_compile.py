"""retrieval.compile against eager, side by side: step time, compile time, the loss drift.

    .venv/bin/python benchmarks/bench_compile.py                     # configs/demo.yaml
    .venv/bin/python benchmarks/bench_compile.py --config configs/ml_latest_small.yaml \\
        --set data.data_dir=../shared/datasets/ml-latest-small --set model.members=1

Prepares the config's data once (a temporary directory), then for ``--rounds`` rounds runs each
mode in a fresh process, the modes taking turns: ``eager``, ``mlp`` (the towers' heads
compiled), ``loss`` (the in-batch softmax compiled) and ``both`` (what ``retrieval.compile: true``
does). Each process builds the model exactly as ``train`` does, trains ``--steps`` steps on the
same batches and reports the median step after ``--warmup`` steps, the first step's time (with an
empty inductor cache: the compile time) and its per-step losses, compared with the eager run of
the same round. Prints a table and writes benchmarks/results/compile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
MODES = ("eager", "mlp", "loss", "both")


def worker(args) -> None:
    """One mode in this process: JSON of its step times and losses on stdout."""
    import torch

    from twotower_rec.cli import quiet_library_warnings
    from twotower_rec.config import load_config
    from twotower_rec.data.batches import Batcher
    from twotower_rec.data.prepared import PreparedData
    from twotower_rec.data.splits import TRAIN
    from twotower_rec.distributed.env import init_distributed
    from twotower_rec.model.factory import build_model
    from twotower_rec.tasks import make_task
    from twotower_rec.train.batch_order import global_batches
    from twotower_rec.losses.compiled import compiled_loss
    from twotower_rec.train.optim import build_optimizer
    from twotower_rec.train.step import train_step

    quiet_library_warnings()
    cfg = load_config(args.config, [*args.overrides, f"data.cache_dir={args.cache}"])
    data = PreparedData(args.cache)
    env = init_distributed()
    task = make_task(cfg)
    model = build_model(cfg, task, data, env)
    optimizer = build_optimizer(model, cfg.train)
    task.start(data, env, 0)
    if args.worker in ("mlp", "both"):
        compile_heads(model)
    if args.worker in ("loss", "both"):
        task.ctx.kernel = compiled_loss()
    batcher, rows = Batcher(data), data.rows(TRAIN)
    order = [b for e in range(100) for b in global_batches(rows.size, cfg.train.batch_size, cfg.train.seed, e)]
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        batch = batcher.batch(rows[order[i]], training=True)
        started = time.perf_counter()
        losses.append(float(train_step(model, optimizer, batch, task, cfg.train.bf16)))
        times.append(time.perf_counter() - started)
    print(json.dumps({"first_step_s": times[0], "median_step_ms": 1000 * statistics.median(times[args.warmup:]),
                      "losses": losses, "threads": torch.get_num_threads(), "batch_size": cfg.train.batch_size}))


def compile_heads(model) -> None:
    """Mode ``mlp``: every tower's head (MLP + L2 normalisation) through torch.compile, as an
    instance attribute over ``Tower.head``. ``nn.Module.compile()`` is not used: with torch 2.13
    it left the module eager (it compiles ``Module._call_impl``, which dynamo skips)."""
    import torch

    from twotower_rec.model.towers import Tower

    for module in model.modules():
        if isinstance(module, Tower):
            module.head = torch.compile(module.head)


def run_mode(mode: str, args, cache: str) -> dict:
    argv = [sys.executable, __file__, "--worker", mode, "--cache", cache, "--config", args.config,
            "--steps", str(args.steps), "--warmup", str(args.warmup)]
    for override in args.overrides:
        argv += ["--set", override]
    with tempfile.TemporaryDirectory() as inductor_cache:  # an empty cache: the first step compiles
        env = {**os.environ, "PYTHONPATH": str(REPO), "TORCHINDUCTOR_CACHE_DIR": inductor_cache}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=50, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "compile.json"))
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from twotower_rec.cli import quiet_library_warnings
    from twotower_rec.config import load_config
    from twotower_rec.data.prepared import prepare
    from twotower_rec.data.sources import load_raw

    quiet_library_warnings()
    modes = ["eager", *[m for m in args.modes if m != "eager"]]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as cache:
        cfg = load_config(args.config, [*args.overrides, f"data.cache_dir={cache}"])
        prepare(load_raw(cfg.data), cfg.data, cfg.features)
        for r in range(args.rounds):
            for mode in modes:
                runs[mode].append(run_mode(mode, args, cache))
                print(f"round {r + 1} {mode}: {runs[mode][-1]['median_step_ms']:.2f} ms", file=sys.stderr, flush=True)
    eager_ms = statistics.median(x["median_step_ms"] for x in runs["eager"])
    rows = []
    for mode in modes:
        drift = [max(abs(a - b) for a, b in zip(x["losses"], e["losses"])) for x, e in zip(runs[mode], runs["eager"])]
        first50 = [max(abs(a - b) for a, b in zip(x["losses"][:50], e["losses"][:50]))
                   for x, e in zip(runs[mode], runs["eager"])]
        ms = statistics.median(x["median_step_ms"] for x in runs[mode])
        rows.append({"mode": mode, "median_step_ms": ms, "speedup": eager_ms / ms,
                     "rounds_ms": [x["median_step_ms"] for x in runs[mode]],
                     "first_step_s": statistics.median(x["first_step_s"] for x in runs[mode]),
                     "max_loss_diff_first_50": max(first50), "max_loss_diff": max(drift)})
    batch = runs["eager"][0]["batch_size"]
    print(f"\n{args.config} {' '.join(args.overrides)}: batch {batch}, {args.steps} timed steps, {args.rounds} rounds, "
          f"{runs['eager'][0]['threads']} threads")
    print("| mode | median step (ms) | vs eager | examples/s | first step (s, compiles) | max loss diff, 50 steps | "
          f"max loss diff, {args.warmup + args.steps} steps |\n|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row['median_step_ms']:.2f} | {row['speedup']:.2f}x | "
              f"{1000 * batch / row['median_step_ms']:,.0f} | {row['first_step_s']:.1f} | "
              f"{row['max_loss_diff_first_50']:.1e} | {row['max_loss_diff']:.1e} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "batch_size": batch,
                               "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                               "date": time.strftime("%Y-%m-%d %H:%M"), "results": rows}, indent=2))
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
