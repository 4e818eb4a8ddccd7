"""The in-batch softmax loss, materialised against chunked, as the batch grows.

    .venv/bin/python benchmarks/bench_loss.py                               # B = 1024 .. 16384
    .venv/bin/python benchmarks/bench_loss.py --batches 1024 4096 --uniform 0 --chunk 1024

For each batch size B (with ``--uniform`` uniform negatives beside the B in-batch candidates,
accidental-hit masking and logQ on, D = ``--dim``) it times the loss's forward + backward,
materialised (``losses/softmax.in_batch_softmax``: the ``[B, N]`` logits) and chunked
(``losses/chunked.chunked_in_batch_softmax``), alternating the two for ``--rounds`` rounds in
fresh processes, and reports the median time, the cost per example relative to the smallest
batch, and the peak memory the loss added (the process's peak RSS after the loss minus before
it). Prints a table and writes benchmarks/results/loss.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def worker(args) -> None:
    import torch

    from twotower_rec.losses.chunked import chunked_in_batch_softmax
    from twotower_rec.losses.softmax import in_batch_softmax

    gen = torch.Generator().manual_seed(0)
    rows, n = args.batch, args.batch + args.uniform
    query = torch.nn.functional.normalize(torch.randn(rows, args.dim, generator=gen), dim=1).requires_grad_()
    item = torch.nn.functional.normalize(torch.randn(n, args.dim, generator=gen), dim=1).requires_grad_()
    ids = torch.randint(1, 50_000, (n,), generator=gen)
    log_q = torch.rand(n, generator=gen).log()

    def loss():
        if args.mode == "chunked":
            return chunked_in_batch_softmax(query, item, 0.1, ids, 0, log_q, chunk=args.chunk)
        return in_batch_softmax(query, item, 0.1, ids, 0, log_q)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(args.warmup + args.steps):
        query.grad = item.grad = None
        started = time.perf_counter()
        loss().backward()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RESULT " + json.dumps({"median_s": statistics.median(times), "loss_peak_mib": (peak - before) / 1024}))


def run_one(args, mode: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--batch", str(batch), "--uniform", str(args.uniform),
           "--dim", str(args.dim), "--chunk", str(args.chunk), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--uniform", type=int, default=1024, help="uniform negatives beside the in-batch ones")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS / "loss.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="chunked", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1024, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):
        for batch in args.batches:
            for mode in ("materialised", "chunked"):
                results.setdefault((mode, batch), []).append(run_one(args, mode, batch))
    rows = []
    for mode in ("materialised", "chunked"):
        base = None
        for batch in args.batches:
            runs = results[(mode, batch)]
            median_s = statistics.median(r["median_s"] for r in runs)
            per_example = median_s / batch
            base = base or per_example
            rows.append({"mode": mode, "batch": batch, "candidates": batch + args.uniform, "median_ms": median_s * 1e3,
                         "us_per_example": per_example * 1e6, "per_example_vs_smallest": per_example / base,
                         "loss_peak_mib": statistics.median(r["loss_peak_mib"] for r in runs)})
    print(f"\nin-batch softmax forward + backward, D={args.dim}, {args.uniform} uniform negatives, chunk {args.chunk}, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'mode':<14}{'batch':>7}{'ms':>10}{'us/example':>12}{'x smallest':>12}{'loss peak MiB':>15}")
    for r in rows:
        print(f"{r['mode']:<14}{r['batch']:>7}{r['median_ms']:>10.1f}{r['us_per_example']:>12.2f}"
              f"{r['per_example_vs_smallest']:>11.2f}x{r['loss_peak_mib']:>15.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dim": args.dim, "uniform": args.uniform, "chunk": args.chunk, "rows": rows}, indent=2))
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
