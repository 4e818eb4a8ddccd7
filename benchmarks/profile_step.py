"""Where one training step's time goes: torch.profiler over the package's real training loop.

    .venv/bin/python benchmarks/profile_step.py                       # configs/demo.yaml data and model
    .venv/bin/python benchmarks/profile_step.py --config configs/ml_latest_small.yaml --set data.data_dir=...

Prepares the config's data (into a temporary directory), builds the sharded model exactly as
``train`` does, warms up, then profiles ``--steps`` steps. Batch building (``Batcher.batch``)
is timed around each step; the step itself is split by the ``record_function`` labels in
``train_step`` (forward + loss, backward with the fused table update, dense optimizer) and
by operator families (embedding lookup, matrix products, the loss). The roofline line counts
one step's FLOPs (``torch.utils.flop_counter``) and compares the rate they are done at with
the best float32 matmul rate of the same threads, measured in the same run. The ceiling line
bounds that share: the matrix products and the table lookups alone, at the speed they run here,
already take some of the step, whatever the other operators cost. Prints a table and writes
benchmarks/results/profile.json; ``--trace`` also writes a Chrome trace.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

RESULTS = Path(__file__).parent / "results"

# operator-name fragments -> the family they are reported under (first match wins)
FAMILIES = [
    ("embedding lookup (fbgemm TBE)", ("fbgemm::", "split_embedding", "TBE", "embedding_bag")),
    ("in-batch logits + loss", ("cross_entropy", "log_softmax", "nll_loss", "masked_fill", "_log_softmax")),
    ("matrix products (MLP, logits)", ("aten::addmm", "aten::mm", "aten::matmul", "aten::bmm")),
    ("gathers / collectives", ("all_gather", "all_reduce", "c10d::", "alltoall", "all_to_all")),
    ("KJT / jagged permutes", ("permute_", "jagged", "KeyedJaggedTensor")),
]


def counted_flops(step) -> float:
    """FLOPs of one call of ``step`` as torch's FlopCounterMode counts them (matmuls, convolutions,
    attention: the operators with a known formula; others, e.g. fbgemm's lookups, count 0)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def matmul_peak(device: torch.device, sizes: tuple[int, ...] = (256, 512, 1024, 2048), repeats: int = 5) -> float:
    """The best float32 matmul rate (FLOP/s) of this process's threads on ``device``: the limit
    a step is compared against, measured in the same run as the step so both see the same load."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        a @ b  # warm-up
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--trace", help="also write a Chrome trace here")
    parser.add_argument("--out", default=str(RESULTS / "profile.json"))
    args = parser.parse_args()

    from twotower_rec.cli import quiet_library_warnings
    from twotower_rec.config import load_config
    from twotower_rec.data.batches import Batcher
    from twotower_rec.data.prepared import prepare
    from twotower_rec.data.sources import load_raw
    from twotower_rec.data.splits import TRAIN
    from twotower_rec.distributed.env import init_distributed, shutdown, synchronize
    from twotower_rec.model.factory import build_model
    from twotower_rec.tasks import make_task
    from twotower_rec.train.batch_order import global_batches
    from twotower_rec.train.optim import build_optimizer
    from twotower_rec.train.step import train_step

    quiet_library_warnings()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [*args.overrides, f"data.cache_dir={tmp}"])
        data = prepare(load_raw(cfg.data), cfg.data, cfg.features)
        env = init_distributed()
        task = make_task(cfg)
        model = build_model(cfg, task, data, env)
        optimizer = build_optimizer(model, cfg.train)
        task.start(data, env, 0)  # with --set retrieval.compile=true it compiles the loss, as the trainer does
        batcher = Batcher(data)
        rows = data.rows(TRAIN)
        order = [b for e in range(100) for b in global_batches(rows.size, cfg.train.batch_size, cfg.train.seed, e)]
        build_times, step_times = [], []

        def one(i: int) -> None:
            t = time.perf_counter()
            batch = batcher.batch(rows[order[i % len(order)]]).to(env.device)
            synchronize(env.device)
            build_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            train_step(model, optimizer, batch, task, cfg.train.bf16)
            synchronize(env.device)  # CUDA returns before the step is done
            step_times.append(time.perf_counter() - t)

        for i in range(args.warmup):
            one(i)
        build_times.clear()
        step_times.clear()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for i in range(args.warmup, args.warmup + args.steps):
                one(i)
        flops = counted_flops(lambda: one(args.warmup + args.steps))
        peak = matmul_peak(env.device)
        shutdown()
    if args.trace:
        prof.export_chrome_trace(args.trace)

    events = prof.key_averages()
    total_ms = sum(step_times) * 1000
    labels = {e.key: e.cpu_time_total / 1000 for e in events if e.key.startswith("## ")}
    families = {name: 0.0 for name, _ in FAMILIES}
    for e in events:
        if e.key.startswith("## "):
            continue
        for name, fragments in FAMILIES:
            if any(f in e.key for f in fragments):
                families[name] += e.self_cpu_time_total / 1000
                break
    build_ms = statistics.median(build_times) * 1000
    step_ms = statistics.median(step_times) * 1000
    print(f"\n{args.config} {' '.join(args.overrides)}: batch {cfg.train.batch_size}, {args.steps} profiled steps, "
          f"{torch.get_num_threads()} threads")
    print(f"median batch building {build_ms:.2f} ms, median train step {step_ms:.2f} ms: batch building is "
          f"{100 * build_ms / (build_ms + step_ms):.1f}% of (building + step)")
    print(f"\n{'phase (record_function)':<42}{'ms / step':>10}{'share':>8}")
    for key, ms in sorted(labels.items(), key=lambda kv: -kv[1]):
        print(f"{key:<42}{ms / args.steps:>10.2f}{100 * ms / total_ms:>7.1f}%")
    print(f"\n{'operator family (self CPU time)':<42}{'ms / step':>10}{'share':>8}")
    for key, ms in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"{key:<42}{ms / args.steps:>10.2f}{100 * ms / total_ms:>7.1f}%")
    print("\ntop operators by self CPU time:")
    top = sorted((e for e in events if not e.key.startswith("## ")), key=lambda e: -e.self_cpu_time_total)[:12]
    for e in top:
        print(f"  {e.key[:60]:<60}{e.self_cpu_time_total / 1000 / args.steps:>9.2f} ms/step")
    achieved = flops / (step_ms / 1000)
    print(f"\nroofline: {flops / 1e9:.3f} GFLOP per step (FlopCounterMode; the tables' lookups count 0), "
          f"{achieved / 1e9:.1f} GFLOP/s achieved at the median step; the best float32 matmul of "
          f"{torch.get_num_threads()} threads in this run: {peak / 1e9:.1f} GFLOP/s; "
          f"share of the limit {100 * achieved / peak:.0f}%")
    # The ceiling: a step that did nothing but its matrix products and table lookups, each as
    # fast as it runs here, would still take their time; no cut of the other operators beats it.
    matmul_ms = families["matrix products (MLP, logits)"] / args.steps
    floor_ms = matmul_ms + families["embedding lookup (fbgemm TBE)"] / args.steps
    ceiling = flops / (floor_ms / 1000) / peak if floor_ms else float("nan")
    print(f"ceiling: the matrix products alone run at {flops / (matmul_ms / 1000) / 1e9:.1f} GFLOP/s at these "
          f"shapes; with the table lookups they take {floor_ms:.2f} ms a step, so a step with nothing else "
          f"would reach {100 * ceiling:.0f}% of the limit")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "config": args.config, "overrides": args.overrides, "batch_size": cfg.train.batch_size,
        "threads": torch.get_num_threads(), "steps": args.steps, "median_build_ms": build_ms,
        "median_step_ms": step_ms, "build_share": build_ms / (build_ms + step_ms),
        "phases_ms_per_step": {k: v / args.steps for k, v in labels.items()},
        "families_ms_per_step": {k: v / args.steps for k, v in families.items()},
        "top_operators_ms_per_step": {e.key: e.self_cpu_time_total / 1000 / args.steps for e in top},
        "flops_per_step": flops, "achieved_flops_per_s": achieved, "matmul_peak_flops_per_s": peak,
        "share_of_peak": achieved / peak, "matmul_and_lookup_ms_per_step": floor_ms,
        "ceiling_share_of_peak": ceiling,
    }, indent=2))
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
