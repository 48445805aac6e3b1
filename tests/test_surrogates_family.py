"""The GRPO family's surrogates, the geometric ratio level and the KL variants.

Hand-computed values (the arithmetic is in the comments) on both signs of A, inside and outside
each clip range; then hypothesis properties: masked tokens contribute nothing through
`policy_objective`, gradients match an independently written formula (piecewise forms, Python
loops), all ratio-clip surrogates give −A ∇log π at w = 1, and the straight-through KLs have k_n's
value and k2's gradient.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from groupwise.algorithms import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    RATIO_LEVELS,
    ObjectiveParts,
    StepCounts,
    policy_objective,
)
from groupwise.algorithms.losses import geometric_log_ratio, sequence_log_ratio
from groupwise.algorithms.surrogates import (
    cispo_loss,
    clip_cov_loss,
    dcpo_loss,
    disco_loss,
    dual_clip_loss,
    gmpo_loss,
    kl_cov_loss,
    reinforce_loss,
    sapo_loss,
    two_sided_loss,
)

D = torch.float64
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def t(x):
    return torch.tensor(x, dtype=D)


def close(actual, expected, atol=1e-7, rtol=1e-7):
    torch.testing.assert_close(actual, t(expected) if not isinstance(expected, torch.Tensor) else expected,
                               atol=atol, rtol=rtol)


def lr(ws):
    """log-ratios of the given ratios, as a leaf that collects the gradient."""
    return t([math.log(w) for w in ws]).requires_grad_()


# =============================================================================================
# Registration and docstrings
# =============================================================================================

NEW_LOSSES = ["dual_clip", "two_sided", "cispo", "sapo", "gmpo", "dcpo", "reinforce", "gpg",
              "clip_cov", "kl_cov", "disco"]


@pytest.mark.parametrize("name", NEW_LOSSES)
def test_new_loss_is_registered_with_paper_and_formula(name):
    doc = POLICY_LOSSES.get(name).__doc__ or ""
    assert "arXiv" in doc or "Paper" in doc
    assert "=" in doc and "ℓ" in doc


def test_geometric_ratio_level_and_kl_variants_registered():
    assert RATIO_LEVELS.get("geometric") is geometric_log_ratio
    assert "arXiv 2507.20673" in geometric_log_ratio.__doc__ and "=" in geometric_log_ratio.__doc__
    for name in ("k1+", "k2+", "k3+", "abs"):
        doc = KL_ESTIMATORS.get(name).__doc__ or ""
        assert "verl" in doc and "=" in doc, name


def test_reinforce_and_gpg_are_one_function():
    assert POLICY_LOSSES.get("reinforce") is POLICY_LOSSES.get("gpg") is reinforce_loss


# =============================================================================================
# Hand-computed values
# =============================================================================================

class TestDualClip:
    # ε_low = ε_high = 0.2, c = 3.  Columns: w, A, loss, clipped_low, clipped_high, d loss / d log w
    CASES = [
        (1.5, 1.0, -1.2, False, True, 0.0),    # max(−1.5, −1.2) = −1.2 (upper clip, flat)
        (0.5, 1.0, -0.5, False, False, -0.5),  # max(−0.5, −0.8) = −0.5; grad −A w = −0.5
        (0.5, -1.0, 0.8, True, False, 0.0),    # max(0.5, 0.8) = 0.8 < 3 (lower clip, flat)
        (4.0, -1.0, 3.0, False, True, 0.0),    # max(4, 1.2) = 4 → min(4, 3·1) = 3 (dual clip, flat)
        (2.0, -1.0, 2.0, False, False, 2.0),   # max(2, 1.2) = 2 < 3; grad −A w = 2
        (1.1, -2.0, 2.2, False, False, 2.2),   # max(2.2, 2.2) = 2.2 < 6; grad −A w = 2.2
    ]

    def test_values_flags_gradients(self):
        x = lr([c[0] for c in self.CASES])
        out = dual_clip_loss(x, t([c[1] for c in self.CASES]), torch.zeros(6, dtype=D),
                             eps_low=0.2, eps_high=0.2, clip_ratio_c=3.0)
        close(out.loss, [c[2] for c in self.CASES])
        assert out.clipped_low.tolist() == [c[3] for c in self.CASES]
        assert out.clipped_high.tolist() == [c[4] for c in self.CASES]
        out.loss.sum().backward()
        close(x.grad, [c[5] for c in self.CASES])

    @pytest.mark.parametrize("c", [1.0, 0.5, -2.0])
    def test_raises_on_c_not_above_one(self, c):
        with pytest.raises(ValueError, match="clip_ratio_c"):
            dual_clip_loss(t([0.0]), t([1.0]), t([0.0]), clip_ratio_c=c)


class TestTwoSided:
    # ε = 0.2, δ = 3.  Columns: w, A, loss, clipped_low, clipped_high, d loss / d log w
    CASES = [
        (1.5, 1.0, -1.2, False, True, 0.0),    # −min(min(1.5,3)·1, 1.2·1) = −1.2
        (4.0, -1.0, 3.0, False, True, 0.0),    # −min(3·(−1), 1.2·(−1)) = −(−3) = 3 (cap δ)
        (2.0, -1.0, 2.0, False, False, 2.0),   # −min(−2, −1.2) = 2; grad −A w = 2
        (0.5, -1.0, 0.8, True, False, 0.0),    # −min(−0.5, −0.8) = 0.8 (lower clip)
        (0.5, 1.0, -0.5, False, False, -0.5),  # −min(0.5, 0.8) = −0.5; grad −0.5
    ]

    def test_values_flags_gradients(self):
        x = lr([c[0] for c in self.CASES])
        out = two_sided_loss(x, t([c[1] for c in self.CASES]), torch.zeros(5, dtype=D),
                             eps_low=0.2, eps_high=0.2, delta=3.0)
        close(out.loss, [c[2] for c in self.CASES])
        assert out.clipped_low.tolist() == [c[3] for c in self.CASES]
        assert out.clipped_high.tolist() == [c[4] for c in self.CASES]
        out.loss.sum().backward()
        close(x.grad, [c[5] for c in self.CASES])

    @pytest.mark.parametrize("delta", [1.2, 1.1, 0.5])
    def test_raises_on_delta_not_above_one_plus_eps_high(self, delta):
        # 1 + ε_high = 1.2: δ must be strictly greater
        with pytest.raises(ValueError, match="delta"):
            two_sided_loss(t([0.0]), t([1.0]), t([0.0]), eps_low=0.2, eps_high=0.2, delta=delta)

    def test_delta_is_required_by_the_config(self):
        from groupwise.config import AlgorithmConfig

        with pytest.raises(ValueError, match="delta"):
            AlgorithmConfig(loss="two_sided").loss_kwargs()
        kw = AlgorithmConfig(loss="two_sided", loss_options={"delta": 4.0}).loss_kwargs()
        assert kw["delta"] == 4.0
        two_sided_loss(t([0.0]), t([1.0]), t([0.0]), **kw)      # and the resolved options are accepted


class TestCispo:
    # weight = sg(clip(w, 0.8, 1.2)); ℓ = −weight·A·logp; d ℓ / d logp = −weight·A; d ℓ / d log w = 0
    # Columns: w, A, logp, loss, clipped_low, clipped_high, d loss / d logp
    CASES = [
        (1.5, 1.0, -0.5, 0.6, False, True, -1.2),   # −1.2·1·(−0.5) = 0.6
        (0.5, -1.0, -2.0, -1.6, True, False, 0.8),  # −0.8·(−1)·(−2) = −1.6
        (1.1, 2.0, -1.0, 2.2, False, False, -2.2),  # −1.1·2·(−1) = 2.2
        (0.5, 1.0, -1.0, 0.8, True, False, -0.8),   # weight clipped at 0.8 whatever the sign of A
    ]

    def test_values_flags_gradients(self):
        x = lr([c[0] for c in self.CASES])
        logp = t([c[2] for c in self.CASES]).requires_grad_()
        out = cispo_loss(x, t([c[1] for c in self.CASES]), logp, eps_low=0.2, eps_high=0.2)
        close(out.loss, [c[3] for c in self.CASES])
        assert out.clipped_low.tolist() == [c[4] for c in self.CASES]
        assert out.clipped_high.tolist() == [c[5] for c in self.CASES]
        out.loss.sum().backward()
        close(logp.grad, [c[6] for c in self.CASES])
        assert x.grad is None                       # the weight is detached: no path to log w

    def test_trl_semantics_when_eps_low_is_large(self):
        # ε_low = 1 → lower bound max(0, 0) = 0: no lower clip (TRL's max-only form);
        # ε_high = 4 → cap 5 (TRL epsilon_high = 5.0).
        # w = 0.01, A = 1, logp = −1 → −0.01·1·(−1) = 0.01 ; w = 6 → capped 5 → −5·1·(−1) = 5
        out = cispo_loss(lr([0.01, 6.0]), t([1.0, 1.0]), t([-1.0, -1.0]), eps_low=1.0, eps_high=4.0)
        close(out.loss, [0.01, 5.0])
        assert out.clipped_low.tolist() == [False, False]
        assert out.clipped_high.tolist() == [False, True]


class TestSapo:
    # τ_pos = 1, τ_neg = 1.05; ℓ = −(4/τ) σ(τ(w−1)) A; d ℓ / d log w = −A · 4σ(1−σ) · w
    def test_values_gradients_flags(self):
        x = lr([1.0, 1.0, 2.0, 4.0, 0.5])
        adv = t([1.0, -1.0, 1.0, 1.0, -1.0])
        out = sapo_loss(x, adv, torch.zeros(5, dtype=D), tau_pos=1.0, tau_neg=1.05)
        close(out.loss, [
            -2.0,                  # w = 1, A = 1: −4·σ(0) = −4·½
            2.0 / 1.05,            # w = 1, A = −1: −(4/1.05)·½·(−1) = 1.9047619
            -2.9242343145200196,   # w = 2: −4·σ(1) = −4·0.73105858
            -3.8102965072897335,   # w = 4: −4·σ(3) = −4·0.95257413
            1.4159383303033666,    # w = ½, A = −1: τ(w−1) = −0.525, σ = 0.37168381 → (4/1.05)·0.37168381
        ])
        out.loss.sum().backward()
        close(x.grad, [
            -1.0,                  # −A·4σ'(0)·1 = −1·4·¼
            1.0,                   # −(−1)·4·¼·1 (τ cancels: (4/τ)·τ)
            -1.5728954659318548,   # −4·σ(1)(1−σ(1))·2 = −4·0.19661193·2
            -0.180706638923648 * 4.0,  # −A·4σ(3)(1−σ(3))·w = −0.18070664·4 = −0.72282656
            0.4670699116426963,    # +4σ(1−σ)·½ = 0.93413982·½
        ])
        # attenuation 4σ(1−σ): 1, 1, 0.786, 0.181 (< ½ → flagged, w > 1), 0.934
        assert out.clipped_high.tolist() == [False, False, False, True, False]
        assert out.clipped_low.tolist() == [False] * 5


class TestGmpo:
    def test_values_flags_gradients(self):
        # ε_low = ε_high = 0.4.
        # Row 0, A = +1, x = [0.1, 0.6, −0.5]: min(x, 0.4) = [0.1, 0.4, −0.5], mean 0/3 = 0 → r = 1 → ℓ = −1
        # Row 1, A = −2, x = [0.2, −0.7, 9 (masked)]: max(x, −0.4) = [0.2, −0.4], mean −0.1
        #        → r = e^−0.1 = 0.90483742 → ℓ = 2·0.90483742 = 1.80967484 (broadcast, masked one too)
        x = t([[0.1, 0.6, -0.5], [0.2, -0.7, 9.0]]).requires_grad_()
        adv = t([[1.0] * 3, [-2.0] * 3])
        mask = t([[1, 1, 1], [1, 1, 0]])
        out = gmpo_loss(x, adv, torch.zeros(2, 3, dtype=D), mask=mask, eps_low=0.4, eps_high=0.4)
        r1 = math.exp(-0.1)
        close(out.loss, [[-1.0] * 3, [2 * r1] * 3])
        assert out.clipped_high.tolist() == [[False, True, False], [False, False, False]]
        assert out.clipped_low.tolist() == [[False, False, False], [False, True, False]]
        # Σ m ℓ: row 0 = −3r → d/dx_t = −3r·(1/3) = −1 unless clipped; row 1 = 4r → 4r·½ = 2r = 1.80967484
        (out.loss * mask).sum().backward()
        close(x.grad, [[-1.0, 0.0, -1.0], [2 * r1, 0.0, 0.0]])

    def test_seq_mean_token_mean_is_verl_geo_mean(self):
        # verl: mean_i(−Ā_i r_i) → (−1 + 1.80967484)/2 = 0.40483742
        x = t([[0.1, 0.6, -0.5], [0.2, -0.7, 9.0]])
        adv, mask = t([1.0, -2.0]), t([[1, 1, 1], [1, 1, 0]])
        parts = ObjectiveParts(ratio_level=RATIO_LEVELS.get("token"), surrogate=gmpo_loss,
                               aggregation=AGGREGATIONS.get("seq_mean_token_mean"),
                               surrogate_options={"eps_low": 0.4, "eps_high": 0.4})
        old = torch.zeros(2, 3, dtype=D)
        out = policy_objective(parts, x, old, adv, mask, StepCounts.of(mask, 3))
        assert out.loss.item() == pytest.approx((-1 + 2 * math.exp(-0.1)) / 2, abs=1e-12)


class TestDcpo:
    # ε_low = 0.16, ε_high = 0.2, c = 10.
    # q = 0.9:   low = ½ + ½√(1 − 0.64/0.9) = ½ + ½√0.28889 = 0.76874192 ; high = ½ + ½√(1 + 0.8/0.9) = 1.18718427
    # q = 0.01:  1 − 64 < 0 → low = ½ ; high = ½ + ½√81 = 5
    # q = 0.001: high = ½ + ½√801 = 14.65 → capped at c = 10 ; low = ½
    LOW9, HIGH9 = 0.768741924943285, 1.1871842709362768
    # Columns: q, w, A, loss, clipped_low, clipped_high, d loss / d log w
    CASES = [
        (0.9, 1.5, 1.0, -HIGH9, False, True, 0.0),  # clipped to high(0.9)
        (0.01, 1.5, 1.0, -1.5, False, False, -1.5),  # inside [½, 5]: a rare token may grow (PPO would clip)
        (0.01, 6.0, 1.0, -5.0, False, True, 0.0),   # clipped to 5
        (0.9, 0.7, -1.0, LOW9, True, False, 0.0),   # max(0.7, 0.76874) = 0.76874
        (0.01, 0.7, -1.0, 0.7, False, False, 0.7),  # low = ½ < 0.7: unclipped; grad −A w = 0.7
        (0.001, 12.0, -1.0, 10.0, False, True, 0.0),  # max(12, 10) = 12 → dual clip min(12, 10) = 10
        (0.001, 12.0, 1.0, -10.0, False, True, 0.0),  # clipped to high = 10
    ]

    def test_values_flags_gradients(self):
        x = lr([c[1] for c in self.CASES])
        old = t([math.log(c[0]) for c in self.CASES])
        out = dcpo_loss(x, t([c[2] for c in self.CASES]), torch.zeros(7, dtype=D), old_logp=old,
                        eps_low=0.16, eps_high=0.2, clip_ratio_c=10.0)
        close(out.loss, [c[3] for c in self.CASES])
        assert out.clipped_low.tolist() == [c[4] for c in self.CASES]
        assert out.clipped_high.tolist() == [c[5] for c in self.CASES]
        out.loss.sum().backward()
        close(x.grad, [c[6] for c in self.CASES])

    def test_needs_old_logp_and_c_above_one(self):
        with pytest.raises(ValueError, match="old_logp"):
            dcpo_loss(t([0.0]), t([1.0]), t([0.0]))
        with pytest.raises(ValueError, match="clip_ratio_c"):
            dcpo_loss(t([0.0]), t([1.0]), t([0.0]), old_logp=t([-1.0]), clip_ratio_c=1.0)

    def test_underflowing_prior_is_finite(self):
        # q = e^−200 underflows to 0 in float32: bounds become [½, c], no NaN
        out = dcpo_loss(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0.0]), old_logp=torch.tensor([-200.0]))
        assert torch.isfinite(out.loss).all() and out.loss.item() == pytest.approx(-1.0)


class TestReinforce:
    def test_values_and_gradient(self):
        # ℓ = −A logp: A = [2, −1], logp = [−0.5, −3] → [1, −3]; d/dlogp = −A = [−2, 1]; log_ratio ignored
        logp = t([-0.5, -3.0]).requires_grad_()
        out = POLICY_LOSSES.get("gpg")(t([5.0, -5.0]), t([2.0, -1.0]), logp)
        close(out.loss, [1.0, -3.0])
        out.loss.sum().backward()
        close(logp.grad, [-2.0, 1.0])
        assert not out.clipped_low.any() and not out.clipped_high.any()


# Two rows × two tokens, A = +2 / −2 (Ā = 0).
COV_ADV = [[2.0, 2.0], [-2.0, -2.0]]


class TestClipCov:
    # logp = [[−0.5, −3.5], [−0.5, −3.5]], mean −2 → centred [[1.5, −1.5], [1.5, −1.5]]
    # cov = (A − 0)·centred = [[3, −3], [−3, 3]] → candidates (1 < cov < 5): (0,0) and (1,1)
    LOGP = [[-0.5, -3.5], [-0.5, -3.5]]

    def test_all_candidates_selected(self):
        # ratio 0.5 → k = max(⌊0.5·4⌋, 1) = 2 = |C|: both candidates lose their loss and gradient.
        # w = 1 → ℓ = −A: [[−2, −2], [2, 2]] → [[0, −2], [2, 0]]; grad −A w elsewhere
        x = torch.zeros(2, 2, dtype=D, requires_grad=True)
        out = clip_cov_loss(x, t(COV_ADV), t(self.LOGP), mask=torch.ones(2, 2, dtype=D),
                            clip_cov_ratio=0.5, clip_cov_lb=1.0, clip_cov_ub=5.0)
        close(out.loss, [[0.0, -2.0], [2.0, 0.0]])
        assert out.clipped_high.tolist() == [[True, False], [False, False]]
        assert out.clipped_low.tolist() == [[False, False], [False, True]]
        out.loss.sum().backward()
        close(x.grad, [[0.0, -2.0], [2.0, 0.0]])

    def test_random_subset_is_seeded_and_inside_the_candidates(self):
        # ratio 0.25 → k = max(⌊0.25·4⌋, 1) = 1: one of (0,0), (1,1), the same one on every call
        args = (torch.zeros(2, 2, dtype=D), t(COV_ADV), t(self.LOGP))
        kw = dict(mask=torch.ones(2, 2, dtype=D), clip_cov_ratio=0.25)
        picks = set()
        for seed in range(12):
            a = clip_cov_loss(*args, seed=seed, **kw)
            b = clip_cov_loss(*args, seed=seed, **kw)
            assert torch.equal(a.loss, b.loss)
            zeroed = tuple(map(tuple, (a.loss == 0).nonzero().tolist()))
            assert len(zeroed) == 1 and zeroed[0] in {(0, 0), (1, 1)}
            picks.add(zeroed[0])
        assert picks == {(0, 0), (1, 1)}            # the seed does change the draw

    def test_ratio_clipped_and_masked_tokens_are_not_candidates(self):
        # (0,0): w = 1.5 with A > 0 is already PPO-clipped → not a candidate; (1,1) is masked.
        # No candidate left → ℓ is plain PPO: (0,0) = −2·1.2 = −2.4, others −A
        x = t([[math.log(1.5), 0.0], [0.0, 0.0]])
        out = clip_cov_loss(x, t(COV_ADV), t(self.LOGP), mask=t([[1, 1], [1, 0]]), clip_cov_ratio=1.0)
        close(out.loss, [[-2.4, -2.0], [2.0, 2.0]])
        assert out.clipped_high.tolist() == [[True, False], [False, False]]


class TestKlCov:
    # logp = [[−0.5, −3.5], [−1.5, −2.5]], mean −2 → centred [[1.5, −1.5], [0.5, −0.5]]
    # cov = A·centred = [[3, −3], [−1, 1]]: top-1 = (0,0); top-2 = (0,0), (1,1)
    LOGP = [[-0.5, -3.5], [-1.5, -2.5]]
    X = [[0.1, 0.2], [-0.3, 0.4]]

    def test_values_top2(self):
        # ℓ = −A e^x + [sel]·1·|x|:
        # (0,0) −2e^0.1 + 0.1 = −2.11034184 ; (0,1) −2e^0.2 = −2.44280552
        # (1,0) 2e^−0.3 = 1.48163644 ; (1,1) 2e^0.4 + 0.4 = 3.38364940
        x = t(self.X).requires_grad_()
        out = kl_cov_loss(x, t(COV_ADV), t(self.LOGP), mask=torch.ones(2, 2, dtype=D), kl_cov_ratio=0.5)
        close(out.loss, [[-2.1103418361512953, -2.4428055163203397], [1.4816364413634358, 3.3836493952825406]])
        assert out.clipped_high.tolist() == [[True, False], [False, False]]
        assert out.clipped_low.tolist() == [[False, False], [False, True]]
        # d/dx: −A e^x + sign(x)·[sel]: (0,0) −2e^0.1 + 1 ; (1,1) 2e^0.4 + 1
        out.loss.sum().backward()
        close(x.grad, [[-2 * math.exp(0.1) + 1, -2 * math.exp(0.2)], [2 * math.exp(-0.3), 2 * math.exp(0.4) + 1]])

    def test_top1_and_masked_tokens_never_selected(self):
        # ratio 0.25 → k = max(⌊0.25·4⌋, 1) = 1 → only (0,0), the largest covariance
        out = kl_cov_loss(t(self.X), t(COV_ADV), t(self.LOGP), mask=torch.ones(2, 2, dtype=D), kl_cov_ratio=0.25)
        assert (out.clipped_high | out.clipped_low).tolist() == [[True, False], [False, False]]
        # mask (0,0): the statistics are recomputed over the 3 valid tokens
        mask = t([[0, 1], [1, 1]])
        # valid: (0,1) A 2 lp −3.5 ; (1,0) A −2 lp −1.5 ; (1,1) A −2 lp −2.5 → Ā = −2/3, mean lp = −2.5
        # cov: (0,1) (8/3)(−1) = −2.667 ; (1,0) (−4/3)(1) = −1.333 ; (1,1) (−4/3)(0) = 0 → top-1 (1,1)
        out = kl_cov_loss(t(self.X), t(COV_ADV), t(self.LOGP), mask=mask, kl_cov_ratio=0.25)
        assert (out.clipped_high | out.clipped_low).tolist() == [[False, False], [False, True]]


class TestDisco:
    # one row, A = +0.5 (sign +1), logp = [−1, −2], x = logp − old = [0.2, −0.2]
    # kl = e^x − 1 − x = [0.02140276, 0.01873075], KL̄ = 0.02006676 ; δ = 0.01, β = 10
    # coef = 10·(0.02006676 − 0.01) = 0.10066756
    def test_logl_sign_with_active_constraint(self):
        logp = t([-1.0, -2.0]).requires_grad_()
        old = t([-1.2, -1.8])
        out = disco_loss(logp - old, t([0.5, 0.5]), logp, old_logp=old, mask=t([1, 1]), weighting="sign", delta=0.01, beta=10.0)
        coef = 10 * (0.020066755619075838 - 0.01)
        # ℓ = −1·logp + coef·kl = [1 + 0.10066756·0.02140276, 2 + 0.10066756·0.01873075] = [1.00215456, 2.00188560]
        close(out.loss, [1.0 + coef * 0.0214027581601699, 2.0 + coef * 0.018730753077981777])
        assert out.clipped_high.tolist() == [True, True] and out.clipped_low.tolist() == [False, False]
        # d/dlogp = −1 + coef·(e^x − 1) = [−0.97771193, −1.01824793] (coef is detached)
        out.loss.sum().backward()
        close(logp.grad, [-0.9777119254021223, -1.0182479321001787])

    def test_inactive_constraint_and_weightings(self):
        # old = logp → KL̄ = 0 ≤ δ: ℓ = −c f ; A = [2, −3, 0]
        logp = t([-1.0, -2.0, -0.5])
        adv = t([2.0, -3.0, 0.0])
        x = torch.zeros(3, dtype=D)
        # sign, logL: −[1, −1, 0]·logp = [1, −2, 0]
        out = disco_loss(x, adv, logp, old_logp=logp, score="logL", weighting="sign")
        close(out.loss, [1.0, -2.0, 0.0])
        assert not (out.clipped_low | out.clipped_high).any()
        # advantage, logL: −A·logp = [2, −6, 0]
        close(disco_loss(x, adv, logp, old_logp=logp, weighting="advantage").loss, [2.0, -6.0, 0.0])
        # sign, Lratio: −sign(A)·w = [−1, 1, 0] at w = 1
        close(disco_loss(x, adv, logp, old_logp=logp, score="Lratio", weighting="sign").loss, [-1.0, 1.0, 0.0])

    def test_bad_options(self):
        with pytest.raises(ValueError, match="score"):
            disco_loss(t([0.0]), t([1.0]), t([0.0]), old_logp=t([0.0]), score="tau")
        with pytest.raises(ValueError, match="weighting"):
            disco_loss(t([0.0]), t([1.0]), t([0.0]), old_logp=t([0.0]), weighting="group")
        with pytest.raises(ValueError, match="old_logp"):
            disco_loss(t([0.0]), t([1.0]), t([0.0]))


class TestKlVariants:
    def test_values_and_gradients(self):
        # logp = −1, ref = −2 → d = logp − ref = 1; δ = ref − logp = −1
        # k1 = 1 ; k2 = ½ ; k3 = e^−1 + 1 − 1 = 0.36787944 ; abs = 1 ; gradient of k2 = d = 1
        for name, value, grad in [("k1+", 1.0, 1.0), ("k2+", 0.5, 1.0), ("k3+", math.exp(-1), 1.0), ("abs", 1.0, 1.0)]:
            logp = t([-1.0]).requires_grad_()
            v = KL_ESTIMATORS.get(name)(logp, t([-2.0]))
            assert v.item() == pytest.approx(value, abs=1e-12), name
            v.sum().backward()
            assert logp.grad.item() == pytest.approx(grad, abs=1e-12), name
        # abs on the other side: logp = −3, ref = −2 → |−1| = 1, gradient sign(−1) = −1
        logp = t([-3.0]).requires_grad_()
        KL_ESTIMATORS.get("abs")(logp, t([-2.0])).sum().backward()
        assert logp.grad.item() == -1.0


# =============================================================================================
# Properties
# =============================================================================================

SURROGATE_CASES = {
    "ppo_clip": {"eps_low": 0.2, "eps_high": 0.28},
    "dual_clip": {"eps_low": 0.2, "eps_high": 0.28, "clip_ratio_c": 1.5},
    "two_sided": {"eps_low": 0.2, "eps_high": 0.28, "delta": 1.6},
    "cispo": {"eps_low": 0.2, "eps_high": 0.28},
    "cispo_trl": {"eps_low": 1.0, "eps_high": 0.5},
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "gmpo": {"eps_low": 0.4, "eps_high": 0.4},
    "dcpo": {"eps_low": 0.16, "eps_high": 0.2, "clip_ratio_c": 3.0},
    "reinforce": {},
    "clip_cov": {"eps_low": 0.2, "eps_high": 0.28, "clip_cov_ratio": 0.3, "clip_cov_lb": -0.5, "clip_cov_ub": 5.0},
    "kl_cov": {"kl_cov_ratio": 0.3, "ppo_kl_coef": 0.5},
    "disco": {"weighting": "sign", "delta": 0.0, "beta": 2.0},
    "disco_lratio_adv": {"score": "Lratio", "weighting": "advantage", "delta": 0.0, "beta": 2.0},
}


def _surrogate(case):
    return POLICY_LOSSES.get(case.split("_trl")[0].split("_lratio")[0])


def _rand(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=D) * scale


def _random_mask(gen, n, t_):
    mask = (torch.rand(n, t_, generator=gen, dtype=D) < 0.6).to(D)
    mask[0, 0] = 1.0
    if n > 1 and t_ > 1:
        mask[-1, -1] = 0.0
    return mask


MANY = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@MANY
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), t_=st.integers(1, 6),
       case=st.sampled_from(sorted(SURROGATE_CASES)), ratio=st.sampled_from(["token", "sequence", "geometric"]),
       agg=st.sampled_from(["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "constant"]))
def test_masked_tokens_contribute_nothing(seed, n, t_, case, ratio, agg):
    gen = torch.Generator().manual_seed(seed)
    mask = _random_mask(gen, n, t_)
    logp0 = -_rand(gen, n, t_).abs()
    old0 = logp0 + _rand(gen, n, t_, scale=0.4)
    adv = _rand(gen, n)
    counts = StepCounts.of(mask, t_ + 2)
    masked = mask == 0
    logp1 = torch.where(masked, _rand(gen, n, t_, scale=40.0), logp0)
    old1 = torch.where(masked, _rand(gen, n, t_, scale=40.0), old0)
    parts = ObjectiveParts(ratio_level=RATIO_LEVELS.get(ratio), surrogate=_surrogate(case),
                           aggregation=AGGREGATIONS.get(agg), surrogate_options=SURROGATE_CASES[case])
    results = []
    for lp, old in ((logp0, old0), (logp1, old1)):
        lp = lp.clone().requires_grad_()
        out = policy_objective(parts, lp, old, adv, mask, counts)
        out.loss.backward()
        results.append((out.loss.detach(), lp.grad, out.sums))
    (l0, g0, s0), (l1, g1, s1) = results
    torch.testing.assert_close(l1, l0, atol=1e-9, rtol=1e-9)
    assert torch.isfinite(g1).all()
    assert (g0[masked] == 0).all() and (g1[masked] == 0).all()
    torch.testing.assert_close(g1, g0, atol=1e-9, rtol=1e-9)
    for key in s0:
        assert s1[key] == pytest.approx(s0[key], rel=1e-9, abs=1e-9), key


# ---- independent reference formulas (per token, token-level ratio w = exp(lp − old)) ---------

def _ref_ppo_like(w, a, low, high, cap_neg):
    """For A > 0: −A·min(w, high); for A < 0: −A·min(max(w, low), cap_neg); 0 for A = 0.
    (Derived by hand from −min(wA, clip(w)A) and the caps, not from the code.)"""
    pos = -a * torch.minimum(w, torch.as_tensor(high, dtype=D))
    neg = -a * torch.minimum(torch.maximum(w, torch.as_tensor(low, dtype=D)), torch.as_tensor(cap_neg, dtype=D))
    return torch.where(a > 0, pos, torch.where(a < 0, neg, torch.zeros_like(w)))


def _ref_loss(case, lp, old, a, mask):
    o = SURROGATE_CASES[case]
    w = torch.exp(lp - old)
    inf = float("inf")
    if case == "ppo_clip":
        return _ref_ppo_like(w, a, 1 - o["eps_low"], 1 + o["eps_high"], inf)
    if case == "dual_clip":
        return _ref_ppo_like(w, a, 1 - o["eps_low"], 1 + o["eps_high"], o["clip_ratio_c"])
    if case == "two_sided":
        return _ref_ppo_like(w, a, 1 - o["eps_low"], 1 + o["eps_high"], o["delta"])
    if case == "dcpo":
        q = torch.exp(old)
        low = 0.5 + 0.5 * torch.sqrt(torch.relu(1 - 4 * o["eps_low"] / q))
        high = torch.minimum(0.5 + 0.5 * torch.sqrt(1 + 4 * o["eps_high"] / q), torch.tensor(o["clip_ratio_c"], dtype=D))
        return _ref_ppo_like(w, a, low, high, o["clip_ratio_c"])
    if case in ("cispo", "cispo_trl"):
        lo, hi = max(0.0, 1 - o["eps_low"]), 1 + o["eps_high"]
        return -(w.detach().clamp(lo, hi)) * a * lp
    if case == "sapo":
        tau = torch.where(a > 0, torch.tensor(o["tau_pos"], dtype=D), torch.tensor(o["tau_neg"], dtype=D))
        return -a * (4 / tau) / (1 + torch.exp(-tau * (w - 1)))
    if case == "reinforce":
        return -a * lp
    if case == "gmpo":
        rows = []
        for i in range(lp.shape[0]):
            terms = []
            for j in range(lp.shape[1]):
                if mask[i, j] > 0:
                    x, ai = lp[i, j] - old[i, j], float(a[i, j])
                    if ai > 0:
                        x = torch.minimum(x, torch.tensor(o["eps_high"], dtype=D))
                    elif ai < 0:
                        x = torch.maximum(x, torch.tensor(-o["eps_low"], dtype=D))
                    else:
                        x = x.clamp(-o["eps_low"], o["eps_high"])
                    terms.append(x)
            mean = torch.stack(terms).mean() if terms else torch.tensor(0.0, dtype=D)
            rows.append(-a[i] * torch.exp(mean))
        return torch.stack(rows)
    if case == "kl_cov":
        valid = [(i, j) for i in range(lp.shape[0]) for j in range(lp.shape[1]) if mask[i, j] > 0]
        mean_a = sum(float(a[i, j]) for i, j in valid) / len(valid)
        mean_lp = sum(float(lp[i, j]) for i, j in valid) / len(valid)
        cov = {(i, j): (float(a[i, j]) - mean_a) * (float(lp[i, j]) - mean_lp) for i, j in valid}
        k = max(int(len(valid) * o["kl_cov_ratio"]), 1)
        top = sorted(valid, key=lambda ij: -cov[ij])[:k]
        sel = torch.zeros_like(w)
        for i, j in top:
            sel[i, j] = 1.0
        return -a * w + sel * o["ppo_kl_coef"] * (lp - old).abs()
    if case == "clip_cov":   # with clip_cov_ratio = 1: every candidate is dropped (no randomness)
        valid = mask > 0
        mean_a = a[valid].mean()
        mean_lp = lp.detach()[valid].mean()
        cov = (a - mean_a) * (lp.detach() - mean_lp)
        ppo = _ref_ppo_like(w, a, 1 - o["eps_low"], 1 + o["eps_high"], inf)
        by_ratio = ((a > 0) & (w > 1 + o["eps_high"])) | ((a < 0) & (w < 1 - o["eps_low"]))
        drop = valid & ~by_ratio & (cov > o["clip_cov_lb"]) & (cov < o["clip_cov_ub"])
        return torch.where(drop, torch.zeros_like(ppo), ppo)
    if case in ("disco", "disco_lratio_adv"):
        f = lp if case == "disco" else w
        c = torch.sign(a) if case == "disco" else a
        kl = w - 1 - (lp - old)
        kl_mean = kl.detach()[mask > 0].mean()
        coef = max(o["beta"] * (float(kl_mean) - o["delta"]), 0.0)
        return -c * f + coef * kl
    raise AssertionError(case)


@MANY
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), t_=st.integers(1, 5),
       case=st.sampled_from(sorted(SURROGATE_CASES)), token_adv=st.booleans())
def test_gradient_matches_independent_formula(seed, n, t_, case, token_adv):
    gen = torch.Generator().manual_seed(seed)
    mask = _random_mask(gen, n, t_)
    lp0 = -_rand(gen, n, t_).abs() - 0.05
    old = lp0 + _rand(gen, n, t_, scale=0.5)
    adv = _rand(gen, n, t_) if token_adv else _rand(gen, n, 1).expand(n, t_)
    options = dict(SURROGATE_CASES[case])
    if case == "clip_cov":
        options["clip_cov_ratio"] = 1.0        # drop every candidate: the reference has no randomness
    lp = lp0.clone().requires_grad_()
    out = _surrogate(case)(lp - old, adv, lp, old_logp=old, mask=mask, **options)
    m = mask
    (out.loss * m).sum().backward()
    got_loss, got_grad = (out.loss.detach() * m), lp.grad

    lp_ref = lp0.clone().requires_grad_()
    ref = _ref_loss(case, lp_ref, old, adv, mask)
    (ref * m).sum().backward()
    torch.testing.assert_close(got_loss, ref.detach() * m, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(got_grad, lp_ref.grad, atol=1e-9, rtol=1e-9)


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), t_=st.integers(1, 5),
       case=st.sampled_from(["ppo_clip", "dual_clip", "two_sided", "cispo", "cispo_trl", "dcpo",
                             "sapo", "kl_cov", "reinforce"]))
def test_on_policy_gradient_is_minus_advantage(seed, n, t_, case):
    # At w = 1 (old = logp.detach()) every one of these gives d ℓ_t / d logp_t = −A_t
    # (the values of cispo, reinforce and sapo differ from the ratio surrogates' −A; their gradients do not;
    # sapo: (4/τ)·σ'(0)·τ = 1; kl_cov: |x|' at 0 is 0; dcpo: low ≤ 1 ≤ high).
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, t_, dtype=D)
    lp = (-_rand(gen, n, t_).abs() - 0.05).requires_grad_()
    adv = _rand(gen, n, t_)
    old = lp.detach()
    out = _surrogate(case)(lp - old, adv, lp, old_logp=old, mask=mask, **SURROGATE_CASES[case])
    out.loss.sum().backward()
    torch.testing.assert_close(lp.grad, -adv, atol=1e-12, rtol=1e-12)
    if case in ("ppo_clip", "dual_clip", "two_sided", "dcpo", "kl_cov"):   # sapo's value is −2A/τ
        torch.testing.assert_close(out.loss.detach(), -adv, atol=1e-12, rtol=1e-12)
    if case != "kl_cov":                         # kl_cov flags its penalized tokens, even at w = 1
        assert not out.clipped_low.any() and not out.clipped_high.any()


def test_on_policy_gradient_of_gmpo_and_disco():
    # gmpo at w = 1 with seq_mean_token_mean: L = mean_i(−A_i) → dL/dlogp_it = −A_i / (|o_i| · #seq)
    # disco (logL, sign) at w = 1: KL̄ = 0 → d ℓ_t / d logp_t = −sign(A_t)
    lp = t([[-1.0, -2.0, -0.5], [-0.3, -0.7, -1.1]]).requires_grad_()
    mask = t([[1, 1, 0], [1, 1, 1]])
    adv = t([0.5, -2.0])
    parts = ObjectiveParts(ratio_level=RATIO_LEVELS.get("token"), surrogate=gmpo_loss,
                           aggregation=AGGREGATIONS.get("seq_mean_token_mean"))
    policy_objective(parts, lp, lp.detach(), adv, mask, StepCounts.of(mask, 3)).loss.backward()
    # row 0: −0.5/(2·2) = −0.125 ; row 1: 2/(3·2) = 0.33333333
    close(lp.grad, [[-0.125, -0.125, 0.0], [1 / 3, 1 / 3, 1 / 3]])

    lp2 = lp.detach().clone().requires_grad_()
    a2 = t([[0.5, 0.5, 0.5], [-2.0, -2.0, -2.0]])
    out = disco_loss(lp2 - lp2.detach(), a2, lp2, old_logp=lp2.detach(), mask=mask, weighting="sign", delta=1e-4, beta=1e3)
    out.loss.sum().backward()
    close(lp2.grad, [[-1.0] * 3, [1.0] * 3])


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), t_=st.integers(1, 8))
def test_geometric_ratio_of_identical_policies_is_one(seed, n, t_):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, t_, generator=gen, dtype=D) < 0.5).to(D)
    logp = -_rand(gen, n, t_).abs()
    old = torch.where(mask == 0, logp + _rand(gen, n, t_, scale=5.0), logp)   # differs only where masked
    lr_ = geometric_log_ratio(logp, old, mask)
    assert torch.equal(torch.exp(lr_), torch.ones(n, t_))
    # and in general it is the geometric mean of the token ratios, i.e. GSPO's sequence ratio
    other = logp + _rand(gen, n, t_, scale=0.3)
    torch.testing.assert_close(geometric_log_ratio(logp, other, mask), sequence_log_ratio(logp, other, mask))
    for i in range(n):
        idx = [j for j in range(t_) if mask[i, j] > 0]
        if idx:
            prod = math.prod(math.exp(float(logp[i, j] - other[i, j])) for j in idx)
            assert math.exp(float(geometric_log_ratio(logp, other, mask)[i, 0])) == pytest.approx(prod ** (1 / len(idx)))


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), name=st.sampled_from(["k1", "k2", "k3"]))
def test_straight_through_kl_has_kn_value_and_k2_gradient(seed, n, name):
    gen = torch.Generator().manual_seed(seed)
    lp0 = -_rand(gen, n).abs()
    ref = lp0 + _rand(gen, n, scale=0.7)
    lp = lp0.clone().requires_grad_()
    plus = KL_ESTIMATORS.get(name + "+")(lp, ref)
    torch.testing.assert_close(plus.detach(), KL_ESTIMATORS.get(name)(lp0, ref), atol=0, rtol=0)
    plus.sum().backward()
    torch.testing.assert_close(lp.grad, lp0 - ref, atol=1e-12, rtol=1e-12)   # ∇½(lp − ref)² = lp − ref


# ---------------------------------------------------------------------------------------------
# DisCO's per-question weights (group ids from the trainer)
# ---------------------------------------------------------------------------------------------

def _disco_grad(adv_rows, group, lp_rows=None, **kw):
    from groupwise.algorithms.surrogates import disco_loss

    n = len(adv_rows)
    a = torch.tensor(adv_rows).unsqueeze(-1).expand(n, 2)
    base = torch.zeros(n, 1) if lp_rows is None else torch.tensor(lp_rows).unsqueeze(-1)
    lp = base.expand(n, 2).clone().requires_grad_(True)
    out = disco_loss(lp - lp.detach(), a, lp, old_logp=lp.detach(), mask=torch.ones(n, 2), group_id=torch.tensor(group), **kw)
    out.loss.sum().backward()
    return (-lp.grad[:, 0]).tolist()


def test_disco_question_weights_by_hand():
    # q0 = rows 0-3: A = (+, +, −, 0): |q| 4, n⁺ 2, n⁻ 1 → c = 4/2, 4/2, −4/1, 0
    # q1 = rows 4-7: A = (+, −, −, −): n⁺ 1, n⁻ 3 → c = 4, −4/3, −4/3, −4/3
    c = _disco_grad([1.0, 1.0, -1.0, 0.0, 1.0, -1.0, -1.0, -1.0], [0, 0, 0, 0, 1, 1, 1, 1])
    assert c == pytest.approx([2.0, 2.0, -4.0, 0.0, 4.0, -4 / 3, -4 / 3, -4 / 3])


def test_disco_tau_weights_negatives_by_softmax_of_their_scores():
    # q1 negatives have s = −1, −2, 0 → softmax(s/1) · |q| = 4·e^s / (e^−1 + e^−2 + e^0)
    c = _disco_grad([1.0, 1.0, -1.0, 0.0, 1.0, -1.0, -1.0, -1.0], [0, 0, 0, 0, 1, 1, 1, 1],
                    lp_rows=[0.0, 0.0, -1.0, 0.0, 0.0, -1.0, -2.0, 0.0], tau=1.0)
    z = math.exp(-1) + math.exp(-2) + 1.0
    assert c[5:] == pytest.approx([-4 * math.exp(-1) / z, -4 * math.exp(-2) / z, -4 / z])
    assert c[:5] == pytest.approx([2.0, 2.0, -4.0, 0.0, 4.0]), "one negative, or positives: unchanged by τ"


def test_disco_question_weighting_needs_group_ids_and_tau_needs_it():
    from groupwise.algorithms.surrogates import disco_loss

    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="needs the rows' group ids"):
        disco_loss(x, x + 1, x, old_logp=x, mask=torch.ones(2, 2))
    with pytest.raises(ValueError, match="tau must be > 0 and needs weighting 'question'"):
        disco_loss(x, x + 1, x, old_logp=x, mask=torch.ones(2, 2), weighting="sign", tau=1.0)


def test_group_aware_loss_needs_group_aligned_batches():
    from groupwise.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="optimizer.micro_batch_size \\(12\\) must be a multiple of rollout.num_generations \\(8\\)"):
        load_config(None, ["algorithm.loss=disco", "optimizer.micro_batch_size=12"])
    load_config(None, ["algorithm.loss=disco", "optimizer.micro_batch_size=16", "algorithm.mini_batches=2"])
