"""Filters (DAPO dynamic sampling, GFPO, D³S, 80/20 entropy mask) and coefficient controllers.

Hand-computed examples (the arithmetic is in the comments), then hypothesis properties whose
expectations are computed independently of the code under test (plain Python loops, brute force
over subsets, `torch.quantile`).
"""
from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from groupwise.algorithms.controllers import (
    AdaptiveEntropyController,
    AdaptiveKLController,
    FixedKLController,
    kl_in_reward,
    sequence_kl,
    token_mean_kl,
)
from groupwise.algorithms.filters import (
    d3s_sample_keep,
    d3s_token_mask,
    dynamic_sampling_keep,
    gfpo_keep,
    select_groups,
    top_entropy_token_mask,
)

NAN = float("nan")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def ids(x):
    return torch.tensor(x, dtype=torch.long)


def bools(x):
    return torch.tensor(x, dtype=torch.bool)


def pop_var(xs):
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / len(xs)


# =============================================================================================
# Hand-computed examples
# =============================================================================================

class TestDynamicSampling:
    def test_keep(self):
        # g0 [1,0,1] varies → keep; g1 [1,1,1] constant → drop; g2 [NaN,2,2] → valid {2,2} constant → drop;
        # g3 [NaN,NaN] no valid reward → drop; g4 [5] singleton → drop (kept with keep_singletons)
        r = t([1, 0, 1, 1, 1, 1, NAN, 2, 2, NAN, NAN, 5])
        g = ids([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4])
        assert dynamic_sampling_keep(r, g).tolist() == [True, False, False, False, False]
        assert dynamic_sampling_keep(r, g, keep_singletons=True).tolist() == [True, False, False, False, True]

    def test_select_groups(self):
        # rows' groups: [2,0,1,3,0,2,3,1]; kept groups {0,2,3}; the first two in id order are 0 and 2
        # → rows holding group 0 or 2: 0,1,4,5
        keep = bools([True, False, True, True])
        g = ids([2, 0, 1, 3, 0, 2, 3, 1])
        assert select_groups(keep, g, 2).tolist() == [0, 1, 4, 5]
        # target 5 > 3 kept: every kept group (0,2,3) → rows 0,1,3,4,5,6; target 0 → nothing
        assert select_groups(keep, g, 5).tolist() == [0, 1, 3, 4, 5, 6]
        assert select_groups(keep, g, 0).tolist() == []
        assert select_groups(keep, g, 2).dtype == torch.long


class TestGFPO:
    # g0 = rows 0-3: lengths [10,5,7,5], rewards [1,0,1,1]; g1 = rows 4-6: lengths [3,9,4], rewards [0,1,1]
    r = t([1, 0, 1, 1, 0, 1, 1])
    g = ids([0, 0, 0, 0, 1, 1, 1])
    lengths = ids([10, 5, 7, 5, 3, 9, 4])

    def test_length(self):
        # g0: two shortest are the 5s (rows 1, 3); g1: 3 (row 4) and 4 (row 6)
        keep = gfpo_keep(self.r, self.g, self.lengths, 2, "length")
        assert keep.tolist() == [False, True, False, True, True, False, True]

    def test_token_efficiency(self):
        # g0 reward/length = [0.1, 0, 0.142857, 0.2] → rows 3, 2; g1 = [0, 0.1111, 0.25] → rows 6, 5
        keep = gfpo_keep(self.r, self.g, self.lengths, 2, "token_efficiency")
        assert keep.tolist() == [False, False, True, True, False, True, True]

    def test_ties_by_row_index_and_small_groups(self):
        # all lengths 5 → the lowest row indices win; k=1. g1 has one row → kept (min(k, 1) = 1)
        keep = gfpo_keep(t([0, 1, 0, 1]), ids([0, 0, 0, 1]), ids([5, 5, 5, 5]), 1, "length")
        assert keep.tolist() == [True, False, False, True]
        # k ≥ group size keeps everything
        assert gfpo_keep(self.r, self.g, self.lengths, 9, "length").all()

    def test_nan_reward_ranks_last_for_efficiency(self):
        # efficiencies [NaN, 0, 0.5]: k=2 keeps rows 2 and 1, not the NaN
        keep = gfpo_keep(t([NAN, 0, 1]), ids([0, 0, 0]), ids([1, 1, 2]), 2, "token_efficiency")
        assert keep.tolist() == [False, True, True]

    def test_per_group_k(self):
        # adaptive difficulty: k = 1 for g0, 3 for g1
        keep = gfpo_keep(self.r, self.g, self.lengths, ids([1, 3]), "length")
        assert keep.tolist() == [False, True, False, False, True, True, True]

    def test_unknown_metric(self):
        with pytest.raises(ValueError, match="token_efficiency"):
            gfpo_keep(self.r, self.g, self.lengths, 2, "reward")


class TestD3S:
    def test_sample_keep_k2(self):
        # advantages [3,1,0,−1,−5], k=2: candidate splits (j from the bottom, 2−j from the top)
        #   j=0 {3,1}: var 1;  j=1 {−5,3}: mean −1, var 16;  j=2 {−5,−1}: var 4 → j=1: rows 0 and 4
        keep = d3s_sample_keep(t([3, 1, 0, -1, -5]), ids([0] * 5), 2)
        assert keep.tolist() == [True, False, False, False, True]

    def test_sample_keep_k3_two_groups(self):
        # g0 [3,1,0,−1,−5], k=3:
        #   j=0 {3,1,0}: 10/3 − (4/3)² = 14/9;   j=1 {−5,3,1}: 35/3 − (1/3)² = 104/9
        #   j=2 {−5,−1,3}: 35/3 − 1 = 96/9;      j=3 {−5,−1,0}: 26/3 − 4 = 42/9   → j=1: rows 0,1,4
        # g1 [0.5, −0.5] has 2 ≤ 3 rows → both kept. Rows interleaved to check grouping.
        adv = t([3, 0.5, 1, 0, -0.5, -1, -5])
        g = ids([0, 1, 0, 0, 1, 0, 0])
        assert d3s_sample_keep(adv, g, 3).tolist() == [True, True, True, False, True, False, True]

    def test_sample_keep_k1_and_k0(self):
        # k=1: every singleton has variance 0 → the smallest j (0) wins: the largest advantage
        assert d3s_sample_keep(t([0.2, 0.9, -2.0]), ids([0, 0, 0]), 1).tolist() == [False, True, False]
        assert not d3s_sample_keep(t([0.2, 0.9, -2.0]), ids([0, 0, 0]), 0).any()

    def test_token_mask(self):
        # A = [2, −1] per sequence; scores |A|·H = [[1.0, 2.0, 0.2], [3.0, 0.2, (0.4 masked)]], M = 5 valid
        adv = t([2, -1])
        ent = t([[0.5, 1.0, 0.1], [3.0, 0.2, 0.4]])
        mask = t([[1, 1, 1], [1, 1, 0]])
        # ratio 0.4 → ⌈2.0⌉ = 2 tokens: 3.0 at (1,0) and 2.0 at (0,1)
        assert d3s_token_mask(adv, ent, mask, 0.4).tolist() == [[0, 1, 0], [1, 0, 0]]
        # ratio 0.5 → ⌈2.5⌉ = 3: adds 1.0 at (0,0)
        assert d3s_token_mask(adv, ent, mask, 0.5).tolist() == [[1, 1, 0], [1, 0, 0]]
        # ratio 0.7 → ⌈3.5⌉ = 4: 0.2 ties at (0,2) and (1,1); the earlier flat position (0,2) wins
        assert d3s_token_mask(adv, ent, mask, 0.7).tolist() == [[1, 1, 1], [1, 0, 0]]
        # ratio 0.6 → 0.6·5 = 3.0000000000000004 in floating point, still 3 tokens; ratio 0.01 → ⌈0.05⌉ = 1
        assert d3s_token_mask(adv, ent, mask, 0.6).sum() == 3
        assert d3s_token_mask(adv, ent, mask, 0.01).sum() == 1
        # [N, T] advantages give the same result as the broadcast [N] ones; bool masks stay bool
        assert torch.equal(d3s_token_mask(adv.unsqueeze(1).expand(2, 3), ent, mask, 0.4), d3s_token_mask(adv, ent, mask, 0.4))
        out = d3s_token_mask(adv, ent, mask.bool(), 1.0)
        assert out.dtype == torch.bool and torch.equal(out, mask.bool())


class TestTopEntropy:
    # valid entropies (the 9.0 is masked): 0.1 0.9 0.5 0.3 0.7 0.2 0.4 → M = 7
    ent = t([[0.1, 0.9, 0.5, 0.3], [0.7, 0.2, 9.0, 0.4]])
    mask = t([[1, 1, 1, 1], [1, 1, 0, 1]])

    def test_rho_half(self):
        # n = 1 + ⌊0.5·6⌋ = 4 → {0.9, 0.7, 0.5, 0.4}; TRL: quantile_0.5 = median = 0.4, keep H ≥ 0.4
        out = top_entropy_token_mask(self.ent, self.mask, 0.5)
        assert out.tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]

    def test_rho_02(self):
        # n = 1 + ⌊0.2·6⌋ = 2 → {0.9, 0.7}. TRL: sorted [.1,.2,.3,.4,.5,.7,.9], q = 0.8 at position 4.8:
        # 0.5 + 0.8·(0.7 − 0.5) = 0.66 → keep H ≥ 0.66 → the same two tokens
        out = top_entropy_token_mask(self.ent, self.mask, 0.2)
        assert out.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
        thr = torch.quantile(self.ent[self.mask.bool()], 0.8)
        assert torch.equal(out.bool(), (self.ent >= thr) & self.mask.bool())

    def test_rho_one_and_zero(self):
        assert torch.equal(top_entropy_token_mask(self.ent, self.mask, 1.0), self.mask)
        # ρ = 0 keeps the maximum (0.9), never the masked 9.0
        assert top_entropy_token_mask(self.ent, self.mask, 0.0).tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]

    def test_ties_kept(self):
        # entropies [1,1,1,0.5], ρ = 0.25 → n = 1 + ⌊0.75⌋ = 1, threshold 1 → all three ties kept
        out = top_entropy_token_mask(t([[1, 1, 1, 0.5]]), torch.ones(1, 4, dtype=torch.bool), 0.25)
        assert out.tolist() == [[True, True, True, False]]

    def test_float_count(self):
        # ρ = 0.7, M = 11 valid: 0.7·10 = 6.999999999999999 in floating point; still n = 1 + 7 = 8
        ent = torch.arange(11, dtype=torch.float64).unsqueeze(0)
        assert top_entropy_token_mask(ent, torch.ones_like(ent), 0.7).sum() == 8

    def test_bad_rho(self):
        with pytest.raises(ValueError):
            top_entropy_token_mask(self.ent, self.mask, 1.5)


class TestKLControllers:
    def test_fixed(self):
        c = FixedKLController(0.05)
        assert c.update(123.0, 10) == 0.05 and c.coef == 0.05

    def test_adaptive_hand(self):
        c = AdaptiveKLController(init_coef=0.1, target_kl=0.1, horizon=10000)
        # KL 0.2: 0.2/0.1 − 1 = 1 → clipped to 0.2; × (1 + 0.2·256/10000) = 1.00512 → 0.100512
        assert c.update(0.2, n_steps=256) == pytest.approx(0.100512, rel=1e-12)
        # KL 0.05: −0.5 → −0.2; × (1 − 0.2·256/10000) = 0.99488
        assert c.update(0.05, n_steps=256) == pytest.approx(0.100512 * 0.99488, rel=1e-12)
        # KL 0.11: +0.1 (inside the clip); × (1 + 0.1/10000)
        assert c.update(torch.tensor(0.11), n_steps=1) == pytest.approx(0.100512 * 0.99488 * 1.00001, rel=1e-12)
        # NaN leaves it alone
        before = c.coef
        assert c.update(NAN) == before

    def test_invalid(self):
        with pytest.raises(ValueError):
            AdaptiveKLController(0.1, 0.0, 100)
        with pytest.raises(ValueError):
            AdaptiveKLController(0.1, 0.1, 0)


class TestEntropyController:
    def test_hand(self):
        c = AdaptiveEntropyController(coef=0.01, target=0.2, delta=0.005, coef_min=0.0, coef_max=0.02)
        assert c.update(0.1) == pytest.approx(0.015)     # 0.1 ≤ 0.2 → +δ
        assert c.update(0.2) == pytest.approx(0.02)      # at the target counts as ≤ → +δ
        assert c.update(0.1) == pytest.approx(0.02)      # clipped at coef_max
        assert c.update(0.3) == pytest.approx(0.015)     # above → −δ
        for _ in range(5):
            c.update(0.3)
        assert c.coef == 0.0                             # clipped at coef_min
        assert c.active(0.2) and not c.active(0.21)
        c.update(0.1)
        assert c.applied_coef(0.3) == 0.0 and c.applied_coef(0.15) == pytest.approx(0.005)

    def test_invalid(self):
        with pytest.raises(ValueError):
            AdaptiveEntropyController(coef=2.0, coef_max=1.0)


class TestKLInReward:
    logp = t([[-1, -2, -3], [-0.5, -0.5, -0.5]])
    ref = t([[-1.5, -2, -2], [-1, -1, -1]])
    mask = t([[1, 1, 0], [1, 1, 1]])

    def test_k1(self):
        # k1 = logp − ref = [[0.5, 0, −1], [0.5, 0.5, 0.5]]; masked sums [0.5, 1.5]
        # r' = [1 − 0.1·0.5, 0 − 0.1·1.5] = [0.95, −0.15]
        out = kl_in_reward(t([1, 0]), self.logp, self.ref, self.mask, 0.1)
        torch.testing.assert_close(out, t([0.95, -0.15]))
        torch.testing.assert_close(sequence_kl(self.logp, self.ref, self.mask, reduce="mean"), t([0.25, 0.5]))

    def test_k3_nan_and_no_grad(self):
        # δ = ref − logp: row 0 [−0.5, 0, (masked)]: k3(−0.5) = e^−0.5 + 0.5 − 1 = 0.10653066, k3(0) = 0
        # row 1: δ = −0.5 three times → 3 · 0.10653066 = 0.31959198
        logp = self.logp.clone().requires_grad_(True)
        out = kl_in_reward(t([NAN, 2]), logp, self.ref, self.mask, 1.0, estimator="k3")
        k3 = math.exp(-0.5) - 0.5
        assert math.isnan(out[0])
        assert out[1].item() == pytest.approx(2 - 3 * k3)
        assert not out.requires_grad

    def test_token_mean_kl(self):
        # k1 masked values: 0.5, 0 | 0.5, 0.5, 0.5 → 2.0 over 5 tokens; k3: (1 + 0 + 3) · 0.10653066 / 5
        assert token_mean_kl(self.logp, self.ref, self.mask, "k1") == pytest.approx(0.4)
        assert token_mean_kl(self.logp, self.ref, self.mask, "k3") == pytest.approx(4 * (math.exp(-0.5) - 0.5) / 5)
        assert token_mean_kl(self.logp, self.ref, torch.zeros_like(self.mask), "k1") == 0.0

    def test_callable_estimator(self):
        out = kl_in_reward(t([0, 0]), self.logp, self.ref, self.mask, 2.0, estimator=lambda lp, ref: torch.ones_like(lp))
        torch.testing.assert_close(out, t([-4.0, -6.0]))   # −2 · (2 and 3 valid tokens)


# =============================================================================================
# Properties
# =============================================================================================

@st.composite
def grouped(draw, values, min_size=1, max_size=7, max_groups=5):
    """(values, group ids) with variable group sizes, rows shuffled so groups are not contiguous."""
    sizes = draw(st.lists(st.integers(min_size, max_size), min_size=1, max_size=max_groups))
    rows = [(draw(values), g) for g, size in enumerate(sizes) for _ in range(size)]
    rows = draw(st.permutations(rows))
    return [v for v, _ in rows], [g for _, g in rows]


def members(group_ids):
    out: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        out.setdefault(g, []).append(i)
    return out


small_rewards = st.one_of(st.just(NAN), st.integers(0, 2).map(float))


@FAST
@given(grouped(small_rewards))
def test_dynamic_sampling_false_exactly_for_constant_groups(data):
    rewards, gids = data
    keep = dynamic_sampling_keep(t(rewards), ids(gids))
    for g, rows in members(gids).items():
        valid = {rewards[i] for i in rows if not math.isnan(rewards[i])}
        assert bool(keep[g]) == (len(valid) > 1)


@FAST
@given(grouped(small_rewards), st.integers(0, 6))
def test_select_groups_whole_groups(data, target):
    rewards, gids = data
    g = ids(gids)
    keep = dynamic_sampling_keep(t(rewards), g)
    rows = select_groups(keep, g, target)
    chosen = sorted(set(gids[i] for i in rows.tolist()))
    kept_ids = [i for i, k in enumerate(keep.tolist()) if k]
    assert chosen == kept_ids[:target]                                   # the first `target` kept groups
    assert rows.tolist() == sorted(i for i, gi in enumerate(gids) if gi in chosen)   # whole groups, ascending
    assert len(chosen) == min(target, len(kept_ids))                      # exactly `target` when enough


@FAST
@given(grouped(st.tuples(st.integers(0, 3).map(float), st.integers(0, 6))), st.integers(0, 8),
       st.sampled_from(["length", "token_efficiency"]))
def test_gfpo_keeps_min_k_best_per_group(data, k, metric):
    pairs, gids = data
    rewards, lengths = [p[0] for p in pairs], [p[1] for p in pairs]
    keep = gfpo_keep(t(rewards), ids(gids), ids(lengths), k, metric).tolist()
    for rows in members(gids).values():
        if metric == "length":
            key = lambda i: (lengths[i], i)                               # noqa: E731
        else:
            key = lambda i: (-rewards[i] / max(lengths[i], 1), i)         # noqa: E731
        expected = set(sorted(rows, key=key)[:k])
        assert {i for i in rows if keep[i]} == expected
        assert len(expected) == min(k, len(rows))


@FAST
@given(grouped(st.floats(-3, 3, allow_nan=False).map(lambda x: round(x, 3))), st.integers(0, 6))
def test_d3s_sample_keep_maximizes_variance(data, k):
    adv, gids = data
    keep = d3s_sample_keep(t(adv), ids(gids), k).tolist()
    for rows in members(gids).values():
        kept = [adv[i] for i in rows if keep[i]]
        size = min(k, len(rows))
        assert len(kept) == size
        if size:
            best = max(pop_var([adv[i] for i in c]) for c in itertools.combinations(rows, size))
            assert pop_var(kept) == pytest.approx(best, rel=1e-9, abs=1e-12)


@st.composite
def token_batch(draw):
    n, tt = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    cell = st.integers(0, 12).map(lambda x: x / 4)     # a coarse grid: many ties, exact interpolation
    ent = draw(st.lists(st.lists(cell, min_size=tt, max_size=tt), min_size=n, max_size=n))
    mask = draw(st.lists(st.lists(st.booleans(), min_size=tt, max_size=tt), min_size=n, max_size=n))
    adv = draw(st.lists(st.integers(-4, 4).map(lambda x: x / 2), min_size=n, max_size=n))
    return t(ent), torch.tensor(mask), t(adv)


@FAST
@given(token_batch(), st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.booleans())
def test_top_entropy_matches_trl_quantile(batch, rho, float_mask):
    ent, mask, _ = batch
    m = mask.double() if float_mask else mask
    out = top_entropy_token_mask(ent, m, rho)
    assert out.dtype == m.dtype
    kept = out != 0
    assert not (kept & ~mask).any()                                        # never un-masks
    n_valid = int(mask.sum())
    if n_valid == 0:
        assert not kept.any()
        return
    if rho == 1.0:
        assert torch.equal(kept, mask)
    thr = torch.quantile(ent[mask], 1 - rho)                               # TRL's threshold (linear)
    assert torch.equal(kept, (ent >= thr) & mask)
    assert int(kept.sum()) >= 1 + math.floor(rho * (n_valid - 1))          # ties may add more


@FAST
@given(token_batch(), st.integers(0, 100), st.booleans(), st.booleans())
def test_d3s_token_mask_counts_and_never_unmasks(batch, percent, float_mask, token_level_adv):
    ratio = percent / 100
    ent, mask, adv = batch
    m = mask.double() if float_mask else mask
    a = adv.unsqueeze(1).expand_as(ent) if token_level_adv else adv
    out = d3s_token_mask(a, ent, m, ratio)
    kept = out != 0
    assert out.dtype == m.dtype
    assert not (kept & ~mask).any()
    n_valid = int(mask.sum())
    assert int(kept.sum()) == math.ceil(Fraction(percent * n_valid, 100))   # exactly ⌈ratio · M⌉
    score = adv.abs().unsqueeze(1) * ent
    dropped = mask & ~kept
    if kept.any() and dropped.any():
        assert score[kept].min() >= score[dropped].max()


@FAST
@given(st.floats(1e-4, 10), st.floats(1e-3, 1), st.floats(0, 5), st.integers(1, 512), st.floats(600, 1e5))
def test_adaptive_kl_moves_toward_target_and_is_bounded(coef, target, kl, n_steps, horizon):
    c = AdaptiveKLController(coef, target, horizon)
    new = c.update(kl, n_steps)
    if kl > target:
        assert new >= coef
    elif kl < target:
        assert new <= coef
    else:
        assert new == pytest.approx(coef)
    assert abs(new / coef - 1) <= 0.2 * n_steps / horizon * (1 + 1e-9)
    err = min(max(kl / target - 1, -0.2), 0.2)
    assert new == pytest.approx(coef * (1 + err * n_steps / horizon), rel=1e-12)


@FAST
@given(st.lists(st.floats(0, 1), min_size=1, max_size=10))
def test_entropy_controller_stays_in_bounds(entropies):
    c = AdaptiveEntropyController(coef=0.01, target=0.3, delta=0.004, coef_min=0.002, coef_max=0.02)
    for h in entropies:
        before = c.coef
        after = c.update(h)
        assert 0.002 <= after <= 0.02
        assert (after >= before) if h <= 0.3 else (after <= before)


def _round_trip(controller, fresh, measurements):
    state = json.loads(json.dumps(controller.state_dict()))
    fresh.load_state_dict(state)
    assert fresh.state_dict() == controller.state_dict()
    for x in measurements:
        assert fresh.update(x) == controller.update(x)


def test_controllers_state_round_trips_through_json():
    fixed = FixedKLController(0.3)
    _round_trip(fixed, FixedKLController(0.0), [0.1])
    kl = AdaptiveKLController(0.05, 0.1, 1000)
    for x in [0.3, 0.02, 0.12]:
        kl.update(x, 64)
    _round_trip(kl, AdaptiveKLController(1.0, 0.5, 10), [0.2, 0.01])
    ent = AdaptiveEntropyController(0.01, 0.2, 0.005, 0.0, 0.1)
    for x in [0.1, 0.1, 0.5]:
        ent.update(x)
    _round_trip(ent, AdaptiveEntropyController(), [0.1, 0.4])
    with pytest.raises(ValueError, match="adaptive_kl"):
        FixedKLController(0.1).load_state_dict(kl.state_dict())
