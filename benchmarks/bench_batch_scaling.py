"""The training step's cost per example against the batch size, eager and with retrieval.compile.

    .venv/bin/python benchmarks/bench_batch_scaling.py                 # configs/demo.yaml, 1024 .. 8192

For each batch size, each mode runs in a fresh process (``bench_compile.py``'s worker: the model
built as ``train`` builds it, the same batches), the modes taking turns, ``--rounds`` times;
the median step after the warm-up, divided by the batch, against batch 1024's. In-batch
negatives score every row against every candidate of the batch, so the logits' share of a step
grows with B (B x B x D multiply-adds). Prints a table and writes
benchmarks/results/batch_scaling.json and .png. With a sample of the batch as negatives
(``retrieval.batch_negatives``) the logits are B x (1 + K + M) and grow linearly:

    .venv/bin/python benchmarks/bench_batch_scaling.py --modes eager --set retrieval.batch_negatives=1024 \
        --out benchmarks/results/batch_scaling_sampled.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_compile import RESULTS, run_mode  # noqa: E402


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    for mode in ("eager", "loss"):
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        axis.plot([r["batch"] for r in mine], [r["us_per_example"] for r in mine], "o-",
                  label="retrieval.compile: true" if mode == "loss" else "eager")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("batch size")
    axis.set_ylabel("step time per example (µs)")
    axis.grid(True, alpha=0.3)
    axis.legend()
    axis.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--batches", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["eager", "loss"], choices=["eager", "loss"],
                        help="loss: retrieval.compile=true (not with retrieval.batch_negatives)")
    parser.add_argument("--out", default=str(RESULTS / "batch_scaling.json"))
    args = parser.parse_args()

    from twotower_rec.cli import quiet_library_warnings
    from twotower_rec.config import load_config
    from twotower_rec.data.prepared import prepare
    from twotower_rec.data.sources import load_raw

    quiet_library_warnings()
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        cfg = load_config(args.config, [*args.overrides, f"data.cache_dir={cache}"])
        prepare(load_raw(cfg.data), cfg.data, cfg.features)
        for batch in args.batches:
            sized = argparse.Namespace(config=args.config, overrides=[*args.overrides, f"train.batch_size={batch}"],
                                       steps=args.steps, warmup=args.warmup)
            times: dict[str, list[float]] = {mode: [] for mode in args.modes}
            for _ in range(args.rounds):
                for mode in times:
                    times[mode].append(run_mode(mode, sized, cache)["median_step_ms"])
            for mode, values in times.items():
                ms = statistics.median(values)
                rows.append({"batch": batch, "mode": mode, "median_step_ms": ms, "rounds_ms": values,
                             "us_per_example": 1000 * ms / batch})
                print(f"batch {batch} {mode}: {ms:.1f} ms", file=sys.stderr, flush=True)
    print(f"\n{args.config} {' '.join(args.overrides)}: {args.steps} timed steps after {args.warmup}, "
          f"median of {args.rounds} rounds\n| batch | mode | median step (ms) | µs / example | vs batch "
          f"{args.batches[0]} |\n|---:|---|---:|---:|---:|")
    for row in rows:
        base = next(r for r in rows if r["mode"] == row["mode"] and r["batch"] == args.batches[0])
        row["vs_first_batch"] = row["us_per_example"] / base["us_per_example"]
        print(f"| {row['batch']:,} | {row['mode']} | {row['median_step_ms']:.1f} | {row['us_per_example']:.1f} | "
              f"{row['vs_first_batch']:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "overrides": args.overrides, "steps": args.steps,
                               "date": time.strftime("%Y-%m-%d %H:%M"), "results": rows}, indent=2))
    try:
        plot(rows, out.with_suffix(".png"), f"{args.config} {' '.join(args.overrides)}, 2 CPU threads")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
