"""Decode with MKL's packed sgemm: each linear layer's weight is packed once per generation round.

A decode step multiplies a few dozen rows by every weight matrix of the model. At that size
MKL's ordinary sgemm spends much of its time re-packing the weight into its kernel layout on
every call; `cblas_sgemm_pack` does that once and `cblas_sgemm_compute` reuses it (PyTorch
exposes the pair as `torch.ops.mkl._mkl_reorder_linear_weight` / `_mkl_linear`). Measured on
SmolLM2-135M's 211 matrices at 32 rows, 2 CPU cores: 64 ms → 49 ms per pass over the weights.
The packed layout is built for one row count, so a call with fewer rows (sequences finished)
is zero-padded up to it; below a quarter of it the plain path is as fast and is used instead.

The result equals `F.linear`'s (the same kernels, same summation order). Packing costs one pass
over the weights per round; the packed copies live only while the context is open (about one more
copy of the weights touched). Used only for float32 weights on the CPU with MKL present.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F


def packed_matmul_available(model: torch.nn.Module) -> bool:
    """fp32 CPU weights, MKL in this torch build, and its packed-linear ops registered."""
    param = next(model.parameters(), None)
    return (param is not None and param.device.type == "cpu" and param.dtype == torch.float32
            and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))


def _packed_forward(module: torch.nn.Linear, packed: torch.Tensor, rows: int):
    weight, bias = module.weight, module.bias
    smallest = max(1, rows // 4)

    def forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        n = flat.shape[0]
        if n > rows or n < smallest or x.dtype != torch.float32:
            return F.linear(x, weight, bias)
        if n < rows:   # the packed layout is for `rows` rows: pad with zeros, drop their outputs
            flat = torch.cat([flat, flat.new_zeros(rows - n, flat.shape[1])])
        out = torch.ops.mkl._mkl_linear(flat.contiguous(), packed, weight, bias, rows)
        return out[:n].reshape(*x.shape[:-1], out.shape[-1])

    return forward


@contextmanager
def packed_linears(model: torch.nn.Module, rows: int) -> Iterator[int]:
    """Within the block every `torch.nn.Linear` of `model` multiplies through a weight packed for
    `rows` rows (see the module doc); yields how many layers were packed (0: not available)."""
    if rows < 1 or not packed_matmul_available(model):
        yield 0
        return
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.float32]
    try:
        with torch.no_grad():
            for m in layers:
                packed = torch.ops.mkl._mkl_reorder_linear_weight(m.weight.detach(), rows)
                m.forward = _packed_forward(m, packed, rows)   # an instance attribute shadows Linear.forward
        yield len(layers)
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
