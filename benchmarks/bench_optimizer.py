"""The dense optimizer step alone: AdamW as torch's per-parameter loop, as foreach, and fused.

Builds each config's model exactly as ``train`` does (a world of one, on the config's own data
prepared into a temporary cache), takes its dense parameters (the ones the fused table
optimizer does not update) with random gradients, and times ``optimizer.step()`` for each
implementation in turn, ``--rounds`` rounds alternating (the machine is shared: side by side
in one run). The package uses ``fused=True`` (``train/optim.py``).

    .venv/bin/python benchmarks/bench_optimizer.py --data-dir ../shared/datasets/ml-latest-small

Prints a table (median of the rounds' medians) and writes benchmarks/results/optimizer.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"demo (bag)": ("configs/demo.yaml", []),
           "ml_latest_small (bag, 1 member)": ("configs/ml_latest_small.yaml", ["model.members=1"]),
           "ml_latest_small_sequences (causal)": ("configs/ml_latest_small_sequences.yaml", [])}
KINDS = {"loop (torch's CPU default)": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def dense_parameters(config: str, overrides: list[str], data_dir: str | None) -> list[torch.Tensor]:
    """The dense parameters of ``config``'s model, as ``train`` builds it."""
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from twotower_rec.config import load_config
    from twotower_rec.data.prepared import PreparedData, prepare
    from twotower_rec.data.sources import load_raw
    from twotower_rec.distributed.env import init_distributed
    from twotower_rec.model.factory import build_model
    from twotower_rec.tasks import make_task

    with tempfile.TemporaryDirectory() as cache:
        extra = [f"data.data_dir={data_dir}"] if data_dir and "demo" not in config else []
        cfg = load_config(REPO / config, [*overrides, *extra, f"data.cache_dir={cache}/data"])
        prepare(load_raw(cfg.data), cfg.data, cfg.features)
        model = build_model(cfg, make_task(cfg), PreparedData(cfg.data.cache_dir), init_distributed())
        return [p.detach().clone() for _, p in in_backward_optimizer_filter(model.named_parameters())]


def time_step(params: list[torch.Tensor], kind: dict, steps: int) -> float:
    """Median seconds of one ``AdamW.step()`` over fresh copies of ``params``."""
    copies = [torch.nn.Parameter(p.clone()) for p in params]
    for p in copies:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(copies, lr=1e-3, **kind)
    for _ in range(5):
        optimizer.step()
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="the unpacked ml-latest-small archive (else only demo runs)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "optimizer.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = {k: v for k, v in CONFIGS.items() if args.data_dir or "demo" in v[0]}
    results = {}
    print("| config | dense parameters | " + " | ".join(f"{k} (ms)" for k in KINDS) + " | fused vs loop |")
    print("|---|---:|" + "---:|" * len(KINDS) + "---:|")
    for name, (config, overrides) in configs.items():
        params = dense_parameters(config, overrides, args.data_dir)
        rounds = {kind: [] for kind in KINDS}
        for _ in range(args.rounds):
            for kind, kwargs in KINDS.items():
                rounds[kind].append(1000 * time_step(params, kwargs, args.steps))
        medians = {kind: statistics.median(v) for kind, v in rounds.items()}
        count = sum(p.numel() for p in params)
        results[name] = {"parameters": count, "tensors": len(params), "median_ms": medians, "rounds_ms": rounds}
        loop, fused = medians["loop (torch's CPU default)"], medians["fused"]
        print(f"| {name} | {count:,} in {len(params)} tensors | "
              + " | ".join(f"{medians[k]:.3f}" for k in KINDS) + f" | {loop / fused:.1f}x |", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "configs": results}, indent=2))


if __name__ == "__main__":
    main()
