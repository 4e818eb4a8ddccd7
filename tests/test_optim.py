"""The dense optimizer: one fused AdamW kernel, the same updates as torch's per-parameter loop."""

from __future__ import annotations

import pytest
import torch

from twotower_rec.config import TrainConfig
from twotower_rec.train.optim import dense_adamw


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_fused_dense_adamw_follows_the_per_parameter_loop(weight_decay):
    train = TrainConfig(dense_lr=1e-2, weight_decay=weight_decay)
    torch.manual_seed(0)
    shapes = [(32, 16), (32,), (8, 32), (8,), ()]
    fused = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    loop = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    start = [p.detach().clone() for p in fused]
    a = dense_adamw(fused, train)
    b = torch.optim.AdamW(loop, lr=train.dense_lr, weight_decay=weight_decay, foreach=False, fused=False)
    assert a.defaults["fused"] is True
    for _ in range(30):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(fused, loop, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert all(not torch.equal(p, s) for p, s in zip(fused, start))
    for p, q in zip(fused, loop):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    # the state is the loop's: a checkpoint saved by either loads into the other
    b.load_state_dict(a.state_dict())
