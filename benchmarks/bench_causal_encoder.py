"""The causal encoder's training pass alone: eager against ``torch.compile``, and its dropout's share.

Times :meth:`CausalEncoder.encode`, forward and backward, on the shape of a sequence-mode
batch (``--windows`` windows of ``--length`` slots, ``--dim`` wide, with the running mean, as
configs/ml_latest_small_sequences.yaml trains it). The eager and compiled passes take turns,
``--rounds`` times, in one process (the machine is shared: side by side in one run). Then the
profiler measures the share of the eager pass spent drawing dropout's uniform numbers
(``aten::uniform_``), and how many are drawn.

    .venv/bin/python benchmarks/bench_causal_encoder.py

Prints a table and writes benchmarks/results/causal_encoder.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from twotower_rec.model.causal import CausalEncoder

RESULTS = Path(__file__).parent / "results"


def timed(run, rounds: int) -> float:
    """Median seconds of ``run()`` over ``rounds`` calls."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def dropout_share(encoder: CausalEncoder, x: torch.Tensor, steps: int = 20) -> tuple[float, float]:
    """(share of the eager pass's self CPU time in ``aten::uniform_``, uniform numbers drawn a pass)."""
    drawn = []
    original = torch.rand_like

    def counting(t, *args, **kwargs):
        drawn.append(t.numel())
        return original(t, *args, **kwargs)

    torch.rand_like = counting
    try:
        encoder.encode(x).sum().backward()
    finally:
        torch.rand_like = original
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            encoder.encode(x).sum().backward()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    uniform = sum(e.self_cpu_time_total for e in events if e.key == "aten::uniform_")
    return uniform / max(total, 1e-9), float(sum(drawn))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=30, help="alternating rounds of eager and compiled")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "causal_encoder.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = CausalEncoder(args.dim, args.length, args.layers, args.heads, args.dropout, with_mean=True).train()
    x = torch.randn(args.windows, args.length, args.dim, requires_grad=True)
    compiled = torch.compile(encoder.encode, dynamic=False)
    started = time.perf_counter()
    compiled(x).sum().backward()
    compile_s = time.perf_counter() - started
    for _ in range(3):
        encoder.encode(x).sum().backward()
    eager_times, compiled_times = [], []
    for _ in range(args.rounds):
        eager_times.append(timed(lambda: encoder.encode(x).sum().backward(), 3))
        compiled_times.append(timed(lambda: compiled(x).sum().backward(), 3))
    eager_ms, compiled_ms = statistics.median(eager_times) * 1e3, statistics.median(compiled_times) * 1e3
    share, drawn = dropout_share(encoder, x)
    print(f"causal encoder, [{args.windows}, {args.length}, {args.dim}], {args.layers} layers, {args.heads} heads, "
          f"dropout {args.dropout}, {args.threads} threads, {args.rounds} alternating rounds")
    print(f"\n{'pass (forward + backward)':<30}{'median ms':>10}{'vs eager':>10}")
    print(f"{'eager':<30}{eager_ms:>10.2f}{1.0:>9.2f}x")
    print(f"{'torch.compile':<30}{compiled_ms:>10.2f}{eager_ms / compiled_ms:>9.2f}x   (compiling: {compile_s:.1f} s)")
    print(f"\ndropout: {drawn:,.0f} uniform numbers drawn a pass; aten::uniform_ is {100 * share:.0f}% of the "
          f"eager pass's self CPU time (profiled)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "shape": [args.windows, args.length, args.dim], "layers": args.layers, "heads": args.heads,
        "dropout": args.dropout, "threads": args.threads, "rounds": args.rounds, "eager_ms": eager_ms,
        "compiled_ms": compiled_ms, "compile_s": compile_s, "uniform_share": share, "uniform_drawn": drawn,
        "eager_rounds_ms": [t * 1e3 for t in eager_times], "compiled_rounds_ms": [t * 1e3 for t in compiled_times],
    }, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
