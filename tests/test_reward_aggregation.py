"""Multi-reward aggregation: weighted sum and GDPO's normalize-then-sum."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from groupwise.algorithms import ADVANTAGES
from groupwise.algorithms.reward_aggregation import REWARD_AGGREGATIONS, aggregate_rewards, group_normalized_sum, weighted_sum
from groupwise.types import Scores

nan = math.nan


def test_weighted_sum_by_hand_and_equals_scores_total():
    v = torch.tensor([[1.0, 0.5], [nan, 2.0], [nan, nan]])
    w = torch.tensor([2.0, -1.0])
    out = weighted_sum(v, w, torch.tensor([0, 0, 1]))
    assert out[:2].tolist() == [1.5, -2.0] and math.isnan(out[2])
    assert torch.equal(out.isnan(), Scores(v, ["a", "b"], w).total().isnan())
    assert torch.allclose(out[:2], Scores(v, ["a", "b"], w).total()[:2])


def test_gdpo_keeps_reward_combinations_apart():
    # GDPO's figure 2: two binary rewards, G = 2. GRPO on the sum gives ±0.7071 to (1,1)-vs-(0,0)
    # and to (1,0)-vs-(0,0) alike; GDPO's advantage counts how many rewards differ.
    v = torch.tensor([[1.0, 1.0], [0.0, 0.0],      # group 0: both rewards differ
                      [1.0, 0.0], [0.0, 0.0]])     # group 1: only the first differs
    g = torch.tensor([0, 0, 1, 1])
    s = 1 / (math.sqrt(0.5) + 1e-4)               # z of (1, 0): ±0.5 / (std 0.7071 + ε)
    expected = [2 * 0.5 * s, -2 * 0.5 * s, 0.5 * s, -0.5 * s]
    assert torch.allclose(group_normalized_sum(v, torch.ones(2), g), torch.tensor(expected), atol=1e-5)
    grpo_on_sum = ADVANTAGES.get("grpo")(weighted_sum(v, torch.ones(2), g), g)
    assert torch.allclose(grpo_on_sum[[0, 2]], grpo_on_sum[[0, 0]], atol=1e-3)  # the sum merges the two cases


def test_gdpo_by_hand_with_weights_nan_and_small_groups():
    v = torch.tensor([[3.0, 1.0], [1.0, nan], [2.0, 0.0],   # group 0: reward 2 valid twice
                      [5.0, nan]])                        # group 1: a single completion
    g = torch.tensor([0, 0, 0, 1])
    w = torch.tensor([1.0, 0.5])
    z1 = [(3 - 2) / (1 + 1e-4), (1 - 2) / (1 + 1e-4), 0.0]         # mean 2, std 1
    z2 = [(1 - 0.5) / (math.sqrt(0.5) + 1e-4), None, (0 - 0.5) / (math.sqrt(0.5) + 1e-4)]
    expected = [z1[0] + 0.5 * z2[0], z1[1], z1[2] + 0.5 * z2[2], 0.0]  # one valid reward in a group: z = 0
    assert torch.allclose(group_normalized_sum(v, w, g), torch.tensor(expected), atol=1e-5)


def test_gdpo_with_batch_std_is_gdpos_batch_zscore():
    torch.manual_seed(0)
    v = torch.randint(0, 3, (12, 3)).float()
    g = torch.arange(4).repeat_interleave(3)
    w = torch.tensor([1.0, 0.5, 2.0])
    # the paper's recipe, written out: per-reward group z-scores, weighted sum, batch z-score
    z = torch.stack([(v[:, k] - v[:, k].view(4, 3).mean(1).repeat_interleave(3))
                     / (v[:, k].view(4, 3).std(1).repeat_interleave(3) + 1e-4) for k in range(3)], 1)
    s = (z * w).sum(1)
    direct = (s - s.mean()) / (s.std() + 1e-4)
    ours = ADVANTAGES.get("batch_std")(aggregate_rewards("normalize_then_sum", v, w, g), g)
    assert torch.allclose(ours, direct, atol=1e-5)


groups = st.integers(1, 4).flatmap(lambda n: st.lists(st.integers(2, 5), min_size=n, max_size=n))


@given(sizes=groups, data=st.data())
@settings(max_examples=60, deadline=None)
def test_gdpo_properties(sizes, data):
    n = sum(sizes)
    g = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    values = torch.tensor(data.draw(st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=2, max_size=2),
                                             min_size=n, max_size=n)))
    w = torch.tensor([1.0, 0.3])
    out = group_normalized_sum(values, w, g)
    # each group's aggregated rewards have mean 0: only relative quality inside a group counts
    for k in range(len(sizes)):
        assert abs(float(out[g == k].mean())) < 1e-4
    # a positive affine change of one reward (r → a·r + b) leaves GDPO unchanged, up to ε
    a, b = data.draw(st.floats(0.5, 4.0)), data.draw(st.floats(-3.0, 3.0))
    moved = values.clone()
    moved[:, 1] = a * moved[:, 1] + b
    assert torch.allclose(group_normalized_sum(moved, w, g), out, atol=2e-3)
    # permuting the completions permutes the output
    perm = torch.randperm(n)
    assert torch.allclose(group_normalized_sum(values[perm], w, g[perm]), out[perm], atol=1e-6)


def test_registry_names_and_unknown_name():
    assert REWARD_AGGREGATIONS.names() == ["normalize_then_sum", "sum_then_normalize"]
    with pytest.raises(KeyError, match="reward aggregation"):
        aggregate_rewards("no_such", torch.zeros(2, 1), torch.ones(1), torch.zeros(2, dtype=torch.long))


def test_config_refuses_an_unknown_aggregation():
    from groupwise.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="rewards.aggregation 'mean' is unknown; known: normalize_then_sum, sum_then_normalize"):
        load_config(None, ["rewards.aggregation=mean"])
