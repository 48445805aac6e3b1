"""Advantage estimators: scalar rewards of a batch of groups → one advantage per completion.

Every estimator has the signature

    fn(rewards[N], group_id[N], ctx: AdvantageContext | None = None, *, <its options>) -> advantages[N]

`ctx` carries what some estimators need beyond the rewards (completion lengths, dataset columns,
state that persists across steps) and what they may hand back (rows to leave out of the loss,
metrics). Options are keyword-only parameters: the config's `algorithm.advantage_options` is
checked against them, so an option an estimator does not take is refused by name.
Groups may have different sizes and need not be contiguous (later samplers vary G per prompt);
all group statistics are computed with scatter-adds, never with Python loops over groups.
A reward of NaN ("not applicable" for every reward function) is left out of its group's statistics
and gets advantage 0, as in TRL.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from groupwise.registry import Registry


@dataclass
class AdvantageContext:
    """Inputs beyond the rewards, and outputs beyond the advantages, of one estimator call."""

    lengths: torch.Tensor | None = None          # [N] completion lengths in tokens
    columns: dict[str, list] = field(default_factory=dict)   # per-row dataset columns
    state: dict[str, Any] = field(default_factory=dict)       # persists across steps, saved in checkpoints
    loss_mask: torch.Tensor | None = None        # [N] bool, set by estimators that exclude rows (MC-GRPO pivot)
    metrics: dict[str, float] = field(default_factory=dict)   # numbers the estimator wants logged

ADVANTAGES: Registry = Registry("advantage estimator")
register_advantage = ADVANTAGES.register

# Estimators that compare completions within a group need G ≥ 2.
GROUP_ESTIMATORS: set[str] = set()


def _group_sums(values: torch.Tensor, group_id: torch.Tensor, num_groups: int) -> torch.Tensor:
    return torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, group_id, values)


def group_stats(rewards: torch.Tensor, group_id: torch.Tensor, unbiased: bool = True):
    """Per-row group count, mean and std over the valid (non-NaN) rewards of each row's group.

    Returns `(count[N], mean[N], std[N], valid[N])`. Std of a group with fewer than two valid
    rewards (unbiased) or none (biased) is 0. Computed in float64: in float32 the mean of a
    constant group such as 13.7 is inexact, and (r − mean)/(std + ε) would blow that error up.
    """
    group_id = group_id.long()
    out_dtype = rewards.dtype
    rewards = rewards.double()
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
    cast = lambda t: t[group_id].to(out_dtype)  # noqa: E731
    return cast(count), cast(mean), cast(var.sqrt()), valid


def _finish(adv: torch.Tensor, valid: torch.Tensor, count: torch.Tensor, min_count: int = 2) -> torch.Tensor:
    """Zero the advantage of NaN rows and of rows whose group has no baseline."""
    keep = valid & (count >= min_count)
    return torch.where(keep, adv, torch.zeros_like(adv))


@register_advantage("grpo")
def group_mean_std_advantage(
    rewards: torch.Tensor, group_id: torch.Tensor, ctx: AdvantageContext | None = None, *, eps: float = 1e-4, std_unbiased: bool = True
) -> torch.Tensor:
    """GRPO advantage: standardize each reward within its group.

    Paper: "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models"
    (Shao et al., arXiv 2402.03300).

        A_i = (r_i − mean_g(r)) / (std_g(r) + ε)

    std is Bessel-corrected (n − 1) by default, like TRL, verl and OpenRLHF; ε = 1e-4 as TRL.
    A group whose rewards are all equal gets A = 0 for every member.
    """
    r = rewards.double()
    count, mean, std, valid = group_stats(r, group_id, std_unbiased)
    return _finish((r - mean) / (std + eps), valid, count).to(rewards.dtype)


@register_advantage("dr_grpo")
def group_mean_advantage(rewards: torch.Tensor, group_id: torch.Tensor, ctx: AdvantageContext | None = None) -> torch.Tensor:
    """Dr. GRPO advantage: subtract the group mean, do not divide by the std.

    Paper: "Understanding R1-Zero-Like Training: A Critical Perspective" (Liu et al., arXiv 2503.20783).

        A_i = r_i − mean_g(r)

    Removing the std removes GRPO's question-difficulty bias (groups with small reward spread get
    their advantages blown up).
    """
    r = rewards.double()
    count, mean, _, valid = group_stats(r, group_id)
    return _finish(r - mean, valid, count).to(rewards.dtype)


@register_advantage("rloo")
def leave_one_out_advantage(rewards: torch.Tensor, group_id: torch.Tensor, ctx: AdvantageContext | None = None) -> torch.Tensor:
    """RLOO advantage: each reward minus the mean of the *other* rewards of its group.

    Paper: "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
    Feedback in LLMs" (Ahmadian et al., arXiv 2402.14740); Kool et al. 2019 "Buy 4 REINFORCE samples".

        A_i = r_i − (Σ_{j≠i} r_j) / (G − 1) = G/(G−1) · (r_i − mean_g(r))

    The baseline never includes the sample itself, so it is unbiased.
    """
    r = rewards.double()
    count, mean, _, valid = group_stats(r, group_id)
    others_mean = (mean * count - torch.where(valid, r, torch.zeros_like(r))) / (count - 1).clamp(min=1)
    return _finish(r - others_mean, valid, count).to(rewards.dtype)


GROUP_ESTIMATORS.update({"grpo", "dr_grpo", "rloo"})


def compute_advantages(
    name: str, rewards: torch.Tensor, group_id: torch.Tensor, ctx: AdvantageContext | None = None, **options: object
) -> torch.Tensor:
    """Look up an estimator by name and apply it with exactly the options it takes."""
    return ADVANTAGES.get(name)(rewards.float(), group_id, ctx if ctx is not None else AdvantageContext(), **options)


# The rest of the family (Lite PPO, REINFORCE++, OPO, GPG, pass@k, MC-GRPO, NGRPO, BNPO, Stratified,
# DCPO-SAS) lives in a sibling module that registers into ADVANTAGES; importing it here registers it.
from groupwise.algorithms import advantages_family as _advantages_family  # noqa: E402,F401
from groupwise.algorithms import advantages_stateful as _advantages_stateful  # noqa: E402,F401
