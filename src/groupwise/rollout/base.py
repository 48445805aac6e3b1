"""The rollout-engine protocol: prompts in, a `RolloutBatch` of G completions per prompt out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from groupwise.types import Prompt, RolloutBatch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0            # 0 = off
    greedy: bool = False      # argmax decoding (evaluation)


class RolloutEngine(Protocol):
    def generate(
        self,
        prompts: list[Prompt],
        prompt_texts: list[str],
        num_generations: int,
        params: SamplingParams,
        seed: int,
    ) -> RolloutBatch:
        """G completions per prompt, groups contiguous; the same seed gives the same completions."""
        ...
