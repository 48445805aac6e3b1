"""The reward runner beyond TRL's contract: time limits, context arguments, per-function errors."""
from __future__ import annotations

import asyncio
import math
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from groupwise.rewards import RewardContext, RewardError, RewardRunner, RewardTimedOut
from groupwise.rewards.contract import RewardTimeout, call_with_timeout, consecutive_groups, context_arguments


def runner(*fns, on_error="raise", timeout_s=None):
    return RewardRunner.from_callables([(f.__name__, f, 1.0) for f in fns], on_error=on_error, timeout_s=timeout_s)


def score(r, n=3, prompts=None, **kw):
    prompts = prompts or ["p"] * n
    return r.score(prompts, [f"c{i}" for i in range(n)], [[1]] * n, **kw)


def sleeper(completions, **kwargs):
    time.sleep(60)
    return [1.0] * len(completions)


def busy_swallower(completions, **kwargs):
    """Spins in pure Python and catches every Exception: the timeout must still get through."""
    while True:
        try:
            sum(range(1000))
        except Exception:  # noqa: BLE001
            pass


def ok(completions, **kwargs):
    return [0.5] * len(completions)


# ----------------------------------------------------------------------------- time limits


@pytest.mark.parametrize("fn", [sleeper, busy_swallower])
def test_hanging_function_is_named_with_its_samples(fn):
    t0 = time.perf_counter()
    with pytest.raises(RewardTimedOut, match=rf"reward function '{fn.__name__}' did not return within rewards.timeout_s = 0.3 s "
                                             r"on a batch of 3 completions \(samples 0–2\)"):
        score(runner(ok, fn, timeout_s=0.3))
    assert time.perf_counter() - t0 < 5


def test_on_error_zero_scores_a_hang_zero_and_counts_it_per_function():
    s = score(runner(ok, sleeper, timeout_s=0.2, on_error="zero"), n=4)
    assert s.values[:, 0].tolist() == [0.5] * 4
    assert s.values[:, 1].tolist() == [0.0] * 4
    assert s.num_errors == 4 and s.function_errors == [0, 4]


def test_async_function_past_its_limit_is_cancelled():
    cancelled = []

    async def slow_async(completions, **kwargs):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    with pytest.raises(RewardTimedOut, match="'slow_async' did not return within"):
        score(runner(slow_async, timeout_s=0.2))
    assert cancelled == [True]


def test_time_limit_off_the_main_thread():
    out = {}

    def work():
        out["scores"] = score(runner(sleeper, ok, timeout_s=0.2, on_error="zero"))

    th = threading.Thread(target=work)
    th.start()
    th.join(10)
    assert not th.is_alive()
    assert out["scores"].function_errors == [3, 0]


def test_a_signal_racing_the_return_never_escapes_the_call():
    # calls that end right at their limit: each either returns or times out inside the call,
    # and no signal arrives later (it would raise RewardTimeout in the sleeps below)
    outcomes = set()
    for _ in range(100):
        try:
            outcomes.add(call_with_timeout(lambda: time.sleep(0.002) or "returned", {}, 0.002))
        except RewardTimeout:
            outcomes.add("timed out")
        time.sleep(0.003)
    assert outcomes <= {"returned", "timed out"}


def test_fast_functions_are_unaffected_and_previous_handler_restored():
    import signal

    before = signal.getsignal(signal.SIGUSR2)
    s = score(runner(ok, timeout_s=5.0))
    assert s.values[:, 0].tolist() == [0.5] * 3 and s.function_errors == [0]
    assert signal.getsignal(signal.SIGUSR2) == before


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, "5"])
def test_bad_timeout_is_refused(bad):
    with pytest.raises(ValueError, match="timeout_s must be a positive number of seconds or None"):
        runner(ok, timeout_s=bad)


# ----------------------------------------------------------------------------- context arguments


def test_context_arguments_only_reach_functions_that_name_them():
    seen = {}

    def named(completions, group_ids, prompt_ids, reward_context, **kwargs):
        seen["named"] = (group_ids, prompt_ids, reward_context)
        return [0.0] * len(completions)

    def catch_all(completions, **kwargs):
        seen["catch_all"] = sorted(kwargs)
        return [0.0] * len(completions)

    r = runner(named, catch_all).bind(device="cpu", model="M", tokenizer="T")
    score(r, n=4, group_ids=[3, 3, 5, 5], prompt_ids=[[1], [1], [2, 2], [2, 2]])
    assert seen["named"][0] == [3, 3, 5, 5] and seen["named"][1] == [[1], [1], [2, 2], [2, 2]]
    assert seen["named"][2] == RewardContext(device=torch.device("cpu"), model="M", tokenizer="T")
    assert seen["catch_all"] == ["completion_ids", "prompts", "trainer_state"]


def test_group_ids_default_to_runs_of_equal_prompts():
    seen = []

    def f(completions, group_ids, **kwargs):
        seen.append(group_ids)
        return [0.0] * len(completions)

    score(runner(f), n=5, prompts=["a", "a", "b", "b", "a"])
    assert seen == [[0, 0, 1, 1, 2]]


@given(st.lists(st.sampled_from("abc"), max_size=20))
@settings(max_examples=50, deadline=None)
def test_consecutive_groups_properties(prompts):
    ids = consecutive_groups(prompts)
    assert len(ids) == len(prompts)
    for i in range(1, len(prompts)):
        assert ids[i] - ids[i - 1] == (prompts[i] != prompts[i - 1])


def test_context_arguments_of_partials_and_wrong_lengths():
    import functools

    def f(completions, group_ids, scale=1.0, **kwargs):
        return [0.0] * len(completions)

    assert context_arguments(functools.partial(f, scale=2.0)) == ("group_ids",)
    assert context_arguments(ok) == ()
    with pytest.raises(ValueError, match="got 2 group_ids for 3 completions"):
        score(runner(ok), group_ids=[0, 0])


def test_dataset_column_may_not_shadow_a_context_argument():
    with pytest.raises(ValueError, match="dataset column 'group_ids' clashes"):
        score(runner(ok), columns={"group_ids": [1, 2, 3]})


def test_errors_per_function_are_counted_per_sample():
    def half_nan(completions, **kwargs):
        return [math.nan if i % 2 else 1.0 for i in range(len(completions))]

    def raises(completions, **kwargs):
        raise RuntimeError("boom")

    s = score(runner(ok, half_nan, raises, on_error="zero"), n=4)
    assert s.function_errors == [0, 2, 4] and s.num_errors == 6
    with pytest.raises(RewardError, match="reward function 'half_nan' returned NaN for sample 1"):
        score(runner(half_nan), n=4)
