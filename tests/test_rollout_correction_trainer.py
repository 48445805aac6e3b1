"""The IS correction inside the objective and the trainer (the weights' own math: test_rollout_correction.py)."""
from __future__ import annotations

import pytest
import torch

from groupwise.algorithms import ObjectiveParts, StepCounts, policy_objective
from groupwise.config import AlgorithmConfig
from groupwise.trainer import Trainer


def test_weights_multiply_the_surrogate_not_the_kl():
    """seq_mean_token_mean, ratio 1, A = [1, −2]: per-token surrogate −A; with weights w the loss
    is mean_rows(mean_tokens(−A·w)) + β·KL (the KL term is not weighted)."""
    cfg = AlgorithmConfig(kl={"coef": 0.5, "estimator": "k1"})
    parts = ObjectiveParts.from_config(cfg)
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]]))
    ref = logp - torch.tensor([[0.1, 0.3], [0.2, 0.0]])          # k1 = logp − ref
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    w = torch.tensor([[2.0, 0.0], [0.5, 7.0]])
    counts = StepCounts.of(mask, 2)
    out = policy_objective(parts, logp, logp.detach(), adv, mask, counts, ref_logp=ref, is_weights=w)
    surrogate = ((-1 * 2.0 + -1 * 0.0) / 2 + (2 * 0.5) / 1) / 2    # rows: (−2 + 0)/2 = −1 ; 1 → mean 0
    kl = ((0.1 + 0.3) / 2 + 0.2 / 1) / 2                             # 0.2
    assert float(out.loss) == pytest.approx(surrogate + 0.5 * kl)
    plain = policy_objective(parts, logp, logp.detach(), adv, mask, counts, ref_logp=ref)
    assert float(plain.loss) == pytest.approx(((-1 - 1) / 2 + 2) / 2 + 0.5 * kl)


def _run(small_config, tmp_path, **extra):
    cfg = small_config(tmp_path / "run", **extra)
    trainer = Trainer(cfg)
    return trainer, trainer.train().last_metrics


def test_hf_sampling_logprobs_match_the_trainer(small_config, tmp_path):
    """Forced on with the hf backend, the correction measures our own sampler against the
    trainer: the same model and temperature, so the log-probs agree to float error and w ≈ 1."""
    _, m = _run(small_config, tmp_path, **{"algorithm.rollout_correction.level": "token", "algorithm.rollout_correction.mode": "truncate"})
    assert m["rollout_correction/logp_diff_max"] < 1e-4
    assert m["rollout_correction/ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert m["rollout_correction/ratio_max"] == pytest.approx(1.0, abs=1e-4)


def test_mask_mode_with_an_impossible_window_drops_every_token(small_config, tmp_path):
    """clip_max 0.5 < 1 ≈ every ratio: MIS masks every token, so the surrogate contributes nothing."""
    _, m = _run(small_config, tmp_path, **{"algorithm.rollout_correction.level": "sequence", "algorithm.rollout_correction.clip_max": 0.5})
    assert m["rollout_correction/masked_fraction"] == pytest.approx(1.0)
    assert m["policy_loss"] == 0.0 and m["grad_norm"] == 0.0


def test_auto_is_off_with_the_hf_backend(small_config, tmp_path):
    trainer, m = _run(small_config, tmp_path, **{"schedule.steps": 1})
    assert trainer.correction_level == "none"
    assert not any(k.startswith("rollout_correction/") for k in m)
