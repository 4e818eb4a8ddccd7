"""Training throughput of the full two-tower step: this package against plain-PyTorch two-towers.

    .venv/bin/python benchmarks/bench_training.py                         # 1e4 .. 1e7 item rows
    .venv/bin/python benchmarks/bench_training.py --rows 1000000 --steps 20

Three implementations of the same model, run in one process, one after the other per table
size, on the same random batches:

- ``torchrec``: this package's TwoTower (TorchRec EmbeddingBagCollections, fused
  RowWiseAdagrad for the tables, Adam for the MLPs) through DistributedModelParallel (a world
  of one), stepped by the package's own ``train_step``;
- ``sparse_adam``: the tutorial model with ``nn.EmbeddingBag(sparse=True)`` tables,
  ``torch.optim.SparseAdam`` for them and Adam for the MLPs;
- ``dense_adam``: the same with dense gradients and one Adam over everything (every step
  touches every row of every table).

Model: query = user id (100k rows) + the history bag (up to ``--history`` item ids, mean)
looked up in the item-id table; item = item id + genres (mean); each side a 2-layer MLP to 64
dims, L2-normalised; in-batch softmax at temperature 0.1 with logQ off. Embeddings
``--dim`` wide. Throughput = batch / median step time after warm-up; each run is bounded by
``--max-seconds``. Peak RSS is the process's, measured after each run (it only grows, so a
row's figure bounds that run and every run before it). Prints a table, writes
benchmarks/results/training.json and (with matplotlib) benchmarks/results/training.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

RESULTS = Path(__file__).parent / "results"
USERS = 100_000


def random_batches(rows: int, batch: int, history: int, count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        hist_len = rng.integers(0, history + 1, batch)
        genre_len = rng.integers(1, 4, batch)
        out.append({
            "user": torch.from_numpy(rng.integers(1, USERS + 1, batch)),
            "hist_values": torch.from_numpy(rng.integers(1, rows + 1, int(hist_len.sum()))),
            "hist_lengths": torch.from_numpy(hist_len),
            "item": torch.from_numpy(rng.integers(1, rows + 1, batch)),
            "genre_values": torch.from_numpy(rng.integers(1, 21, int(genre_len.sum()))),
            "genre_lengths": torch.from_numpy(genre_len),
        })
    return out


def offsets(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(lengths, 0) - lengths


def mlp(in_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, 128), nn.ReLU(), nn.Linear(128, 64))


class PlainTwoTower(nn.Module):
    """The two-tower most tutorials write: one nn.EmbeddingBag per id."""

    def __init__(self, rows: int, dim: int, sparse: bool) -> None:
        super().__init__()
        self.user = nn.EmbeddingBag(USERS + 1, dim, mode="sum", sparse=sparse)
        self.items = nn.EmbeddingBag(rows + 1, dim, mode="mean", sparse=sparse)  # item id and history
        self.genres = nn.EmbeddingBag(21, dim, mode="mean", sparse=sparse)
        for bag in (self.user, self.items, self.genres):
            bound = bag.num_embeddings ** -0.5
            nn.init.uniform_(bag.weight, -bound, bound)
        self.query_mlp, self.item_mlp = mlp(2 * dim), mlp(2 * dim)

    def forward(self, b: dict) -> torch.Tensor:
        ones = torch.ones_like(b["user"])
        q = torch.cat([self.user(b["user"], offsets(ones)),
                       self.items(b["hist_values"], offsets(b["hist_lengths"]))], dim=1)
        i = torch.cat([self.items(b["item"], offsets(ones)),
                       self.genres(b["genre_values"], offsets(b["genre_lengths"]))], dim=1)
        q, i = F.normalize(self.query_mlp(q), dim=-1), F.normalize(self.item_mlp(i), dim=-1)
        return F.cross_entropy(q @ i.t() / 0.1, torch.arange(q.shape[0]))


def run_plain(kind: str, rows: int, dim: int, batches: list[dict], warmup: int, max_seconds: float) -> list[float]:
    model = PlainTwoTower(rows, dim, sparse=kind == "sparse_adam")
    if kind == "sparse_adam":
        tables = list(model.user.parameters()) + list(model.items.parameters()) + list(model.genres.parameters())
        dense = list(model.query_mlp.parameters()) + list(model.item_mlp.parameters())
        optimizers = [torch.optim.SparseAdam(tables, lr=1e-3), torch.optim.Adam(dense, lr=1e-3)]
    else:
        optimizers = [torch.optim.Adam(model.parameters(), lr=1e-3)]
    times, started = [], time.perf_counter()
    for step, b in enumerate(batches):
        t = time.perf_counter()
        loss = model(b)
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad()
        if step >= warmup:
            times.append(time.perf_counter() - t)
        if time.perf_counter() - started > max_seconds and len(times) >= 3:
            break
    return times


def run_torchrec(rows: int, dim: int, batches: list[dict], warmup: int, max_seconds: float) -> list[float]:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from twotower_rec.config import Config, ModelConfig, TrainConfig
    from twotower_rec.data.batches import Batch
    from twotower_rec.data.features import HISTORY, Feature, FeatureSpec
    from twotower_rec.distributed import sharding
    from twotower_rec.model.factory import new_model
    from twotower_rec.tasks import make_task
    from twotower_rec.losses.softmax import LossContext
    from twotower_rec.train.optim import build_optimizer
    from twotower_rec.train.step import train_step

    spec = FeatureSpec(
        query_features=[Feature("user_id", "query", USERS + 1),
                        Feature(HISTORY, "query", rows + 1, pooling="mean", table="t_item_id")],
        item_features=[Feature("item_id", "item", rows + 1, pooling="mean"),
                       Feature("genres", "item", 21, pooling="mean")],
        item_dense=[], history_length=64, num_users=USERS, num_items=rows)
    cfg = Config()
    cfg.model = ModelConfig(embedding_dim=dim, mlp_dims=[128], output_dim=64)
    cfg.train = TrainConfig(batch_size=len(batches[0]["user"]), seed=0)
    cfg.loss.temperature, cfg.loss.logq = 0.1, "none"
    from twotower_rec.distributed.env import init_distributed, synchronize

    env = init_distributed()
    model = sharding.shard_model(new_model(cfg.model, spec), env, cfg.sharding, cfg.train)
    optimizer = build_optimizer(model, cfg.train)
    task = make_task(cfg)  # retrieval; its loss state by hand (this spec has no prepared data)
    task.ctx = LossContext(cfg.loss, np.ones(rows + 1), cfg.train.batch_size, env.device)  # logQ is off: counts unused
    converted = []
    for b in batches:
        n = len(b["user"])
        ones = torch.ones(n, dtype=torch.long)
        query = KeyedJaggedTensor(keys=["user_id", HISTORY], values=torch.cat([b["user"], b["hist_values"]]),
                                  lengths=torch.cat([ones, b["hist_lengths"]]))
        item = KeyedJaggedTensor(keys=["item_id", "genres"], values=torch.cat([b["item"], b["genre_values"]]),
                                 lengths=torch.cat([ones, b["genre_lengths"]]))
        converted.append(Batch(query, item, torch.zeros(n, 0), torch.ones(n), b["item"]).to(env.device))
    times, started = [], time.perf_counter()
    for step, b in enumerate(converted):
        synchronize(env.device)
        t = time.perf_counter()
        train_step(model, optimizer, b, task)
        synchronize(env.device)  # CUDA returns before the step is done
        if step >= warmup:
            times.append(time.perf_counter() - t)
        if time.perf_counter() - started > max_seconds and len(times) >= 3:
            break
    return times


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def plot(rows_out: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, style in (("torchrec", "o-"), ("sparse_adam", "s--"), ("dense_adam", "^:")):
        pts = [(r["rows"], r["examples_per_s"]) for r in rows_out if r["kind"] == kind and r["examples_per_s"]]
        if pts:
            ax.plot(*zip(*pts), style, label=kind)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("item table rows")
    ax.set_ylabel("training examples / s")
    ax.set_title("two-tower training step, 2 CPU cores")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    parser.add_argument("--kinds", nargs="+", default=["torchrec", "sparse_adam", "dense_adam"])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--history", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--dense-max-rows", type=int, default=1_000_000,
                        help="skip dense Adam above this many rows (it updates every row every step)")
    parser.add_argument("--out", default=str(RESULTS / "training.json"))
    args = parser.parse_args()
    from twotower_rec.cli import quiet_library_warnings

    quiet_library_warnings()
    torch.manual_seed(0)
    results = []
    print(f"{'rows':>12}{'kind':>13}{'steps':>7}{'step ms':>10}{'examples/s':>13}{'peak RSS GiB':>14}", flush=True)
    for rows in args.rows:
        batches = random_batches(rows, args.batch_size, args.history, args.warmup + args.steps, seed=rows)
        for kind in args.kinds:
            if kind == "dense_adam" and rows > args.dense_max_rows:
                results.append({"rows": rows, "kind": kind, "skipped": f"more than --dense-max-rows {args.dense_max_rows}",
                                "examples_per_s": None})
                print(f"{rows:>12,}{kind:>13}{'skipped':>7}", flush=True)
                continue
            times = (run_torchrec(rows, args.dim, batches, args.warmup, args.max_seconds) if kind == "torchrec"
                     else run_plain(kind, rows, args.dim, batches, args.warmup, args.max_seconds))
            step = statistics.median(times)
            results.append({"rows": rows, "kind": kind, "steps_timed": len(times), "median_step_s": step,
                            "examples_per_s": args.batch_size / step, "peak_rss_gib": peak_rss_gib()})
            print(f"{rows:>12,}{kind:>13}{len(times):>7}{1000 * step:>10.1f}{args.batch_size / step:>13,.0f}"
                  f"{peak_rss_gib():>14.2f}", flush=True)
    print("\nratios (torchrec examples/s over the baseline's):")
    for rows in args.rows:
        by = {r["kind"]: r["examples_per_s"] for r in results if r["rows"] == rows}
        parts = [f"{k} {by['torchrec'] / v:.1f}x" for k, v in by.items() if k != "torchrec" and v and by.get("torchrec")]
        print(f"  {rows:>12,}: " + ", ".join(parts))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"batch_size": args.batch_size, "dim": args.dim, "history": args.history,
                               "cores": os.cpu_count(), "threads": torch.get_num_threads(), "results": results},
                              indent=2))
    png = out.with_suffix(".png")
    print(f"written to {out}" + (f" and {png}" if plot(results, png) else " (no matplotlib: no plot)"))


if __name__ == "__main__":
    main()
