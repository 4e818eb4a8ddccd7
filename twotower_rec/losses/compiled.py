"""``retrieval.compile``: the in-batch softmax through ``torch.compile``.

:func:`compiled_loss` compiles :func:`twotower_rec.losses.softmax.softmax_cross_entropy`: the
logits, logQ, the accidental-hit mask and the cross-entropy in one graph, so the ``[B, N]`` mask
and the edited logits are never written out. What it buys, what compiling costs at the first
step and how far its per-step losses are from eager: ``benchmarks/bench_compile.py``,
BENCHMARKS.md ("retrieval.compile") and docs/benchmarks-history.md ("retrieval.compile: the loss, the heads, both").

Compiling every tower's head (MLP and L2 normalisation) too was measured (``bench_compile.py``,
modes ``mlp`` and ``both``) and is not done: it bought nothing over the loss alone and moved the
per-step losses (the compiled reductions round differently, and training amplifies it).
TorchRec's embedding collections, the KJT plumbing, the causal encoder, the next-item and
chunked losses stay eager.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from twotower_rec.losses.softmax import softmax_cross_entropy


def compiled_loss() -> Callable[..., torch.Tensor]:
    """:func:`softmax_cross_entropy` compiled (shapes specialised: a step's batch is fixed)."""
    return torch.compile(softmax_cross_entropy, dynamic=False)

