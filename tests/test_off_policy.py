"""Off-policy rows: LUFFY/AMPO policy shaping, RePO replay ratio, advantages and loss split."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from groupwise.algorithms.off_policy import (
    luffy_shaped_surrogate,
    repo_advantages,
    repo_objective,
    replay_log_ratio,
)

f64 = torch.float64


def _shaped(p: list[list[float]], adv, gamma=0.1, mask=None):
    logp = torch.log(torch.tensor(p, dtype=f64)).requires_grad_()
    m = torch.ones_like(logp) if mask is None else torch.tensor(mask, dtype=f64)
    loss = luffy_shaped_surrogate(logp, torch.as_tensor(adv, dtype=f64), m, gamma=gamma)
    loss.sum().backward()
    return loss.detach(), logp.grad


# ------------------------------------------------------------------------ LUFFY shaping by hand

def test_luffy_value_and_gradient_by_hand():
    # p = 0.5, 0.1, 0.9; γ = 0.1; A = 2
    loss, grad = _shaped([[0.5, 0.1, 0.9]], [2.0])
    # ℓ = −A p/(p+γ): −2·0.5/0.6, −2·0.1/0.2, −2·0.9/1.0
    assert loss.tolist()[0] == pytest.approx([-5 / 3, -1.0, -1.8])
    # ∂ℓ/∂logp = −A γ p/(p+γ)²: −2·0.05/0.36, −2·0.01/0.04, −2·0.09/1.0
    assert grad.tolist()[0] == pytest.approx([-0.1 / 0.36, -0.5, -0.18])


def test_luffy_token_level_advantages_mask_and_gamma():
    loss, grad = _shaped([[0.5, 0.5], [0.25, 0.25]], [[1.0, -1.0], [2.0, 0.0]], gamma=0.5, mask=[[1, 0], [1, 1]])
    assert torch.allclose(loss, torch.tensor([[-0.5, 0.0], [-2 / 3, 0.0]], dtype=f64))
    # γ p/(p+γ)² at p = 0.5, γ = 0.5: 0.25; at p = 0.25: 0.125/0.5625
    assert torch.allclose(grad, torch.tensor([[-0.25, 0.0], [-2 * 0.125 / 0.5625, 0.0]], dtype=f64))


def test_luffy_rejects_bad_input():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="gamma"):
        luffy_shaped_surrogate(logp, torch.zeros(2), torch.ones(2, 3), gamma=0.0)
    with pytest.raises(ValueError, match="adv"):
        luffy_shaped_surrogate(logp, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        luffy_shaped_surrogate(logp, torch.zeros(2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="logp"):
        luffy_shaped_surrogate(torch.zeros(3), torch.zeros(3), torch.ones(3))


logps = st.lists(st.floats(min_value=-30.0, max_value=0.0, allow_nan=False), min_size=1, max_size=12)
gammas = st.floats(min_value=1e-3, max_value=2.0)


@settings(max_examples=60, deadline=None)
@given(logps, gammas)
def test_luffy_shaping_bounded_monotone_and_gradient_formula(values, gamma):
    logp = torch.tensor([sorted(values)], dtype=f64, requires_grad=True)
    loss = luffy_shaped_surrogate(logp, torch.ones(1, dtype=f64), torch.ones_like(logp), gamma=gamma)
    f = -loss.detach()[0]
    assert (f >= 0).all() and (f <= 1 / (1 + gamma) + 1e-12).all() and (f < 1).all()
    assert (f[1:] >= f[:-1]).all()                       # monotone in p
    loss.sum().backward()
    p = torch.exp(logp.detach()[0])
    assert torch.allclose(-logp.grad[0], gamma * p / (p + gamma) ** 2, rtol=1e-9, atol=1e-15)


@settings(max_examples=30, deadline=None)
@given(gammas)
def test_luffy_gradient_weight_peaks_at_gamma_vanishes_at_zero_and_is_small_at_one(gamma):
    def weight(p):
        logp = torch.tensor([[math.log(p)]], dtype=f64, requires_grad=True)
        luffy_shaped_surrogate(logp, torch.ones(1, dtype=f64), torch.ones_like(logp), gamma=gamma).sum().backward()
        return float(-logp.grad)

    peak = weight(gamma) if gamma <= 1 else None
    if peak is not None:
        assert peak == pytest.approx(0.25)               # γ·γ/(2γ)² = 1/4
        assert weight(gamma / 3) < peak and (gamma * 3 > 1 or weight(gamma * 3) < peak)
    assert weight(1e-12) < 1e-9                          # → 0 as p → 0
    assert weight(1.0) == pytest.approx(gamma / (1 + gamma) ** 2)   # at p = 1: γ/(1+γ)², → 0 as γ → 0


# ------------------------------------------------------------------------ RePO

def test_replay_log_ratio_values_mask_and_clamp():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -50.0, 0.0]])
    beh = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -1.0, -40.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    lr = replay_log_ratio(logp, beh, mask)
    assert torch.allclose(lr, torch.tensor([[0.5, -1.0, 0.0], [0.0, -20.0, 20.0]]))
    with pytest.raises(ValueError, match="behaviour_logp"):
        replay_log_ratio(logp, beh[:, :2], mask)


def test_repo_advantages_split_and_mixed_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    group = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    replay = torch.tensor([False, False, False, True, True, True, False, True])
    # split: group 0 on-policy [1,0,1] (mean 2/3, unbiased std √(1/3)); replayed [0,1,1] (mean 2/3)
    # group 1: one on-policy and one replayed row → sets of one → 0
    s = math.sqrt(1 / 3) + 1e-4
    adv = repo_advantages(rewards, group, replay)
    assert adv.tolist() == pytest.approx([1 / 3 / s, -2 / 3 / s, 1 / 3 / s, -2 / 3 / s, 1 / 3 / s, 1 / 3 / s, 0.0, 0.0], rel=1e-6)
    # mixed: group 0 = [1,0,1,0,1,1], mean 2/3, unbiased std √(4/15); group 1 = [0,0] → 0
    s2 = math.sqrt(4 / 15) + 1e-4
    mixed = repo_advantages(rewards, group, replay, mode="mixed")
    assert mixed[:6].tolist() == pytest.approx([(r - 2 / 3) / s2 for r in [1, 0, 1, 0, 1, 1]], rel=1e-6)
    assert mixed[6:].tolist() == [0.0, 0.0]
    centred = repo_advantages(rewards, group, replay, scale_std=False)
    assert centred[:3].tolist() == pytest.approx([1 / 3, -2 / 3, 1 / 3])


def test_repo_advantages_reject_bad_input():
    r, g, b = torch.ones(3), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="mode"):
        repo_advantages(r, g, b, mode="joint")
    with pytest.raises(ValueError, match="row 1"):
        repo_advantages(torch.tensor([0.0, math.nan, 1.0]), g, b)
    with pytest.raises(ValueError, match="is_replay"):
        repo_advantages(r, g, b[:2])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.floats(-5, 5)), min_size=1, max_size=24))
def test_repo_split_advantages_are_centred_in_each_set(rows):
    group = torch.tensor([r[0] for r in rows])
    replay = torch.tensor([r[1] for r in rows])
    rewards = torch.tensor([r[2] for r in rows], dtype=f64)
    adv = repo_advantages(rewards, group, replay, scale_std=False)
    for g in range(4):
        for flag in (False, True):
            sel = (group == g) & (replay == flag)
            if sel.any():
                assert float(adv[sel].sum()) == pytest.approx(0.0, abs=1e-9)


def test_repo_objective_splits_on_and_off_rows():
    loss = torch.tensor([[1.0, 3.0], [2.0, 0.0], [4.0, 8.0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    replay = torch.tensor([False, False, True])
    # per-row means 2, 2, 6; seq-mean over all N = 3 rows: on = (2+2)/3, off = 6/3
    assert float(repo_objective(loss, mask, replay)) == pytest.approx(4 / 3 + 2.0)
    assert float(repo_objective(loss, mask, replay, off_policy_coef=0.5)) == pytest.approx(4 / 3 + 1.0)
    # token-mean per part: on = (1+3+2)/3, off = 12/2
    assert float(repo_objective(loss, mask, replay, aggregation="token_mean")) == pytest.approx(2.0 + 6.0)
    assert float(repo_objective(loss, mask, torch.zeros(3, dtype=torch.bool), aggregation="token_mean")) == pytest.approx(18 / 5)
    with pytest.raises(ValueError, match="aggregation"):
        repo_objective(loss, mask, replay, aggregation="sum")
