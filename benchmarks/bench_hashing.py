"""What hashed ids (data.hash_buckets) cost in quality on MovieLens latest-small.

    .venv/bin/python benchmarks/bench_hashing.py --data-dir ../shared/datasets/ml-latest-small \
        --work /tmp/hashing --seeds 0 1 --settings none u100,i3000 u50,i1000

Each setting (``none``: exact vocabularies; ``u100,i3000``: user_id hashed into 100 rows and
item_id into 3,000) is prepared once and trained once per seed as a single run of
configs/ml_latest_small.yaml (``model.members=1``; every other setting is the one chosen on
validation there), then evaluated on the test split. The table shows, per setting, the
collision rates ``prepare`` reported, validation NDCG@10 (the best checkpoint's; what
settings are chosen on) and test HR@10 / NDCG@10 / HR@200, each the mean over seeds.
Writes benchmarks/results/hashing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
CONFIG = REPO / "configs" / "ml_latest_small.yaml"


def buckets_of(setting: str) -> dict[str, int]:
    """``u100,i3000`` -> {user_id: 100, item_id: 3000}; ``none`` -> {}."""
    if setting == "none":
        return {}
    names = {"u": "user_id", "i": "item_id"}
    return {names[part[0]]: int(part[1:]) for part in setting.split(",")}


def cli(verb: str, overrides: list[str]) -> None:
    argv = [sys.executable, "-m", "twotower_rec", verb, "--config", str(CONFIG)]
    for item in overrides:
        argv += ["--set", item]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the unpacked ml-latest-small archive")
    parser.add_argument("--work", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--settings", nargs="+", default=["none", "u100,i3000", "u50,i1000"])
    parser.add_argument("--out", default=str(RESULTS / "hashing.json"))
    args = parser.parse_args()
    rows = []
    for setting in args.settings:
        buckets = buckets_of(setting)
        cache = Path(args.work) / setting.replace(",", "_") / "data"
        base = [f"data.data_dir={args.data_dir}", f"data.cache_dir={cache}", "model.members=1",
                "data.hash_buckets={" + ", ".join(f"{k}: {v}" for k, v in buckets.items()) + "}"]
        cli("prepare", base)
        info = json.loads((cache / "prepared.json").read_text())
        runs = []
        for seed in args.seeds:
            out_dir = cache.parent / f"seed{seed}"
            overrides = [*base, f"train.seed={seed}", f"train.out_dir={out_dir}", "train.progress=false"]
            started = time.perf_counter()
            cli("train", overrides)
            cli("evaluate", overrides)
            train = json.loads((out_dir / "train_metrics.json").read_text())
            test = json.loads((out_dir / "eval_test.json").read_text())["model"]
            runs.append({"seed": seed, "validation_ndcg@10": train["best_validation_ndcg@10"],
                         "test": {k: test[k] for k in ("hr@10", "ndcg@10", "hr@200")},
                         "seconds": round(time.perf_counter() - started, 1)})
            print(f"{setting} seed {seed}: {runs[-1]}", file=sys.stderr, flush=True)
        rows.append({"setting": setting, "hash_buckets": buckets, "hashing": info.get("hashing", {}), "runs": runs})
    print("\n| setting | user_id collisions | item_id collisions | validation NDCG@10 | test HR@10 | test NDCG@10 "
          "| test HR@200 |\n|---|---|---|---|---|---|---|")
    for row in rows:
        def mean(get):
            return statistics.mean(get(r) for r in row["runs"])
        rate = {k: f"{100 * v['collision_rate']:.1f}% of {v['ids']:,} in {v['buckets']:,}"
                for k, v in row["hashing"].items()}
        print(f"| {row['setting']} | {rate.get('user_id', 'exact')} | {rate.get('item_id', 'exact')} | "
              f"{mean(lambda r: r['validation_ndcg@10']):.4f} | {mean(lambda r: r['test']['hr@10']):.4f} | "
              f"{mean(lambda r: r['test']['ndcg@10']):.4f} | {mean(lambda r: r['test']['hr@200']):.4f} |")
    RESULTS.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                                          "seeds": args.seeds, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
