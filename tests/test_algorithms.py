"""Unit tests of the algorithm math with hand-computed numbers (the arithmetic is in the comments).

Covers advantages, ratio levels, the PPO-clip surrogate, loss aggregations and StepCounts, KL
estimators, entropy, the composed policy objective, filters, the LR schedule, pass@k and the
sampler's top-k / top-p filter.
"""
from __future__ import annotations

import math

import pytest
import torch

from groupwise.algorithms import (
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    RATIO_LEVELS,
    ObjectiveParts,
    StepCounts,
    compute_advantages,
    entropy_from_logits,
    needs_groups,
    policy_objective,
)
from groupwise.algorithms.advantages import (
    group_mean_advantage,
    group_mean_std_advantage,
    group_stats,
    leave_one_out_advantage,
)
from groupwise.algorithms.filters import mask_truncated_completions, zero_variance_groups
from groupwise.algorithms.losses import (
    constant_normalized,
    ppo_clip_loss,
    seq_mean_token_mean,
    seq_mean_token_sum,
    sequence_log_ratio,
    token_log_ratio,
    token_mean,
)
from groupwise.algorithms.regularizers import kl_k1, kl_k2, kl_k3
from groupwise.evaluation import pass_at_k
from groupwise.optim import lr_multiplier
from groupwise.rollout.hf import filter_top_k_top_p

NAN = float("nan")
INF = float("inf")


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def ids(x):
    return torch.tensor(x, dtype=torch.long)


def close(actual, expected, atol=1e-6, rtol=1e-6):
    torch.testing.assert_close(actual, t(expected) if not isinstance(expected, torch.Tensor) else expected,
                               atol=atol, rtol=rtol)


# =============================================================================================
# Advantages
# =============================================================================================

class TestGRPO:
    def test_two_groups_unbiased_std(self):
        # group 0: [1,0,0,1] mean 0.5, deviations ±0.5, Σdev² = 4·0.25 = 1,
        #          unbiased var = 1/3, std = 0.5773502692 → A = ±0.5 / 0.5774502692 = ±0.8658754
        # group 1: [1,1,1,1] all equal → A = 0
        a = group_mean_std_advantage(t([1, 0, 0, 1, 1, 1, 1, 1]), ids([0, 0, 0, 0, 1, 1, 1, 1]))
        x = 0.5 / (math.sqrt(1 / 3) + 1e-4)
        assert x == pytest.approx(0.8658754, abs=1e-6)
        close(a, [x, -x, -x, x, 0, 0, 0, 0])

    def test_two_groups_biased_std(self):
        # biased var = Σdev²/n = 1/4, std = 0.5 → A = ±0.5 / 0.5001 = ±0.99980004
        a = group_mean_std_advantage(t([1, 0, 0, 1, 1, 1, 1, 1]), ids([0, 0, 0, 0, 1, 1, 1, 1]),
                                     std_unbiased=False)
        x = 0.5 / 0.5001
        assert x == pytest.approx(0.99980004, abs=1e-7)
        close(a, [x, -x, -x, x, 0, 0, 0, 0])

    def test_custom_eps(self):
        # group [0, 2]: mean 1, unbiased std = sqrt((1+1)/1) = 1.41421356; eps = 0.5 → A = ±1/1.91421356
        a = group_mean_std_advantage(t([0, 2]), ids([0, 0]), eps=0.5)
        x = 1 / (math.sqrt(2) + 0.5)
        assert x == pytest.approx(0.5224077, abs=1e-6)
        close(a, [-x, x])

    def test_nan_rewards_get_zero_and_are_excluded_from_stats(self):
        # one group [2, NaN, 0, 4]: valid = [2, 0, 4], mean = 2, devs = [0, -2, 2],
        # unbiased var = 8/2 = 4, std = 2 → A = [0, 0 (NaN row), -2/2.0001, 2/2.0001] = [0, 0, -0.99995, 0.99995]
        # (if the NaN row were counted as 0: mean 1.5 → A[0] ≠ 0, so this distinguishes.)
        a = group_mean_std_advantage(t([2, NAN, 0, 4]), ids([0, 0, 0, 0]))
        x = 2 / 2.0001
        close(a, [0, 0, -x, x])
        assert not torch.isnan(a).any()

    def test_group_with_single_valid_reward_or_all_nan_gets_zero(self):
        # group 0 = [NaN, 3] → only one valid reward → no baseline → 0;
        # group 1 = [NaN, NaN] → 0; group 2 = [1, 0] → ±0.5/(sqrt(0.5)+1e-4)
        a = group_mean_std_advantage(t([NAN, 3, NAN, NAN, 1, 0]), ids([0, 0, 1, 1, 2, 2]))
        x = 0.5 / (math.sqrt(0.5) + 1e-4)
        close(a, [0, 0, 0, 0, x, -x])

    def test_variable_sizes_and_noncontiguous_ids(self):
        # ids [1,0,1,2,0,1], rewards [3,1,0,5,2,0]
        # group 0 (rows 1,4): [1,2] mean 1.5, unbiased std = sqrt(0.25+0.25) = 0.70710678
        #     → A = ∓0.5 / 0.70720678 = ∓0.70700676
        # group 1 (rows 0,2,5): [3,0,0] mean 1, devs [2,-1,-1], Σdev² = 6, var = 3, std = 1.7320508
        #     → A = [2, -1, -1] / 1.7321508
        # group 2 (row 3): single member → 0
        a = group_mean_std_advantage(t([3, 1, 0, 5, 2, 0]), ids([1, 0, 1, 2, 0, 1]))
        g0 = 0.5 / (math.sqrt(0.5) + 1e-4)
        g1 = 1 / (math.sqrt(3) + 1e-4)
        assert g0 == pytest.approx(0.70700676, abs=1e-6)
        close(a, [2 * g1, -g0, -g1, 0, g0, -g1])

    def test_group_ids_with_gaps(self):
        # ids {0, 5}: group 5 = [4, 0] mean 2, std sqrt(8) = 2.8284271 → ±2/2.8285271; group 0 = [1, 1] → 0
        a = group_mean_std_advantage(t([4, 1, 0, 1]), ids([5, 0, 5, 0]))
        x = 2 / (math.sqrt(8) + 1e-4)
        close(a, [x, 0, -x, 0])

    def test_group_stats(self):
        # group 0 = [1, NaN, 3] → count 2, mean 2, unbiased std sqrt(2) ; group 1 = [5] → count 1, mean 5, std 0
        count, mean, std, valid = group_stats(t([1, NAN, 3, 5]), ids([0, 0, 0, 1]))
        close(count, [2, 2, 2, 1])
        close(mean, [2, 2, 2, 5])
        close(std, [math.sqrt(2)] * 3 + [0.0])
        assert valid.tolist() == [True, False, True, True]
        # biased: std = sqrt(2/2) = 1; a single member has std 0
        _, _, std_b, _ = group_stats(t([1, NAN, 3, 5]), ids([0, 0, 0, 1]), unbiased=False)
        close(std_b, [1, 1, 1, 0])


class TestDrGRPO:
    def test_mean_subtraction(self):
        # group 0 [1,0,0,1] − 0.5 ; group 1 [3,0,0] − 1 → [2,-1,-1] (no std division)
        a = group_mean_advantage(t([1, 0, 0, 1, 3, 0, 0]), ids([0, 0, 0, 0, 1, 1, 1]))
        close(a, [0.5, -0.5, -0.5, 0.5, 2, -1, -1])

    def test_nan_and_singletons(self):
        # group 0 [2, NaN, 0, 4]: valid mean 2 → [0, 0, -2, 2]; group 1 [7] singleton → 0
        a = group_mean_advantage(t([2, NAN, 0, 4, 7]), ids([0, 0, 0, 0, 1]))
        close(a, [0, 0, -2, 2, 0])


class TestRLOO:
    def test_g3_hand_example(self):
        # [3, 0, 0]: 3 − (0+0)/2 = 3 ; 0 − (3+0)/2 = −1.5 ; 0 − (3+0)/2 = −1.5
        a = leave_one_out_advantage(t([3, 0, 0]), ids([0, 0, 0]))
        close(a, [3, -1.5, -1.5])

    def test_mixed_groups(self):
        # ids [1,0,1,2,0,1], rewards [3,1,0,5,2,0]
        # group 0: [1, 2] → [1−2, 2−1] = [−1, 1]
        # group 1: [3, 0, 0] → [3, −1.5, −1.5]; group 2 singleton → 0
        a = leave_one_out_advantage(t([3, 1, 0, 5, 2, 0]), ids([1, 0, 1, 2, 0, 1]))
        close(a, [3, -1, -1.5, 0, 1, -1.5])

    def test_nan_excluded_from_baseline(self):
        # [2, NaN, 0, 4]: 2 − (0+4)/2 = 0 ; NaN → 0 ; 0 − (2+4)/2 = −3 ; 4 − (2+0)/2 = 3
        a = leave_one_out_advantage(t([2, NAN, 0, 4]), ids([0, 0, 0, 0]))
        close(a, [0, 0, -3, 3])


class TestAdvantageRegistry:
    def test_compute_advantages_by_name(self):
        r, g = t([1, 0, 0, 1]), ids([0, 0, 0, 0])
        close(compute_advantages("dr_grpo", r, g), [0.5, -0.5, -0.5, 0.5])
        with pytest.raises(TypeError):  # an option the estimator does not take is refused, never ignored
            compute_advantages("dr_grpo", r, g, eps=0.3)
        # rloo: 1 − 1/3 = 2/3 ; 0 − 2/3 = −2/3
        close(compute_advantages("rloo", r, g), [2 / 3, -2 / 3, -2 / 3, 2 / 3])
        # grpo with eps 0.5: ±0.5 / (0.57735 + 0.5)
        x = 0.5 / (math.sqrt(1 / 3) + 0.5)
        close(compute_advantages("grpo", r, g, eps=0.5), [x, -x, -x, x])

    def test_compute_advantages_casts_to_float(self):
        a = compute_advantages("dr_grpo", torch.tensor([1, 0], dtype=torch.int64), ids([0, 0]))
        assert a.dtype == torch.float32
        close(a, [0.5, -0.5])

    def test_registry_and_needs_groups(self):
        assert {"grpo", "dr_grpo", "rloo"} <= set(ADVANTAGES.names())
        assert ADVANTAGES.get("grpo") is group_mean_std_advantage
        assert ADVANTAGES.get("dr_grpo") is group_mean_advantage
        assert ADVANTAGES.get("rloo") is leave_one_out_advantage
        assert needs_groups("grpo") and needs_groups("rloo") and needs_groups("dr_grpo")
        assert not needs_groups("no_such_estimator")


# =============================================================================================
# Ratio levels
# =============================================================================================

LOGP = [[-1.0, -2.0, -3.0], [-0.5, -1.5, -9.0]]
OLD = [[-1.5, -2.0, -2.0], [-1.0, -1.0, -4.0]]
MASK = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


class TestRatioLevels:
    def test_token(self):
        # lp − old, unmasked: [[0.5, 0, −1], [0.5, −0.5, −5]]
        close(token_log_ratio(t(LOGP), t(OLD), t(MASK)), [[0.5, 0, -1], [0.5, -0.5, -5]])

    def test_sequence_masked_mean_broadcast(self):
        # row 0: masked mean of [0.5, 0] = 0.25 ; row 1: masked mean of [0.5] = 0.5
        out = sequence_log_ratio(t(LOGP), t(OLD), t(MASK))
        close(out, [[0.25] * 3, [0.5] * 3])

    def test_sequence_fully_masked_row_is_zero(self):
        out = sequence_log_ratio(t([[1.0, 2.0]]), t([[0.0, 0.0]]), t([[0.0, 0.0]]))
        close(out, [[0.0, 0.0]])

    def test_sequence_gradient_is_mask_over_length(self):
        # d seq_i / d logp_it = m_it / |o_i| → row 0: [1/2, 1/2, 0], row 1: [1, 0, 0]
        logp = t(LOGP).requires_grad_()
        sequence_log_ratio(logp, t(OLD), t(MASK))[:, 0].sum().backward()
        close(logp.grad, [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])

    def test_registry(self):
        assert RATIO_LEVELS.get("token") is token_log_ratio
        assert RATIO_LEVELS.get("sequence") is sequence_log_ratio
        assert AGGREGATIONS.get("token_mean") is token_mean
        assert AGGREGATIONS.get("seq_mean_token_mean") is seq_mean_token_mean
        assert AGGREGATIONS.get("seq_mean_token_sum") is seq_mean_token_sum
        assert AGGREGATIONS.get("constant") is constant_normalized


# =============================================================================================
# PPO clip surrogate
# =============================================================================================

class TestPPOClip:
    # (ratio w, advantage A, expected loss, clipped_low, clipped_high, d loss / d log w), ε_low 0.2, ε_high 0.28:
    CASES = [
        # w > 1+ε_high, A > 0: min(1.5, 1.28) = 1.28 → −1.28, clipped high, no gradient
        (1.5, 1.0, -1.28, False, True, 0.0),
        # w > 1+ε_high, A < 0: min(−1.5, −1.28) = −1.5 → 1.5, unclipped, grad −wA = 1.5
        (1.5, -1.0, 1.5, False, False, 1.5),
        # w < 1−ε_low, A > 0: min(0.5, 0.8) = 0.5 → −0.5, grad −wA = −0.5
        (0.5, 1.0, -0.5, False, False, -0.5),
        # w < 1−ε_low, A < 0: min(−0.5, −0.8) = −0.8 → 0.8, clipped low, no gradient
        (0.5, -1.0, 0.8, True, False, 0.0),
        # inside the region: w = 1.1, A = 2 → −2.2, grad −2.2
        (1.1, 2.0, -2.2, False, False, -2.2),
        # 1.2 < w = 1.25 < 1.28: inside only thanks to clip-higher → −1.25 unclipped
        (1.25, 1.0, -1.25, False, False, -1.25),
        # w = 0.75 < 0.8, A = −2: min(−1.5, −1.6) = −1.6 → 1.6, clipped low
        (0.75, -2.0, 1.6, True, False, 0.0),
        # w = 0.85 (inside), A = −1 → 0.85
        (0.85, -1.0, 0.85, False, False, 0.85),
        # A = 0 → 0 everywhere, never flagged
        (3.0, 0.0, 0.0, False, False, 0.0),
    ]

    def test_values_flags_and_gradient(self):
        w = t([c[0] for c in self.CASES])
        adv = t([c[1] for c in self.CASES])
        log_ratio = w.log().requires_grad_()
        out = ppo_clip_loss(log_ratio, adv, log_ratio, eps_low=0.2, eps_high=0.28)
        close(out.loss.detach(), [c[2] for c in self.CASES], atol=1e-5, rtol=1e-5)
        assert out.clipped_low.tolist() == [c[3] for c in self.CASES]
        assert out.clipped_high.tolist() == [c[4] for c in self.CASES]
        out.loss.sum().backward()
        close(log_ratio.grad, [c[5] for c in self.CASES], atol=1e-5, rtol=1e-5)

    def test_default_is_symmetric_0_2(self):
        # default ε_high = 0.2: w = 1.25, A = 1 → clipped to 1.2 → −1.2, clipped high
        out = ppo_clip_loss(t([math.log(1.25)]), t([1.0]), t([0.0]))
        close(out.loss, [-1.2], atol=1e-6, rtol=1e-6)
        assert out.clipped_high.tolist() == [True]

    def test_extreme_log_ratio_is_clamped_to_20(self):
        # log w = 30 with A = −1: ratio clamped to e^20 = 4.85165195e8 → loss = e^20 (finite)
        out = ppo_clip_loss(t([30.0, -30.0]), t([-1.0, 1.0]), t([0.0, 0.0]))
        assert torch.isfinite(out.loss).all()
        assert out.loss[0].item() == pytest.approx(math.exp(20), rel=1e-5)
        # log w = −30 with A = +1: w = e^−20 ≈ 2.06e−9 < 0.8 → min(w, 0.8) = w → loss ≈ −2.06e−9
        assert out.loss[1].item() == pytest.approx(-math.exp(-20), rel=1e-4)

    def test_registry_takes_runtime_inputs_and_refuses_foreign_options(self):
        fn = POLICY_LOSSES.get("ppo_clip")
        out = fn(t([0.0]), t([1.0]), t([0.0]), old_logp=t([0.0]), mask=t([1.0]), eps_low=0.2, eps_high=0.28)
        close(out.loss, [-1.0])
        with pytest.raises(TypeError):
            fn(t([0.0]), t([1.0]), t([0.0]), eps_low=0.2, eps_high=0.28, unrelated=1)


# =============================================================================================
# Aggregations and StepCounts
# =============================================================================================

LOSS = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
AGG_MASK = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


class TestAggregations:
    # Whole-step counts bigger than this micro-batch: 6 tokens, 4 sequences, 5 rows, L = 4.
    STEP = StepCounts(num_tokens=6.0, num_sequences=4, num_rows=5, max_completion_length=4)

    def test_values_with_step_counts(self):
        loss, mask = t(LOSS), t(AGG_MASK)
        # masked sum = 1 + 2 + 4 = 7
        # token_mean: 7 / 6 = 1.1666667
        assert token_mean(loss, mask, self.STEP).item() == pytest.approx(7 / 6, abs=1e-6)
        # seq_mean_token_mean: row means (1+2)/2 = 1.5 and 4/1 = 4 → (1.5 + 4) / 4 = 1.375
        assert seq_mean_token_mean(loss, mask, self.STEP).item() == pytest.approx(1.375, abs=1e-6)
        # seq_mean_token_sum: 7 / 4 = 1.75
        assert seq_mean_token_sum(loss, mask, self.STEP).item() == pytest.approx(1.75, abs=1e-6)
        # constant: 7 / (5 · 4) = 0.35
        assert constant_normalized(loss, mask, self.STEP).item() == pytest.approx(0.35, abs=1e-6)

    def test_values_with_own_counts(self):
        loss, mask = t(LOSS), t(AGG_MASK)
        c = StepCounts.of(mask, 3)          # 3 tokens, 2 sequences, 2 rows, L = 3
        assert c == StepCounts(num_tokens=3.0, num_sequences=2, num_rows=2, max_completion_length=3)
        assert token_mean(loss, mask, c).item() == pytest.approx(7 / 3, abs=1e-6)
        assert seq_mean_token_mean(loss, mask, c).item() == pytest.approx(5.5 / 2, abs=1e-6)
        assert seq_mean_token_sum(loss, mask, c).item() == pytest.approx(7 / 2, abs=1e-6)
        assert constant_normalized(loss, mask, c).item() == pytest.approx(7 / 6, abs=1e-6)

    def test_step_counts_of_with_empty_row(self):
        mask = t([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
        c = StepCounts.of(mask, 8)
        assert (c.num_tokens, c.num_sequences, c.num_rows, c.max_completion_length) == (3.0, 2, 3, 8)
        assert isinstance(c.num_tokens, float) and isinstance(c.num_sequences, int)

    def test_empty_row_does_not_change_seq_mean(self):
        # rows: [1,2 | m 1,1], [9,9 | m 0,0] → seq_mean_token_mean = 1.5 / 1 (one trainable sequence)
        loss = t([[1.0, 2.0], [9.0, 9.0]])
        mask = t([[1.0, 1.0], [0.0, 0.0]])
        c = StepCounts.of(mask, 2)
        assert seq_mean_token_mean(loss, mask, c).item() == pytest.approx(1.5)
        # constant counts all rows: 3 / (2 · 2) = 0.75
        assert constant_normalized(loss, mask, c).item() == pytest.approx(0.75)

    def test_zero_counts_do_not_divide_by_zero(self):
        loss, mask = t([[1.0]]), t([[0.0]])
        c = StepCounts.of(mask, 0)
        for name in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"):
            assert AGGREGATIONS.get(name)(loss, mask, c).item() == 0.0

    @pytest.mark.parametrize("name", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"])
    def test_micro_batches_with_step_counts_add_up(self, name):
        # 4 rows with a ragged mask, split 1 + 3 and 2 + 1 + 1; counts always of the whole batch.
        agg = AGGREGATIONS.get(name)
        loss = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [-1.0, 0.5, 2.0], [7.0, 8.0, 9.0]])
        mask = t([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]])
        counts = StepCounts.of(mask, 5)
        full = agg(loss, mask, counts)
        # hand values of the full batch: masked sum = 1+2+4-1+0.5+2 = 8.5 ; 6 tokens ; 3 sequences ; 4 rows
        # row means: 1.5, 4, 0.5 → Σ = 6
        expected = {"token_mean": 8.5 / 6, "seq_mean_token_mean": 6 / 3,
                    "seq_mean_token_sum": 8.5 / 3, "constant": 8.5 / (4 * 5)}[name]
        assert full.item() == pytest.approx(expected, abs=1e-6)
        for cuts in ([0, 1, 4], [0, 2, 3, 4]):
            parts = [agg(loss[a:b], mask[a:b], counts) for a, b in zip(cuts, cuts[1:])]
            assert sum(parts).item() == pytest.approx(full.item(), abs=1e-6)


# =============================================================================================
# KL estimators and entropy
# =============================================================================================

class TestKL:
    def test_values(self):
        # (logp, ref) = (−1, −2): k1 = 1, k2 = ½·1 = 0.5, δ = ref − logp = −1 → k3 = e^−1 + 1 − 1 = 0.36787944
        # (logp, ref) = (−2, −1): k1 = −1, k2 = 0.5, δ = 1 → k3 = e − 1 − 1 = 0.71828183
        # (logp, ref) = (−0.5, −0.5): all 0
        # (logp, ref) = (0, −3): k1 = 3, k2 = 4.5, δ = −3 → k3 = e^−3 + 3 − 1 = 2.04978707
        logp, ref = t([-1.0, -2.0, -0.5, 0.0]), t([-2.0, -1.0, -0.5, -3.0])
        close(kl_k1(logp, ref), [1.0, -1.0, 0.0, 3.0])
        close(kl_k2(logp, ref), [0.5, 0.5, 0.0, 4.5])
        close(kl_k3(logp, ref), [math.exp(-1), math.e - 2, 0.0, math.exp(-3) + 2], atol=1e-6, rtol=1e-6)
        assert math.exp(-3) + 2 == pytest.approx(2.04978707)

    def test_k3_nonnegative_and_zero_iff_equal(self):
        g = torch.Generator().manual_seed(0)
        logp = torch.randn(1000, generator=g) * 3
        ref = torch.randn(1000, generator=g) * 3
        assert (kl_k3(logp, ref) >= 0).all()
        assert (kl_k3(logp, ref) > 0).all()                    # continuous draws never coincide
        assert (kl_k3(logp, logp.clone()) == 0).all()

    def test_k3_clamped(self):
        # δ = 30 → clamped to 20 → e^20 − 21 ≫ 10 → clamped to 10
        assert kl_k3(t([0.0]), t([30.0])).item() == pytest.approx(10.0)
        # δ = −30 → clamped to −20 → e^−20 + 19 ≈ 19 → clamped to 10
        assert kl_k3(t([0.0]), t([-30.0])).item() == pytest.approx(10.0)

    def test_k3_gradient(self):
        # d k3 / d logp = −e^δ + 1 ; at δ = −1: 1 − 0.36787944 = 0.63212056
        logp = t([-1.0]).requires_grad_()
        kl_k3(logp, t([-2.0])).sum().backward()
        assert logp.grad.item() == pytest.approx(1 - math.exp(-1), abs=1e-6)

    def test_registry(self):
        assert KL_ESTIMATORS.get("k1") is kl_k1
        assert KL_ESTIMATORS.get("k2") is kl_k2
        assert KL_ESTIMATORS.get("k3") is kl_k3


class TestEntropy:
    def test_values(self):
        # uniform over 4 → ln 4 = 1.38629436 ; p = [½, ¼, ¼] → ½ ln2 + ½ ln4 = 1.5 ln 2 = 1.03972077
        h = entropy_from_logits(t([[0.0, 0.0, 0.0, 0.0]]))
        assert h.item() == pytest.approx(math.log(4), abs=1e-6)
        h = entropy_from_logits(t([[math.log(0.5), math.log(0.25), math.log(0.25)]]) + 7.0)
        assert h.item() == pytest.approx(1.5 * math.log(2), abs=1e-6)

    def test_half_precision_input_computed_in_float32(self):
        h = entropy_from_logits(torch.zeros(2, 8, dtype=torch.bfloat16))
        assert h.dtype == torch.float32
        close(h, [math.log(8)] * 2)


# =============================================================================================
# Composed policy objective
# =============================================================================================

def _parts(ratio="token", agg="token_mean", kl_coef=0.0, kl="k3", entropy_coef=0.0, eps_low=0.2, eps_high=0.28):
    return ObjectiveParts(
        ratio_level=RATIO_LEVELS.get(ratio),
        surrogate=POLICY_LOSSES.get("ppo_clip"),
        aggregation=AGGREGATIONS.get(agg),
        surrogate_options={"eps_low": eps_low, "eps_high": eps_high},
        kl_coef=kl_coef,
        kl_estimator=KL_ESTIMATORS.get(kl) if kl_coef > 0 else None,
        entropy_coef=entropy_coef,
    )


class TestPolicyObjective:
    MASK = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    ADV = [1.0, -2.0]

    def _logp(self):
        return t([[-1.0, -0.5, -3.0], [-2.0, -0.1, -0.7]]).requires_grad_()

    def test_ratio_one_token_mean(self):
        # w = 1 → ℓ = −A per token. Masked: row 0 two tokens of −1, row 1 three tokens of +2 → Σ = −2 + 6 = 4
        # token_mean over 5 tokens → 0.8 ; gradient −A·w·m/5 → row 0 [−0.2, −0.2, 0], row 1 [0.4, 0.4, 0.4]
        logp, mask = self._logp(), t(self.MASK)
        out = policy_objective(_parts(), logp, logp.detach(), t(self.ADV), mask, StepCounts.of(mask, 3))
        assert out.loss.item() == pytest.approx(0.8, abs=1e-6)
        out.loss.backward()
        close(logp.grad, [[-0.2, -0.2, 0.0], [0.4, 0.4, 0.4]])
        assert out.sums["tokens"] == 5.0
        assert out.sums["policy_loss"] == pytest.approx(0.8, abs=1e-6)
        assert out.sums["clip_low"] == 0.0 and out.sums["clip_high"] == 0.0
        assert out.sums["log_ratio_abs"] == 0.0
        assert "kl" not in out.sums and "entropy" not in out.sums

    @pytest.mark.parametrize("agg,expected", [
        ("token_mean", 4 / 5),
        # per sequence means: −1 and +2 → (−1 + 2) / 2 = 0.5
        ("seq_mean_token_mean", 0.5),
        # per sequence sums: −2 and +6 → 4 / 2 = 2
        ("seq_mean_token_sum", 2.0),
        # 4 / (2 rows · 3) = 0.6667
        ("constant", 4 / 6),
    ])
    @pytest.mark.parametrize("ratio", ["token", "sequence"])
    def test_ratio_one_each_aggregation(self, agg, expected, ratio):
        logp, mask = self._logp(), t(self.MASK)
        out = policy_objective(_parts(ratio=ratio, agg=agg), logp, logp.detach(), t(self.ADV), mask,
                               StepCounts.of(mask, 3))
        assert out.loss.item() == pytest.approx(expected, abs=1e-6)

    def test_per_token_advantages(self):
        # A[N,T] = [[1, 3, 100], [0, 0, −1]]: masked −Σ A = −(1+3) − (−1) = −3 → token_mean −3/5 = −0.6
        logp, mask = self._logp(), t(self.MASK)
        adv = t([[1.0, 3.0, 100.0], [0.0, 0.0, -1.0]])
        out = policy_objective(_parts(), logp, logp.detach(), adv, mask, StepCounts.of(mask, 3))
        assert out.loss.item() == pytest.approx(-0.6, abs=1e-6)

    def test_kl_term_adds_beta_kl(self):
        # ref = logp − 0.5 → δ = −0.5, k3 = e^−0.5 + 0.5 − 1 = 0.10653066 per token
        # loss = 0.8 + 0.1 · 0.10653066 = 0.81065307 ; sums["kl"] = 5 · 0.10653066 = 0.5326533
        logp, mask = self._logp(), t(self.MASK)
        ref = logp.detach() - 0.5
        out = policy_objective(_parts(kl_coef=0.1, kl="k3"), logp, logp.detach(), t(self.ADV), mask,
                               StepCounts.of(mask, 3), ref_logp=ref)
        k3 = math.exp(-0.5) - 0.5
        assert out.loss.item() == pytest.approx(0.8 + 0.1 * k3, abs=1e-6)
        assert out.sums["kl"] == pytest.approx(5 * k3, abs=1e-5)
        assert out.sums["policy_loss"] == pytest.approx(0.8, abs=1e-6)     # reported without KL
        # k1 = 0.5 per token → loss 0.8 + 0.05 = 0.85
        out = policy_objective(_parts(kl_coef=0.1, kl="k1"), logp, logp.detach(), t(self.ADV), mask,
                               StepCounts.of(mask, 3), ref_logp=ref)
        assert out.loss.item() == pytest.approx(0.85, abs=1e-6)

    def test_kl_gradient(self):
        # k1 gradient wrt logp is 1 per token → β·m/5 added: row 0 [−0.2+0.02, ...], row 1 [0.4+0.02, ...]
        logp, mask = self._logp(), t(self.MASK)
        out = policy_objective(_parts(kl_coef=0.1, kl="k1"), logp, logp.detach(), t(self.ADV), mask,
                               StepCounts.of(mask, 3), ref_logp=logp.detach() - 0.5)
        out.loss.backward()
        close(logp.grad, [[-0.18, -0.18, 0.0], [0.42, 0.42, 0.42]])

    def test_kl_without_reference_raises(self):
        logp, mask = self._logp(), t(self.MASK)
        with pytest.raises(ValueError, match="reference"):
            policy_objective(_parts(kl_coef=0.1), logp, logp.detach(), t(self.ADV), mask, StepCounts.of(mask, 3))

    def test_entropy_bonus_subtracts(self):
        # entropy 2.0 at every token, c_H = 0.01 → loss = 0.8 − 0.02 = 0.78 ; sums["entropy"] = 5·2 = 10
        logp, mask = self._logp(), t(self.MASK)
        ent = torch.full((2, 3), 2.0)
        out = policy_objective(_parts(entropy_coef=0.01), logp, logp.detach(), t(self.ADV), mask,
                               StepCounts.of(mask, 3), entropy=ent)
        assert out.loss.item() == pytest.approx(0.78, abs=1e-6)
        assert out.sums["entropy"] == pytest.approx(10.0)
        # with entropy_coef 0 the entropy is only reported
        out = policy_objective(_parts(), logp, logp.detach(), t(self.ADV), mask, StepCounts.of(mask, 3), entropy=ent)
        assert out.loss.item() == pytest.approx(0.8, abs=1e-6)
        assert out.sums["entropy"] == pytest.approx(10.0)

    def test_entropy_bonus_needs_entropy(self):
        logp, mask = self._logp(), t(self.MASK)
        with pytest.raises(ValueError, match="entropy"):
            policy_objective(_parts(entropy_coef=0.01), logp, logp.detach(), t(self.ADV), mask,
                             StepCounts.of(mask, 3))

    def test_clip_counts_and_log_ratio_sums(self):
        # old = logp − log 1.5 → w = 1.5 at every token.
        # row 0 A = +1: clipped high on its 2 masked tokens → ℓ = −1.28 each
        # row 1 A = −2: w = 1.5 unclipped (A<0) → ℓ = 3 each, 3 tokens
        # token_mean: (−2.56 + 9) / 5 = 1.288 ; clip_high = 2, clip_low = 0 ; |log w| sum = 5 ln 1.5 = 2.02732554
        logp, mask = self._logp(), t(self.MASK)
        old = logp.detach() - math.log(1.5)
        out = policy_objective(_parts(), logp, old, t(self.ADV), mask, StepCounts.of(mask, 3))
        assert out.loss.item() == pytest.approx(1.288, abs=1e-5)
        assert out.sums["clip_high"] == 2.0 and out.sums["clip_low"] == 0.0
        assert out.sums["log_ratio_abs"] == pytest.approx(5 * math.log(1.5), abs=1e-5)


# =============================================================================================
# Filters
# =============================================================================================

class TestFilters:
    def test_mask_truncated_completions(self):
        mask = t([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
        out = mask_truncated_completions(mask, torch.tensor([True, False, True]))
        close(out, [[1, 1, 0], [0, 0, 0], [1, 0, 0]])
        assert out.dtype == mask.dtype

    def test_mask_truncated_keeps_fractional_weights(self):
        out = mask_truncated_completions(t([[0.5, 1.0], [0.25, 0.0]]), torch.tensor([1, 0]))
        close(out, [[0.5, 1.0], [0.0, 0.0]])

    def test_zero_variance_groups(self):
        # groups: 0 = [1, 1] equal ; 1 = [0, 1] differ ; 2 = [2, 2, 2] equal ; 3 = [5] single → equal
        out = zero_variance_groups(t([1, 1, 0, 1, 2, 2, 2, 5]), ids([0, 0, 1, 1, 2, 2, 2, 3]))
        assert out.tolist() == [True, False, True, True]

    def test_zero_variance_groups_noncontiguous(self):
        # ids [1, 0, 1, 0]: group 0 = [3, 3] → True ; group 1 = [2, 4] → False
        out = zero_variance_groups(t([2, 3, 4, 3]), ids([1, 0, 1, 0]))
        assert out.tolist() == [True, False]

    def test_zero_variance_groups_ignores_nan(self):
        # docstring: "True when every (non-NaN) reward of the group is equal".
        # group 0 = [1, NaN] → non-NaN rewards {1} → True ; group 1 = [0, 1] → False
        out = zero_variance_groups(t([1, NAN, 0, 1]), ids([0, 0, 1, 1]))
        assert out.tolist() == [True, False]


# =============================================================================================
# Learning-rate schedule
# =============================================================================================

class TestLRMultiplier:
    def test_warmup(self):
        # warm-up 4: (step+1)/4 → 0.25, 0.5, 0.75, 1.0 ; then 1 at the start of the decay
        vals = [lr_multiplier(s, warmup=4, total=10, kind="linear", min_ratio=0.0) for s in range(5)]
        assert vals == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])

    def test_constant(self):
        assert lr_multiplier(0, warmup=2, total=10, kind="constant", min_ratio=0.1) == pytest.approx(0.5)
        for s in (2, 5, 10, 100):
            assert lr_multiplier(s, warmup=2, total=10, kind="constant", min_ratio=0.1) == 1.0

    def test_linear(self):
        # warm-up 2, total 10, min 0.1: progress = (s − 2)/8 ; value = 0.1 + 0.9 (1 − progress)
        # s=2 → 1 ; s=6 → 0.1 + 0.45 = 0.55 ; s=8 → 0.1 + 0.9·0.25 = 0.325 ; s=10 → 0.1 ; s=50 → 0.1
        f = lambda s: lr_multiplier(s, warmup=2, total=10, kind="linear", min_ratio=0.1)  # noqa: E731
        assert [f(s) for s in (2, 6, 8, 10, 50)] == pytest.approx([1.0, 0.55, 0.325, 0.1, 0.1])

    def test_cosine(self):
        # s=4 → progress 0.25, decay ½(1 + cos π/4) = 0.85355339 → 0.1 + 0.9·0.85355339 = 0.86819805
        # s=6 → progress 0.5, decay 0.5 → 0.55 ; s=10 → 0.1 ; s=2 → 1
        f = lambda s: lr_multiplier(s, warmup=2, total=10, kind="cosine", min_ratio=0.1)  # noqa: E731
        assert [f(s) for s in (2, 4, 6, 10, 11)] == pytest.approx([1.0, 0.86819805, 0.55, 0.1, 0.1])

    def test_no_warmup_and_zero_min(self):
        # warm-up 0, total 4, linear to 0: 1, 0.75, 0.5, 0.25, 0
        vals = [lr_multiplier(s, warmup=0, total=4, kind="linear", min_ratio=0.0) for s in range(5)]
        assert vals == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])

    def test_unknown_kind(self):
        with pytest.raises(ValueError, match="unknown"):
            lr_multiplier(3, warmup=0, total=10, kind="step", min_ratio=0.0)


# =============================================================================================
# pass@k
# =============================================================================================

class TestPassAtK:
    @pytest.mark.parametrize("n,c,k,expected", [
        (4, 1, 1, 0.25),          # 1 − C(3,1)/C(4,1) = 1 − 3/4
        (4, 1, 2, 0.5),           # 1 − C(3,2)/C(4,2) = 1 − 3/6
        (4, 0, 2, 0.0),           # 1 − C(4,2)/C(4,2)
        (4, 4, 2, 1.0),           # n − c < k
        (4, 3, 2, 1.0),           # n − c = 1 < 2: every pair contains a correct one
        (5, 2, 3, 0.9),           # 1 − C(3,3)/C(5,3) = 1 − 1/10
        (10, 3, 1, 0.3),          # k = 1 → c/n
        (4, 1, 4, 1.0),           # k = n and c ≥ 1
    ])
    def test_values(self, n, c, k, expected):
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)

    def test_k_greater_than_n_raises(self):
        with pytest.raises(ValueError):
            pass_at_k(3, 1, 4)


# =============================================================================================
# Sampler filter
# =============================================================================================

class TestTopKTopP:
    def test_top_k_keeps_two_largest(self):
        out = filter_top_k_top_p(t([[1.0, 3.0, 2.0, 0.0], [5.0, -1.0, 0.0, 4.0]]), top_k=2, top_p=1.0)
        close(out, [[-INF, 3.0, 2.0, -INF], [5.0, -INF, -INF, 4.0]])

    def test_top_k_off(self):
        x = t([[1.0, 3.0, 2.0]])
        close(filter_top_k_top_p(x, top_k=0, top_p=1.0), x)
        close(filter_top_k_top_p(x, top_k=3, top_p=1.0), x)
        close(filter_top_k_top_p(x, top_k=10, top_p=1.0), x)

    def _probs_logits(self):
        # probabilities [0.05, 0.5, 0.3, 0.15]; sorted 0.5, 0.3, 0.15, 0.05, cumulative 0.5, 0.8, 0.95, 1.0
        return torch.log(t([[0.05, 0.5, 0.3, 0.15]]))

    @pytest.mark.parametrize("top_p,kept", [
        (0.3, [1]),               # the argmax alone already has 0.5 ≥ 0.3
        (0.45, [1]),
        (0.7, [1, 2]),            # 0.5 < 0.7 ≤ 0.8
        (0.9, [1, 2, 3]),         # 0.8 < 0.9 ≤ 0.95
        (0.97, [0, 1, 2, 3]),     # 0.95 < 0.97
        (0.01, [1]),              # tiny p still keeps the argmax
    ])
    def test_top_p_smallest_prefix(self, top_p, kept):
        out = filter_top_k_top_p(self._probs_logits(), top_k=0, top_p=top_p)
        finite = torch.isfinite(out[0]).nonzero().flatten().tolist()
        assert finite == kept
        # kept logits are unchanged
        close(out[0, kept], self._probs_logits()[0, kept])

    def test_top_k_then_top_p_renormalises(self):
        # top_k = 2 keeps {0.5, 0.3} → renormalised 0.625, 0.375 ; top_p = 0.6: 0.625 ≥ 0.6 → argmax only
        # (with the un-renormalised 0.5 < 0.6 both would stay)
        out = filter_top_k_top_p(self._probs_logits(), top_k=2, top_p=0.6)
        assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [1]

    def test_top_p_against_brute_force(self):
        g = torch.Generator().manual_seed(3)
        logits = torch.randn(20, 7, generator=g) * 2
        for top_p in (0.2, 0.5, 0.9):
            out = filter_top_k_top_p(logits, top_k=0, top_p=top_p)
            for row, orow in zip(logits, out):
                probs = row.double().softmax(-1).tolist()
                order = sorted(range(len(probs)), key=lambda i: -probs[i])
                keep, mass = set(), 0.0
                for i in order:
                    keep.add(i)
                    mass += probs[i]
                    if mass >= top_p:
                        break
                assert set(torch.isfinite(orow).nonzero().flatten().tolist()) == keep
