"""Multi-reward aggregation: K reward functions' scores `[N, K]` → one scalar reward per completion.

Selected by `rewards.aggregation`; the advantage estimator then runs on the result.

    fn(values[N, K], weights[K], group_id[N]) -> rewards[N]

NaN means "not applicable": it is left out of sums and statistics; a row NaN for every function
stays NaN (the estimators give it advantage 0), as in TRL.
"""
from __future__ import annotations

import torch

from groupwise.algorithms.advantages import group_stats
from groupwise.registry import Registry

REWARD_AGGREGATIONS: Registry = Registry("reward aggregation")
register_reward_aggregation = REWARD_AGGREGATIONS.register


def _weighted_nansum(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    all_nan = torch.isnan(values).all(dim=-1)
    total = torch.nansum(values * weights.to(values), dim=-1)
    return torch.where(all_nan, torch.full_like(total, float("nan")), total)


@register_reward_aggregation("sum_then_normalize")
def weighted_sum(values: torch.Tensor, weights: torch.Tensor, group_id: torch.Tensor) -> torch.Tensor:
    """The weighted sum of the functions' rewards; the advantage estimator normalizes it.

    GRPO's multi-reward default (DeepSeekMath, arXiv 2402.03300; TRL `sum_then_normalize`):

        r_i = Σ_k w_k r_ik        (NaN terms left out; a row NaN for every k stays NaN)
    """
    return _weighted_nansum(values, weights)


@register_reward_aggregation("normalize_then_sum")
def group_normalized_sum(values: torch.Tensor, weights: torch.Tensor, group_id: torch.Tensor,
                         eps: float = 1e-4) -> torch.Tensor:
    """GDPO: normalize each reward within its group, then take the weighted sum.

    Paper: "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL
    Optimization" (Liu et al., arXiv 2601.05242); TRL `multi_objective_aggregation="normalize_then_sum"`.

        z_ik = (r_ik − mean_g(r_k)) / (std_g(r_k) + ε),   r_i = Σ_k w_k z_ik

    with mean and Bessel-corrected std over the valid rewards of function k in completion i's
    group g, ε = 1e-4. A function with fewer than two valid rewards in a group carries no relative
    information there: its z is 0. Normalizing each reward separately keeps reward combinations
    apart that a normalized sum would merge — with two binary rewards and G = 2, (1, 0) vs (0, 1)
    and (1, 1) vs (0, 0) stay distinct.

    GDPO then normalizes the sum over the batch: `algorithm.advantage: batch_std` does exactly that
    here, because every group's z-sum already has mean 0 (with every reward valid), so
    A_i = (r_i − mean_g r) / (std_batch r + ε) = (r_i − mean_batch r) / (std_batch r + ε).
    """
    v = values.double()
    k = v.shape[-1]
    z = torch.empty_like(v)
    for j in range(k):  # K is a handful of reward functions; the statistics themselves are vectorized
        count, mean, std, valid = group_stats(v[:, j], group_id)
        zj = (v[:, j] - mean) / (std + eps)
        z[:, j] = torch.where(valid & (count < 2), torch.zeros_like(zj), zj)  # NaN rows stay NaN
    return _weighted_nansum(z, weights.double()).to(values.dtype)


def aggregate_rewards(name: str, values: torch.Tensor, weights: torch.Tensor, group_id: torch.Tensor) -> torch.Tensor:
    """The registered aggregation `name` applied to `values[N, K]`."""
    return REWARD_AGGREGATIONS.get(name)(values, weights, group_id)
