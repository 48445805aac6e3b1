"""Format and structure rewards: think_answer_format and json_schema (groupwise.rewards.structure)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from groupwise.rewards import structure
from groupwise.rewards.contract import REWARDS, RewardError, RewardRunner


def call(fn, completions, prompts=None, **columns):
    """Call a reward the way the runner does."""
    n = len(completions)
    return fn(prompts=prompts if prompts is not None else ["p"] * n, completions=completions,
              completion_ids=[[0]] * n, trainer_state=None, **columns)


def fmt(**kwargs):
    return REWARDS.get("think_answer_format")(**kwargs)


def schema_reward(**kwargs):
    return REWARDS.get("json_schema")(**kwargs)


# ----------------------------------------------------------------------------- think_answer_format

FORMAT_CASES = [
    # completion, strict, lenient
    ("<think>a</think><answer>b</answer>", 1.0, 1.0),
    ("  <think>\nreason\n</think>\n\n<answer>42</answer>\n", 1.0, 1.0),
    ("<think></think><answer></answer>", 1.0, 1.0),                           # empty blocks are allowed
    ("Sure! <think>a</think><answer>b</answer>", 0.0, 1.0),                   # text before
    ("<think>a</think><answer>b</answer> bye", 0.0, 1.0),                     # text after
    ("<think>a</think> so <answer>b</answer>", 0.0, 1.0),                     # text between
    ("<think>a<think>b</think></think><answer>c</answer>", 0.0, 1.0),         # nested think
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0, 1.0),       # duplicated answer
    ("<think>a</think><think>b</think><answer>c</answer>", 0.0, 1.0),         # duplicated think
    ("<think>a<answer>b</answer></think>", 0.0, 0.0),                         # answer inside think
    ("<answer>b</answer><think>a</think>", 0.0, 0.0),                         # wrong order
    ("<think>a</think>", 0.0, 0.0),
    ("<think>a</think><answer>b", 0.0, 0.0),
    ("<THINK>a</THINK><ANSWER>b</ANSWER>", 0.0, 0.0),                         # tags are case-sensitive
    ("", 0.0, 0.0),
]


def test_think_answer_format_strict_and_lenient():
    completions = [c for c, _, _ in FORMAT_CASES]
    assert call(fmt(), completions) == [s for _, s, _ in FORMAT_CASES]
    assert call(fmt(strict=False), completions) == [l for _, _, l in FORMAT_CASES]


@pytest.mark.parametrize("completion, expected", [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("<think>a</think><answer>b", 0.75),                    # 3 tags once
    ("<think>a</think><answer>b</answer> extra", 0.75),     # all 4 tags once but not the format: capped
    ("<think>a<think>b</think>", 0.25),                     # </think> once; <think> twice
    ("<think>x</think><think>y</think><answer>z</answer>", 0.5),
    ("no tags at all", 0.0),
])
def test_think_answer_format_partial_credit(completion, expected):
    assert call(fmt(partial=True), [completion]) == [expected]


def test_think_answer_format_partial_lenient_full_credit_with_duplicates():
    # lenient: the format holds despite a duplicate, so 1.0 although only 2 tags occur once
    assert call(fmt(partial=True, strict=False), ["<think>x</think><think>y</think><answer>z</answer>"]) == [1.0]


def test_think_answer_format_custom_tags_and_chat_completion():
    fn = fmt(think_tag="reasoning", answer_tag="final")
    chat = [{"role": "assistant", "content": "<reasoning>r</reasoning>\n<final>7</final>"}]
    assert call(fn, [chat, "<think>r</think><answer>7</answer>", "<reasoning>r</reasoning><final>7</final>x"]) == [1.0, 0.0, 0.0]


def test_think_answer_format_think_opened_in_prompt():
    opened, plain = "Solve 2+2.\n<think>\n", "Solve 2+2."
    inside = "2+2 is 4</think>\n<answer>4</answer>"
    full = "<think>2+2 is 4</think>\n<answer>4</answer>"
    auto = fmt()
    # auto: decided per row from the text prompt
    assert call(auto, [inside, full, inside, full], prompts=[opened, opened, plain, plain]) == [1.0, 0.0, 0.0, 1.0]
    chat_prompt = [{"role": "user", "content": "Solve 2+2."}]
    assert call(auto, [inside], prompts=[chat_prompt]) == [0.0]  # the template's tag is invisible
    assert call(fmt(think_opened_in_prompt=True), [inside, full], prompts=[chat_prompt] * 2) == [1.0, 0.0]
    assert call(fmt(think_opened_in_prompt=False), [inside], prompts=[opened]) == [0.0]
    assert call(fmt(think_opened_in_prompt=True, strict=False), ["a</think>b<answer>4</answer>c"]) == [1.0]
    # partial: a missing <think> counts as present when the prompt opened it
    assert call(fmt(think_opened_in_prompt=True, partial=True), ["a</think>", "<think>a</think>"]) == [0.5, 0.25]


def test_think_answer_format_through_the_runner():
    runner = RewardRunner.from_callables([("fmt", fmt(partial=True), 1.0)])
    scores = runner.score(["q <think>", "q"], ["a</think><answer>1</answer>", "a</think><answer>1</answer>"], [[1], [2]])
    assert scores.values[:, 0].tolist() == [1.0, 0.75]  # row 2: <think> missing, 3 tags once


@pytest.mark.parametrize("kwargs, message", [
    (dict(think_tag="<think>"), "think_tag"),
    (dict(answer_tag=""), "answer_tag"),
    (dict(answer_tag="a b"), "answer_tag"),
    (dict(think_tag="x", answer_tag="x"), "must differ"),
    (dict(strict="yes"), "strict"),
    (dict(partial=1), "partial"),
    (dict(think_opened_in_prompt="maybe"), "think_opened_in_prompt"),
])
def test_think_answer_format_bad_kwargs(kwargs, message):
    with pytest.raises(RewardError, match=message):
        fmt(**kwargs)


_PIECES = st.sampled_from(["<think>", "</think>", "<answer>", "</answer>", "a", " ", "\n", "<", ">"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=12).map("".join))
def test_think_answer_format_properties(text):
    strict, lenient = call(fmt(), [text])[0], call(fmt(strict=False), [text])[0]
    partial = call(fmt(partial=True), [text])[0]
    assert strict in (0.0, 1.0) and lenient in (0.0, 1.0)
    assert strict <= lenient                          # strict is the stronger requirement
    assert partial in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert (partial == 1.0) == (strict == 1.0)        # full credit exactly for the format
    if strict == 1.0:                                 # each tag exactly once, in order
        assert all(text.count(t) == 1 for t in ("<think>", "</think>", "<answer>", "</answer>"))
        assert text.index("</think>") < text.index("<answer>")


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(blacklist_characters="<>"), max_size=20),
       st.text(st.characters(blacklist_characters="<>"), max_size=20),
       st.sampled_from(["", " ", "\n\n", "\t"]), st.text(st.characters(blacklist_characters="<>"), min_size=1, max_size=5))
def test_think_answer_format_any_content(x, y, ws, junk):
    good = f"{ws}<think>{x}</think>{ws}<answer>{y}</answer>{ws}"
    assert call(fmt(), [good]) == [1.0]
    if junk.strip():  # visible text outside the blocks: strict 0, lenient 1
        assert call(fmt(), [junk + good]) == [0.0]
        assert call(fmt(strict=False), [junk + good]) == [1.0]


# ----------------------------------------------------------------------------- json_schema

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("completion, expected", [
    ('{"name": "Ann", "age": 3}', 1.0),                                         # whole
    ('<think>hmm</think>\n<answer>\n{"name": "Ann", "age": 3}\n</answer>', 1.0),  # answer tag
    ('Here:\n```json\n{"name": "Ann", "age": -1}\n```\nDone.', 0.5),            # fenced, breaks minimum
    ('Here:\n```\n{"name": "Ann", "age": 1}\n```', 1.0),                        # bare fence
    ('Sure, {"name": "A", "age": 2} is it.', 1.0),                              # first balanced object
    ('note {"a": "}"} then', 0.5),                                              # brace inside a JSON string
    ('{not json} but later {"name": "B", "age": 5}', 1.0),                      # first start that decodes
    ('[1, 2]', 0.5),                                                            # JSON, wrong type
    ('{"name": "Ann", "age": NaN}', 0.0),                                       # NaN is not JSON
    ('{"name": "Ann", "age": 3', 0.0),                                          # truncated
    ('no json here', 0.0),
    ('', 0.0),
])
def test_json_schema_hierarchy_and_default_extraction(completion, expected):
    assert call(schema_reward(schema=PERSON), [completion]) == [expected]


def test_json_schema_extraction_chain_order():
    good = '{"name": "A", "age": 1}'
    text = f'<answer>oops</answer>\n```json\n{good}\n```'
    assert call(schema_reward(schema=PERSON), [text]) == [1.0]                   # answer fails to parse → fenced
    assert call(schema_reward(schema=PERSON, extract="answer"), [text]) == [0.0]
    assert call(schema_reward(schema=PERSON, extract=["whole"]), [text]) == [0.0]
    assert call(schema_reward(schema=PERSON, extract=["balanced"]), [text]) == [1.0]
    # the last answer block is tried first
    two = f'<answer>{good}</answer> <answer>{{"x": 1}}</answer>'
    assert call(schema_reward(schema=PERSON), [two]) == [0.5]
    assert call(schema_reward(schema=PERSON, answer_tag="json"), [f"<json>{good}</json>"]) == [1.0]


def test_json_schema_valid_json_score():
    fn = schema_reward(schema=PERSON, valid_json_score=0.2)
    assert call(fn, ['{"name": 1, "age": 1}', '{"name": "x", "age": 1}', "nope"]) == [0.2, 1.0, 0.0]
    assert call(schema_reward(schema=PERSON, valid_json_score=0), ['{"name": 1}']) == [0.0]


@pytest.mark.parametrize("completion, expected", [
    ('{"name": "A", "age": 1}', 1.0),
    ('{"name": "A"}', 0.5 + 0.5 * 1 / 3),                   # age missing: 1 of 2 required keys
    ('{"name": 5, "age": 1}', 0.5 + 0.5 * 1 / 3),           # name present but invalid
    ('{"name": "A", "age": 1, "extra": 0}', 0.5 + 0.5 * 2 / 3),  # both keys fine, root error
    ('{"name": 5, "age": -1}', 0.5),
    ('[1]', 0.5),                                            # not an object
    ('nothing', 0.0),
])
def test_json_schema_partial(completion, expected):
    assert call(schema_reward(schema=PERSON, partial=True), [completion]) == [pytest.approx(expected)]


def test_json_schema_partial_without_required_is_plain():
    fn = schema_reward(schema={"type": "object", "properties": {"a": {"type": "integer"}}}, partial=True)
    assert call(fn, ['{"a": "x"}', '{"a": 1}']) == [0.5, 1.0]


def test_json_schema_per_row_schemas_from_column():
    s_int = {"type": "integer"}
    s_obj = json.dumps({"type": "object", "required": ["k"]})
    fn = schema_reward(schema_column="schema")
    completions = ["5", '{"k": 1}', '{"j": 1}', "5", "anything"]
    assert call(fn, completions, schema=[s_int, s_obj, s_obj, s_obj, None]) == [1.0, 1.0, 0.5, 0.5, None]


def test_json_schema_validator_from_dollar_schema_and_2020_12_default():
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "number", "maximum": 5, "exclusiveMaximum": True}
    assert call(schema_reward(schema=draft4), ["4", "5"]) == [1.0, 0.5]
    no_dollar = {k: v for k, v in draft4.items() if k != "$schema"}  # boolean exclusiveMaximum is invalid in 2020-12
    with pytest.raises(RewardError, match="kwarg 'schema'.*Draft202012Validator"):
        schema_reward(schema=no_dollar)
    tuple_schema = {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False}
    assert call(schema_reward(schema=tuple_schema), ['[1, "a"]', '[1, "a", 3]', '["a", 1]']) == [1.0, 0.5, 0.5]


def test_json_schema_refs_and_formats():
    with_defs = {"$defs": {"pos": {"type": "integer", "minimum": 1}}, "type": "object",
                 "properties": {"n": {"$ref": "#/$defs/pos"}}, "required": ["n"]}
    assert call(schema_reward(schema=with_defs, partial=True), ['{"n": 2}', '{"n": 0}']) == [1.0, 0.5]
    remote = schema_reward(schema={"$ref": "https://example.com/never-fetched.json"})
    with pytest.raises(RewardError, match="kwarg 'schema'.*cannot be resolved"):
        call(remote, ["1"])
    email = {"type": "string", "format": "email"}
    assert call(schema_reward(schema=email), ['"not-an-email"']) == [1.0]   # format is an annotation
    assert call(schema_reward(schema=email, check_formats=True), ['"not-an-email"', '"a@b.c"']) == [0.5, 1.0]


def test_json_schema_boolean_and_text_schemas():
    assert call(schema_reward(schema=True), ['"x"', "nope"]) == [1.0, 0.0]
    assert call(schema_reward(schema=False), ['"x"']) == [0.5]
    assert call(schema_reward(schema='{"type": "string"}'), ['"x"', "3"]) == [1.0, 0.5]


def test_json_schema_caches_validators_per_distinct_schema(monkeypatch):
    compiled = []
    original = structure._ValidatorCache._compile

    def counting(self, schema, where):
        compiled.append(json.dumps(schema, sort_keys=True))
        return original(self, schema, where)

    monkeypatch.setattr(structure._ValidatorCache, "_compile", counting)
    fn = schema_reward(schema_column="schema")
    a_dict = {"type": "object", "required": ["k"]}
    a_text = '{"required": ["k"], "type": "object"}'  # the same schema, other key order
    b = {"type": "integer"}
    column = [a_dict, a_text, b, a_dict, b, a_text]
    assert call(fn, ['{"k": 1}', "{}", "1", "{}", '"x"', '{"k": 0}'], schema=column) == [1.0, 0.5, 1.0, 0.5, 0.5, 1.0]
    assert len(compiled) == 2
    call(fn, ["1"] * 6, schema=column)
    assert len(compiled) == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "exactly one of schema .* and schema_column.*neither"),
    (dict(schema={"type": "object"}, schema_column="s"), "exactly one.*both"),
    (dict(schema={"type": "nonsense"}), "kwarg 'schema'.*not a valid"),
    (dict(schema="{not json"), "kwarg 'schema'.*not valid JSON"),
    (dict(schema=[1, 2]), "kwarg 'schema'.*must be a JSON object"),
    (dict(schema_column=""), "schema_column"),
    (dict(schema=True, extract="xml"), "extract must be one of"),
    (dict(schema=True, extract=[]), "extract must be one of"),
    (dict(schema=True, valid_json_score=1.0), "valid_json_score"),
    (dict(schema=True, valid_json_score=-0.1), "valid_json_score"),
    (dict(schema=True, valid_json_score=True), "valid_json_score"),
    (dict(schema=True, partial="no"), "partial"),
    (dict(schema=True, answer_tag="<answer>"), "answer_tag"),
])
def test_json_schema_bad_kwargs(kwargs, message):
    with pytest.raises(RewardError, match=message):
        schema_reward(**kwargs)


def test_json_schema_bad_row_schema_and_missing_column():
    fn = schema_reward(schema_column="schema")
    with pytest.raises(RewardError, match=r"sample 1 \(column 'schema'\).*not a valid"):
        call(fn, ["1", "2"], schema=['{"type": "integer"}', '{"type": 12}'])
    with pytest.raises(RewardError, match=r"sample 0 \(column 'schema'\).*not valid JSON"):
        call(fn, ["1"], schema=["{type: integer}"])
    with pytest.raises(RewardError, match=r"sample 0 \(column 'schema'\).*must be a JSON object"):
        call(fn, ["1"], schema=[["integer"]])
    with pytest.raises(RewardError, match=r"needs the dataset column 'schema'.*available are: answer"):
        call(fn, ["1"], answer=["1"])


def _is_integer(x):
    """JSON Schema's "integer": any number with zero fractional part (1.0 included), never a boolean."""
    return type(x) is int or (type(x) is float and x.is_integer())


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(_JSON, st.sampled_from(["{}", "", "Answer: ", "<think>x</think>\n"]), st.booleans())
def test_json_schema_properties(value, prefix, fenced):
    body = json.dumps(value)
    text = prefix + (f"```json\n{body}\n```" if fenced else f"<answer>{body}</answer>")
    # schema true accepts every JSON value, false none; extraction finds the value through the wrapper
    assert call(schema_reward(schema=True), [text]) == [1.0]
    assert call(schema_reward(schema=False), [text]) == [0.5]
    (scored,) = call(schema_reward(schema=PERSON, partial=True), [text])
    assert 0.5 <= scored <= 1.0
    assert (scored == 1.0) == (isinstance(value, dict) and set(value) == {"name", "age"}
                               and isinstance(value["name"], str) and _is_integer(value["age"]) and value["age"] >= 0)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_json_schema_scores_are_in_the_hierarchy(text):
    assert call(schema_reward(schema=PERSON), [text])[0] in (0.0, 0.5, 1.0)
