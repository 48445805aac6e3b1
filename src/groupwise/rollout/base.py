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
        num_generations: int | list[int],
        params: SamplingParams,
        seed: int,
        row_offset: int = 0,
    ) -> RolloutBatch:
        """G completions per prompt (or `num_generations[i]` for prompt i), groups contiguous; the same
        seed gives the same completions. Row i samples as row `row_offset + i` of a larger batch
        would (a rank generating its share gets what one process would)."""
        ...

    def sync_weights(self, model) -> None:
        """Make the engine generate with `model`'s current weights (called after every update)."""
        ...

    def sleep(self) -> None:
        """Free generation memory during the update (vLLM on GPU); `wake_up` before generating."""
        ...

    def wake_up(self) -> None:
        ...


def group_sizes(num_generations: int | list[int], num_prompts: int) -> list[int]:
    """Each prompt's group size from an int (the same G for all) or a per-prompt list."""
    if isinstance(num_generations, int):
        sizes = [num_generations] * num_prompts
    else:
        sizes = [int(g) for g in num_generations]
        if len(sizes) != num_prompts:
            raise ValueError(f"generate: {len(sizes)} group sizes for {num_prompts} prompts")
    if any(g < 1 for g in sizes):
        raise ValueError(f"generate: every group needs at least one completion, got {sizes}")
    return sizes
