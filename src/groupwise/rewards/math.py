r"""Math rewards: answer extraction, exact and symbolic (Math-Verify) answer matching, and majority voting.

- `extract_answer(text, extract)` pulls the final answer out of a completion with the extractors
  of `EXTRACTORS` ("boxed", "answer_is", "answer_tag", "last_number", "full"), a custom
  "regex:<pattern>", or a list of these tried in order (`DEFAULT_EXTRACT` is
  ["boxed", "answer_is", "last_number"]).
- `exact_answer` compares the extracted answer with the reference as a number or a string.
- `math_verify` decides equivalence with Hugging Face Math-Verify ("1/2" = "0.5" = "\frac{1}{2}").
- `majority_vote` is label-free: each group's most frequent answer is the pseudo-label (TTRL).

Math-Verify runs in worker processes (`groupwise.rewards.verify_pool`), each job with a time limit.
"""
from __future__ import annotations

import logging
import re
import time
from collections import Counter
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any, Callable, Sequence

from groupwise.rewards.contract import RewardError, RewardFn, consecutive_groups, register_reward
from groupwise.rewards.text import completion_text, required_column
from groupwise.rewards.verify_pool import VerifyPool, attach_pool, pool_options, record_pool_metrics

logger = logging.getLogger("groupwise.rewards")

Extract = str | Sequence[str]

# ----------------------------------------------------------------------------- extraction

_NUMBER = re.compile(
    r"""
    (?:(?<![\w.])-)?                          # a sign, unless it is a hyphen or subtraction (3-5)
    (?: (?:\d{1,3}(?:,\d{3})+(?!\d) | \d+) (?:\.\d+)?   # 1,234,567.5 | 1234 | 12.5
      | \.\d+ )                               # .5
    """,
    re.VERBOSE,
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "the answer is X", "The final answer is: X", "**Final Answer:** X", "Answer: X"; X may start on the next line.
_ANSWER_IS = re.compile(r"\b(?:final\s+answer|answer)\b[ \t*_]*(?:is\b|:)[\s*:]*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def last_number(text: str) -> str | None:
    """The last integer or decimal in `text`, thousands separators removed: 'x = -1,234.5.' → '-1234.5'."""
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


def _balanced(text: str, start: int) -> str | None:
    """The text from `start` up to the brace that closes an already-open `{`, or None if it never closes."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def last_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` (or `\fbox{...}`), braces balanced: '\boxed{\frac{1}{2}}' → '\frac{1}{2}'.

    An unbalanced (truncated) last box is skipped for an earlier complete one; an empty box is no answer.
    """
    for match in reversed(list(_BOXED.finditer(text))):
        content = _balanced(text, match.end())
        if content is not None:
            return content.strip() or None
    return None


def _unwrap(answer: str) -> str:
    r"""Wrappers around the whole answer removed: '$\frac12$.' → '\frac12', '**42**' → '42', '\(x\)' → 'x',
    '\boxed{5}' → '5'."""
    previous = None
    while answer != previous:
        previous = answer
        answer = answer.strip().rstrip(".").strip().strip("*").strip()
        if len(answer) >= 2 and answer[0] == answer[-1] == "$":
            answer = answer.strip("$")
        elif answer.startswith(("\\(", "\\[")) and answer.endswith(("\\)", "\\]")):
            answer = answer[2:-2]
        else:
            box = _BOXED.match(answer)
            if box and answer.endswith("}") and _balanced(answer, box.end()) == answer[box.end():-1]:
                answer = answer[box.end():-1]
    return answer


def answer_is(text: str) -> str | None:
    r"""The answer after the last "the answer is", "final answer:" or "answer:" (any case), up to the end of
    its line or sentence, wrappers removed: 'So the answer is $\frac{1}{2}$.' → '\frac{1}{2}'."""
    for match in reversed(list(_ANSWER_IS.finditer(text))):
        rest = _SENTENCE_END.split(text[match.end():].split("\n", 1)[0], maxsplit=1)[0]
        answer = _unwrap(rest)
        if answer:
            return answer
    return None


def answer_tag(text: str) -> str | None:
    """The content of the last complete `<answer>...</answer>`, stripped (an unclosed tag is no answer)."""
    matches = _ANSWER_TAG.findall(text)
    return (matches[-1].strip() or None) if matches else None


def full_text(text: str) -> str | None:
    """The whole text, stripped (an empty text is no answer)."""
    return text.strip() or None


#: The extractors by name; `extract` may also be "regex:<pattern>" or a list of names tried in order.
EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "boxed": last_boxed,
    "answer_is": answer_is,
    "answer_tag": answer_tag,
    "last_number": last_number,
    "full": full_text,
}
DEFAULT_EXTRACT: tuple[str, ...] = ("boxed", "answer_is", "last_number")


def _regex_extractor(pattern: str, owner: str) -> Callable[[str], str | None]:
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise RewardError(f"{owner}: extract 'regex:{pattern}' is not a valid regular expression: {e}") from None

    def extract(text: str) -> str | None:
        # group 1 of the last match that captured something (the whole match if the pattern has no group)
        for match in reversed(list(regex.finditer(text))):
            value = match.group(1) if regex.groups else match.group(0)
            if value and value.strip():
                return value.strip()
        return None

    return extract


def compile_extract(extract: Extract, owner: str = "extract_answer") -> Callable[[str], str | None]:
    """The function `text -> answer | None` that the `extract` option names; RewardError for a bad option."""
    names = [extract] if isinstance(extract, str) else extract
    known = ", ".join(EXTRACTORS)
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise RewardError(f"{owner}: extract must be one of {known}, 'regex:<pattern>', or a non-empty list "
                          f"of these, not {extract!r}")
    chain: list[Callable[[str], str | None]] = []
    for name in names:
        if name.startswith("regex:"):
            chain.append(_regex_extractor(name[len("regex:"):], owner))
        elif name in EXTRACTORS:
            chain.append(EXTRACTORS[name])
        else:
            raise RewardError(f"{owner}: extract must be one of {known}, 'regex:<pattern>', or a list of "
                              f"these; unknown extractor {name!r}")
    if len(chain) == 1:
        return chain[0]

    def first_hit(text: str) -> str | None:
        for extractor in chain:
            answer = extractor(text)
            if answer is not None:
                return answer
        return None

    return first_hit


@lru_cache(maxsize=64)
def _cached_extractor(extract: str | tuple[str, ...]) -> Callable[[str], str | None]:
    return compile_extract(extract)


def extract_answer(text: str, extract: Extract = DEFAULT_EXTRACT) -> str | None:
    r"""The answer in `text` by the extractor(s) `extract`, or None; the first extractor with a hit wins.

    - "boxed": the last `\boxed{...}`/`\fbox{...}` with balanced braces (a truncated one is skipped);
    - "answer_is": after the last "the answer is" / "final answer:" / "answer:" (any case), to the end
      of the line or sentence, without surrounding `$`, `**`, trailing period or a whole `\boxed{}`;
    - "answer_tag": the last complete `<answer>...</answer>`;
    - "last_number": the last integer/decimal, a leading minus kept, thousands separators removed;
    - "full": the whole text, stripped;
    - "regex:<pattern>": group 1 (or the whole match) of the last match of `pattern`.
    """
    key = extract if isinstance(extract, str) else tuple(extract) if isinstance(extract, (list, tuple)) else extract
    try:
        extractor = _cached_extractor(key)
    except (TypeError, RewardError):  # unhashable or bad: compile_extract says what is wrong with `extract` itself
        extractor = compile_extract(extract)
    return extractor(text)


# ----------------------------------------------------------------------------- exact comparison


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


def _answer_key(answer: str) -> tuple[str, Any]:
    """A hashable key with key(a) == key(b) exactly when `answers_equal(a, b)`."""
    number = _as_number(answer)
    return ("number", number) if number is not None else ("text", answer.strip())


# ----------------------------------------------------------------------------- exact_answer


@register_reward("exact_answer")
def exact_answer(answer_column: str = "answer", extract: Extract = "last_number") -> RewardFn:
    r"""Rule-based outcome reward: r_i = 1[extract(c_i) = a_i] ∈ {0, 1}.

    The binary accuracy reward of "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in
    Open Language Models" (Shao et al., 2024, arXiv 2402.03300; GRPO) and DeepSeek-R1 (arXiv
    2501.12948), in the GSM8K style of final-number answers (Cobbe et al., 2021, arXiv 2110.14168).

    `extract` names the extractor of `extract_answer` ("last_number" by default; "full", "boxed",
    "answer_is", "answer_tag", "regex:<pattern>") or a list of them tried in order. If the
    extracted answer and the reference `a_i` (column `answer_column`) both read as numbers they are
    compared numerically ("85" = "85.0" = "85.00", "1,234" = "1234"), otherwise as strings after
    strip. Nothing extracted scores 0; a reference of None scores None (not applicable).
    """
    extractor = compile_extract(extract, "exact_answer")

    def reward(prompts: Any = None, completions: Sequence[Any] = (), completion_ids: Any = None, **columns: Any) -> list[float | None]:
        references = required_column("exact_answer", answer_column, columns)
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


@register_reward("math_verify")
def math_verify_reward(answer_column: str = "answer", extract: Extract | None = None, timeout_s: float = 5.0,
                       workers: int | None = None) -> RewardFn:
    r"""Symbolic-equivalence accuracy reward: r_i = 1[verify(parse(a_i), parse(x_i))] ∈ {0, 1}.

    The rule-based accuracy reward of "DeepSeek-R1: Incentivizing Reasoning Capability in LLMs via
    Reinforcement Learning" (DeepSeek-AI, 2025, arXiv 2501.12948), with the equivalence check of
    Hugging Face Math-Verify (github.com/huggingface/Math-Verify, as in Open-R1 and TRL).

    x_i is the completion as is (`extract=None`: Math-Verify finds the answer itself, the last
    `\boxed{}` first) or the answer that `extract` takes from it (see `extract_answer`; nothing
    extracted scores 0). a_i is the reference in column `answer_column`. Bare answers (a_i, and x_i
    when extracted) are parsed inside `$...$`, so "2\sqrt{3}" is not read as 2. Equal are e.g.
    "1/2" = "0.5" = "\frac{1}{2}" = "\dfrac12", "1,234" = "1{,}234" = "1\,234" = "1234",
    "-3" = "−3", "x=3" = "3" and sets, intervals, matrices, symbolic forms that simplify alike.
    Percentages: "X%" (or "X\%") equals both X/100 and X ("50\%" = "0.5" = "50", "12.5\%" =
    "0.125" = "12.5"); "0.5" ≠ "50". A reference of None, or one that cannot be parsed, scores
    None (not applicable); a completion that cannot be parsed scores 0. It never raises on model
    output.

    Parsing and verification run in `workers` worker processes (default: min(4, CPU cores)), one
    completion at a time each, within `timeout_s` seconds per completion; one that overruns scores
    0 and is counted in `reward.timeouts` (see the module docstring). `reward.close()` stops the
    workers; `reward.last_metrics` describes the last call.
    """
    extractor = compile_extract(extract, "math_verify") if extract is not None else None
    pool = VerifyPool(pool_options("math_verify", timeout_s, workers), float(timeout_s), "math_verify")

    def reward(prompts: Any = None, completions: Sequence[Any] = (), completion_ids: Any = None, **columns: Any) -> list[float | None]:
        start, before = time.monotonic(), (pool.timeouts, pool.restarts)
        references = required_column("math_verify", answer_column, columns)
        scores: list[float | None] = []
        jobs: dict[tuple[str, str], int] = {}  # a repeated (gold, prediction) pair is verified once
        owners: list[int | None] = []
        for completion, reference in zip(completions, references):
            text = completion_text(completion)
            gold = None if reference is None else str(reference).strip()
            if not gold:
                scores.append(None)
                owners.append(None)
                continue
            # nothing extracted: still a job (with an empty prediction, which scores 0), so that a gold
            # that cannot be parsed scores None whatever the completion
            predicted = text if extractor is None else extractor(text) or ""
            scores.append(0.0)
            owners.append(jobs.setdefault((gold, predicted), len(jobs)))
        results = pool.run([{"gold": g, "gold_kind": "answer", "pred": p, "pred_kind": "text" if extractor is None else "answer"}
                            for g, p in jobs])
        for i, job in enumerate(owners):
            if job is not None:
                status, value = results[job]
                scores[i] = None if status == "gold" else 1.0 if status == "ok" and value == 1 else 0.0
        record_pool_metrics(reward, "math_verify", pool, before, len(jobs), start)
        return scores

    reward.__name__ = "math_verify"
    attach_pool(reward, pool)
    return reward


# ----------------------------------------------------------------------------- majority_vote


def _exact_classes(answers: list[str]) -> list[int]:
    """For each distinct answer, the index of the first answer `answers_equal` to it (its class)."""
    first: dict[tuple[str, Any], int] = {}
    return [first.setdefault(_answer_key(a), j) for j, a in enumerate(answers)]


def _math_verify_classes(groups: list[list[str]], pool: VerifyPool) -> tuple[list[list[int]], int]:
    """For each distinct answer of each group, the index of its class's first answer under Math-Verify;
    and the number of jobs run.

    Greedy, as Math-Verify's relation need not be transitive: the first unclassified answer r opens a
    class; every later unclassified answer x with verify(r, x) joins it. Each round does this for all
    groups at once, so the pool runs their comparisons in parallel. First each answer is checked
    alone (against 0): one that cannot be parsed, or that overruns (a tower such as 9^{9^{9}}), is a
    class of its own, instead of failing or overrunning once per comparison.
    """
    classes = [list(range(len(g))) for g in groups]
    probes = [(k, j) for k, g in enumerate(groups) if len(g) > 1 for j in range(len(g))]
    results = pool.run([{"gold": groups[k][j], "gold_kind": "answer", "pred": "0", "pred_kind": "answer"} for k, j in probes])
    alone = {probe for probe, (status, _) in zip(probes, results) if status in ("gold", "timeout", "crash")}
    remaining = [[j for j in range(len(g)) if (k, j) not in alone] for k, g in enumerate(groups)]
    ran = len(probes)
    while any(len(rest) > 1 for rest in remaining):
        jobs, where = [], []
        for k, rest in enumerate(remaining):
            for j in rest[1:]:  # rest[0] opens a class: it is its own first answer already
                jobs.append({"gold": groups[k][rest[0]], "gold_kind": "answer", "pred": groups[k][j], "pred_kind": "answer"})
                where.append((k, j))
        ran += len(jobs)
        for (k, j), (status, value) in zip(where, pool.run(jobs)):
            if status == "ok" and value == 1:
                classes[k][j] = remaining[k][0]
        remaining = [[j for j in rest[1:] if classes[k][j] == j] for k, rest in enumerate(remaining)]
    return classes, ran


@register_reward("majority_vote")
def majority_vote(extract: Extract = DEFAULT_EXTRACT, equivalence: str = "exact", timeout_s: float = 5.0,
                  workers: int | None = None) -> RewardFn:
    r"""Label-free majority-vote reward of "TTRL: Test-Time Reinforcement Learning" (Zuo et al., 2025, arXiv 2504.16084).

    Within each group g (the `group_ids` context argument: the completions of one prompt), with
    y_i = extract(c_i) the extracted answer of completion i (None when nothing is extracted):

        ŷ_g = argmax_y Σ_{j∈g, y_j≠None} 1[y_j ≡ y]      (the pseudo-label; ties: the answer seen first)
        r_i = 1[y_i ≠ None and y_i ≡ ŷ_g] ∈ {0, 1}

    A completion without an answer does not vote and scores 0; a group where nobody answers scores 0
    throughout. `equivalence="exact"`: ≡ is `answers_equal` (numbers by value, "85" ≡ "85.0" ≡
    "85.00", else stripped strings); `equivalence="math_verify"`: ≡ is Math-Verify equivalence of the
    answers as in the `math_verify` reward ("1/2" ≡ "0.5" ≡ "\frac{1}{2}"), classes formed greedily
    in order of first appearance (each answer joins the first class whose first answer it verifies
    against), run in `workers` processes with `timeout_s` per comparison (a comparison that
    overruns counts as "different" and in `reward.timeouts`; an answer that cannot be parsed or
    overruns when checked alone is a class of its own). With k distinct answers in a group this
    takes k checks and at most k(k−1)/2 comparisons. Needs no answer column.
    """
    if equivalence not in ("exact", "math_verify"):
        raise RewardError(f"majority_vote: equivalence must be 'exact' or 'math_verify', not {equivalence!r}")
    extractor = compile_extract(extract, "majority_vote")
    size = pool_options("majority_vote", timeout_s, workers)
    pool = VerifyPool(size, float(timeout_s), "majority_vote") if equivalence == "math_verify" else None

    def reward(prompts: Any = None, completions: Sequence[Any] = (), completion_ids: Any = None,
               group_ids: Sequence[Any] | None = None, **columns: Any) -> list[float | None]:
        start = time.monotonic()
        before = (pool.timeouts, pool.restarts) if pool else (0, 0)
        n = len(completions)
        if group_ids is None:  # called outside the runner: runs of equal prompts, else one group
            group_ids = consecutive_groups(prompts) if prompts is not None else [0] * n
        if len(group_ids) != n:
            raise RewardError(f"majority_vote: got {len(group_ids)} group ids for {n} completions")
        answers = [extractor(completion_text(c)) for c in completions]
        members: dict[Any, list[int]] = {}  # group id -> its completions (groups may interleave)
        for i, g in enumerate(group_ids):
            members.setdefault(g, []).append(i)
        # the distinct answer strings of each group, in order of first appearance
        distinct = [list(dict.fromkeys(answers[i].strip() for i in idx if answers[i] is not None)) for idx in members.values()]
        if pool is None:
            classes, compared = [_exact_classes(d) for d in distinct], 0
        else:
            classes, compared = _math_verify_classes(distinct, pool)
        scores: list[float | None] = [0.0] * n
        for idx, d, cls in zip(members.values(), distinct, classes):
            class_of = dict(zip(d, cls))
            votes = Counter(class_of[answers[i].strip()] for i in idx if answers[i] is not None)
            if not votes:
                continue
            # a class is named by the position of its first answer, so the lowest name wins a tie
            winner = min(votes, key=lambda c: (-votes[c], c))
            for i in idx:
                if answers[i] is not None and class_of[answers[i].strip()] == winner:
                    scores[i] = 1.0
        if pool is not None:
            record_pool_metrics(reward, "majority_vote", pool, before, compared, start)
        return scores

    reward.__name__ = "majority_vote"
    if pool is not None:
        attach_pool(reward, pool)
    else:  # the same surface without a pool, so callers need not tell the two apart
        reward.close, reward.timeouts, reward.last_metrics = (lambda: None), 0, {}
    return reward
