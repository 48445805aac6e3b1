"""Who decodes when: slot budgets, per-sequence random numbers, and length-aware ordering.

Infinite Sampling: Efficient and Stable Grouped RL Training for Large Language Models
(arXiv 2506.22950). Large groups are decoded as micro-groups under a memory budget; with
continuous sampling a finished sequence's slot is refilled at once from the pending queue, and a
length-aware scheduler orders that queue by each sequence's predicted length.

Scheduling must never change what is sampled, so each sequence draws its random numbers from a
counter-based stream of its own, u(seed, sequence, t) = splitmix64³(seed, sequence, t) / 2⁶⁴,
instead of from one generator shared by whatever rows happen to share a batch.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Literal

import numpy as np
import torch

LengthOrder = Literal["none", "shortest_first", "longest_first", "longest_then_shortest"]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer (Steele, Lea & Flood 2014) on uint64 arrays, wrapping mod 2⁶⁴."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sequence_uniforms(seed: int, sequences: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """u ∈ [0, 1) for each (sequence, step) pair, a pure function of (seed, sequence, step).

    53 random bits per number (float64), independent of batch composition and order.
    """
    seq = sequences.detach().cpu().numpy().astype(np.uint64)
    step = steps.detach().cpu().numpy().astype(np.uint64)
    with np.errstate(over="ignore"):
        h = _splitmix64(_splitmix64(_splitmix64(np.full_like(seq, seed & (2**64 - 1), dtype=np.uint64)) + seq) + step)
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)
    return torch.from_numpy(u).to(sequences.device)


def text_config(config):
    """The language model's own config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys + values one token occupies in the KV cache, over all layers."""
    text = text_config(config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def concurrent_sequences(
    num_sequences: int,
    max_concurrent: int | None,
    kv_budget_mb: float | None,
    kv_bytes_per_sequence: int,
) -> int:
    """Slots: the most sequences decoded at once, under `max_concurrent` and the KV-cache budget
    (each slot reserves a whole sequence: its longest prompt plus max_new_tokens). At least one."""
    slots = num_sequences
    if max_concurrent is not None:
        slots = min(slots, max_concurrent)
    if kv_budget_mb is not None:
        slots = min(slots, int(kv_budget_mb * 2**20 // max(kv_bytes_per_sequence, 1)))
    return max(1, slots)


class LengthPredictor:
    """Predicted completion length of a prompt: the mean of its previous completions' lengths
    (exponentially weighted, weight `decay` on the past), else the mean over all prompts seen,
    else `default`."""

    def __init__(self, default: float, decay: float = 0.5):
        self.default = default
        self.decay = decay
        self.by_prompt: dict[object, float] = {}
        self.total = 0.0
        self.count = 0

    def predict(self, key: object) -> float:
        if key in self.by_prompt:
            return self.by_prompt[key]
        return self.total / self.count if self.count else self.default

    def update(self, keys: list[object], lengths: list[int]) -> None:
        per_prompt: dict[object, list[int]] = defaultdict(list)
        for k, n in zip(keys, lengths):
            per_prompt[k].append(n)
        for k, ns in per_prompt.items():
            mean = float(np.mean(ns))
            self.by_prompt[k] = mean if k not in self.by_prompt else self.decay * self.by_prompt[k] + (1 - self.decay) * mean
            self.total += sum(ns)
            self.count += len(ns)


def order_sequences(predicted: list[float], order: LengthOrder, slots: int | None = None) -> list[int]:
    """Indices of the sequences in the order they are admitted to free slots (ties keep request order).

    "longest_then_shortest" is Infinite Sampling's two-stage plan in simple form: the first `slots`
    admissions (the initial fill) take the longest predicted sequences, so the long ones start
    early and do not form the tail; every later refill takes the shortest remaining one (SJF).
    (The paper plans the initial grouping with an FPTAS; the greedy longest-first fill is the
    classical LPT heuristic for the same makespan objective.)
    """
    idx = list(range(len(predicted)))
    shortest = sorted(idx, key=lambda i: (predicted[i], i))
    if order == "shortest_first":
        return shortest
    if order == "longest_first":
        return sorted(idx, key=lambda i: (-predicted[i], i))
    if order == "longest_then_shortest":
        first = sorted(idx, key=lambda i: (-predicted[i], i))[: slots or len(idx)]
        taken = set(first)
        return first + [i for i in shortest if i not in taken]
    return idx
