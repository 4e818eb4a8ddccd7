"""``train.compile``: the event-mode in-batch softmax through ``torch.compile``.

:func:`compiled_loss` compiles :func:`twotower_rec.losses.softmax.softmax_cross_entropy`: the
logits, logQ, the accidental-hit mask and the cross-entropy in one graph, so the ``[B, N]`` mask
and the edited logits are never written out. Measured side by side (benchmarks/bench_compile.py,
BENCHMARKS.md): 1.23x the eager step on configs/demo.yaml and 1.10x on ml_latest_small (1
member), per-step losses within 1.4e-6 of eager, about 11 s of compiling at the first step.

Compiling every tower's head (MLP and L2 normalisation) too was measured
(benchmarks/bench_compile.py, modes ``mlp`` and ``both``) and is not done: it bought
nothing over the loss alone (1.34x against 1.33x on demo in a 3-round run, 0.95x alone on ml_latest_small) and
moved the per-step losses by 1e-4 to 1e-3 within 50 steps (the compiled reductions round
differently, and training amplifies it). TorchRec's embedding collections, the KJT plumbing,
the causal encoder, the sequence-mode and chunked losses stay eager.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from twotower_rec.losses.softmax import softmax_cross_entropy


def compiled_loss() -> Callable[..., torch.Tensor]:
    """:func:`softmax_cross_entropy` compiled (shapes specialised: a step's batch is fixed)."""
    return torch.compile(softmax_cross_entropy, dynamic=False)

