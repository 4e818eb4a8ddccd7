"""ANN index build time, recall against exact search, and query speed, by catalog size.

    .venv/bin/python benchmarks/bench_ann.py                          # 1e4, 1e5, 1e6 items x 64 dims
    .venv/bin/python benchmarks/bench_ann.py --export runs/demo/export # the trained demo catalog too

Catalogs are clustered unit vectors (200 Gaussian clusters, like trained item embeddings);
queries are 1,000 perturbed catalog vectors. For each index kind the export offers (flat =
exact, hnsw, ivf; default parameters of ``export.*``) it reports build seconds, recall@10 and
recall@100 against exact inner-product search, and the median time of one batch of 1,000
queries (top-100). With ``--export`` the trained catalog and its users' real queries are added.
Prints a table and writes benchmarks/results/ann.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from twotower_rec.serving import ann

RESULTS = Path(__file__).parent / "results"


def clustered(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.normal(size=(200, dim))
    x = centres[rng.integers(0, 200, n)] + 0.6 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def measure(name: str, vectors: np.ndarray, queries: np.ndarray, kinds: list[str]) -> list[dict]:
    rows = []
    for kind in kinds:
        index, build_s = ann.timed_build(vectors, ann.AnnParams(kind=kind))
        recall = ann.recall_against_exact(index, vectors, queries)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            ann.search(index, queries, 100)
            times.append(time.perf_counter() - started)
        rows.append({"catalog": name, "items": int(vectors.shape[0]), "kind": kind, "build_s": build_s,
                     "query_ms_per_1000": 1000 * statistics.median(times), **recall})
        print(f"{name:<22}{vectors.shape[0]:>10,}{kind:>6}{build_s:>9.2f}{recall['recall@10']:>8.4f}"
              f"{recall['recall@100']:>9.4f}{rows[-1]['query_ms_per_1000']:>14.1f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivf"])
    parser.add_argument("--export", help="also measure a trained export's catalog with its users' queries")
    parser.add_argument("--out", default=str(RESULTS / "ann.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'catalog':<22}{'items':>10}{'kind':>6}{'build s':>9}{'R@10':>8}{'R@100':>9}{'ms/1000 q':>14}")
    rows = []
    if args.export:
        import torch

        from twotower_rec.serving.exported import ExportedModel

        model = ExportedModel.load(args.export)
        users = [str(u) for u in model.users["raw_user_ids"][:1000].tolist()]
        with torch.no_grad():
            values, lengths, _, _ = model.user_query(users)
            queries = model.query_tower(values, lengths).numpy()
        rows += measure(f"export {Path(args.export).name}", model.item_embeddings.numpy(), queries, args.kinds)
    for n in args.sizes:
        vectors = clustered(n, args.dim, rng)
        queries = vectors[rng.choice(n, 1000, replace=False)] + 0.1 * rng.normal(size=(1000, args.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        rows += measure("synthetic clustered", vectors, queries, args.kinds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dim": args.dim, "cores": os.cpu_count(), "results": rows}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
