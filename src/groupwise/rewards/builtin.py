"""Built-in reward functions, registered as factories in `REWARDS`.

`REWARDS.get(name)(**kwargs)` returns a TRL-style reward
`fn(prompts, completions, completion_ids, **columns) -> list[float | None]`.
A completion given as a chat-message list (TRL conversational style) is scored on the content
of its last message.
"""
from __future__ import annotations

import inspect
import logging
import math
import re
import threading
from decimal import Decimal, InvalidOperation
from typing import Any, Sequence

from groupwise.rewards.contract import RewardError, RewardFn, register_reward

logger = logging.getLogger("groupwise.rewards")


# ----------------------------------------------------------------------------- helpers


def completion_text(completion: Any) -> str:
    """The text to score: the string itself, or the last message's content of a message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # multimodal parts: [{"type": "text", "text": ...}, ...]
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise RewardError(f"cannot read a completion of type {type(completion).__name__}; expected text or a list of messages")


def _column(reward: str, column: str, columns: dict[str, Any]) -> Sequence[Any]:
    if column not in columns:
        available = ", ".join(sorted(k for k in columns if k != "trainer_state")) or "none"
        raise RewardError(f"reward '{reward}' needs the dataset column '{column}'; the columns available are: {available}")
    return columns[column]


_NUMBER = re.compile(
    r"""
    (?:(?<![\w.])-)?                          # a sign, unless it is a hyphen or subtraction (3-5)
    (?: (?:\d{1,3}(?:,\d{3})+(?!\d) | \d+) (?:\.\d+)?   # 1,234,567.5 | 1234 | 12.5
      | \.\d+ )                               # .5
    """,
    re.VERBOSE,
)
_BOXED = re.compile(r"\\boxed\s*\{")


def last_number(text: str) -> str | None:
    """The last integer or decimal in `text`, thousands separators removed: 'x = -1,234.5.' → '-1234.5'."""
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


def last_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}`, braces balanced: '\boxed{\frac{1}{2}}' → '\frac{1}{2}'."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
        # unbalanced (e.g. truncated): try an earlier \boxed
    return None


def _as_number(text: str) -> Decimal | None:
    try:
        x = Decimal(text.strip().replace(",", ""))
    except InvalidOperation:
        return None
    return x if x.is_finite() else None


def answers_equal(predicted: str, reference: Any) -> bool:
    """Equal as numbers when both read as numbers ('85' == '85.0', '1,234' == '1234'), else as stripped strings."""
    predicted, reference = predicted.strip(), str(reference).strip()
    a, b = _as_number(predicted), _as_number(reference)
    if a is not None and b is not None:
        return a == b
    return predicted == reference


# ----------------------------------------------------------------------------- exact_answer

_EXTRACTORS = {"last_number": last_number, "full": lambda text: text.strip(), "boxed": last_boxed}


@register_reward("exact_answer")
def exact_answer(answer_column: str = "answer", extract: str = "last_number") -> RewardFn:
    r"""Rule-based outcome reward: r_i = 1[extract(c_i) = a_i] ∈ {0, 1}.

    The binary accuracy reward of DeepSeekMath/GRPO (Shao et al., 2024, arXiv 2402.03300) and
    DeepSeek-R1 (arXiv 2501.12948), in the GSM8K style of final-number answers (Cobbe et al., 2021,
    arXiv 2110.14168).

    - `extract="last_number"`: the last integer/decimal of the completion (a leading minus kept,
      thousands separators such as 1,234 removed);
    - `extract="full"`: the whole completion, stripped;
    - `extract="boxed"`: the content of the last `\boxed{...}` (balanced braces).

    If the extracted answer and the reference `a_i` (column `answer_column`) both read as numbers
    they are compared numerically ("85" = "85.0"), otherwise as strings after strip. Nothing
    extracted scores 0; a reference of None scores None (not applicable).
    """
    if extract not in _EXTRACTORS:
        raise RewardError(f"exact_answer: extract must be one of {', '.join(_EXTRACTORS)}, not {extract!r}")
    extractor = _EXTRACTORS[extract]

    def reward(prompts: Any = None, completions: Sequence[Any] = (), completion_ids: Any = None, **columns: Any) -> list[float | None]:
        references = _column("exact_answer", answer_column, columns)
        scores: list[float | None] = []
        for completion, reference in zip(completions, references):
            if reference is None:
                scores.append(None)
                continue
            predicted = extractor(completion_text(completion))
            scores.append(1.0 if predicted is not None and answers_equal(predicted, reference) else 0.0)
        return scores

    reward.__name__ = "exact_answer"
    return reward


# ----------------------------------------------------------------------------- math_verify


def _timeout_kwargs(fn: Any, name: str) -> dict[str, Any]:
    """`{name: None}` (no signal-based timeout) off the main thread, if the installed `fn` takes it."""
    if threading.current_thread() is threading.main_thread():
        return {}
    return {name: None} if name in inspect.signature(fn).parameters else {}


@register_reward("math_verify")
def math_verify_reward(answer_column: str = "answer") -> RewardFn:
    r"""Symbolic-equivalence accuracy reward: r_i = 1[verify(parse(a_i), parse(c_i))] ∈ {0, 1}.

    Uses Hugging Face Math-Verify (github.com/huggingface/Math-Verify, as in Open-R1), so "1/2",
    "0.5", "\frac{1}{2}" and "\boxed{\frac12}" all match the gold "0.5"; the rule-based accuracy
    reward of DeepSeek-R1 (arXiv 2501.12948). The gold answer is parsed as given, or wrapped in
    `$...$` when that yields nothing; a gold that still cannot be parsed scores None (not
    applicable, as in TRL's `accuracy_reward`). A completion that cannot be parsed or verified
    scores 0 — this reward never raises on model output.

    Math-Verify's timeouts use `signal.alarm`, which only the main thread may set; elsewhere it is
    called with `parsing_timeout=None` / `timeout_seconds=None` (no timeout).
    """
    import math_verify as mv  # imported lazily: it pulls in sympy

    def reward(prompts: Any = None, completions: Sequence[Any] = (), completion_ids: Any = None, **columns: Any) -> list[float | None]:
        references = _column("math_verify", answer_column, columns)
        parse_kw = _timeout_kwargs(mv.parse, "parsing_timeout")
        verify_kw = _timeout_kwargs(mv.verify, "timeout_seconds")
        golds: dict[str, list[Any]] = {}  # each answer repeats once per completion of its group
        scores: list[float | None] = []
        for completion, reference in zip(completions, references):
            if reference is None:
                scores.append(None)
                continue
            key = str(reference).strip()
            if key not in golds:
                golds[key] = _parse(mv, key, parse_kw) or _parse(mv, f"${key}$", parse_kw)
            gold = golds[key]
            if not gold:
                scores.append(None)
                continue
            try:
                answer = mv.parse(completion_text(completion), **parse_kw)
                scores.append(1.0 if answer and mv.verify(gold, answer, **verify_kw) else 0.0)
            except Exception as e:  # noqa: BLE001 - an unparseable completion is simply wrong
                logger.debug("math_verify: scoring 0 after %s: %s", type(e).__name__, e)
                scores.append(0.0)
        return scores

    reward.__name__ = "math_verify"
    return reward


def _parse(mv: Any, text: str, kwargs: dict[str, Any]) -> list[Any]:
    try:
        return list(mv.parse(text, **kwargs))
    except Exception:  # noqa: BLE001
        return []


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
