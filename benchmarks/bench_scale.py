"""Cost of every stage against data size: 1e6, 1e7 and 1e8 synthetic interactions end to end.

    .venv/bin/python benchmarks/bench_scale.py --work /work/scale_data              # 1e6 1e7 1e8
    .venv/bin/python benchmarks/bench_scale.py --work /tmp/scale --sizes 1e6 1e7

For each size (users = size / 10, items = size / 100: at 1e8, 1e7 users and 1e6 items) it
writes the synthetic data set as Parquet files in blocks of users (``synthetic.write_parquet``,
not timed as a stage), then runs the CLI, each verb in a fresh process under /usr/bin/time:

- ``prepare``: the directory of Parquet files out of core (``data.engine=duckdb``,
  ``data.memory_limit`` = ``--memory-limit``) with the users' and items' tables;
- ``train``: ``--steps`` steps of ``--batch`` examples (the default two-tower: user id, gender, age,
  occupation, a 50-item history bag; item id, genres, year), validation only at the end;
- ``evaluate``: ``--eval-users`` sampled test users ranked over the full catalog;
- ``export``: with an IVF index (``export.ann=ivf``).

Wall time and peak RSS of each stage; train's examples/s and start-up time (from
``train_metrics.json``). Prints a table and writes benchmarks/results/scale.json and (with
matplotlib) benchmarks/results/scale.png, cost against size on log-log axes with a linear
reference. Sizes run smallest first; ``--keep`` leaves the data and runs in ``--work``.

The examples/s of single runs swing 20% on a shared machine, so the comparison of sizes has a
mode of its own: ``--train-rounds N`` runs only ``train`` on sizes kept from an earlier run,
the sizes taking turns N times, and reports the median per size and its ratio to the first:

    .venv/bin/python benchmarks/bench_scale.py --work /work/scale_data --sizes 1e6 1e8 --train-rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
STAGES = ("prepare", "train", "evaluate", "export")


def timed(argv: list[str], log: Path) -> dict:
    """Run ``argv`` under /usr/bin/time; wall seconds, CPU seconds (user + system: what a
    busy shared machine does not inflate) and peak RSS (GiB). Output goes to ``log``."""
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(["/usr/bin/time", "-f", "peak_rss_kb=%M cpu=%U+%S", *argv], stdout=out, stderr=subprocess.STDOUT,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - started
    text = log.read_text()
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed (exit {done.returncode}); its output:\n{text[-4000:]}")
    peak_kb = int(text.rsplit("peak_rss_kb=", 1)[1].split()[0])
    user, system = text.rsplit("cpu=", 1)[1].split()[0].split("+")
    return {"seconds": round(wall, 2), "cpu_seconds": round(float(user) + float(system), 1),
            "peak_rss_gib": round(peak_kb / 2**20, 3)}


def layout(size: int, args, work: Path) -> tuple[Path, Path, list[str]]:
    """The raw data folder, the runs folder and the CLI overrides of one size."""
    folder = work / f"scale_{size:.0e}".replace("+", "")
    raw, runs = folder / "raw", folder / "runs"
    common = [
        "data.source=interactions", f"data.interactions_path={raw / 'interactions'}",
        f"data.users_path={raw / 'users.parquet'}", f"data.items_path={raw / 'items.parquet'}",
        f"data.cache_dir={runs / 'data'}", "data.engine=duckdb", f"data.memory_limit={args.memory_limit}",
        f"train.out_dir={runs / 'train'}", f"train.max_steps={args.steps}", "train.epochs=1000",
        f"train.batch_size={args.batch}",
        "train.val_every_steps=0", "train.checkpoint_every_steps=0", f"train.val_max_users={args.val_users}",
        f"eval.max_users={args.eval_users}", f"export.dir={runs / 'export'}", "export.ann=ivf",
        f"export.recall_queries={args.val_users}",
    ]
    return raw, runs, [a for c in common for a in ("--set", c)]


def run_size(size: int, args, work: Path) -> dict:
    from twotower_rec.config import SyntheticConfig
    from twotower_rec.data.synthetic import write_parquet

    raw, runs, overrides = layout(size, args, work)
    users, items = size // 10, size // 100
    row = {"size": size, "users": users, "items": items, "command": " ".join(sys.argv),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    if not (raw / "users.parquet").is_file():
        started = time.perf_counter()
        cfg = SyntheticConfig(num_users=users, num_items=items, interactions_per_user=args.per_user,
                              num_clusters=max(20, items // 5000), seed=0)
        counts = write_parquet(cfg, raw, users_per_file=250_000,
                               log=lambda m: print(m, file=sys.stderr, flush=True))
        row["generate_seconds"] = round(time.perf_counter() - started, 1)
        (raw / "counts.json").write_text(json.dumps(counts))
    row["raw_interactions"] = json.loads((raw / "counts.json").read_text())["interactions"]
    runs.mkdir(parents=True, exist_ok=True)
    python = [sys.executable, "-m", "twotower_rec"]
    for stage in STAGES:
        if stage not in args.stages:
            continue
        print(f"scale {size:.0e}: {stage}", file=sys.stderr, flush=True)
        row[stage] = timed([*python, stage, *overrides], runs / f"{stage}.log")
        if stage == "prepare":
            from twotower_rec.data.prepared import PreparedData

            row["rows"] = PreparedData(runs / "data").num_rows
        if stage == "train":
            metrics = json.loads((runs / "train" / "train_metrics.json").read_text())
            row["train"]["examples_per_second"] = round(metrics["examples_per_second"])
            row["train"]["startup_seconds"] = round(metrics["startup_seconds"], 2)
        print(f"scale {size:.0e}: {stage} {row[stage]}", file=sys.stderr, flush=True)
    if not args.keep:
        shutil.rmtree(runs)
    return row


def train_rounds(args, work: Path) -> None:
    """``--train-rounds N``: only ``train``, on sizes already prepared (by an earlier run with
    ``--keep``), the sizes taking turns N times; examples/s and peak RSS per run, the median
    per size and its ratio to the first size's. The machine's load drifts over minutes, so
    sizes compared within a round, many rounds, are what the examples/s target is read from."""
    sizes = [int(float(t)) for t in args.sizes]
    python = [sys.executable, "-m", "twotower_rec"]
    runs_of = {size: [] for size in sizes}
    for r in range(args.train_rounds):
        for size in sizes:
            _, runs, overrides = layout(size, args, work)
            if not (runs / "data" / "feature_spec.json").is_file():
                raise SystemExit(f"size {size:.0e} is not prepared in {runs}: run without --train-rounds and "
                                 "with --keep first")
            stage = timed([*python, "train", *overrides], runs / "train.log")
            metrics = json.loads((runs / "train" / "train_metrics.json").read_text())
            run = {"round": r, "examples_per_second": round(metrics["examples_per_second"]),
                   "startup_seconds": round(metrics["startup_seconds"], 2), **stage}
            runs_of[size].append(run)
            print(f"round {r}: {size:.0e} {run}", file=sys.stderr, flush=True)
    first = statistics.median(run["examples_per_second"] for run in runs_of[sizes[0]])
    table = []
    print(f"\n| interactions | examples/s per round | median | vs {sizes[0]:.0e} | start-up s (median) "
          "| peak RSS GiB (max) |\n|---|---|---:|---:|---:|---:|")
    for size in sizes:
        rates = [run["examples_per_second"] for run in runs_of[size]]
        median = statistics.median(rates)
        row = {"size": size, "runs": runs_of[size], "median_examples_per_second": median,
               "ratio_to_first": round(median / first, 3),
               "median_startup_seconds": statistics.median(run["startup_seconds"] for run in runs_of[size]),
               "max_peak_rss_gib": max(run["peak_rss_gib"] for run in runs_of[size])}
        table.append(row)
        print(f"| {size:.0e} | {' / '.join(f'{x:,}' for x in rates)} | {median:,.0f} | {row['ratio_to_first']:.2f}x | "
              f"{row['median_startup_seconds']} | {row['max_peak_rss_gib']} |")
    out = Path(args.out).with_name("scale_train_rounds.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                               "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
                               "steps": args.steps, "batch": args.batch, "results": table}, indent=2))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["rows"] for r in rows]
    fig, (wall, rss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for stage in STAGES:  # a stage not run (or stopped) at some size is drawn where it was measured
        measured = [r for r in rows if stage in r]
        wall.plot([r["rows"] for r in measured], [r[stage]["seconds"] for r in measured], "o-", label=stage)
        rss.plot([r["rows"] for r in measured], [r[stage]["peak_rss_gib"] for r in measured], "o-", label=stage)
    for axis in (wall, rss):
        first = min(rows, key=lambda r: r["rows"])
        top = max(first[s]["seconds" if axis is wall else "peak_rss_gib"] for s in STAGES if s in first)
        axis.plot(sizes, [top * s / first["rows"] for s in sizes], "k--", lw=0.8, label="linear from the top stage")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("interactions (after prepare)")
        axis.grid(True, which="both", alpha=0.3)
    wall.set_ylabel("wall seconds")
    rss.set_ylabel("peak RSS (GiB)")
    wall.legend(fontsize=8)
    fig.suptitle("twotower-rec: cost of each stage against data size (2 CPU cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="folder for the data and runs (outside the repository)")
    parser.add_argument("--sizes", nargs="*", default=["1e6", "1e7", "1e8"], help="none: only the table and plot")
    parser.add_argument("--stages", nargs="+", default=list(STAGES))
    parser.add_argument("--per-user", type=int, default=11, help="synthetic interactions_per_user")
    parser.add_argument("--memory-limit", default="4GB", help="data.memory_limit for prepare")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--val-users", type=int, default=2000)
    parser.add_argument("--eval-users", type=int, default=10_000)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--merge", nargs="*", default=[],
                        help="JSON files of other runs (e.g. sizes run separately) whose rows join --out's")
    parser.add_argument("--out", default=str(RESULTS / "scale.json"))
    parser.add_argument("--train-rounds", type=int, default=0,
                        help="only train, on sizes prepared before (--keep), the sizes taking turns this many "
                             "times; writes results/scale_train_rounds.json")
    args = parser.parse_args()
    work = Path(args.work)
    if args.train_rounds:
        train_rounds(args, work)
        return
    out = Path(args.out)
    previous = {r["size"]: r for r in json.loads(out.read_text())["results"]} if out.is_file() else {}
    for other in args.merge:
        previous.update({r["size"]: r for r in json.loads(Path(other).read_text())["results"]})
    rows = [previous[s] for s in sorted(previous)]
    for text in args.sizes:
        row = run_size(int(float(text)), args, work)
        previous[row["size"]] = row  # a run of some sizes keeps the others' rows
        rows = [previous[s] for s in sorted(previous)]
        RESULTS.mkdir(exist_ok=True)
        out.write_text(json.dumps({
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(sys.argv), "results": rows}, indent=2))
    if args.merge:
        out.write_text(json.dumps({**json.loads(out.read_text()), "results": rows} if out.is_file() else {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
            "results": rows}, indent=2))
    print("\n| interactions | users | items | stage | wall s | peak RSS GiB | notes |\n|---|---|---|---|---|---|---|")
    for r in rows:
        for stage in STAGES:
            if stage in r:
                notes = (f"{r['train']['examples_per_second']:,} examples/s, start-up {r['train']['startup_seconds']} s"
                         if stage == "train" else "")
                print(f"| {r['rows']:,} | {r['users']:,} | {r['items']:,} | {stage} | {r[stage]['seconds']} | "
                      f"{r[stage]['peak_rss_gib']} | {notes} |")
    try:
        plot(rows, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
