"""Optimizer and learning-rate schedule."""
from __future__ import annotations

import math
from typing import Any

import torch


FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(params: list[torch.nn.Parameter], opt: Any) -> torch.optim.Optimizer:
    """torch AdamW; fused (one kernel per tensor, not a dozen elementwise passes over it) when every
    parameter is a floating tensor on the CPU or CUDA: 84 ms instead of 215 ms per step for 135M
    parameters on 2 CPU cores. Same update rule, same state (checkpoints load either way)."""
    params = list(params)
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
                             fused=fused or None)


def lr_multiplier(step: int, *, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """LR factor at optimizer step `step` (0-based): linear warm-up to 1, then constant/linear/cosine to `min_ratio`.

    Warm-up uses (step + 1) / warmup so the very first update is not wasted at lr = 0.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        decay = 1.0 - progress
    elif kind == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"schedule.lr_scheduler '{kind}' is unknown; known: constant, linear, cosine")
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Any, optimizer_steps_per_step: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = schedule.steps * optimizer_steps_per_step
    warmup = schedule.warmup_steps * optimizer_steps_per_step
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_multiplier(s, warmup=warmup, total=total, kind=schedule.lr_scheduler, min_ratio=schedule.min_lr_ratio),
    )
