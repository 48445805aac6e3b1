"""The default sampler: every prompt once per epoch, in a fresh seeded order, G completions each."""
from __future__ import annotations

import random
from typing import Any

from groupwise.data.samplers.base import RoundOutcome, SamplePlan, SamplerContext, register_sampler

__all__ = ["UniformSampler", "uniform_sampler"]


class UniformSampler:
    """Walk a fresh permutation of `range(num_prompts)` each epoch.

    Epoch e's order is a shuffle seeded from `(seed, e)` alone, so it is the same on every
    run and machine. A request that crosses the end of an epoch continues into the next
    epoch's permutation. `epoch` and `position` say where the walk is (`0 <= position <
    num_prompts`); `shuffle=False` walks `0, 1, …, num_prompts - 1` every epoch.
    """

    def __init__(self, num_prompts: int, seed: int, shuffle: bool = True):
        if num_prompts < 1:
            raise ValueError(f"num_prompts must be at least 1, got {num_prompts}")
        self.num_prompts = int(num_prompts)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order: list[int] | None = None  # the permutation of `self.epoch`, built lazily

    def _permutation(self) -> list[int]:
        if self._order is None:
            order = list(range(self.num_prompts))
            if self.shuffle:
                # A string seed is hashed with SHA-512: stable across processes and Python versions.
                random.Random(f"groupwise.uniform:{self.seed}:{self.epoch}").shuffle(order)
            self._order = order
        return self._order

    def next_indices(self, n: int) -> list[int]:
        """The next `n` dataset indices (may span several epochs)."""
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        out: list[int] = []
        while len(out) < n:
            take = min(n - len(out), self.num_prompts - self.position)
            out.extend(self._permutation()[self.position : self.position + take])
            self.position += take
            if self.position == self.num_prompts:
                self.epoch += 1
                self.position = 0
                self._order = None
        return out

    def plan(self, num_groups: int, group_size: int, step: int = 0) -> SamplePlan:
        """The next `num_groups` prompts of the walk, `group_size` completions each."""
        return SamplePlan(self.next_indices(num_groups), [group_size] * num_groups)

    def update(self, outcome: RoundOutcome) -> None:
        """Uniform sampling does not adapt to rewards."""

    def state_dict(self) -> dict[str, int]:
        """Where the walk is, as JSON-serializable ints; restoring it repeats the same future."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_prompts": self.num_prompts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; raises ValueError if it was saved for another dataset size."""
        num_prompts = state.get("num_prompts", self.num_prompts)
        if num_prompts != self.num_prompts:
            raise ValueError(
                f"sampler state was saved for {num_prompts} prompts but the dataset has {self.num_prompts}"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_prompts:
            raise ValueError(f"invalid sampler state: epoch {epoch}, position {position}")
        if position == self.num_prompts:
            epoch, position = epoch + 1, 0
        self.seed, self.epoch, self.position = int(state["seed"]), epoch, position
        self._order = None


@register_sampler("uniform")
def uniform_sampler(ctx: SamplerContext) -> UniformSampler:
    """Uniform sampling without replacement within an epoch (every prompt once per epoch, as TRL
    and verl's default dataloaders do); every group gets `rollout.num_generations` completions."""
    return UniformSampler(ctx.num_prompts, ctx.seed, shuffle=ctx.shuffle)
