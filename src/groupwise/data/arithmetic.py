"""The built-in task: two-digit integer addition and subtraction.

Each problem is a prompt such as ``"37+48="`` or ``"82-57="`` whose answer is the exact
integer result (``"85"``, ``"25"``). Operands are drawn uniformly from 0..99 and the operator
from ``+`` and ``-``; a subtraction always puts the larger operand first, so answers lie in
0..198 (10,000 distinct additions and 5,050 distinct subtractions). The completion a policy
should produce is just the answer's digits followed by end-of-sequence; `is_correct` also
accepts a leading ``-``, so a negative guess is simply wrong rather than unparseable.

Why this family: a character-level model of under a million parameters learns it partially
in a short supervised warm start (carries and borrows are what it gets wrong), and every
kind of problem (carry or not, borrow or not) is partly solved by sampling, so group-relative
reinforcement learning gets signal everywhere and climbs steadily. (Allowing negative
differences was tried: the sign is learned so late that RL stalls on half the subtractions.)

* `heldout_split` is a fixed evaluation set that does not depend on any user seed.
* `train_split` draws training rows from a seed and never yields a held-out prompt.
* `is_correct` is the exact-match reward: the completion must be one integer equal to the answer.

Everything is deterministic: each split uses its own `random.Random`, never the global RNG.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from random import Random

BUILTIN_MODEL_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "builtin"

OPERAND_MAX = 99
OPERATORS = ("+", "-")
HELDOUT_SEED = 20250917  # fixed: the held-out set must not move with user seeds
HELDOUT_MAX = 1000       # held-out sets are prefixes of one fixed list of this many problems

_INTEGER = re.compile(r"-?[0-9]+")


def problem_category(a: int, op: str, b: int) -> str:
    """The skill a problem exercises (a column for curricula such as SEC): addition with or without
    a carry, subtraction with or without a borrow, in the units digit."""
    if op == "+":
        return "add_carry" if a % 10 + b % 10 >= 10 else "add"
    return "sub_borrow" if a % 10 < b % 10 else "sub"


def make_problem(a: int, op: str, b: int) -> dict:
    """The row for `a op b`: ``{"prompt": "a op b=", "answer": str(result), "category": …}``."""
    result = a + b if op == "+" else a - b
    return {"prompt": f"{a}{op}{b}=", "answer": str(result), "category": problem_category(a, op, b)}


def _random_problem(rng: Random) -> dict:
    """Uniform operands in 0..OPERAND_MAX and a uniform operator; differences are never negative."""
    a = rng.randint(0, OPERAND_MAX)
    op = rng.choice(OPERATORS)
    b = rng.randint(0, OPERAND_MAX)
    if op == "-" and a < b:
        a, b = b, a
    return make_problem(a, op, b)


@lru_cache(maxsize=1)
def _heldout_rows() -> tuple[tuple[str, str], ...]:
    """The fixed list of distinct held-out problems, in a fixed order."""
    rng = Random(HELDOUT_SEED)
    rows: dict[str, str] = {}
    while len(rows) < HELDOUT_MAX:
        row = _random_problem(rng)
        rows.setdefault(row["prompt"], row["answer"])
    return tuple(rows.items())


@lru_cache(maxsize=1)
def _heldout_prompts() -> frozenset[str]:
    return frozenset(prompt for prompt, _ in _heldout_rows())


def heldout_split(n: int = 200) -> list[dict]:
    """The first `n` (at most 1000) problems of the fixed held-out set; no duplicates."""
    if not 0 <= n <= HELDOUT_MAX:
        raise ValueError(f"held-out split has at most {HELDOUT_MAX} problems, got n={n}")
    return [{"prompt": p, "answer": a} for p, a in _heldout_rows()[:n]]


def train_split(seed: int, n: int) -> list[dict]:
    """`n` training problems drawn from `seed` (repeats possible), none of them held out.

    Every problem in the largest held-out set (1000 problems) is excluded, whatever `n`
    the held-out split is later taken with.
    """
    rng = Random(seed)
    excluded = _heldout_prompts()
    rows: list[dict] = []
    while len(rows) < n:
        row = _random_problem(rng)
        if row["prompt"] not in excluded:
            rows.append(row)
    return rows


def parse_integer_answer(completion: str) -> int | None:
    """The integer a completion states, or None: after stripping whitespace it must be `-?digits`."""
    text = completion.strip()
    if not _INTEGER.fullmatch(text):
        return None
    return int(text)


def is_correct(completion: str, answer: str) -> bool:
    """Whether the completion is exactly the integer `answer` (surrounding whitespace allowed)."""
    value = parse_integer_answer(completion)
    return value is not None and value == int(answer)
