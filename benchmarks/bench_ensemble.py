"""Ensemble size against quality: the trained single runs given, grouped K at a time.

    .venv/bin/python benchmarks/bench_ensemble.py --config configs/ml_latest_small.yaml \
        --set data.cache_dir=runs/ml_latest_small/data --checkpoints runs/single_seed*/checkpoint --sizes 1 3 5

The checkpoints (single runs, ``model.members=1``, all on the prepared data of ``--config``)
are cut, in the order given, into disjoint groups of K; each group is loaded side by side
into the package's :class:`twotower_rec.model.ensemble.Ensemble`, which is what
``model.members=K`` trains and serves, and ranked on ``eval.split`` like ``evaluate`` does.
For each K the table shows the mean, sample std, lowest and highest of the groups' metrics.
Prints the table and writes benchmarks/results/ensemble.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from twotower_rec.config import load_config
from twotower_rec.data.batches import Batcher
from twotower_rec.data.prepared import PreparedData
from twotower_rec.data.splits import SPLIT_NAMES
from twotower_rec.evaluation.metrics import ranking_metrics
from twotower_rec.evaluation.ranking import rank_split
from twotower_rec.model.ensemble import Ensemble
from twotower_rec.model.factory import new_model
from twotower_rec.model.two_tower import TwoTower
from twotower_rec.tasks import make_task
from twotower_rec.train import checkpoint

RESULTS = Path(__file__).parent / "results"
METRICS = ("hr@10", "ndcg@10", "hr@200")


def load_plain(path: Path, data: PreparedData) -> TwoTower:
    """A single run's best weights in an unsharded CPU TwoTower."""
    cfg = checkpoint.config_of(path)
    if cfg.model.members != 1:
        raise SystemExit(f"{path}: an ensemble checkpoint (model.members={cfg.model.members}); give single runs")
    model = new_model(cfg.model, data.spec, make_task(cfg), torch.device("cpu"))
    checkpoint.load(path, model, data)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--checkpoints", nargs="+", required=True, help="single-run checkpoint folders")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 3, 5])
    parser.add_argument("--out", default=str(RESULTS / "ensemble.json"))
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    data = PreparedData(cfg.data.cache_dir)
    batcher = Batcher(data)
    started = time.perf_counter()
    members = [load_plain(Path(p), data) for p in args.checkpoints]
    rows = []
    header = f"{'K':>3}{'groups':>8}" + "".join(f"{m + ' mean (std)':>22}{'min':>8}{'max':>8}" for m in METRICS)
    print(f"{cfg.eval.split} split, {len(members)} single runs", flush=True)
    print(header, flush=True)
    for size in args.sizes:
        groups = [members[i:i + size] for i in range(0, len(members) - size + 1, size)]
        results = []
        with torch.no_grad():
            for group in groups:
                model = group[0] if size == 1 else Ensemble(group)
                ranking = rank_split(model.encode_query, model.encode_items, data, batcher, cfg.eval,
                                     SPLIT_NAMES[cfg.eval.split], seed=cfg.train.seed, with_popularity=False)
                results.append(ranking_metrics(ranking.top["model"], ranking.targets, cfg.eval.ks))
        row = {"members": size, "groups": len(groups), "per_group": results}
        line = f"{size:>3}{len(groups):>8}"
        for metric in METRICS:
            values = [r[metric] for r in results]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            row[metric] = {"mean": statistics.mean(values), "std": std, "min": min(values), "max": max(values)}
            line += f"{statistics.mean(values):>14.4f} ({std:.4f}){min(values):>8.4f}{max(values):>8.4f}"
        print(line, flush=True)
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoints": args.checkpoints, "split": cfg.eval.split, "rows": rows,
                               "seconds": time.perf_counter() - started}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
