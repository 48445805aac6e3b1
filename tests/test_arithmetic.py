"""The built-in arithmetic task and the built-in tokenizer and model shipped with the package."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from groupwise.data.arithmetic import (
    BUILTIN_MODEL_DIR,
    heldout_split,
    is_correct,
    parse_integer_answer,
    train_split,
)


def evaluate(prompt: str) -> int:
    """The exact value of a prompt such as '37-48=' (operands and + / - only)."""
    assert prompt.endswith("=")
    expression = prompt[:-1]
    assert set(expression) <= set("0123456789+-")
    return eval(expression)  # noqa: S307 - digits and +/- only, checked above


# --------------------------------------------------------------------------- splits
def test_heldout_is_fixed_and_distinct():
    rows = heldout_split()
    assert len(rows) == 200
    assert rows == heldout_split(200)
    assert len({r["prompt"] for r in rows}) == len(rows)
    assert heldout_split(50) == rows[:50]


def test_heldout_rejects_impossible_size():
    with pytest.raises(ValueError):
        heldout_split(10**6)


def test_answers_are_correct():
    for row in heldout_split() + train_split(seed=3, n=500):
        assert int(row["answer"]) == evaluate(row["prompt"])
        assert row["answer"] == str(int(row["answer"]))  # canonical form: no '+', no leading zeros


def test_train_split_is_deterministic_and_seeded():
    assert train_split(seed=1, n=300) == train_split(seed=1, n=300)
    assert train_split(seed=1, n=300) != train_split(seed=2, n=300)
    assert len(train_split(seed=1, n=37)) == 37


def test_train_split_never_contains_heldout():
    held = {r["prompt"] for r in heldout_split(1000)}
    for seed in range(3):
        assert not held & {r["prompt"] for r in train_split(seed=seed, n=5000)}


def test_both_operators_occur_and_answers_are_in_range():
    rows = train_split(seed=0, n=1000)
    assert any("+" in r["prompt"] for r in rows) and any("-" in r["prompt"] for r in rows)
    assert all(0 <= int(r["answer"]) <= 198 for r in rows)  # differences put the larger operand first


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_train_answers_equal_expression_for_any_seed(seed):
    for row in train_split(seed=seed, n=20):
        assert int(row["answer"]) == evaluate(row["prompt"])
        assert is_correct(row["answer"], row["answer"])


# --------------------------------------------------------------------------- answer checking
@pytest.mark.parametrize(
    "completion, expected",
    [("85", 85), (" 85 ", 85), ("-3", -3), ("0", 0), ("\n12\n", 12),
     ("8 5", None), ("", None), ("   ", None), ("abc", None), ("85abc", None), ("- 3", None), ("3.0", None)],
)
def test_parse_integer_answer(completion, expected):
    assert parse_integer_answer(completion) == expected


@pytest.mark.parametrize(
    "completion, answer, expected",
    [("85", "85", True), (" 85 ", "85", True), ("-3", "-3", True), ("3", "-3", False),
     ("86", "85", False), ("8 5", "85", False), ("", "0", False), ("abc", "85", False)],
)
def test_is_correct(completion, answer, expected):
    assert is_correct(completion, answer) is expected


# --------------------------------------------------------------------------- built-in assets
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BUILTIN_MODEL_DIR)


def test_builtin_tokenizer_round_trips_and_specials(tokenizer):
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 0
    assert tokenizer.bos_token == "<bos>" and tokenizer.bos_token_id == 1
    assert tokenizer.eos_token == "<eos>" and tokenizer.eos_token_id == 2
    for text in ["37+48=", "12-99=-87", " a b  c ~!"]:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert len(ids) == len(text) + 1  # one token per character
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text


def test_builtin_model_loads_and_is_small(tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(BUILTIN_MODEL_DIR)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer("37+48=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_builtin_model_card_matches_window():
    card = json.loads((BUILTIN_MODEL_DIR / "builtin_model_card.json").read_text())
    assert 0.10 <= card["greedy_accuracy"] <= 0.50
    assert card["pass_at_8"] > card["greedy_accuracy"]
