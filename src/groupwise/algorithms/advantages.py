"""Advantage estimators: scalar rewards of a batch of groups → one advantage per completion.

Every estimator has the signature `fn(rewards[N], group_id[N], **options) -> advantages[N]`.
Groups may have different sizes and need not be contiguous (later samplers vary G per prompt);
all group statistics are computed with scatter-adds, never with Python loops over groups.
A reward of NaN ("not applicable" for every reward function) is left out of its group's statistics
and gets advantage 0, as in TRL.
"""
from __future__ import annotations

import torch

from groupwise.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator")
register_advantage = ADVANTAGES.register

# Estimators that compare completions within a group need G ≥ 2.
GROUP_ESTIMATORS: set[str] = set()


def _group_sums(values: torch.Tensor, group_id: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, group_id, values)


def group_stats(rewards: torch.Tensor, group_id: torch.Tensor, unbiased: bool = True):
    """Per-row group count, mean and std over the valid (non-NaN) rewards of each row's group.

    Returns `(count[N], mean[N], std[N], valid[N])`. Std of a group with fewer than two valid
    rewards (unbiased) or none (biased) is 0.
    """
    group_id = group_id.long()
    num_groups = int(group_id.max()) + 1 if group_id.numel() else 0
    valid = ~torch.isnan(rewards)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    w = valid.to(rewards.dtype)
    count = _group_sums(w, group_id, num_groups)
    mean = _group_sums(r, group_id, num_groups) / count.clamp(min=1)
    sq_dev = torch.where(valid, (r - mean[group_id]) ** 2, torch.zeros_like(r))
    denom = (count - 1) if unbiased else count
    var = _group_sums(sq_dev, group_id, num_groups) / denom.clamp(min=1)
    var = torch.where(denom > 0, var, torch.zeros_like(var))
    return count[group_id], mean[group_id], var.sqrt()[group_id], valid


def _finish(adv: torch.Tensor, valid: torch.Tensor, count: torch.Tensor, min_count: int = 2) -> torch.Tensor:
    """Zero the advantage of NaN rows and of rows whose group has no baseline."""
    keep = valid & (count >= min_count)
    return torch.where(keep, adv, torch.zeros_like(adv))


@register_advantage("grpo")
def group_mean_std_advantage(
    rewards: torch.Tensor, group_id: torch.Tensor, *, eps: float = 1e-4, std_unbiased: bool = True
) -> torch.Tensor:
    """GRPO advantage: standardize each reward within its group.

    Paper: "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models"
    (Shao et al., arXiv 2402.03300).

        A_i = (r_i − mean_g(r)) / (std_g(r) + ε)

    std is Bessel-corrected (n − 1) by default, like TRL, verl and OpenRLHF; ε = 1e-4 as TRL.
    A group whose rewards are all equal gets A = 0 for every member.
    """
    count, mean, std, valid = group_stats(rewards, group_id, std_unbiased)
    return _finish((rewards - mean) / (std + eps), valid, count)


@register_advantage("dr_grpo")
def group_mean_advantage(rewards: torch.Tensor, group_id: torch.Tensor, **_: object) -> torch.Tensor:
    """Dr. GRPO advantage: subtract the group mean, do not divide by the std.

    Paper: "Understanding R1-Zero-Like Training: A Critical Perspective" (Liu et al., arXiv 2503.20783).

        A_i = r_i − mean_g(r)

    Removing the std removes GRPO's question-difficulty bias (groups with small reward spread get
    their advantages blown up).
    """
    count, mean, _, valid = group_stats(rewards, group_id)
    return _finish(rewards - mean, valid, count)


@register_advantage("rloo")
def leave_one_out_advantage(rewards: torch.Tensor, group_id: torch.Tensor, **_: object) -> torch.Tensor:
    """RLOO advantage: each reward minus the mean of the *other* rewards of its group.

    Paper: "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs" (Ahmadian et al., arXiv 2402.14740); Kool et al. 2019 "Buy 4 REINFORCE samples".

        A_i = r_i − (Σ_{j≠i} r_j) / (G − 1) = G/(G−1) · (r_i − mean_g(r))

    The baseline never includes the sample itself, so it is unbiased.
    """
    count, mean, _, valid = group_stats(rewards, group_id)
    others_mean = (mean * count - torch.where(valid, rewards, torch.zeros_like(rewards))) / (count - 1).clamp(min=1)
    return _finish(rewards - others_mean, valid, count)


GROUP_ESTIMATORS.update({"grpo", "dr_grpo", "rloo"})


def compute_advantages(name: str, rewards: torch.Tensor, group_id: torch.Tensor, **options: object) -> torch.Tensor:
    """Look up an estimator by name and apply it; options the estimator does not take are ignored by it."""
    return ADVANTAGES.get(name)(rewards.float(), group_id, **options)
