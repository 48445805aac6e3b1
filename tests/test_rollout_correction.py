"""The sampler–trainer importance-sampling correction (TIS / MIS / IcePop): hand-computed weights and properties."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from groupwise.algorithms.rollout_correction import resolve_level, rollout_importance_weights

# Two rows, three positions; row 1's last position is padding.
# log-ratios old − sampling: row 0: ln 2, ln 0.5, ln 4 (sum ln 4); row 1: ln 0.25, ln 1.5 (sum ln 0.375)
OLD = torch.log(torch.tensor([[2.0, 0.5, 4.0], [0.25, 1.5, 9.0]]))
SAMPLING = torch.zeros(2, 3)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def weights(level, mode, clip_max=3.0, clip_min=None, old=OLD, sampling=SAMPLING, mask=MASK):
    return rollout_importance_weights(old, sampling, mask, level, mode, clip_max, clip_min)


@pytest.mark.parametrize(
    "level, mode, clip_min, expected",
    [
        ("token", "truncate", None, [[2.0, 0.5, 3.0], [0.25, 1.5, 0.0]]),
        ("token", "mask", None, [[2.0, 0.5, 0.0], [0.25, 1.5, 0.0]]),
        ("sequence", "truncate", None, [[3.0, 3.0, 3.0], [0.375, 0.375, 0.0]]),
        ("sequence", "mask", None, [[0.0, 0.0, 0.0], [0.375, 0.375, 0.0]]),
        ("token", "truncate", 0.4, [[2.0, 0.5, 3.0], [0.4, 1.5, 0.0]]),
        ("token", "mask", 0.4, [[2.0, 0.5, 0.0], [0.0, 1.5, 0.0]]),
        ("sequence", "truncate", 0.5, [[3.0, 3.0, 3.0], [0.5, 0.5, 0.0]]),
        ("sequence", "mask", 0.5, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
    ],
)
def test_hand_computed_weights(level, mode, clip_min, expected):
    w, _ = weights(level, mode, clip_min=clip_min)
    torch.testing.assert_close(w, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_sequence_level_sums_log_ratios_rather_than_averaging():
    # a geometric mean would give (2·0.5·4)^(1/3) = 1.587 for row 0; TRL (and we) use the product, 4
    w, m = weights("sequence", "truncate", clip_max=10.0)
    assert w[0].tolist() == pytest.approx([4.0, 4.0, 4.0])
    assert m["rollout_correction/ratio_max"] == pytest.approx(4.0)
    assert m["rollout_correction/ratio_min"] == pytest.approx(0.375)
    assert m["rollout_correction/ratio_mean"] == pytest.approx((4.0 + 0.375) / 2)


def test_hand_computed_metrics_token_mask():
    _, m = weights("token", "mask")
    d = [math.log(2), math.log(0.5), math.log(4), math.log(0.25), math.log(1.5)]   # the masked tokens only
    assert m["rollout_correction/logp_diff_mean"] == pytest.approx(sum(abs(x) for x in d) / 5)
    assert m["rollout_correction/logp_diff_max"] == pytest.approx(math.log(4))
    assert m["rollout_correction/ratio_min"] == pytest.approx(0.25)
    assert m["rollout_correction/ratio_max"] == pytest.approx(4.0)
    assert m["rollout_correction/ratio_mean"] == pytest.approx((2 + 0.5 + 4 + 0.25 + 1.5) / 5)
    assert m["rollout_correction/masked_fraction"] == pytest.approx(1 / 5)   # only the ratio 4 > 3 is dropped
    k3 = [math.exp(x) - 1 - x for x in d]
    assert m["rollout_correction/kl"] == pytest.approx(sum(k3) / 5)


def test_masked_fraction_counts_whole_dropped_sequences_and_is_zero_under_truncate():
    _, m = weights("sequence", "mask")
    assert m["rollout_correction/masked_fraction"] == pytest.approx(3 / 5)   # row 0 (3 tokens) of 5
    _, m = weights("sequence", "truncate")
    assert m["rollout_correction/masked_fraction"] == 0.0


def test_padding_gets_weight_zero_whatever_its_log_probs():
    old = torch.tensor([[0.0, 5.0], [-1.0, -30.0]])
    sampling = torch.tensor([[0.0, -5.0], [-1.0, 0.0]])
    mask = torch.tensor([[1, 0], [1, 0]])
    for level in ("token", "sequence"):
        for mode in ("truncate", "mask"):
            w, m = rollout_importance_weights(old, sampling, mask, level, mode, 3.0, None)
            assert w[:, 1].tolist() == [0.0, 0.0]
            assert w[:, 0].tolist() == [1.0, 1.0], "the padding's huge log-ratio must not leak into the sequence sum"
            assert m["rollout_correction/logp_diff_max"] == 0.0


def test_weights_are_detached():
    old = OLD.clone().requires_grad_(True)
    w, _ = weights("token", "truncate", old=old)
    assert not w.requires_grad


def test_no_masked_token_gives_zero_metrics_not_nan():
    w, m = weights("token", "mask", mask=torch.zeros(2, 3, dtype=torch.long))
    assert w.abs().sum() == 0
    assert all(v == 0.0 for v in m.values())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="level"):
        weights("geometric", "mask")
    with pytest.raises(ValueError, match="mode"):
        weights("token", "clip")
    with pytest.raises(ValueError, match="clip_min"):
        weights("token", "mask", clip_max=1.0, clip_min=2.0)
    with pytest.raises(ValueError, match="same"):
        rollout_importance_weights(OLD, SAMPLING[:, :2], MASK, "token", "mask", 3.0, None)


def test_resolve_level():
    assert resolve_level("auto", "vllm") == "sequence"
    assert resolve_level("auto", "hf") == "none"
    assert resolve_level("token", "hf") == "token"
    assert resolve_level("none", "vllm") == "none"
    with pytest.raises(ValueError):
        resolve_level("tokens", "vllm")


# ----- properties -----

@st.composite
def logprob_batches(draw):
    n = draw(st.integers(1, 4))
    t = draw(st.integers(1, 6))
    floats = st.floats(-8.0, 0.0, allow_nan=False, width=32)
    old = torch.tensor(draw(st.lists(floats, min_size=n * t, max_size=n * t))).view(n, t)
    sampling = torch.tensor(draw(st.lists(floats, min_size=n * t, max_size=n * t))).view(n, t)
    mask = torch.tensor(draw(st.lists(st.integers(0, 1), min_size=n * t, max_size=n * t))).view(n, t)
    return old, sampling, mask


clip_bounds = st.tuples(st.floats(0.05, 1.0), st.floats(1.0, 10.0))


@settings(max_examples=150, deadline=None)
@given(logprob_batches(), st.sampled_from(["token", "sequence"]), clip_bounds, st.booleans())
def test_truncated_weights_lie_in_the_clip_range_on_the_mask(batch, level, bounds, one_sided):
    old, sampling, mask = batch
    lo, hi = bounds
    w, _ = rollout_importance_weights(old, sampling, mask, level, "truncate", hi, None if one_sided else lo)
    on = w[mask.bool()]
    assert bool((on <= hi + 1e-6).all())
    assert bool((on >= (0.0 if one_sided else lo) - 1e-6).all())
    assert bool((w[~mask.bool()] == 0).all())


@settings(max_examples=150, deadline=None)
@given(logprob_batches(), st.sampled_from(["token", "sequence"]), clip_bounds)
def test_masked_weights_are_zero_or_the_unclipped_ratio(batch, level, bounds):
    old, sampling, mask = batch
    lo, hi = bounds
    w, _ = rollout_importance_weights(old, sampling, mask, level, "mask", hi, lo)
    diff = (old - sampling) * mask
    ratio = torch.exp(diff) if level == "token" else torch.exp(diff.sum(-1, keepdim=True)).expand_as(diff)
    on = mask.bool()
    kept = w[on] != 0
    torch.testing.assert_close(w[on][kept], ratio[on][kept], rtol=1e-5, atol=0)
    assert bool((ratio[on][kept] >= lo - 1e-6).all() and (ratio[on][kept] <= hi + 1e-6).all())
    dropped = ~kept
    assert bool(((ratio[on][dropped] < lo) | (ratio[on][dropped] > hi)).all()), "only out-of-range ratios are dropped"
    if level == "sequence":   # a sequence is kept or dropped whole
        for row in range(w.shape[0]):
            vals = w[row][on[row]]
            assert bool((vals == 0).all()) or bool((vals != 0).all())


@settings(max_examples=100, deadline=None)
@given(logprob_batches(), st.sampled_from(["token", "sequence"]), st.sampled_from(["truncate", "mask"]), clip_bounds)
def test_identical_logprobs_give_weight_one_on_the_mask(batch, level, mode, bounds):
    old, _, mask = batch
    lo, hi = bounds
    w, m = rollout_importance_weights(old, old.clone(), mask, level, mode, hi, lo)
    assert w[mask.bool()].tolist() == [1.0] * int(mask.sum())
    assert bool((w[~mask.bool()] == 0).all())
    assert m["rollout_correction/kl"] == 0.0 and m["rollout_correction/masked_fraction"] == 0.0
