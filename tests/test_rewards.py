"""Reward-function contract, output validation, loading, and the built-in rewards."""
from __future__ import annotations

import asyncio
import logging
import math
import textwrap
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from groupwise.registry import UnknownPartError
from groupwise.rewards import REWARDS, RewardError, RewardRunner, load_reward_function, register_reward


def spec(name, weight=1.0, **kwargs):
    """Stand-in for the config's RewardFunctionConfig."""
    return SimpleNamespace(name=name, weight=weight, kwargs=kwargs)


def call(fn, completions, completion_ids=None, **columns):
    """Call a reward the way the runner does."""
    n = len(completions)
    return fn(prompts=["p"] * n, completions=completions,
              completion_ids=completion_ids if completion_ids is not None else [[0]] * n,
              trainer_state=None, **columns)


def score(runner, completions, completion_ids=None, **columns):
    n = len(completions)
    return runner.score(["p"] * n, completions, completion_ids or [[1, 2]] * n, columns, trainer_state={"step": 0})


def constant(values):
    def fn(prompts, completions, completion_ids, **kwargs):
        return values
    fn.__name__ = "const"
    return fn


# ----------------------------------------------------------------------------- built-ins


def test_exact_answer_last_number():
    fn = REWARDS.get("exact_answer")()
    completions = ["so the answer is 85", "it is 85.0.", "total: 1,234", "x = -7", "3-5 gives 2", "no number here", "85 or 86"]
    answers = ["85", "85", "1234", "-7", "2", "0", "85"]
    assert call(fn, completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_exact_answer_full_and_boxed():
    full = REWARDS.get("exact_answer")(extract="full")
    assert call(full, ["  Paris \n", "paris", " 42.00 ", "the answer is 42"], answer=["Paris", "Paris", "42", "42"]) == [1.0, 0.0, 1.0, 0.0]
    boxed = REWARDS.get("exact_answer")(extract="boxed")
    completions = [r"first \boxed{1} then \boxed{\frac{1}{2}}", r"\boxed{ 12 }", r"\boxed{12", "12", r"\boxed{3} and \boxed{4"]
    assert call(boxed, completions, answer=[r"\frac{1}{2}", "12", "12", "12", "3"]) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_exact_answer_chat_completion_none_reference_and_int_answer():
    fn = REWARDS.get("exact_answer")()
    chat = [{"role": "assistant", "content": "I think 3"}, {"role": "assistant", "content": "no, it is 4"}]
    assert call(fn, [chat, "4", "4"], answer=[4, None, 5]) == [1.0, None, 0.0]


def test_exact_answer_missing_column_names_column_and_available():
    fn = REWARDS.get("exact_answer")(answer_column="solution")
    with pytest.raises(RewardError, match=r"'solution'.*available are: answer, level"):
        call(fn, ["4"], answer=["4"], level=[1])
    with pytest.raises(RewardError, match="extract must be one of"):
        REWARDS.get("exact_answer")(extract="first_number")


def test_math_verify_equivalences_and_garbage():
    fn = REWARDS.get("math_verify")()
    completions = ["The answer is 1/2", r"$\frac{1}{2}$", r"\boxed{0.5}", "0.25", "garbage ###", ""]
    assert call(fn, completions, answer=["0.5"] * 6) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert call(fn, ["so x = 0.5"], answer=[r"\frac{1}{2}"]) == [1.0]


def test_math_verify_off_the_main_thread():
    fn = REWARDS.get("math_verify")()
    result: dict = {}

    def work():
        try:
            result["scores"] = call(fn, ["1/2", r"\frac{1}{2}", "3"], answer=["0.5", "0.5", "0.5"])
        except Exception as e:  # noqa: BLE001
            result["error"] = e

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=30)
    assert "error" not in result, result.get("error")
    assert result["scores"] == [1.0, 1.0, 0.0]


def test_format_reward():
    think = REWARDS.get("format")(pattern=r"<think>.*?</think>\s*<answer>.*?</answer>")
    completions = ["<think>a\nb</think>\n<answer>4</answer>\n", "<answer>4</answer>", "<think>x</think><answer>4</answer> extra"]
    assert call(think, completions) == [1.0, 0.0, 0.0]
    search = REWARDS.get("format")(pattern=r"<ANSWER>", mode="search", flags="i")
    assert call(search, ["blah <answer>4</answer>", "none"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match=r"pattern '\(unclosed' is not a valid regular expression"):
        REWARDS.get("format")(pattern="(unclosed")
    with pytest.raises(RewardError, match="mode must be"):
        REWARDS.get("format")(pattern="x", mode="match")


@pytest.mark.parametrize(
    "length, penalty, expected",
    [(0, 1.0, 0.0), (15, 1.0, 0.0), (16, 1.0, -0.2), (18, 1.0, -0.6), (20, 1.0, -1.0), (21, 1.0, -1.0),
     (500, 1.0, -1.0), (18, 0.5, -0.3), (25, 0.5, -0.5)],
)
def test_soft_overlong_dapo_values(length, penalty, expected):
    # max_length=20, buffer=5: zero up to 15 tokens, then −penalty·(L−15)/5 up to 20, then −penalty.
    fn = REWARDS.get("soft_overlong")(max_length=20, buffer=5, penalty=penalty)
    (value,) = call(fn, ["x"], completion_ids=[list(range(length))])
    assert value == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("kwargs", [dict(max_length=10, buffer=10), dict(max_length=10, buffer=0),
                                    dict(max_length=10, buffer=-1), dict(max_length=10, buffer=2, penalty=-1.0)])
def test_soft_overlong_validation(kwargs):
    with pytest.raises(RewardError, match="soft_overlong"):
        REWARDS.get("soft_overlong")(**kwargs)


# ----------------------------------------------------------------------------- loading


def test_load_builtin_unknown_and_bad_kwargs():
    assert callable(load_reward_function("exact_answer", {"extract": "full"}))
    # the list grows as rewards are added (majority_vote came with groupwise.rewards.math): check a few names
    with pytest.raises(UnknownPartError, match=r"known: .*\bexact_answer\b.*\bmajority_vote\b.*\bmath_verify\b.*\bsoft_overlong\b"):
        load_reward_function("nonexistent", {})
    with pytest.raises(RewardError, match=r"built-in reward 'exact_answer' cannot be built with the arguments \['column'\]"):
        load_reward_function("exact_answer", {"column": "x"})


def test_user_function_from_file_with_bound_kwargs(tmp_path):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length_bonus(prompts, completions, completion_ids, scale=1.0, **kwargs):
            return [scale * len(c) for c in completions]
    """))
    path = f"{tmp_path / 'my_rewards.py'}:length_bonus"
    runner = RewardRunner([spec(path, weight=2.0, scale=0.5), spec(path)])
    assert runner.names == ["length_bonus", "length_bonus_2"]
    assert runner.index(path) == 0
    scores = score(runner, ["ab", "abcd"])
    assert scores.values.tolist() == [[1.0, 2.0], [2.0, 4.0]]
    assert scores.weights.tolist() == [2.0, 1.0]


def test_user_function_from_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "groupwise_test_dotted_rewards.py").write_text(
        "def has_answer(completions, answer, **kwargs):\n    return [float(a in c) for c, a in zip(completions, answer)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("groupwise_test_dotted_rewards.has_answer", "groupwise_test_dotted_rewards:has_answer"):
        runner = RewardRunner([spec(name)])
        assert runner.names == ["has_answer"]
        assert score(runner, ["it is 4", "it is 5"], answer=["4", "4"]).values[:, 0].tolist() == [1.0, 0.0]


def test_registered_user_reward_factory():
    @register_reward("test_constant_reward")
    def factory(value: float = 1.0):
        return lambda completions, **kwargs: [value] * len(completions)

    runner = RewardRunner([spec("test_constant_reward", value=0.25)])
    assert runner.names == ["test_constant_reward"]
    assert score(runner, ["a", "b"]).values[:, 0].tolist() == [0.25, 0.25]


def test_runner_passes_the_trl_arguments():
    seen = {}

    def spy(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        return [0.0] * len(completions)

    chat = [[{"role": "user", "content": "hi"}]] * 2
    RewardRunner.from_callables([("spy", spy, 1.0)]).score(chat, ["a", "b"], [[1], [2, 3]], {"answer": ["x", "y"]}, {"step": 3})
    assert seen == dict(prompts=chat, completions=["a", "b"], completion_ids=[[1], [2, 3]], answer=["x", "y"], trainer_state={"step": 3})


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("values, message", [
    ([1.0, 2.0, 3.0], "reward function 'const' returned 3 values for 4 completions"),
    ([1.0] * 5, "reward function 'const' returned 5 values for 4 completions"),
    ([], "reward function 'const' returned 0 values for 4 completions"),
    (1.0, "reward function 'const' returned a float; expected a list"),
    (None, "reward function 'const' returned a NoneType; expected a list"),
    (np.ones((4, 1)), r"reward function 'const' returned a 2-D array of shape \(4, 1\)"),
    ([0.0, 1.0, float("nan"), 0.0], r"reward function 'const' returned NaN for sample 2; return None"),
    ([0.0, float("inf"), 1.0, 0.0], r"reward function 'const' returned inf for sample 1; rewards must be finite"),
    ([0.0, 0.0, 0.0, -float("inf")], r"reward function 'const' returned -inf for sample 3"),
    ([0.0, 1e39, 0.0, 0.0], r"reward function 'const' returned 1e\+39 for sample 1"),
    ([0.0, "0.5", 0.0, 0.0], r"reward function 'const' returned a str \('0.5'\) for sample 1; expected a number"),
    ([0.0, 0.0, [1.0], 0.0], r"reward function 'const' returned a list \(\[1.0\]\) for sample 2"),
    ([0.0, 0.0, 0.0, torch.ones(2)], r"reward function 'const' returned a Tensor .* for sample 3"),
])
def test_invalid_outputs_raise_naming_function_and_sample(values, message):
    runner = RewardRunner.from_callables([("const", constant(values), 1.0)])
    with pytest.raises(RewardError, match=message):
        score(runner, ["a", "b", "c", "d"])


def test_exception_inside_function_is_chained():
    def broken(prompts, completions, completion_ids, **kwargs):
        return [1 / 0 for _ in completions]

    runner = RewardRunner.from_callables([("broken", broken, 1.0)])
    with pytest.raises(RewardError, match="reward function 'broken' raised ZeroDivisionError: division by zero") as info:
        score(runner, ["a"])
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_function_without_kwargs_gets_a_hint():
    runner = RewardRunner.from_callables([("strict", lambda prompts, completions, completion_ids: [0.0], 1.0)])
    with pytest.raises(RewardError, match=r"'strict' raised TypeError.*must accept \*\*kwargs"):
        score(runner, ["a"])


def test_accepted_value_types_and_none_is_nan():
    values = [None, True, np.float32(0.5), torch.tensor(2.0), np.int64(3), 4, np.bool_(False), torch.tensor(True)]
    scores = score(RewardRunner.from_callables([("mixed", constant(values), 1.0)]), ["x"] * 8)
    column = scores.values[:, 0]
    assert scores.values.dtype == torch.float32 and scores.values.shape == (8, 1)
    assert math.isnan(column[0]) and column[1:].tolist() == [1.0, 0.5, 2.0, 3.0, 4.0, 0.0, 1.0]
    tensor_out = score(RewardRunner.from_callables([("t", constant(torch.tensor([1.0, 2.0])), 1.0)]), ["a", "b"])
    assert tensor_out.values[:, 0].tolist() == [1.0, 2.0]


def test_on_error_zero_replaces_and_counts(caplog):
    def broken(prompts, completions, completion_ids, **kwargs):
        raise RuntimeError("boom")

    runner = RewardRunner.from_callables(
        [("ok", constant([1.0, 1.0, 1.0]), 1.0), ("nan", constant([1.0, float("nan"), "x"]), 1.0),
         ("short", constant([1.0]), 1.0), ("broken", broken, 1.0), ("inf", constant([float("inf"), 2.0, None]), 1.0)],
        on_error="zero",
    )
    with caplog.at_level(logging.WARNING, logger="groupwise.rewards"):
        scores = score(runner, ["a", "b", "c"])
        score(runner, ["a", "b", "c"])  # warnings are logged once per function
    v = scores.values
    assert v[:, 0].tolist() == [1.0, 1.0, 1.0]
    assert v[:, 1].tolist() == [1.0, 0.0, 0.0]
    assert v[:, 2].tolist() == [0.0, 0.0, 0.0]
    assert v[:, 3].tolist() == [0.0, 0.0, 0.0]
    assert v[0, 4] == 0.0 and v[1, 4] == 2.0 and math.isnan(v[2, 4])
    assert scores.num_errors == 2 + 3 + 3 + 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    assert any("'broken' raised RuntimeError: boom" in w for w in warnings)
    assert any("'short' returned 1 values for 3 completions" in w for w in warnings)


def test_bad_runner_configuration():
    with pytest.raises(ValueError, match="on_error"):
        RewardRunner.from_callables([("f", constant([0.0]), 1.0)], on_error="ignore")
    with pytest.raises(ValueError, match="weight"):
        RewardRunner.from_callables([("f", constant([0.0]), float("nan"))])
    with pytest.raises(ValueError, match="at least one"):
        RewardRunner.from_callables([])
    runner = RewardRunner.from_callables([("f", constant([0.0]), 1.0)])
    with pytest.raises(ValueError, match="column 'answer' has 2 values for 1 completions"):
        runner.score(["p"], ["a"], [[1]], {"answer": ["x", "y"]})
    with pytest.raises(ValueError, match="column 'prompts' clashes"):
        runner.score(["p"], ["a"], [[1]], {"prompts": ["x"]})


# ----------------------------------------------------------------------------- async, weights, totals


async def async_len(prompts, completions, completion_ids, **kwargs):
    await asyncio.sleep(0.05)
    return [float(len(c)) for c in completions]


async def async_two(prompts, completions, completion_ids, **kwargs):
    await asyncio.sleep(0.05)
    return [2.0] * len(completions)


def test_async_and_sync_functions_together():
    thread_of_sync = []

    def sync_one(prompts, completions, completion_ids, **kwargs):
        thread_of_sync.append(threading.current_thread())
        return [1.0] * len(completions)

    runner = RewardRunner.from_callables([("a", async_len, 1.0), ("s", sync_one, 1.0), ("b", async_two, 1.0)])
    scores = score(runner, ["ab", "abc"])
    assert scores.values.tolist() == [[2.0, 1.0, 2.0], [3.0, 1.0, 2.0]]
    assert thread_of_sync == [threading.main_thread()]


def test_async_functions_inside_a_running_event_loop():
    runner = RewardRunner.from_callables([("a", async_len, 1.0), ("b", async_two, 1.0)])

    async def main():
        return score(runner, ["abcd"])

    assert asyncio.run(main()).values.tolist() == [[4.0, 2.0]]


def test_async_failure_is_reported():
    async def bad(prompts, completions, completion_ids, **kwargs):
        raise KeyError("missing")

    runner = RewardRunner.from_callables([("ok", async_two, 1.0), ("bad", bad, 1.0)])
    with pytest.raises(RewardError, match="reward function 'bad' raised KeyError"):
        score(runner, ["a"])
    zero = RewardRunner.from_callables([("ok", async_two, 1.0), ("bad", bad, 1.0)], on_error="zero")
    scores = score(zero, ["a"])
    assert scores.values.tolist() == [[2.0, 0.0]] and scores.num_errors == 1


def test_weights_and_total_with_nan():
    runner = RewardRunner.from_callables(
        [("acc", constant([1.0, None, None, 0.0]), 1.0), ("fmt", constant([1.0, 1.0, None, 0.5]), 0.5)]
    )
    assert runner.weights.dtype == torch.float32 and runner.weights.tolist() == [1.0, 0.5]
    scores = score(runner, ["a", "b", "c", "d"])
    assert scores.names == ["acc", "fmt"]
    total = scores.total()
    assert total[0] == 1.5 and total[1] == 0.5 and math.isnan(total[2]) and total[3] == 0.25


def test_duplicate_builtin_names_are_made_unique():
    runner = RewardRunner([spec("format", pattern="a"), spec("format", pattern="b", weight=0.1), spec("exact_answer")])
    assert runner.names == ["format", "format_2", "exact_answer"]
    assert runner.weights.tolist() == pytest.approx([1.0, 0.1, 1.0])


# ----------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False, width=32)), min_size=1, max_size=20))
def test_runner_returns_exactly_the_values(values):
    scores = score(RewardRunner.from_callables([("f", constant(values), 1.0)]), ["x"] * len(values))
    expected = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)
    assert torch.equal(torch.isnan(scores.values[:, 0]), torch.isnan(expected))
    assert torch.equal(torch.nan_to_num(scores.values[:, 0]), torch.nan_to_num(expected))
    assert scores.num_errors == 0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 20), st.integers(0, 25), st.sampled_from(["raise", "zero"]))
def test_wrong_length_always_rejected(n, m, on_error):
    if m == n:
        m = n + 1
    runner = RewardRunner.from_callables([("f", constant([0.5] * m), 1.0)], on_error=on_error)
    if on_error == "raise":
        with pytest.raises(RewardError, match=f"'f' returned {m} values for {n} completions"):
            score(runner, ["x"] * n)
    else:
        scores = score(runner, ["x"] * n)
        assert scores.values.abs().sum() == 0 and scores.num_errors == n
