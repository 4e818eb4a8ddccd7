"""Do two commits compute the same numbers? For a refactor: each config is prepared, trained
and evaluated by each commit's own code and configs (in a ``git worktree`` of each), and the
per-step losses, the validation curve and the evaluation metrics are compared exactly.

    .venv/bin/python benchmarks/compare_trees.py --before 282fe50 --after HEAD \\
        --data-dir ../shared/datasets/ml-latest-small

Configs: configs/demo.yaml, configs/ml_latest_small.yaml (one member),
configs/ml_latest_small_sequences.yaml and configs/ml_latest_small_bce.yaml; only options both commits know are set from the
command line (paths, ``model.members``), so a renamed option in a config is each commit's own.
Prints a table and writes benchmarks/results/compare_trees.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONFIGS = {"demo": ("configs/demo.yaml", []),
           "ml_latest_small (1 member)": ("configs/ml_latest_small.yaml", ["model.members=1"]),
           "ml_latest_small_sequences": ("configs/ml_latest_small_sequences.yaml", []),
           "ml_latest_small_bce": ("configs/ml_latest_small_bce.yaml", [])}


def run(tree: Path, config: str, extra: list[str], out: Path, data_dir: str) -> dict:
    """prepare, train and evaluate ``config`` with ``tree``'s code; its losses, validation and metrics."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    paths = [f"data.cache_dir={out / 'data'}", f"train.out_dir={out / 'run'}", "train.progress=false"]
    source = [f"data.data_dir={data_dir}"] if "ml_latest_small" in config else []
    started = time.perf_counter()
    for verb, sets in (("prepare", [*paths, *source]), ("train", [*paths, *extra]), ("evaluate", paths)):
        argv = [sys.executable, "-m", "twotower_rec", verb, "--config", str(tree / config),
                *(a for s in sets for a in ("--set", s))]
        proc = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{tree}: {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "run" / "train_metrics.json").read_text())
    return {"losses": metrics["losses"], "validation": metrics["validation"],
            # the checkpoint it scored is named by path and meta.json digest: other on every run
            "evaluation": {k: v for k, v in json.loads((out / "run" / "eval_test.json").read_text()).items()
                           if k != "checkpoint"},
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the commit before (e.g. the tree an issue was filed on)")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--data-dir", required=True, help="the unpacked ml-latest-small")
    parser.add_argument("--out", default=str(RESULTS / "compare_trees.json"))
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for side in ("before", "after"):
            rev = getattr(args, side)
            trees[side] = Path(tmp) / side
            subprocess.run(["git", "worktree", "add", "--detach", str(trees[side]), rev], cwd=REPO, check=True,
                           capture_output=True)
        try:
            for name, (config, extra) in CONFIGS.items():
                got = {side: run(tree, config, extra, Path(tmp) / f"{side}-{len(rows)}", data_dir)
                       for side, tree in trees.items()}
                same = {key: got["before"][key] == got["after"][key] for key in ("losses", "validation", "evaluation")}
                rows.append({"config": name, "steps": len(got["after"]["losses"]), **same,
                             "ndcg@10": got["after"]["evaluation"]["model"]["ndcg@10"],
                             "seconds_before": got["before"]["seconds"], "seconds_after": got["after"]["seconds"]})
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, capture_output=True)
    print(f"{args.before} vs {args.after}: per-step losses, validation curve and test metrics, compared exactly")
    print(f"{'config':<30}{'steps':>7}{'losses':>9}{'validation':>12}{'test metrics':>14}{'test ndcg@10':>14}")
    for r in rows:
        print(f"{r['config']:<30}{r['steps']:>7}{str(r['losses']):>9}{str(r['validation']):>12}"
              f"{str(r['evaluation']):>14}{r['ndcg@10']:>14.4f}")
    Path(args.out).write_text(json.dumps({"before": args.before, "after": args.after, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
