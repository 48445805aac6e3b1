"""The sampler contract: which prompts each generation round uses, and how many completions each gets.

A sampler is built once per run by a factory registered in `SAMPLERS`:

    factory(ctx: SamplerContext, *, <its options>) -> Sampler

and then, every round,

    plan = sampler.plan(num_groups, group_size, step)      # → SamplePlan(indices, group_sizes)

(`step` counts the plans drawn before this one: the training step, unless dynamic sampling draws
several rounds in a step; each draw gets fresh, replayable randomness.)
    ... generate, score ...
    sampler.update(outcome)                                  # RoundOutcome of that plan

`plan` must return exactly `num_groups` dataset indices (repeats allowed) and as many group sizes;
the sizes must sum to `num_groups × group_size` (the round's rollout budget) unless the sampler's
docstring says otherwise. Samplers that keep per-prompt numbers read `ctx.stats` (the trainer's
`PromptStats`, already updated with the round when `update` is called) and keep only what it
lacks. Randomness comes from generators seeded by `(ctx.seed, step)`, so a resumed run draws
the same prompts; `state_dict()` holds plain values or tensors (tensors go to safetensors).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from groupwise.data.prompt_stats import PromptStats
from groupwise.registry import Registry
from groupwise.types import Prompt


@dataclass
class SamplePlan:
    """One round's prompts (dataset indices, one per group) and each group's size."""

    indices: list[int]
    group_sizes: list[int]

    def __post_init__(self) -> None:
        if len(self.indices) != len(self.group_sizes):
            raise ValueError(f"SamplePlan: {len(self.indices)} indices but {len(self.group_sizes)} group sizes")
        if any(int(g) < 1 for g in self.group_sizes):
            raise ValueError(f"SamplePlan: every group needs at least one completion, got sizes {self.group_sizes}")


@dataclass
class RoundOutcome:
    """What a plan's groups produced, group by group (lists aligned with `indices`)."""

    indices: list[int]
    rewards: list[list[float]]            # per group, per completion (weighted total; NaN = not applicable)
    correct: list[list[bool]]
    completions: list[list[str]] = field(default_factory=list)   # decoded completions, when available
    step: int = 0


@dataclass
class SamplerContext:
    """What every sampler factory receives."""

    num_prompts: int
    seed: int
    stats: PromptStats
    prompts: list[Prompt] = field(default_factory=list)   # the training rows (for category columns)
    shuffle: bool = True


class Sampler(Protocol):
    def plan(self, num_groups: int, group_size: int, step: int) -> SamplePlan: ...

    def update(self, outcome: RoundOutcome) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


SAMPLERS: Registry = Registry("sampler")
register_sampler = SAMPLERS.register


def sampler_options(factory: Callable[..., Any]) -> dict[str, Any]:
    """Option name → default of a sampler factory (its keyword-only parameters)."""
    params = inspect.signature(factory).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_sampler_options(name: str, options: dict[str, Any]) -> None:
    """Raise ValueError naming `data.sampler_options.<key>` when the sampler does not take it."""
    takes = sampler_options(SAMPLERS.get(name))
    for key in options:
        if key not in takes:
            raise ValueError(f"data.sampler_options.{key} does not apply to sampler '{name}' (its options: {', '.join(takes) or 'none'})")
    missing = [k for k, d in takes.items() if d is inspect.Parameter.empty and k not in options]
    if missing:
        raise ValueError(f"sampler '{name}' needs data.sampler_options.{missing[0]}")


def build_sampler(name: str, ctx: SamplerContext, options: dict[str, Any] | None = None) -> Sampler:
    options = dict(options or {})
    check_sampler_options(name, options)
    return SAMPLERS.get(name)(ctx, **options)


def step_generator(seed: int, step: int, salt: str) -> torch.Generator:
    """A torch generator seeded from (seed, step, salt) alone: resuming at `step` draws the same."""
    import hashlib

    digest = hashlib.sha256(f"groupwise.sampler:{salt}:{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def weighted_without_replacement(weights: torch.Tensor, n: int, generator: torch.Generator) -> list[int]:
    """`n` distinct indices drawn with probability ∝ `weights` (float64, ≥ 0), with replacement only
    once the positive-weight indices run out (then uniformly among the rest)."""
    w = weights.double().clamp(min=0)
    positive = int((w > 0).sum())
    take = min(n, positive)
    out = torch.multinomial(w, take, replacement=False, generator=generator).tolist() if take else []
    if len(out) < n:   # fewer positive weights than slots: fill with uniform draws over all prompts
        rest = torch.randint(0, w.numel(), (n - len(out),), generator=generator).tolist()
        out.extend(rest)
    return out
