"""Format and structure rewards: the think/answer tag format and JSON-schema adherence.

- `think_answer_format`: DeepSeek-R1's `<think>…</think><answer>…</answer>` format, strict or
  lenient, with optional partial credit per tag (open-r1's tag count);
- `json_schema`: ThinkJSON / RL-Struct style schema adherence of a JSON answer.

For any other textual format use the regex reward `format` (`groupwise.rewards.builtin`), e.g.
`pattern="<think>.*?</think>\\s*<answer>.*?</answer>"`.
"""
from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from typing import Any, Callable, Sequence

from groupwise.rewards.text import completion_text, required_column
from groupwise.rewards.contract import RewardError, RewardFn, register_reward

# ----------------------------------------------------------------------------- think_answer_format

_TAG_NAME = re.compile(r"[A-Za-z_][\w.:-]*")


def _tag_name(reward: str, kwarg: str, value: Any) -> str:
    if not isinstance(value, str) or not _TAG_NAME.fullmatch(value):
        raise RewardError(f"{reward}: {kwarg} must be a tag name such as 'think' (letters, digits, _ . : -; "
                          f"no angle brackets), not {value!r}")
    return value


def _prompt_ends_with(prompt: Any, tag: str) -> bool:
    """Whether a text prompt ends with `tag` (trailing whitespace ignored).

    A chat prompt (message list) never does: the opening tag that a chat template appends is not
    visible here, so such setups must say `think_opened_in_prompt=True`."""
    return isinstance(prompt, str) and prompt.rstrip().endswith(tag)


@register_reward("think_answer_format")
def think_answer_format(think_tag: str = "think", answer_tag: str = "answer", strict: bool = True,
                        partial: bool = False, think_opened_in_prompt: bool | str = "auto") -> RewardFn:
    r"""DeepSeek-R1's reasoning format: a think block, then an answer block.

    Paper: "DeepSeek-R1: Incentivizing Reasoning Capability in LLMs via Reinforcement Learning"
    (DeepSeek-AI, arXiv 2501.12948), the format reward of R1-Zero's rule-based rewards. Partial
    credit follows open-r1's `tag_count_reward` (github.com/huggingface/open-r1).

    With T = (`<think>`, `</think>`, `<answer>`, `</answer>`) (tag names from `think_tag`,
    `answer_tag`) and n_t(c) the number of occurrences of tag t in the completion c:

        F_strict(c)  = 1[c = ws <think> x </think> ws <answer> y </answer> ws]  and n_t(c) = 1 ∀t
        F_lenient(c) = 1[c contains <think> x </think> … <answer> y </answer>, in that order]

    (ws: only whitespace; x, y: any text, possibly empty). Strict mode therefore scores nested or
    duplicated tags and any text outside the two blocks 0; lenient mode accepts text around and
    between the blocks and repeated blocks.

        r_i = F(c_i)                                                   (partial = False)
        r_i = 1 if F(c_i) else min(0.75, 0.25 · #{t ∈ T : n_t(c_i) = 1})  (partial = True)

    i.e. with `partial`, 0.25 for each tag present exactly once (as open-r1's tag count, without
    its newline conventions), capped at 0.75 so that a completion failing the format never scores
    as much as one that has it; r ∈ {0, 0.25, 0.5, 0.75, 1}.

    `think_opened_in_prompt`: when the prompt itself ends with `<think>` (R1-distill and Qwen3
    templates), the completion starts inside the think block: the format is then
    `x </think> ws <answer> y </answer>` with no `<think>` in the completion (n_<think> = 0 counts
    as the tag present once for partial credit). True / False, or "auto" (default): per row,
    True when the prompt is text ending with `<think>` (whitespace ignored); a chat prompt
    (message list) counts as not opened, since the template's tag is not visible in it.

    Any other textual format: the regex reward `format` (e.g. `pattern="<think>.*?</think>\s*<answer>.*?</answer>"`).
    """
    name = "think_answer_format"
    think_tag = _tag_name(name, "think_tag", think_tag)
    answer_tag = _tag_name(name, "answer_tag", answer_tag)
    if think_tag == answer_tag:
        raise RewardError(f"{name}: think_tag and answer_tag must differ, both are {think_tag!r}")
    for kwarg, value in (("strict", strict), ("partial", partial)):
        if not isinstance(value, bool):
            raise RewardError(f"{name}: {kwarg} must be true or false, not {value!r}")
    if think_opened_in_prompt not in (True, False, "auto"):
        raise RewardError(f"{name}: think_opened_in_prompt must be true, false or 'auto', not {think_opened_in_prompt!r}")

    t_open, t_close, a_open, a_close = (f"<{think_tag}>", f"</{think_tag}>", f"<{answer_tag}>", f"</{answer_tag}>")
    q = [re.escape(t) for t in (t_open, t_close, a_open, a_close)]
    # Strict: the whole completion is the two blocks; tag counts (checked apart) rule out nesting and duplicates.
    strict_closed = re.compile(rf"\s*{q[0]}.*{q[1]}\s*{q[2]}.*{q[3]}\s*", re.DOTALL)
    strict_opened = re.compile(rf".*{q[1]}\s*{q[2]}.*{q[3]}\s*", re.DOTALL)

    def has_format(text: str, counts: list[int], opened: bool) -> bool:
        if strict:  # counts first: the regex then runs only on candidates, each tag once (no backtracking blow-up)
            expected = [0 if opened else 1, 1, 1, 1]
            return counts == expected and (strict_opened if opened else strict_closed).fullmatch(text) is not None
        # lenient: the tags occur in order; taking each one's earliest occurrence is optimal, and linear
        at = 0
        for tag in (t_close, a_open, a_close) if opened else (t_open, t_close, a_open, a_close):
            found = text.find(tag, at)
            if found < 0:
                return False
            at = found + len(tag)
        return True

    def reward(prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (), completion_ids: Any = None,
               **columns: Any) -> list[float | None]:
        prompts = prompts if prompts is not None else [None] * len(completions)
        scores: list[float | None] = []
        for prompt, completion in zip(prompts, completions):
            text = completion_text(completion)
            opened = _prompt_ends_with(prompt, t_open) if think_opened_in_prompt == "auto" else think_opened_in_prompt
            counts = [text.count(t) for t in (t_open, t_close, a_open, a_close)]
            if has_format(text, counts, opened):
                scores.append(1.0)
            elif partial:
                present = sum(c == 1 for c in counts[1:]) + (counts[0] == (0 if opened else 1))
                scores.append(min(0.75, 0.25 * present))
            else:
                scores.append(0.0)
        return scores

    reward.__name__ = name
    return reward


# ----------------------------------------------------------------------------- JSON extraction


class _NotJSON(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not JSON")  # Python's json accepts NaN/Infinity; the standard does not


def _loads(text: str) -> Any:
    """Strict JSON (no NaN/Infinity), or _NotJSON."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; very deep nesting recurses
        raise _NotJSON(str(e)) from None


_FENCE = re.compile(r"```[ \t]*(?:json|JSON|jsonc)?[ \t]*\r?\n(.*?)```", re.DOTALL)
_OPENERS = re.compile(r"[{\[]")
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
#: start positions tried by the "balanced" extractor: each try is a C-speed parse, but a text of
#: thousands of stray brackets must not make one reward call quadratic.
_MAX_STARTS = 256


def _from_answer_tag(tag: str) -> Callable[[str], list[str]]:
    block = re.compile(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", re.DOTALL)

    def candidates(text: str) -> list[str]:
        return list(reversed(block.findall(text)))  # the last answer block first

    return candidates


def _from_fence(text: str) -> list[str]:
    return list(reversed(_FENCE.findall(text)))  # the last ```json block first


def _from_whole(text: str) -> list[str]:
    return [text]


def _first_balanced(text: str) -> Any:
    """The first complete JSON object/array starting at a `{` or `[` (JSON strings respected)."""
    for k, match in enumerate(_OPENERS.finditer(text)):
        if k >= _MAX_STARTS:
            break
        try:
            value, _ = _DECODER.raw_decode(text, match.start())
        except (ValueError, RecursionError):
            continue
        return value
    raise _NotJSON("no JSON object or array")


_EXTRACTORS = ("answer", "fenced", "whole", "balanced")


# ----------------------------------------------------------------------------- json_schema


class _ValidatorCache:
    """Compiled validators by canonical schema text (LRU, bounded: per-row schemas can be many)."""

    def __init__(self, check_formats: bool, maxsize: int = 1024):
        self.check_formats = check_formats
        self.maxsize = maxsize
        self._items: OrderedDict[str, Any] = OrderedDict()

    def get(self, schema: Any, where: str) -> Any:
        """The validator of `schema` (a dict/bool, or JSON text); RewardError naming `where` if malformed."""
        if isinstance(schema, str):
            if schema in self._items:  # the column's raw text: no re-parse for repeated rows
                self._items.move_to_end(schema)
                return self._items[schema]
            raw = schema
            try:
                schema = _loads(schema)
            except _NotJSON as e:
                raise RewardError(f"json_schema: the schema of {where} is not valid JSON: {e}") from None
        else:
            raw = None
        if not isinstance(schema, (dict, bool)):
            raise RewardError(f"json_schema: the schema of {where} must be a JSON object (or true/false), "
                              f"not a {type(schema).__name__}")
        try:
            key = json.dumps(schema, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise RewardError(f"json_schema: the schema of {where} is not JSON-serializable: {e}") from None
        validator = self._items.get(key)
        if validator is None:
            validator = self._compile(schema, where)
        self._remember(key, validator)
        if raw is not None:
            self._remember(raw, validator)
        return validator

    def _remember(self, key: str, validator: Any) -> None:
        self._items[key] = validator
        self._items.move_to_end(key)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def _compile(self, schema: Any, where: str) -> Any:
        import jsonschema  # imported lazily: only this reward needs it

        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as e:
            path = "/".join(str(p) for p in e.absolute_path) or "(root)"
            raise RewardError(f"json_schema: the schema of {where} is not a valid {cls.__name__} schema "
                              f"(at {path}): {e.message}") from None
        return cls(schema, format_checker=cls.FORMAT_CHECKER if self.check_formats else None)


@register_reward("json_schema")
def json_schema(schema: dict | bool | str | None = None, schema_column: str | None = None,
                extract: str | Sequence[str] = ("answer", "fenced", "whole", "balanced"), answer_tag: str = "answer",
                valid_json_score: float = 0.5, partial: bool = False, check_formats: bool = False) -> RewardFn:
    r"""JSON-schema adherence: 0 for no JSON, `valid_json_score` for JSON off the schema, 1 when it validates.

    Papers: "Think Inside the JSON: Reinforcement Strategy for Strict LLM Schema Adherence"
    (Agarwal et al., arXiv 2502.14905; ThinkJSON) and "RL-Struct" (arXiv 2512.00319), whose
    reward is hierarchical: parseable JSON first, then schema validity. With J(c) the JSON
    extracted from the completion (below) and v = `valid_json_score`:

        r_i = 0   if no JSON can be extracted from c_i
        r_i = v   if J(c_i) parses but does not validate against the schema
        r_i = 1   if J(c_i) validates

    With `partial=True` the schema failure earns part of the gap: with K the schema's top-level
    `required` keys and k_i those present in J(c_i) (an object) with no validation error located
    inside their value,

        r_i = v + (1 − v) · k_i / (K + 1)   if J(c_i) parses but does not validate
        r_i = 1                             if it validates (the same formula with k_i = K and +1 for validity)

    so a failing instance stays below 1 and a schema without `required` gives v as before.

    The schema is either `schema` (a dict, bool or JSON text, checked when the reward is built) or
    the per-row column `schema_column` (a dict or JSON text; None scores None): exactly one.
    The validator class comes from the schema's `$schema` (Draft 2020-12 when absent or unknown);
    `format` is an annotation unless `check_formats=True`. A malformed schema, or one with a `$ref`
    that cannot be resolved (remote references are never fetched), is a RewardError naming the
    kwarg or the sample. Compiled validators are cached per distinct schema.

    Extraction, `extract` (one name or a chain; the first candidate that parses wins):
    "answer" (the last `<answer>…</answer>` block, tag from `answer_tag`, before earlier ones),
    "fenced" (the last ```json (or bare ```) fenced block first), "whole" (the whole completion),
    "balanced" (the first `{…}`/`[…]` from which a complete JSON value decodes, JSON strings
    respected; at most 256 start positions tried). Only strict JSON parses (NaN/Infinity do not).
    `valid_json_score` defaults to 0.5: parseable output gets a clear signal early in training,
    while validating output stays strictly preferred; it must be in [0, 1).
    """
    name = "json_schema"
    if (schema is None) == (schema_column is None):
        raise RewardError(f"{name}: give exactly one of schema (the schema itself) and schema_column "
                          f"(a dataset column with one schema per row); got "
                          f"{'both' if schema is not None else 'neither'}")
    if schema_column is not None and (not isinstance(schema_column, str) or not schema_column):
        raise RewardError(f"{name}: schema_column must be a column name, not {schema_column!r}")
    chain = [extract] if isinstance(extract, str) else list(extract) if isinstance(extract, (list, tuple)) else None
    if not chain or any(e not in _EXTRACTORS for e in chain):
        raise RewardError(f"{name}: extract must be one of {', '.join(_EXTRACTORS)} or a list of them, not {extract!r}")
    answer_tag = _tag_name(name, "answer_tag", answer_tag)
    if (isinstance(valid_json_score, bool) or not isinstance(valid_json_score, (int, float))
            or not math.isfinite(valid_json_score) or not 0 <= valid_json_score < 1):
        raise RewardError(f"{name}: valid_json_score must be a number in [0, 1), not {valid_json_score!r}")
    for kwarg, value in (("partial", partial), ("check_formats", check_formats)):
        if not isinstance(value, bool):
            raise RewardError(f"{name}: {kwarg} must be true or false, not {value!r}")

    cache = _ValidatorCache(check_formats)
    fixed = cache.get(schema, "the kwarg 'schema'") if schema is not None else None
    candidates = {"answer": _from_answer_tag(answer_tag), "fenced": _from_fence, "whole": _from_whole}
    v = float(valid_json_score)

    def extract_json(text: str) -> tuple[bool, Any]:
        for method in chain:
            if method == "balanced":
                try:
                    return True, _first_balanced(text)
                except _NotJSON:
                    continue
            for candidate in candidates[method](text):
                try:
                    return True, _loads(candidate.strip())
                except _NotJSON:
                    continue
        return False, None

    def score(validator: Any, instance: Any, where: str) -> float:
        from referencing.exceptions import Unresolvable

        try:
            errors = list(validator.iter_errors(instance))
        except Unresolvable as e:
            raise RewardError(f"{name}: the schema of {where} has a reference that cannot be resolved: {e}") from None
        except RecursionError:  # an absurdly deep instance: treat as not validating
            return v
        if not errors:
            return 1.0
        if not partial:
            return v
        required = validator.schema.get("required", []) if isinstance(validator.schema, dict) else []
        required = [k for k in dict.fromkeys(required) if isinstance(k, str)]
        if not isinstance(instance, dict) or not required:
            return v
        bad = {e.absolute_path[0] for e in errors if e.absolute_path}  # keys whose value holds an error
        k = sum(key in instance and key not in bad for key in required)
        return v + (1.0 - v) * k / (len(required) + 1)

    def reward(prompts: Any = None, completions: Sequence[Any] = (), completion_ids: Any = None,
               **columns: Any) -> list[float | None]:
        schemas = required_column(name, schema_column, columns) if schema_column is not None else None
        scores: list[float | None] = []
        for i, completion in enumerate(completions):
            if schemas is not None:
                if schemas[i] is None:
                    scores.append(None)
                    continue
                where = f"sample {i} (column '{schema_column}')"
                validator = cache.get(schemas[i], where)
            else:
                where, validator = "the kwarg 'schema'", fixed
            parsed, instance = extract_json(completion_text(completion))
            scores.append(score(validator, instance, where) if parsed else 0.0)
        return scores

    reward.__name__ = name
    return reward
