"""Regularizers: per-token KL estimators to the reference policy.

Each estimator maps `(logp[N,T], ref_logp[N,T]) -> kl[N,T]`, to be masked and aggregated like
the policy loss. Notation from Schulman, "Approximating KL Divergence" (2020 blog post), with
δ = ref − logp (the log-ratio π_ref / π_θ of a token sampled from π_θ):
"""
from __future__ import annotations

import torch

from groupwise.registry import Registry

KL_ESTIMATORS: Registry = Registry("KL estimator")

# verl clamps δ to ±20 and k3 to ±10 for numerical safety; we do the same.
_DELTA_LIMIT = 20.0
_K3_LIMIT = 10.0


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log π_θ − log π_ref = −δ  (unbiased, high variance, can be negative)."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 = ½ (log π_θ − log π_ref)² = ½ δ²  (biased, low variance; its gradient is the KL gradient)."""
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = exp(δ) − δ − 1 ≥ 0  (unbiased, low variance; GRPO's KL, DeepSeekMath arXiv 2402.03300)."""
    delta = (ref_logp - logp).clamp(-_DELTA_LIMIT, _DELTA_LIMIT)
    return (torch.exp(delta) - delta - 1.0).clamp(-_K3_LIMIT, _K3_LIMIT)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the softmax over the last dim: H = −Σ p log p, with 0 log 0 = 0 (masked logits)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
