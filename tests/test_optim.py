"""build_optimizer: torch AdamW, fused on the CPU, with the AdamW update rule."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from groupwise.optim import build_optimizer

OPT = SimpleNamespace(lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.5)


def test_fused_on_cpu_and_one_hand_computed_step():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = build_optimizer([p], OPT)
    assert opt.defaults["fused"] is True
    p.grad = torch.tensor([0.5, 0.0])
    opt.step()
    # Step 1: m̂ = g, v̂ = g², so the Adam step is lr · g / (|g| + ε); decay first: θ ← θ (1 − lr·λ)
    decayed = torch.tensor([1.0, -2.0]) * (1 - 0.1 * 0.5)
    expected = decayed - 0.1 * torch.tensor([0.5 / (0.5 + 1e-8), 0.0])
    torch.testing.assert_close(p.detach(), expected)
    assert math.isclose(float(opt.state[p]["exp_avg_sq"][0]), 0.001 * 0.25, rel_tol=1e-6)


def test_not_fused_where_torch_has_no_fused_kernel():
    assert build_optimizer([torch.nn.Parameter(torch.zeros(2, device="meta"))], OPT).defaults["fused"] is None
