"""Decode through oneDNN-prepacked weights: each linear layer's weight is reordered once per round.

A decode step multiplies a few dozen rows by every weight matrix of the model. At that size a
plain sgemm spends much of its time re-packing the weight into its kernel's blocked layout on
every call. oneDNN's inner-product primitive takes the weight already in that layout
(`torch.ops.mkldnn._reorder_linear_weight`, reordered once when the round starts) and any row
count (`torch.ops.mkldnn._linear_pointwise`), so no padding is needed when sequences finish.

Measured on SmolLM2-135M's 211 matrices at 32 rows, 2 CPU cores, fp32 (one pass over all weights):
AMD EPYC (AVX2): plain F.linear 227 ms, MKL's packed sgemm 226 ms, oneDNN prepacked 128 ms;
the LM head alone (49,152 × 576) 43 → 20 ms. An earlier measurement on an Intel Xeon with
AVX-512 gave plain 64 ms, MKL packed 49 ms, oneDNN 55 ms: a smaller gain there.

The result is a float32 matrix product like `F.linear`'s, summed in another order: it differs by a
few float32 roundings (≈ 1e-4 on outputs of magnitude ≈ 25). The packed copies live only while the
context is open (one more copy of the weights; `groupwise plan` counts it). Used only for float32
weights on the CPU with oneDNN present, and only where no gradient is recorded.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F


def onednn_linear_available() -> bool:
    """oneDNN in this torch build, with its prepacked-linear ops registered."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def packed_matmul_available(model: torch.nn.Module) -> bool:
    """fp32 CPU weights and `onednn_linear_available()`."""
    param = next(model.parameters(), None)
    return param is not None and param.device.type == "cpu" and param.dtype == torch.float32 and onednn_linear_available()


def prepack_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """`weight` `[out, in]` reordered for oneDNN's inner product at about `rows` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def prepacked_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x Wᵀ + b` for a 2-D float32 `x` and a weight from `prepack_weight` (no gradient)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _packed_forward(module: torch.nn.Linear, packed: torch.Tensor):
    weight, bias = module.weight, module.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return F.linear(x, weight, bias)   # the packed op records no gradient
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        out = prepacked_linear(flat, packed, bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    return forward


@contextmanager
def packed_linears(model: torch.nn.Module, rows: int) -> Iterator[int]:
    """Within the block every `torch.nn.Linear` of `model` multiplies through a weight prepacked
    for about `rows` rows (oneDNN's hint; other row counts work too); yields how many layers were
    packed (0: not available, or `rows` < 1)."""
    if rows < 1 or not packed_matmul_available(model):
        yield 0
        return
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32]
    try:
        with torch.no_grad():
            for m in layers:
                packed = prepack_weight(m.weight, rows)
                m.forward = _packed_forward(m, packed)   # an instance attribute shadows Linear.forward
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
