"""The served query tower's latency per query batch: ``query_tower.pt2`` (torch.export) vs ``query_tower.pt``.

    .venv/bin/python benchmarks/bench_query_tower.py --export runs/demo/export
    .venv/bin/python benchmarks/bench_query_tower.py --export runs/demo/export --batches 1,64,1024 --repeats 50

The export must have been written with ``--set export.torchscript=true`` (both towers). Both are
called on the codes of the export's first known users (``ExportedModel.user_query``), in one
torch thread by default (``--threads``), after ``--warmup`` calls; the median of ``--repeats``
calls per batch size is reported, with the largest difference between the two towers' outputs.
Prints a table and writes benchmarks/results/query_tower.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from twotower_rec.serving.exported import ExportedModel

RESULTS = Path(__file__).parent / "results"


def median_ms(call, repeats: int, warmup: int) -> float:
    """Median wall time of ``call()`` in milliseconds.

    Args:
        call: the function to time.
        repeats: timed calls.
        warmup: untimed calls first.
    """
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, help="an export written with export.torchscript=true")
    parser.add_argument("--batches", default="1,16,256,1024", help="query batch sizes, comma-separated")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "query_tower.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = ExportedModel.load(args.export)
    scripted_path = Path(args.export) / "query_tower.pt"
    if not scripted_path.is_file():
        sys.exit(f"error: {scripted_path} is missing: export with --set export.torchscript=true")
    scripted = torch.jit.load(str(scripted_path), map_location="cpu").eval()
    users = model.users["raw_user_ids"].tolist()
    rows = []
    with torch.no_grad():
        for size in [int(b) for b in args.batches.split(",")]:
            values, lengths, _, _ = model.user_query(users[:size])
            program_ms = median_ms(lambda: model.query_tower(values, lengths), args.repeats, args.warmup)
            scripted_ms = median_ms(lambda: scripted(values, lengths), args.repeats, args.warmup)
            diff = float((model.query_tower(values, lengths) - scripted(values, lengths)).abs().max())
            rows.append({"batch": len(users[:size]), "pt2_ms": program_ms, "torchscript_ms": scripted_ms,
                         "ratio": program_ms / scripted_ms, "max_abs_diff": diff})
    print(f"{'batch':>6} {'pt2 ms':>9} {'TorchScript ms':>15} {'pt2 / ts':>9} {'max |diff|':>11}")
    for row in rows:
        print(f"{row['batch']:>6} {row['pt2_ms']:>9.3f} {row['torchscript_ms']:>15.3f} {row['ratio']:>9.2f} "
              f"{row['max_abs_diff']:>11.1e}")
    result = {"benchmark": "query_tower_latency", "export": str(args.export), "threads": args.threads,
              "repeats": args.repeats, "query_features": model.manifest["query_features"], "rows": rows,
              "torch": torch.__version__, "python": platform.python_version(),
              "command": " ".join(["benchmarks/bench_query_tower.py", *sys.argv[1:]])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
