"""Regularizers: per-token KL estimators to the reference policy.

Each estimator maps `(logp[N,T], ref_logp[N,T]) -> kl[N,T]`, to be masked and aggregated like
the policy loss. Notation from Schulman, "Approximating KL Divergence" (2020 blog post), with
δ = ref − logp (the log-ratio π_ref / π_θ of a token sampled from π_θ). Variants from verl's
`kl_penalty`: `abs`, and the straight-through `k1+`, `k2+`, `k3+` (value of k_n, gradient of k2).
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


@KL_ESTIMATORS.register("abs")
def kl_abs(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """abs = |log π_θ − log π_ref| = |δ|  (verl `kl_penalty` "abs"; not an unbiased KL estimate, a distance)."""
    return (logp - ref_logp).abs()


def _straight_through_k2(value: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    k2 = kl_k2(logp, ref_logp)
    return k2 - k2.detach() + value.detach()


@KL_ESTIMATORS.register("k1+")
def kl_k1_plus(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1+ = k2 − sg(k2) + sg(k1): the value of k1, the gradient of k2 (straight-through).

    verl `kl_penalty` with a "+" suffix (anchors §2.4). ∇k2 = (log π_θ − log π_ref) ∇log π_θ, whose
    expectation over o ~ π_θ is ∇KL(π_θ ‖ π_ref); the gradients of k1 (∇log π_θ, mean 0) and k3
    ((1 − e^δ) ∇log π_θ, the gradient of KL(π_ref ‖ π_θ)) are not. So a "+" estimator logs its
    own value and follows an unbiased gradient of the reverse KL (Schulman, "Approximating KL
    Divergence", 2020).
    """
    return _straight_through_k2(kl_k1(logp, ref_logp), logp, ref_logp)


@KL_ESTIMATORS.register("k2+")
def kl_k2_plus(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2+ = k2 − sg(k2) + sg(k2) = k2 in value and gradient (verl "k2+"; registered for completeness)."""
    return _straight_through_k2(kl_k2(logp, ref_logp), logp, ref_logp)


@KL_ESTIMATORS.register("k3+")
def kl_k3_plus(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3+ = k2 − sg(k2) + sg(k3): the value of k3 (clamped as `k3`), the gradient of k2 (verl "k3+").

    See `k1+` for why: the reported value stays GRPO's k3, the update follows ∇k2.
    """
    return _straight_through_k2(kl_k3(logp, ref_logp), logp, ref_logp)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the softmax over the last dim: H = −Σ p log p, with 0 log 0 = 0 (masked logits)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
