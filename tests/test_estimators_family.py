"""The GRPO-family advantage estimators of `advantages_family`: hand-computed numbers (arithmetic in
the comments), comparisons with plain-Python loops, and hypothesis properties.

Every expectation is computed independently of the code under test.
"""
from __future__ import annotations

import inspect
import json
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from groupwise.algorithms import (
    ADVANTAGES,
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    RATIO_LEVELS,
    ObjectiveParts,
    StepCounts,
    compute_advantages,
    needs_groups,
    policy_objective,
)
from groupwise.algorithms.advantages import AdvantageContext, group_mean_std_advantage
from groupwise.algorithms.options import part_options

NAN = float("nan")
NEW = ["batch_std", "reinforce_pp_baseline", "reinforce_pp", "opo", "gpg", "passk", "mc_grpo", "ngrpo", "bnpo",
       "stratified", "dcpo_sas"]
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def ids(x):
    return torch.tensor(x, dtype=torch.long)


def close(actual, expected, atol=1e-6, rtol=1e-6):
    expected = expected if isinstance(expected, torch.Tensor) else torch.tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected.to(actual.dtype), atol=atol, rtol=rtol)


def est(name):
    return ADVANTAGES.get(name)


def ctx_for(n, lengths=None, **columns):
    return AdvantageContext(lengths=None if lengths is None else torch.as_tensor(lengths, dtype=torch.float32),
                            columns={k: list(v) for k, v in columns.items()})


@st.composite
def grouped(draw, values, min_size=1, max_size=6, max_groups=5, nan=False):
    """(rewards, group ids): variable group sizes, shuffled rows, ids with gaps (non-contiguous)."""
    sizes = draw(st.lists(st.integers(min_size, max_size), min_size=1, max_size=max_groups))
    gap = draw(st.integers(1, 3))
    rows = []
    for g, size in enumerate(sizes):
        elem = st.one_of(st.just(NAN), values) if nan else values
        rows += [(draw(elem), g * gap) for _ in range(size)]
    rows = draw(st.permutations(rows))
    return [r for r, _ in rows], [g for _, g in rows]


small_ints = st.integers(0, 4).map(float)
floats = st.floats(-50, 50, allow_nan=False, allow_infinity=False)


def members(rewards, gids):
    """{group: [(row, reward)]} over non-NaN rewards, in row order."""
    out: dict[int, list[tuple[int, float]]] = {}
    for i, (r, g) in enumerate(zip(rewards, gids)):
        if not math.isnan(r):
            out.setdefault(g, []).append((i, r))
    return out


def mean(xs):
    return sum(xs) / len(xs)


def std(xs, unbiased=True):
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - (1 if unbiased else 0)))


# =============================================================================================
# Registry, docstrings, options
# =============================================================================================

class TestRegistry:
    @pytest.mark.parametrize("name", NEW)
    def test_registered_with_paper_and_formula(self, name):
        assert name in ADVANTAGES
        doc = inspect.getdoc(est(name))
        assert "arXiv" in doc
        assert re.search(r"^\s+A(_i)?\s+=", doc, re.M), f"{name}: no formula line 'A_i = …' in the docstring"

    def test_group_estimators(self):
        for name in NEW:
            assert needs_groups(name) == (name != "reinforce_pp"), name

    @pytest.mark.parametrize("name", NEW)
    def test_options_are_keyword_only_and_json_simple(self, name):
        sig = inspect.signature(est(name))
        positional = [p.name for p in sig.parameters.values() if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        assert positional == ["rewards", "group_id", "ctx"]
        for option, default in part_options(est(name)).items():
            assert default is inspect.Parameter.empty or isinstance(default, (bool, int, float, str)), option

    def test_stratified_key_is_required(self):
        assert part_options(est("stratified"))["key"] is inspect.Parameter.empty


# =============================================================================================
# Lite PPO: group mean, batch std
# =============================================================================================

class TestBatchStd:
    def test_hand_computed(self):
        # rewards [1,0,0,1 | 1,1,1,1]: batch mean 0.75, Σ(r−0.75)² = 6·0.0625 + 2·0.5625 = 1.5
        # unbiased std = √(1.5/7) = 0.4629100 → group 0: ±0.5 / 0.4630100 = ±1.0798903; group 1 constant → 0
        # biased   std = √(1.5/8) = 0.4330127 → ±0.5 / 0.4331127 = ±1.1544342
        r, g = t([1, 0, 0, 1, 1, 1, 1, 1]), ids([0, 0, 0, 0, 1, 1, 1, 1])
        x = 0.5 / (math.sqrt(1.5 / 7) + 1e-4)
        assert x == pytest.approx(1.0798903, abs=1e-6)
        close(est("batch_std")(r, g), [x, -x, -x, x, 0, 0, 0, 0])
        y = 0.5 / (math.sqrt(1.5 / 8) + 1e-4)
        close(est("batch_std")(r, g, std_unbiased=False), [y, -y, -y, y, 0, 0, 0, 0])

    @FAST
    @given(rg=grouped(floats, nan=True), unbiased=st.booleans())
    def test_against_loop(self, rg, unbiased):
        rewards, gids = rg
        a = est("batch_std")(t(rewards), ids(gids), std_unbiased=unbiased)
        allv = [r for r in rewards if not math.isnan(r)]
        sd = std(allv, unbiased) if len(allv) >= (2 if unbiased else 1) else 0.0
        expected = [0.0] * len(rewards)
        for ms in members(rewards, gids).values():
            vals = [r for _, r in ms]
            if len(ms) < 2 or max(vals) == min(vals):
                continue
            for i, r in ms:
                expected[i] = (r - mean(vals)) / (sd + 1e-4)
        close(a, expected, atol=1e-7, rtol=1e-7)


# =============================================================================================
# REINFORCE++ (-baseline): batch whitening, token-weighted with lengths
# =============================================================================================

def token_level_whiten(per_row, lengths, eps):
    """verl masked_whiten of a sequence-constant value tiled over each row's tokens — built from tokens."""
    tokens = torch.cat([torch.full((int(n),), float(v), dtype=torch.float64) for v, n in zip(per_row, lengths)])
    m, v = tokens.mean(), tokens.var(correction=1)
    return [(x - m) / torch.sqrt(v + eps) for x in per_row]


class TestReinforcePP:
    def test_baseline_hand_computed_without_lengths(self):
        # groups [1,0] and [3,1]: centred a = [0.5,−0.5, 1,−1], mean 0, var = (0.25+0.25+1+1)/3 = 0.833333
        # A = a / √0.833333 = a / 0.9128709 = [0.5477226, −0.5477226, 1.0954451, −1.0954451]
        a = est("reinforce_pp_baseline")(t([1, 0, 3, 1]), ids([0, 0, 1, 1]), eps=0.0)
        close(a, [0.5477226, -0.5477226, 1.0954451, -1.0954451])

    def test_baseline_hand_computed_with_lengths(self):
        # lengths [1,3,2,2] (W = 8): m = (0.5·1 − 0.5·3 + 1·2 − 1·2)/8 = −0.125
        # deviations 0.625, −0.375, 1.125, −0.875; Σw·d² = 0.390625 + 0.421875 + 2.53125 + 1.53125 = 4.875
        # var = 4.875/7 = 0.6964286, std = 0.8345230 → A = d / 0.8345230
        ctx = ctx_for(4, lengths=[1, 3, 2, 2])
        a = est("reinforce_pp_baseline")(t([1, 0, 3, 1]), ids([0, 0, 1, 1]), ctx, eps=0.0)
        s = math.sqrt(4.875 / 7)
        close(a, [0.625 / s, -0.375 / s, 1.125 / s, -0.875 / s])
        close(a, [0.7489309, -0.4493585, 1.3480756, -1.0485032])

    def test_plain_hand_computed(self):
        # r = [2, 0, 1], no groups needed: mean 1, unbiased var = (1+1+0)/2 = 1 → A = [1, −1, 0]
        close(est("reinforce_pp")(t([2, 0, 1]), ids([0, 1, 2]), eps=0.0), [1, -1, 0])

    @FAST
    @given(rg=grouped(floats, nan=True), data=st.data())
    def test_equals_verl_token_level_whitening(self, rg, data):
        rewards, gids = rg
        lengths = data.draw(st.lists(st.integers(1, 5), min_size=len(rewards), max_size=len(rewards)))
        ctx = ctx_for(len(rewards), lengths=lengths)
        # reinforce_pp: returns = r (γ = 1, outcome reward), whitened over all tokens
        a = est("reinforce_pp")(t(rewards), ids(gids), ctx, eps=1e-8)
        rows = [i for i, r in enumerate(rewards) if not math.isnan(r)]
        expected = [0.0] * len(rewards)
        if sum(lengths[i] for i in rows) > 1:
            for i, v in zip(rows, token_level_whiten([rewards[i] for i in rows], [lengths[i] for i in rows], 1e-8)):
                expected[i] = float(v)
            close(a, expected, atol=1e-6, rtol=1e-6)
        # reinforce_pp_baseline: group-centred first (groups with ≥ 2 valid rewards only)
        b = est("reinforce_pp_baseline")(t(rewards), ids(gids), ctx, eps=1e-8)
        centred = {}
        for ms in members(rewards, gids).values():
            if len(ms) >= 2:
                m = mean([r for _, r in ms])
                for i, r in ms:
                    centred[i] = 0.0 if max(x for _, x in ms) == min(x for _, x in ms) else r - m
        rows = sorted(centred)
        expected = [0.0] * len(rewards)
        if sum(lengths[i] for i in rows) > 1:
            for i, v in zip(rows, token_level_whiten([centred[i] for i in rows], [lengths[i] for i in rows], 1e-8)):
                expected[i] = float(v)
            close(b, expected, atol=1e-6, rtol=1e-6)


# =============================================================================================
# OPO: length-weighted baseline (the row itself included)
# =============================================================================================

class TestOPO:
    def test_hand_computed(self):
        # group [1,0,0] with lengths [2,4,4]: b = (2·1)/(2+4+4) = 0.2 → A = [0.8, −0.2, −0.2]
        # group [3,1] with lengths [1,3]: b = (3 + 3)/4 = 1.5 → A = [1.5, −0.5]
        ctx = ctx_for(5, lengths=[2, 4, 4, 1, 3])
        close(est("opo")(t([1, 0, 0, 3, 1]), ids([0, 0, 0, 1, 1]), ctx), [0.8, -0.2, -0.2, 1.5, -0.5])

    def test_missing_lengths_raise_naming_the_estimator(self):
        with pytest.raises(ValueError, match=r"'opo'.*ctx\.lengths"):
            est("opo")(t([1, 0]), ids([0, 0]), AdvantageContext())
        with pytest.raises(ValueError, match="'opo'"):
            est("opo")(t([1, 0]), ids([0, 0]))
        with pytest.raises(ValueError, match="'opo'"):
            compute_advantages("opo", t([1, 0]), ids([0, 0]))
        with pytest.raises(ValueError, match="'opo'.*shape"):
            est("opo")(t([1, 0]), ids([0, 0]), ctx_for(3, lengths=[1, 2, 3]))

    @FAST
    @given(rg=grouped(floats, nan=True), data=st.data())
    def test_against_loop_including_itself(self, rg, data):
        rewards, gids = rg
        lengths = data.draw(st.lists(st.integers(1, 9), min_size=len(rewards), max_size=len(rewards)))
        a = est("opo")(t(rewards), ids(gids), ctx_for(len(rewards), lengths=lengths))
        expected = [0.0] * len(rewards)
        for ms in members(rewards, gids).values():
            if len(ms) < 2 or max(r for _, r in ms) == min(r for _, r in ms):
                continue
            b = sum(lengths[j] * r for j, r in ms) / sum(lengths[j] for j, _ in ms)   # j includes i itself
            for i, r in ms:
                expected[i] = r - b
        close(a, expected, atol=1e-7, rtol=1e-7)


# =============================================================================================
# GPG
# =============================================================================================

class TestGPG:
    def test_hand_computed(self):
        # [1,0,0,1 | 1,1,1,1]: N = 8 valid rows, M = 4 nonzero centred rewards → α = 2
        # A = 2·(r − mean_g) = [1, −1, −1, 1, 0, 0, 0, 0]
        ctx = AdvantageContext()
        a = est("gpg")(t([1, 0, 0, 1, 1, 1, 1, 1]), ids([0, 0, 0, 0, 1, 1, 1, 1]), ctx)
        close(a, [1, -1, -1, 1, 0, 0, 0, 0])
        assert ctx.metrics["gpg/alpha"] == 2.0

    def test_row_at_the_mean_does_not_count(self):
        # [0, 0.5, 1]: mean 0.5, the middle row's centred reward is 0 → N = 3, M = 2, α = 1.5
        # A = 1.5·[−0.5, 0, 0.5] = [−0.75, 0, 0.75]; with f_norm = 3: [−0.25, 0, 0.25]
        close(est("gpg")(t([0, 0.5, 1]), ids([0, 0, 0])), [-0.75, 0, 0.75])
        close(est("gpg")(t([0, 0.5, 1]), ids([0, 0, 0]), f_norm=3.0), [-0.25, 0, 0.25])

    @FAST
    @given(rg=grouped(small_ints, nan=True))
    def test_against_loop(self, rg):
        rewards, gids = rg
        a = est("gpg")(t(rewards), ids(gids))
        dev = [0.0] * len(rewards)
        for ms in members(rewards, gids).values():
            if len(ms) >= 2:
                m = mean([r for _, r in ms])
                for i, r in ms:
                    dev[i] = r - m
        n_valid = sum(1 for r in rewards if not math.isnan(r))
        alpha = n_valid / max(sum(1 for d in dev if abs(d) > 1e-12), 1)
        close(a, [alpha * d for d in dev], atol=1e-9, rtol=1e-9)


# =============================================================================================
# pass@k
# =============================================================================================

class TestPassK:
    def test_hand_computed(self):
        # group 0 [0.2, 0.9, 0.5]: best row 1 gets 0.9 − 0.5 = 0.4, the others 0
        # group 1 [0.2, 0.9, 0.5, 0.9]: tie at the top → r_max − r_2nd = 0 for everyone
        r = t([0.2, 0.9, 0.5, 0.2, 0.9, 0.5, 0.9])
        g = ids([0, 0, 0, 1, 1, 1, 1])
        close(est("passk")(r, g), [0, 0.4, 0, 0, 0, 0, 0])
        # normalize_by_std: std of [0.2, 0.9, 0.5] (unbiased) = √(0.246667/2) = 0.3511885
        # → 0.4 / (0.3511885 + 1e-4) = 1.1386654
        a = est("passk")(r, g, normalize_by_std=True)
        close(a, [0, 0.4 / (math.sqrt(0.74 / 3 / 2) + 1e-4), 0, 0, 0, 0, 0])
        assert a[1].item() == pytest.approx(1.1386654, abs=1e-6)

    @FAST
    @given(rg=grouped(small_ints, nan=True))
    def test_against_loop(self, rg):
        rewards, gids = rg
        a = est("passk")(t(rewards), ids(gids))
        expected = [0.0] * len(rewards)
        for ms in members(rewards, gids).values():
            if len(ms) < 2:
                continue
            best_i, best_r = min(ms, key=lambda x: (-x[1], x[0]))        # highest reward, lowest index
            expected[best_i] = best_r - max(r for i, r in ms if i != best_i)
        close(a, expected)


# =============================================================================================
# MC-GRPO: median baseline, pivot excluded from the loss
# =============================================================================================

class TestMCGRPO:
    def test_hand_computed(self):
        # G+1 = 3 rollouts [3, 1, 2]: median 2 (row 2 is the pivot)
        # MAD = median(|1|, |−1|, |0|) = 1 → A = [1/1.001, −1/1.001, 0] = [0.999001, −0.999001, 0]
        ctx = AdvantageContext()
        a = est("mc_grpo")(t([3, 1, 2]), ids([0, 0, 0]), ctx)
        close(a, [1 / 1.001, -1 / 1.001, 0])
        assert ctx.loss_mask.tolist() == [True, True, False]
        assert ctx.metrics["mc_grpo/pivots"] == 1.0
        close(est("mc_grpo")(t([3, 1, 2]), ids([0, 0, 0]), AdvantageContext(), scale="none"), [1, -1, 0])

    def test_ties_pick_lowest_row_and_mad_zero(self):
        # [1, 1, 1, 0, 5] sorted 0,1,1,1,5 → median 1; rows 0,1,2 equal it → pivot row 0
        # |dev| = [0,0,0,1,4] → MAD 0 → A = dev / 1e-3 = [0, 0, 0, −1000, 4000] (the reference's behaviour)
        ctx = AdvantageContext()
        a = est("mc_grpo")(t([1, 1, 1, 0, 5]), ids([0] * 5), ctx)
        close(a, [0, 0, 0, -1000, 4000], rtol=1e-9)
        assert ctx.loss_mask.tolist() == [False, True, True, True, True]

    def test_even_group_uses_lower_median(self):
        # [4, 1, 3, 2] sorted 1,2,3,4 → lower median 2 (row 3) → A = r − 2 = [2, −1, 1, 0]
        ctx = AdvantageContext()
        close(est("mc_grpo")(t([4, 1, 3, 2]), ids([0] * 4), ctx, scale="none"), [2, -1, 1, 0])
        assert ctx.loss_mask.tolist() == [True, True, True, False]

    def test_std_scale_and_existing_mask_is_kept(self):
        # [3, 1, 2]: std (unbiased) = 1 → A = [1/1.001, −1/1.001, 0]; a row already masked stays masked
        ctx = AdvantageContext(loss_mask=torch.tensor([False, True, True]))
        close(est("mc_grpo")(t([3, 1, 2]), ids([0, 0, 0]), ctx, scale="std"), [1 / 1.001, -1 / 1.001, 0])
        assert ctx.loss_mask.tolist() == [False, True, False]

    def test_needs_ctx_and_valid_scale(self):
        with pytest.raises(ValueError, match="'mc_grpo'"):
            est("mc_grpo")(t([1, 0, 1]), ids([0, 0, 0]))
        with pytest.raises(ValueError, match="scale"):
            est("mc_grpo")(t([1, 0, 1]), ids([0, 0, 0]), AdvantageContext(), scale="iqr")

    @FAST
    @given(rg=grouped(small_ints, min_size=1, max_size=7, nan=True), scale=st.sampled_from(["mad", "none", "std"]))
    def test_one_pivot_per_group(self, rg, scale):
        rewards, gids = rg
        ctx = AdvantageContext()
        a = est("mc_grpo")(t(rewards), ids(gids), ctx, scale=scale)
        masked = [i for i, keep in enumerate(ctx.loss_mask.tolist()) if not keep]
        ms = members(rewards, gids)
        assert ctx.metrics["mc_grpo/pivots"] == len(ms) == len(masked)
        for g, rows in ms.items():
            pivots = [i for i in masked if gids[i] == g]
            assert len(pivots) == 1                                     # exactly one pivot per group
            vals = sorted(r for _, r in rows)
            med = vals[(len(vals) - 1) // 2]                            # lower median
            assert pivots[0] == min(i for i, r in rows if r == med)     # lowest row index equal to it
            assert a[pivots[0]].item() == 0.0
            if scale == "none" and len(rows) >= 2:
                for i, r in rows:
                    assert a[i].item() == pytest.approx(r - med)
        for i, r in enumerate(rewards):
            if math.isnan(r):
                assert a[i].item() == 0.0 and i not in masked

    def test_pivot_gets_zero_gradient_through_policy_objective(self):
        torch.manual_seed(0)
        rewards, gids = t([3, 1, 2, 0, 1, 1]), ids([0, 0, 0, 1, 1, 1])
        ctx = AdvantageContext()
        adv = compute_advantages("mc_grpo", rewards, gids, ctx, scale="none")
        pivots = (~ctx.loss_mask).nonzero().flatten().tolist()
        assert pivots == [2, 4]                       # group 1: [0,1,1] median 1 → lowest equal row 4
        parts = ObjectiveParts(
            ratio_level=RATIO_LEVELS.get("token"), surrogate=POLICY_LOSSES.get("ppo_clip"),
            aggregation=AGGREGATIONS.get("token_mean"), surrogate_options={"eps_low": 0.2, "eps_high": 0.2},
            kl_coef=0.1, kl_estimator=KL_ESTIMATORS.get("k3"),
        )
        old = -torch.rand(6, 4) - 0.1
        ref = old - 0.3
        completion = torch.ones(6, 4)

        def grads(mask):
            logp = (old + 0.05 * torch.randn(6, 4)).requires_grad_()
            out = policy_objective(parts, logp, old, adv, mask, StepCounts.of(mask, 4), ref_logp=ref)
            out.loss.backward()
            return logp.grad.abs().sum(-1)

        masked = grads(completion * ctx.loss_mask.float().unsqueeze(-1))
        for i in range(6):
            assert (masked[i] == 0) == (i in pivots)
        unmasked = grads(completion)                  # without the mask the KL term moves the pivot
        assert all(unmasked[i] > 0 for i in pivots)


# =============================================================================================
# NGRPO: virtual max-reward sample
# =============================================================================================

class TestNGRPO:
    def test_hand_computed(self):
        # all-zero group of 4 + virtual 1: μ' = 1/5 = 0.2, Σ(dev²) = 4·0.04 + 0.64 = 0.8, σ' = √(0.8/4) = 0.4472136
        # → A = −0.2 / (0.4472136 + 1e-4) = −0.4471136
        # group [1, 0] + virtual 1: μ' = 2/3, Σ(dev²) = 1/9 + 4/9 + 1/9 = 2/3, σ' = √(1/3) = 0.5773503
        # → A = [(1/3)/0.5774503, (−2/3)/0.5774503] = [0.5772503, −1.1545006]
        a = est("ngrpo")(t([0, 0, 0, 0, 1, 0]), ids([0, 0, 0, 0, 1, 1]))
        z = -0.2 / (math.sqrt(0.2) + 1e-4)
        s = math.sqrt(1 / 3) + 1e-4
        close(a, [z] * 4 + [(1 / 3) / s, (-2 / 3) / s])
        assert z == pytest.approx(-0.4471136, abs=1e-6)

    def test_two_virtual_samples_and_max_reward(self):
        # [0, 0] with k = 2 virtual samples of R = 2: values [0,0,2,2], μ' = 1, σ' (unbiased) = √(4/3)
        # → A = −1 / (1.1547005 + 1e-4) = −0.8659504
        a = est("ngrpo")(t([0, 0]), ids([0, 0]), max_reward=2.0, num_virtual=2)
        close(a, [-1 / (math.sqrt(4 / 3) + 1e-4)] * 2)
        with pytest.raises(ValueError, match="num_virtual"):
            est("ngrpo")(t([0, 0]), ids([0, 0]), num_virtual=0)

    @FAST
    @given(n=st.integers(2, 8), rmax=st.floats(0.1, 10), k=st.integers(1, 3))
    def test_all_wrong_group_is_strictly_negative_and_all_max_is_zero(self, n, rmax, k):
        a = est("ngrpo")(torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.long),
                         max_reward=rmax, num_virtual=k)
        assert (a < 0).all()
        b = est("ngrpo")(torch.full((n,), rmax, dtype=torch.float64), torch.zeros(n, dtype=torch.long),
                         max_reward=rmax, num_virtual=k)
        close(b, [0.0] * n, atol=1e-9)

    @FAST
    @given(rg=grouped(st.floats(0, 1), nan=True), unbiased=st.booleans())
    def test_against_loop(self, rg, unbiased):
        rewards, gids = rg
        a = est("ngrpo")(t(rewards), ids(gids), std_unbiased=unbiased)
        expected = [0.0] * len(rewards)
        for ms in members(rewards, gids).values():
            if len(ms) < 2:
                continue
            vals = [r for _, r in ms] + [1.0]
            for i, r in ms:
                expected[i] = (r - mean(vals)) / (std(vals, unbiased) + 1e-4)
        close(a, expected, atol=1e-7, rtol=1e-7)


# =============================================================================================
# BNPO: Beta normalization with state
# =============================================================================================

def beta_pdf(p, a, b):
    return math.exp((a - 1) * math.log(p) + (b - 1) * math.log(1 - p)
                    - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)))


BNPO_R = [1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]
BNPO_G = [0] * 4 + [1] * 4 + [2] * 4


class TestBNPO:
    def test_hand_computed_and_state(self):
        # p = [0.25, 0.5, 0.75] → μ = 0.5, σ² = (0.0625 + 0 + 0.0625)/2 = 0.0625
        # μ(1−μ)/σ² − 1 = 0.25/0.0625 − 1 = 3 → a = b = 1.5 → α = β = 1 + 1.5/3 = 1.5
        # Beta(1.5,1.5): B = Γ(1.5)²/Γ(3) = π/8 = 0.3926991; f(0.25) = √0.1875/0.3926991 = 1.1026578,
        # f(0.5) = 0.5/0.3926991 = 1.2732395
        # group 0: (1 − 0.25)/1.1026578 = 0.6801750, (0 − 0.25)/1.1026578 = −0.2267250
        # group 1: ±0.5/1.2732395 = ±0.3926991;  group 2: 0.2267250, −0.6801750
        ctx = AdvantageContext()
        a = est("bnpo")(t(BNPO_R), ids(BNPO_G), ctx)
        u, v, w = 0.6801750, 0.2267250, 0.3926991
        close(a, [u, -v, -v, -v, w, w, -w, -w, v, v, v, -u])
        assert ctx.state["bnpo"] == {"alpha": 1.5, "beta": 1.5, "p_mean": 0.5, "p_var": 0.0625, "steps": 1}
        assert ctx.metrics["bnpo/alpha"] == 1.5 and ctx.metrics["bnpo/beta"] == 1.5

    def test_state_round_trips_through_json_and_second_call_uses_it(self):
        ctx = AdvantageContext()
        est("bnpo")(t(BNPO_R), ids(BNPO_G), ctx, momentum=0.5)
        restored = AdvantageContext(state=json.loads(json.dumps(ctx.state)))
        assert restored.state == ctx.state
        # second batch: p = [0.25, 0.25] → batch σ² = 0; with momentum 0.5 and the stored moments:
        # μ = 0.5·0.5 + 0.5·0.25 = 0.375, σ² = 0.5·0.0625 + 0.5·0 = 0.03125
        # c = 0.375·0.625/0.03125 − 1 = 6.5 → α = 1 + 6.5·0.375/3 = 1.8125, β = 1 + 6.5·0.625/3 = 2.3541667
        r2, g2 = t([1, 0, 0, 0, 0, 0, 1, 0]), ids([0] * 4 + [1] * 4)
        a = est("bnpo")(r2, g2, restored, momentum=0.5)
        alpha, beta = 1.8125, 1 + 6.5 * 0.625 / 3
        assert restored.state["bnpo"]["alpha"] == pytest.approx(alpha)
        assert restored.state["bnpo"]["beta"] == pytest.approx(beta)
        assert restored.state["bnpo"]["steps"] == 2
        f = beta_pdf(0.25, alpha, beta)
        close(a, [0.75 / f, -0.25 / f, -0.25 / f, -0.25 / f, -0.25 / f, -0.25 / f, 0.75 / f, -0.25 / f])
        # a fresh state: σ² = 0 and nothing stored → Beta(1, 1), A = s − p
        fresh = est("bnpo")(r2, g2, AdvantageContext(), momentum=0.5)
        close(fresh, [0.75, -0.25, -0.25, -0.25, -0.25, -0.25, 0.75, -0.25])
        assert not torch.allclose(a, fresh)

    def test_degenerate_batch_reuses_stored_beta(self):
        # stored α = β = 1.5; one group [1, 0] (p = 0.5) cannot be fitted → f(0.5) = 1.2732395 → ±0.3926991
        ctx = AdvantageContext()
        est("bnpo")(t(BNPO_R), ids(BNPO_G), ctx)
        ctx = AdvantageContext(state=json.loads(json.dumps(ctx.state)))
        close(est("bnpo")(t([1, 0]), ids([0, 0]), ctx), [0.3926991, -0.3926991])
        assert ctx.state["bnpo"]["alpha"] == 1.5

    def test_reward_range_mapping_and_errors(self):
        # rewards in [−1, 1] with min_value −1: s = (r + 1)/2 → the BNPO_R batch mapped to {−1, 1}
        r = t([2 * x - 1 for x in BNPO_R])
        close(est("bnpo")(r, ids(BNPO_G), min_value=-1.0), est("bnpo")(t(BNPO_R), ids(BNPO_G)))
        with pytest.raises(ValueError, match="'bnpo'.*min_value, max_value"):
            est("bnpo")(t([2, 0]), ids([0, 0]))


# =============================================================================================
# Stratified GRPO
# =============================================================================================

class TestStratified:
    def test_hand_computed(self):
        # group [0.5, 0.2, 0.9] with strata a, a, b (λ = 0.8):
        #   SAN: stratum a = [0.5, 0.2]: mean 0.35, std √0.045 = 0.2121320 → ±0.15/0.2122320 = ±0.7067736;
        #        stratum b alone → 0
        #   GN:  mean 0.5333333, std 0.3511885 → [−0.0948888, −0.9488878, 1.0437766]
        #   A = 0.8·SAN + 0.2·GN = [0.5464411, −0.7551964, 0.2087553]
        ctx = ctx_for(3, k=["a", "a", "b"])
        a = est("stratified")(t([0.5, 0.2, 0.9]), ids([0, 0, 0]), ctx, key="k")
        san = 0.15 / (math.sqrt(0.045) + 1e-4)
        gn = [(x - 1.6 / 3) / (std([0.5, 0.2, 0.9]) + 1e-4) for x in (0.5, 0.2, 0.9)]
        close(a, [0.8 * san + 0.2 * gn[0], -0.8 * san + 0.2 * gn[1], 0.2 * gn[2]])
        close(a, [0.5464411, -0.7551964, 0.2087553])

    def test_strata_are_formed_inside_each_group_and_unhashable_values_work(self):
        # the same stratum value in two groups is two cells: group 0 [1, 0] and group 1 [5, 3], all stratum [1]
        ctx = ctx_for(4, k=[[1], [1], [1], [1]])
        a = est("stratified")(t([1, 0, 5, 3]), ids([0, 0, 1, 1]), ctx, key="k", blend=1.0)
        close(a, group_mean_std_advantage(t([1, 0, 5, 3]), ids([0, 0, 1, 1])))

    def test_missing_column_raises(self):
        with pytest.raises(ValueError, match=r"'stratified'.*ctx\.columns\['calls'\]"):
            est("stratified")(t([1, 0]), ids([0, 0]), AdvantageContext(), key="calls")
        with pytest.raises(ValueError, match="blend"):
            est("stratified")(t([1, 0]), ids([0, 0]), ctx_for(2, k=[0, 0]), key="k", blend=1.5)

    @FAST
    @given(rg=grouped(floats, nan=True), blend=st.sampled_from([0.0, 0.3, 1.0]))
    def test_one_stratum_equals_grpo(self, rg, blend):
        rewards, gids = rg
        ctx = ctx_for(len(rewards), k=[7] * len(rewards))
        a = est("stratified")(t(rewards), ids(gids), ctx, key="k", blend=blend)
        close(a, group_mean_std_advantage(t(rewards), ids(gids)), atol=1e-9, rtol=1e-9)

    @FAST
    @given(rg=grouped(floats, nan=True), data=st.data())
    def test_blend_endpoints(self, rg, data):
        rewards, gids = rg
        strata = data.draw(st.lists(st.sampled_from(["x", "y", 3]), min_size=len(rewards), max_size=len(rewards)))
        ctx = ctx_for(len(rewards), k=strata)
        # λ = 0: the group estimate; λ = 1: GRPO inside each (group, stratum) cell
        close(est("stratified")(t(rewards), ids(gids), ctx, key="k", blend=0.0),
              group_mean_std_advantage(t(rewards), ids(gids)), atol=1e-9, rtol=1e-9)
        cells = {}
        cell_ids = [cells.setdefault((g, repr(s)), len(cells)) for g, s in zip(gids, strata)]
        close(est("stratified")(t(rewards), ids(gids), ctx, key="k", blend=1.0),
              group_mean_std_advantage(t(rewards), ids(cell_ids)), atol=1e-9, rtol=1e-9)


# =============================================================================================
# DCPO smooth advantage standardization
# =============================================================================================

def sas_reference(rewards, hist):
    """One prompt, plain Python: (advantages, new history) from the DCPO formulas; hist = (t, μ, σ)."""
    t_, mu_old, sd_old = hist
    mu_new, sd_new = mean(rewards), std(rewards)
    if t_ == 0:
        mu_tot, sd_tot = mu_new, sd_new
    else:
        mu_tot = (t_ * mu_old + mu_new) / (t_ + 1)
        sd_tot = math.sqrt((t_ * sd_old ** 2 + sd_new ** 2 + t_ / (t_ + 1) * (mu_new - mu_old) ** 2) / (t_ + 1))
    i = t_ + 1
    out = []
    for r in rewards:
        a_new = (r - mu_new) / sd_new if sd_new > 1e-6 else 0.0
        a_tot = (r - mu_tot) / sd_tot if sd_tot > 1e-6 else 0.0
        sa1 = a_tot / i + (1 - 1 / i) * a_new
        sa2 = a_new / i + (1 - 1 / i) * a_tot
        out.append(sa1 if abs(sa1) < abs(sa2) else sa2)
    return out, (i, mu_tot, sd_tot)


class TestDCPOSAS:
    def test_hand_computed_two_steps_with_json_state(self):
        # step 1, prompt "p" first seen, [1,0,0,1]: GRPO without ε: mean 0.5, std 0.5773503 → ±0.8660254
        ctx = ctx_for(4, prompt_index=["p"] * 4)
        a1 = est("dcpo_sas")(t([1, 0, 0, 1]), ids([0] * 4), ctx)
        close(a1, [0.8660254, -0.8660254, -0.8660254, 0.8660254])
        assert ctx.state["dcpo_sas"]["p"] == [1, 0.5, pytest.approx(math.sqrt(1 / 3))]
        # step 2, same prompt, all wrong [0,0,0,0]: t = 1, μ_new = 0, σ_new = 0
        # μ_tot = (0.5 + 0)/2 = 0.25; σ²_tot = (1/3 + 0 + ½·0.25)/2 = 0.2291667, σ_tot = 0.4787136
        # Â_new = 0, Â_tot = −0.25/0.4787136 = −0.5222329; i = 2: SA_1 = SA_2 = −0.2611165
        state = json.loads(json.dumps(ctx.state))
        ctx2 = AdvantageContext(columns={"prompt_index": ["p"] * 4}, state=state)
        a2 = est("dcpo_sas")(t([0, 0, 0, 0]), ids([0] * 4), ctx2)
        close(a2, [-0.2611165] * 4)
        assert ctx2.state["dcpo_sas"]["p"] == [2, 0.25, pytest.approx(math.sqrt(0.2291667), abs=1e-7)]
        assert ctx2.metrics["dcpo_sas/revisited"] == 1.0
        json.dumps(ctx2.state)

    def test_third_step_against_reference_loop_and_two_prompts(self):
        ctx = ctx_for(6, prompt_index=[4, 4, 4, 9, 9, 9])
        hist = {4: (0, 0.0, 0.0), 9: (0, 0.0, 0.0)}
        batches = [([1, 0, 0], [0.2, 0.4, 0.9]), ([1, 1, 1], [0.0, 0.5, 0.5]), ([1, 1, 0], [0.3, 0.3, 0.3])]
        for b4, b9 in batches:
            a = est("dcpo_sas")(t(b4 + b9), ids([0, 0, 0, 1, 1, 1]), ctx)
            e4, hist[4] = sas_reference(b4, hist[4])
            e9, hist[9] = sas_reference(b9, hist[9])
            close(a, e4 + e9)
            ctx.state = json.loads(json.dumps(ctx.state))
        assert ctx.state["dcpo_sas"]["4"][0] == 3 and ctx.state["dcpo_sas"]["9"][0] == 3

    def test_without_std_and_errors(self):
        # first visit without normalization: A = r − μ_new = [0.5, −0.5]
        ctx = ctx_for(2, prompt_index=[0, 0])
        close(est("dcpo_sas")(t([1, 0]), ids([0, 0]), ctx, normalize_by_std=False), [0.5, -0.5])
        with pytest.raises(ValueError, match=r"'dcpo_sas'.*ctx\.columns\['prompt_index'\]"):
            est("dcpo_sas")(t([1, 0]), ids([0, 0]), AdvantageContext())
        with pytest.raises(ValueError, match="'dcpo_sas'"):
            est("dcpo_sas")(t([1, 0]), ids([0, 0]))

    @FAST
    @given(rg=grouped(floats, min_size=2, nan=True))
    def test_first_visit_is_grpo_without_eps(self, rg):
        rewards, gids = rg
        ctx = ctx_for(len(rewards), prompt_index=[f"q{g}" for g in gids])
        a = est("dcpo_sas")(t(rewards), ids(gids), ctx)
        expected = [0.0] * len(rewards)
        for ms in members(rewards, gids).values():
            if len(ms) >= 2 and std([r for _, r in ms]) > 1e-6:
                for i, r in ms:
                    expected[i] = (r - mean([x for _, x in ms])) / std([x for _, x in ms])
        close(a, expected, atol=1e-7, rtol=1e-7)


# =============================================================================================
# Properties shared by the family
# =============================================================================================

CENTRED = ["batch_std", "reinforce_pp_baseline", "opo", "gpg", "passk", "mc_grpo", "bnpo", "stratified", "dcpo_sas"]


def call(name, rewards, gids, lengths=None):
    n = len(rewards)
    ctx = ctx_for(n, lengths=lengths if lengths is not None else [3] * n, k=[g % 2 for g in gids],
                  prompt_index=list(gids))
    options = {"key": "k"} if name == "stratified" else {}
    rewards_t = torch.tensor(rewards, dtype=torch.float64)
    if name == "bnpo":
        rewards_t = rewards_t / 4           # BNPO needs rewards in [0, 1]
    return est(name)(rewards_t, ids(gids), ctx, **options), ctx


class TestFamilyProperties:
    @FAST
    @given(rg=grouped(small_ints, nan=True), name=st.sampled_from(NEW))
    def test_nan_rows_get_zero_and_outputs_are_finite(self, rg, name):
        rewards, gids = rg
        a, _ = call(name, rewards, gids, lengths=[1 + i % 4 for i in range(len(rewards))])
        assert torch.isfinite(a).all()
        for i, r in enumerate(rewards):
            if math.isnan(r):
                assert a[i].item() == 0.0

    @FAST
    @given(rg=grouped(small_ints, min_size=2, nan=True), c=small_ints, n=st.integers(1, 6),
           name=st.sampled_from(CENTRED))
    def test_constant_group_gets_zero(self, rg, c, n, name):
        rewards, gids = rg
        cg = max(gids) + 2
        rewards, gids = rewards + [c] * n, gids + [cg] * n
        a, _ = call(name, rewards, gids)    # equal lengths: REINFORCE++-baseline's whitening mean is 0
        close(a[-n:], torch.zeros(n, dtype=torch.float64), atol=1e-8, rtol=0)

    @pytest.mark.parametrize("name", NEW)
    def test_float32_in_float32_out_through_compute_advantages(self, name):
        ctx = ctx_for(6, lengths=[1, 2, 3, 4, 5, 6], k=[0, 1, 0, 1, 0, 1], prompt_index=[0, 0, 0, 1, 1, 1])
        options = {"key": "k"} if name == "stratified" else {}
        a = compute_advantages(name, torch.tensor([1.0, 0, 1, 0, 0, 1]), ids([0, 0, 0, 1, 1, 1]), ctx, **options)
        assert a.dtype == torch.float32 and a.shape == (6,) and torch.isfinite(a).all()
