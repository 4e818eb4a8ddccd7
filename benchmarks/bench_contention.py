"""Training throughput when the cores are shared: one training alone, two trainings started
together, and one training beside a CPU-bound process, each with the default threads and with
``train.num_threads=1``.

    .venv/bin/python benchmarks/bench_contention.py --rounds 3
    .venv/bin/python benchmarks/bench_contention.py --tree ../before --rounds 3   # another checkout

Each training is ``python -m twotower_rec train`` on a config prepared once (default
configs/demo.yaml, ``--steps`` steps, no validation, no checkpoints); examples/s is what its
``train_metrics.json`` reports. ``--tree`` runs another checkout's code (its ``PYTHONPATH``)
with this venv. ``--env KEY=VALUE`` adds to the trainings' environment (e.g.
``OMP_WAIT_POLICY=ACTIVE`` to see what passive waiting buys). The scenarios of a round run one
after the other, rounds interleave them, and the table shows medians and the ratios of medians.
Prints a table and writes benchmarks/results/contention.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
HOG = "while True:\n    pass\n"
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml", help="the config to train (relative to --tree)")
    p.add_argument("--tree", default=str(REPO), help="the checkout whose code trains (default: this one)")
    p.add_argument("--steps", type=int, default=100, help="training steps per run")
    p.add_argument("--rounds", type=int, default=3, help="repetitions of every scenario (medians over them)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="add to the trainings' env")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every training (e.g. data.data_dir=...)")
    p.add_argument("--only", choices=["alone", "two together", "beside a CPU hog"], action="append",
                   help="run only these scenarios (repeatable; e.g. --only alone for lone runs of two trees in turn)")
    p.add_argument("--out", default=str(RESULTS / "contention.json"))
    return p.parse_args()


class Runner:
    """Starts trainings of one prepared config in a temporary folder."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args, self.work, self.tree = args, work, Path(args.tree).resolve()
        self.env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
        self.env["PYTHONPATH"] = str(self.tree)
        self.env.update(dict(item.split("=", 1) for item in args.env))
        self.sets = [f"data.cache_dir={work / 'data'}", *args.overrides]
        self.count = 0
        subprocess.run(self.argv("prepare"), cwd=self.tree, env=self.env, check=True, capture_output=True)

    def argv(self, verb: str, extra: list[str] = ()) -> list[str]:
        sets = [a for s in [*self.sets, *extra] for a in ("--set", s)]
        return [sys.executable, "-m", "twotower_rec", verb, "--config", str(self.tree / self.args.config), *sets]

    def start(self, threads: int) -> tuple[subprocess.Popen, Path]:
        self.count += 1
        out = self.work / f"run{self.count}"
        extra = [f"train.out_dir={out}", f"train.max_steps={self.args.steps}", "train.epochs=1000",
                 "train.val_every_steps=0", "train.checkpoint_every_steps=0", "train.progress=false",
                 f"train.num_threads={threads}"]
        proc = subprocess.Popen(self.argv("train", extra), cwd=self.tree, env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return proc, out

    @staticmethod
    def rate(proc: subprocess.Popen, out: Path) -> float:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"training failed (exit {proc.returncode}):\n{err[-2000:]}")
        return float(json.loads((out / "train_metrics.json").read_text())["examples_per_second"])

    def alone(self, threads: int) -> list[float]:
        return [self.rate(*self.start(threads))]

    def together(self, threads: int) -> list[float]:
        runs = [self.start(threads), self.start(threads)]
        return [self.rate(*run) for run in runs]

    def beside_hog(self, threads: int) -> list[float]:
        hog = subprocess.Popen([sys.executable, "-c", HOG])
        try:
            return [self.rate(*self.start(threads))]
        finally:
            hog.kill()
            hog.wait()


SCENARIOS = [("alone", 0), ("alone", 1), ("two together", 0), ("two together", 1),
             ("beside a CPU hog", 0), ("beside a CPU hog", 1)]


def main() -> None:
    args = parse_args()
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="contention-") as tmp:
        runner = Runner(args, Path(tmp))
        for _ in range(args.rounds):
            for scenario, threads in SCENARIOS:
                if args.only and scenario not in args.only:
                    continue
                key = f"{scenario}, num_threads={threads}"
                method = {"alone": runner.alone, "two together": runner.together,
                          "beside a CPU hog": runner.beside_hog}[scenario]
                rates.setdefault(key, []).extend(method(threads))
    medians = {key: statistics.median(values) for key, values in rates.items()}
    alone = medians.get("alone, num_threads=0", float("nan"))
    print(f"{args.config}, {args.steps} steps, {args.rounds} rounds, tree {args.tree}, env {args.env or '-'}, "
          f"{os.cpu_count()} cores")
    print(f"{'scenario':<34} {'examples/s (median)':>20} {'x alone (default)':>18}  all runs")
    for key, median in medians.items():
        runs = ", ".join(f"{v:,.0f}" for v in rates[key])
        print(f"{key:<34} {median:>20,.0f} {median / alone:>18.3f}  {runs}")
    nan = float("nan")
    ratios = {
        "two together / alone (default threads)": medians.get("two together, num_threads=0", nan) / alone,
        "beside hog: default / num_threads=1": (medians.get("beside a CPU hog, num_threads=0", nan)
                                                / medians.get("beside a CPU hog, num_threads=1", nan)),
        "beside hog / alone (default threads)": medians.get("beside a CPU hog, num_threads=0", nan) / alone,
    }
    for name, value in ratios.items():
        print(f"{name:<48} {value:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "steps": args.steps, "rounds": args.rounds, "tree": args.tree,
                               "env": args.env, "cores": os.cpu_count(), "runs": rates, "medians": medians,
                               "ratios": ratios}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
