"""Per-prompt statistics: updates by hand, invariants, checkpoints."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from groupwise.data.prompt_stats import PromptStats

nan = math.nan


def test_update_by_hand_with_a_repeated_prompt_variable_sizes_and_nan():
    s = PromptStats(4, history=3)
    s.update([2, 0, 2], [[1.0, 0.0, 1.0], [0.5, nan], [0.0, 0.0]], [[True, False, True], [False, False], [False, False]], step=7)
    assert s.attempts.tolist() == [1, 0, 2, 0]
    assert s.samples.tolist() == [2, 0, 5, 0]
    assert s.successes.tolist() == [0, 0, 2, 0]
    assert s.reward_sum.tolist() == [0.5, 0.0, 2.0, 0.0]
    assert s.last_step.tolist() == [7, -1, 7, -1]
    # prompt 2's last group is the later one: [0, 0]
    assert s.last_mean[2] == 0.0 and s.last_std[2] == 0.0 and s.last_success_rate[2] == 0.0
    assert s.last_mean[0] == 0.5 and s.last_std[0] == 0.0          # the NaN reward is left out
    assert math.isnan(s.last_mean[1]) and math.isnan(s.success_rate()[1])
    assert torch.allclose(s.success_rate()[[0, 2]], torch.tensor([0.0, 0.4], dtype=torch.float64))
    h = s.history[2].tolist()
    assert math.isnan(h[0]) and h[1:] == [2 / 3, 0.0]
    mean, var = s.reward_mean_var()
    assert mean[2] == pytest.approx(0.4) and var[2] == pytest.approx(0.24)   # rewards 1,0,1,0,0


def test_history_keeps_the_last_entries_oldest_first():
    s = PromptStats(1, history=2)
    for step, rate in enumerate([0.0, 0.5, 1.0]):
        k = int(rate * 2)
        s.update([0], [[1.0] * k + [0.0] * (2 - k)], [[True] * k + [False] * (2 - k)], step=step)
    assert s.history[0].tolist() == [0.5, 1.0] and s.history_count[0] == 3
    assert s.recent_success_rate(1)[0] == 1.0 and s.recent_success_rate()[0] == 0.75


def test_metrics():
    s = PromptStats(4)
    s.update([0, 1, 2], [[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]], [[True, True], [False, True], [False, False]], step=0)
    m = s.metrics()
    assert m["prompts/seen_fraction"] == 0.75
    assert m["prompts/solved_fraction"] == pytest.approx(1 / 3) and m["prompts/unsolved_fraction"] == pytest.approx(1 / 3)


@given(st.lists(st.tuples(st.integers(0, 5), st.lists(st.booleans(), min_size=1, max_size=4)), min_size=1, max_size=12))
@settings(max_examples=60, deadline=None)
def test_counts_add_up(groups):
    s = PromptStats(6)
    s.update([p for p, _ in groups], [[float(x) for x in c] for _, c in groups], [c for _, c in groups], step=1)
    assert int(s.attempts.sum()) == len(groups)
    assert int(s.samples.sum()) == sum(len(c) for _, c in groups)
    assert int(s.successes.sum()) == sum(sum(c) for _, c in groups)
    rate = s.success_rate()
    seen = s.attempts > 0
    assert bool(((rate[seen] >= 0) & (rate[seen] <= 1)).all()) and bool(torch.isnan(rate[~seen]).all())
    # with 0/1 rewards the reward mean equals the success rate
    mean, _ = s.reward_mean_var()
    assert torch.allclose(mean[seen], rate[seen])


def test_state_dict_round_trip_and_mismatch():
    s = PromptStats(3, history=2)
    s.update([1], [[1.0, 0.0]], [[True, False]], step=4)
    t = PromptStats(3, history=2)
    t.load_state_dict(s.state_dict())
    for k, v in s.state_dict().items():
        assert torch.equal(torch.nan_to_num(v, nan=-9), torch.nan_to_num(getattr(t, k), nan=-9)), k
    with pytest.raises(ValueError, match="saved for 3 prompts × 2 history entries, but this run has 4 × 2"):
        PromptStats(4, history=2).load_state_dict(s.state_dict())


def test_bad_updates_are_refused():
    s = PromptStats(2)
    with pytest.raises(ValueError, match="prompt index out of range 0..1"):
        s.update([2], [[1.0]], [[True]], step=0)
    with pytest.raises(ValueError, match="as many correctness flags as rewards"):
        s.update([0], [[1.0, 0.0]], [[True]], step=0)
