"""Built-in reward functions, registered as factories in `REWARDS`.

`REWARDS.get(name)(**kwargs)` returns a TRL-style reward
`fn(prompts, completions, completion_ids, **columns) -> list[float | None]`.
A completion given as a chat-message list (TRL conversational style) is scored on the content
of its last message.

The math rewards (`exact_answer`, `math_verify`, `majority_vote`) live in `groupwise.rewards.math`.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

from groupwise.rewards.contract import RewardError, RewardFn, register_reward
from groupwise.rewards.text import completion_text

# ----------------------------------------------------------------------------- format

_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE, "a": re.ASCII}


@register_reward("format")
def format_reward(pattern: str, mode: str = "fullmatch", flags: str = "") -> RewardFn:
    r"""Format reward: r_i = 1[pattern matches c_i] ∈ {0, 1}.

    The format reward of DeepSeek-R1 (arXiv 2501.12948), e.g.
    `pattern="<think>.*?</think>\s*<answer>.*?</answer>"`. `mode="fullmatch"` requires the whole
    completion (stripped) to match, `mode="search"` any part of it. DOTALL is always on, so `.`
    crosses newlines; `flags` adds more of "i" (ignore case), "m" (multiline), "x" (verbose),
    "a" (ASCII).
    """
    if mode not in ("fullmatch", "search"):
        raise RewardError(f"format: mode must be 'fullmatch' or 'search', not {mode!r}")
    unknown = set(flags) - set(_FLAGS)
    if unknown:
        raise RewardError(f"format: unknown regex flag(s) {''.join(sorted(unknown))!r}; known: {''.join(_FLAGS)}")
    compiled_flags = re.DOTALL
    for letter in flags:
        compiled_flags |= _FLAGS[letter]
    try:
        regex = re.compile(pattern, compiled_flags)
    except re.error as e:
        raise RewardError(f"format: the pattern {pattern!r} is not a valid regular expression: {e}") from e
    match = regex.fullmatch if mode == "fullmatch" else regex.search

    def reward(prompts: Any = None, completions: Sequence[Any] = (), completion_ids: Any = None, **columns: Any) -> list[float | None]:
        return [1.0 if match(completion_text(c).strip() if mode == "fullmatch" else completion_text(c)) else 0.0
                for c in completions]

    reward.__name__ = "format"
    return reward


# ----------------------------------------------------------------------------- soft_overlong


@register_reward("soft_overlong")
def soft_overlong(max_length: int, buffer: int, penalty: float = 1.0) -> RewardFn:
    r"""DAPO's soft overlong punishment (Yu et al., 2025, arXiv 2503.14476, eq. 13).

    With L_i = len(completion_ids[i]) (unpadded), L_max = `max_length`, L_cache = `buffer`:

        r_i = 0                                          if L_i ≤ L_max − L_cache
        r_i = (L_max − L_cache − L_i) / L_cache · penalty if L_max − L_cache < L_i ≤ L_max
        r_i = −penalty                                   if L_i > L_max

    A linear ramp from 0 to −penalty over the last `buffer` tokens. Add it to the accuracy
    reward (weight 1) so long-but-correct answers are discouraged gradually, not cut off.
    """
    for name, value in (("max_length", max_length), ("buffer", buffer)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RewardError(f"soft_overlong: {name} must be an integer, not {value!r}")
    if not 0 < buffer < max_length:
        raise RewardError(f"soft_overlong: need 0 < buffer < max_length, got buffer={buffer}, max_length={max_length}")
    if not (isinstance(penalty, (int, float)) and math.isfinite(penalty) and penalty >= 0):
        raise RewardError(f"soft_overlong: penalty must be a finite number ≥ 0, not {penalty!r}")
    start = max_length - buffer

    def reward(prompts: Any = None, completions: Sequence[Any] = (), completion_ids: Sequence[Sequence[int]] = (), **columns: Any) -> list[float | None]:
        scores: list[float | None] = []
        for ids in completion_ids:
            length = len(ids)
            if length <= start:
                scores.append(0.0)
            elif length <= max_length:
                scores.append((start - length) / buffer * penalty)
            else:
                scores.append(-float(penalty))
        return scores

    reward.__name__ = "soft_overlong"
    return reward
