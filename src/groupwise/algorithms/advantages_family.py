"""More advantage estimators of the GRPO family, registered into `advantages.ADVANTAGES`.

Same contract as `advantages.py`: `fn(rewards[N], group_id[N], ctx=None, *, <options>) -> [N]`,
vectorized over groups (scatter-adds, sorts), NaN rewards left out of every statistic with
advantage 0, statistics in float64 and the result cast back to the rewards' dtype. What an
estimator needs beyond the rewards comes from `ctx` (lengths, dataset columns, persistent state);
a missing field raises ValueError naming the estimator. State kept in `ctx.state` holds plain
floats, ints and lists only, so it round-trips through JSON in checkpoints.

This module is imported at the bottom of `advantages.py`; importing either registers everything.
Estimators with state across steps (BNPO, DCPO-SAS) are in `advantages_stateful.py`.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from groupwise.algorithms.advantages import (
    GROUP_ESTIMATORS,
    AdvantageContext,
    _finish,
    _group_sums,
    group_mean_std_advantage,
    group_stats,
    register_advantage,
)

# ---------------------------------------------------------------------------------------------
# Helpers (all vectorized over groups)
# ---------------------------------------------------------------------------------------------


def _num_groups(group_id: torch.Tensor) -> int:
    return int(group_id.max()) + 1 if group_id.numel() else 0


def _constant_rows(r: torch.Tensor, group_id: torch.Tensor, valid: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[N] bool: the row's group has at least one valid reward and all its valid rewards are equal.

    Exact (max == min), unlike `std == 0`, which float rounding of the mean can miss.
    """
    inf = torch.full((num_groups,), math.inf, dtype=r.dtype, device=r.device)
    hi = (-inf).scatter_reduce(0, group_id, torch.where(valid, r, -math.inf), reduce="amax")
    lo = inf.scatter_reduce(0, group_id, torch.where(valid, r, math.inf), reduce="amin")
    return (hi == lo)[group_id]


def _group_range(r: torch.Tensor, group_id: torch.Tensor, valid: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[N] max − min of the valid rewards of the row's group (0 for groups with < 1 valid reward)."""
    inf = torch.full((num_groups,), math.inf, dtype=r.dtype, device=r.device)
    hi = (-inf).scatter_reduce(0, group_id, torch.where(valid, r, -math.inf), reduce="amax")
    lo = inf.scatter_reduce(0, group_id, torch.where(valid, r, math.inf), reduce="amin")
    rng = torch.where(hi >= lo, hi - lo, torch.zeros_like(hi))
    return rng[group_id]


def _group_order(values: torch.Tensor, group_id: torch.Tensor, valid: torch.Tensor, num_groups: int):
    """Row order sorted by (group, value, row index) with each group's invalid rows last.

    Returns `(order[N], start[num_groups])`: the rows of group g occupy `order[start[g] : start[g] + size_g]`.
    Two stable sorts: by value first, then by group, so ties keep increasing row index.
    """
    key = torch.where(valid, values, torch.full_like(values, math.inf))
    by_value = torch.sort(key, stable=True).indices
    by_group = torch.sort(group_id[by_value], stable=True).indices
    order = by_value[by_group]
    size = torch.bincount(group_id, minlength=num_groups)
    start = torch.cumsum(size, 0) - size
    return order, start


def _group_lower_median(values: torch.Tensor, group_id: torch.Tensor, valid: torch.Tensor, num_groups: int):
    """Per group: the lower median of the valid values (the ⌈n/2⌉-th smallest) and the valid count.

    Groups with no valid value get median 0.
    """
    order, start = _group_order(values, group_id, valid, num_groups)
    count = _group_sums(valid.to(torch.long), group_id, num_groups)
    pos = (start + (count - 1).clamp(min=0) // 2).clamp(max=max(values.numel() - 1, 0))
    med = values[order[pos]] if values.numel() else values.new_zeros(num_groups)
    med = torch.where(count > 0, med, torch.zeros_like(med))
    return med, count, order, start


def _whiten(a: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """verl `masked_whiten` of a per-row value repeated over `weight` tokens.

        mean = Σ w a / Σ w,   var = Σ w (a − mean)² / (Σ w − 1),   out = (a − mean) / √(var + ε)

    Rows with weight 0 do not enter the statistics. With Σ w ≤ 1 the variance is taken as 0.
    """
    total = weight.sum()
    if total <= 0:
        return torch.zeros_like(a)
    mean = (weight * a).sum() / total
    ss = (weight * (a - mean) ** 2).sum()
    var = ss / (total - 1) if total > 1 else torch.zeros_like(ss)
    denom = torch.sqrt(var + eps)
    return (a - mean) / denom if denom > 0 else torch.zeros_like(a)


def _lengths(name: str, rewards: torch.Tensor, ctx: AdvantageContext | None, required: bool) -> torch.Tensor | None:
    lengths = None if ctx is None else ctx.lengths
    if lengths is None:
        if required:
            raise ValueError(f"advantage estimator '{name}' needs ctx.lengths (the completion lengths in tokens)")
        return None
    lengths = torch.as_tensor(lengths).to(device=rewards.device, dtype=torch.float64)
    if lengths.shape != rewards.shape:
        raise ValueError(f"advantage estimator '{name}': ctx.lengths has shape {tuple(lengths.shape)}, "
                         f"the rewards {tuple(rewards.shape)}")
    return lengths


def _column(name: str, ctx: AdvantageContext | None, key: str, n: int, hint: str = "") -> list:
    if ctx is None or key not in ctx.columns:
        have = ", ".join(sorted(ctx.columns)) if ctx is not None and ctx.columns else "none"
        raise ValueError(f"advantage estimator '{name}' needs ctx.columns['{key}'] (columns present: {have}){hint}")
    values = list(ctx.columns[key])
    if len(values) != n:
        raise ValueError(f"advantage estimator '{name}': ctx.columns['{key}'] has {len(values)} rows, the rewards {n}")
    return values


def _codes(values: list, device: torch.device) -> tuple[torch.Tensor, list]:
    """Map arbitrary (hashable) values to consecutive ints in order of first appearance."""
    index: dict[Any, int] = {}
    out = []
    for v in values:  # data preparation (hashing), not group math
        try:
            k = ("h", v)
            hash(k)
        except TypeError:
            k = ("r", repr(v))
        out.append(index.setdefault(k, len(index)))
    keys = [k[1] for k in sorted(index, key=index.__getitem__)]
    return torch.tensor(out, dtype=torch.long, device=device), keys


# ---------------------------------------------------------------------------------------------
# Batch-level normalizers
# ---------------------------------------------------------------------------------------------


@register_advantage("batch_std")
def batch_std_advantage(
    rewards: torch.Tensor, group_id: torch.Tensor, ctx: AdvantageContext | None = None, *,
    eps: float = 1e-4, std_unbiased: bool = True,
) -> torch.Tensor:
    """Lite PPO advantage: group mean, batch std.

    Paper: "Tricks or Traps? A Deep Dive into RL for LLM Reasoning" (Liu et al., arXiv 2508.08221);
    TRL `scale_rewards="batch"`.

        A_i = (r_i − mean_g(r)) / (std_batch(r) + ε)

    std_batch is over every valid reward of the batch (not over the centred values), Bessel-corrected
    by default as TRL's `rewards.std()`. Groups whose rewards are all equal, and groups with fewer
    than two valid rewards, get exactly 0.
    """
    r = rewards.double()
    count, mean, _, valid = group_stats(r, group_id)
    rv = r[valid]
    need = 2 if std_unbiased else 1
    std = rv.std(correction=1 if std_unbiased else 0) if rv.numel() >= need else r.new_zeros(())
    adv = (r - mean) / (std + eps)
    adv = torch.where(_constant_rows(r, group_id.long(), valid, _num_groups(group_id)), torch.zeros_like(adv), adv)
    return _finish(adv, valid, count).to(rewards.dtype)


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline_advantage(
    rewards: torch.Tensor, group_id: torch.Tensor, ctx: AdvantageContext | None = None, *, eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++-baseline: subtract the group mean, then whiten over the whole batch.

    Paper: "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward Models"
    (Hu et al., arXiv 2501.03262); verl `reinforce_plus_plus_baseline`, OpenRLHF `reinforce_baseline`.

        a_i = r_i − mean_g(r)
        A_i = (a_i − m) / √(v + ε),   m = Σ_j w_j a_j / Σ_j w_j,   v = Σ_j w_j (a_j − m)² / (Σ_j w_j − 1)

    verl tiles a_i over the completion's tokens and whitens over all tokens of the batch
    (`masked_whiten`, Bessel-corrected, ε inside the square root). With `ctx.lengths` the weights are
    w_j = |o_j|, which is exactly that token-level whitening of a sequence-constant advantage; without
    lengths w_j = 1 (sequence-level whitening). verl's ε is 1e-8, and so is this default;
    `algorithm.advantage_eps` overrides it only when set. Rows of groups with fewer than two valid rewards have no
    baseline: they are left out of the whitening statistics and get 0 (verl would use a_i = r_i).
    After whitening a constant group is 0 only when m = 0 (always so with equal weights).
    """
    r = rewards.double()
    gid = group_id.long()
    count, mean, _, valid = group_stats(r, gid)
    lengths = _lengths("reinforce_pp_baseline", rewards, ctx, required=False)
    a = torch.where(_constant_rows(r, gid, valid, _num_groups(gid)), torch.zeros_like(r), r - mean)
    use = valid & (count >= 2)
    a = torch.where(use, a, torch.zeros_like(a))
    w = (lengths if lengths is not None else torch.ones_like(r)) * use.to(r.dtype)
    adv = _whiten(a, w, eps)
    return torch.where(use, adv, torch.zeros_like(adv)).to(rewards.dtype)


@register_advantage("reinforce_pp")
def reinforce_pp_advantage(
    rewards: torch.Tensor, group_id: torch.Tensor, ctx: AdvantageContext | None = None, *, eps: float = 1e-8,
) -> torch.Tensor:
    """REINFORCE++: the return, whitened over the whole batch; no group baseline.

    Paper: "REINFORCE++: An Efficient RLHF Algorithm with Robustness to Both Prompt and Reward Models"
    (Hu et al., arXiv 2501.03262); verl `reinforce_plus_plus`, OpenRLHF `reinforce`.

        A_i = (r_i − m) / √(v + ε),   m = Σ_j w_j r_j / Σ_j w_j,   v = Σ_j w_j (r_j − m)² / (Σ_j w_j − 1)

    With an outcome reward only (no KL in the reward) and γ = 1 every token's return G_t equals r_i,
    so verl's token-level whitening of the returns is the weighted whitening above with w_j = |o_j|
    (`ctx.lengths`), or w_j = 1 without lengths. Groups play no role (G = 1 is fine). verl's ε is
    1e-8, and so is this default; `algorithm.advantage_eps` overrides it only when set.
    """
    r = rewards.double()
    valid = ~torch.isnan(r)
    lengths = _lengths("reinforce_pp", rewards, ctx, required=False)
    a = torch.where(valid, r, torch.zeros_like(r))
    w = (lengths if lengths is not None else torch.ones_like(r)) * valid.to(r.dtype)
    adv = _whiten(a, w, eps)
    return torch.where(valid, adv, torch.zeros_like(adv)).to(rewards.dtype)


# ---------------------------------------------------------------------------------------------
# Other baselines and scalings
# ---------------------------------------------------------------------------------------------


@register_advantage("opo")
def opo_advantage(rewards: torch.Tensor, group_id: torch.Tensor, ctx: AdvantageContext | None = None) -> torch.Tensor:
    """OPO advantage: the length-weighted mean reward of the group as baseline.

    Paper: "On-Policy RL with Optimal Reward Baseline" (Hao et al., arXiv 2505.23585); verl `opo`.

        b_g = Σ_j |o_j| r_j / Σ_j |o_j|        (j over the group's valid rows, the row itself included)
        A_i = r_i − b_g

    Needs `ctx.lengths`. A group whose lengths are all 0 falls back to the plain mean. Groups whose
    rewards are all equal get exactly 0; groups with fewer than two valid rewards get 0 (verl: b = 0).
    """
    lengths = _lengths("opo", rewards, ctx, required=True)
    r = rewards.double()
    gid = group_id.long()
    num_groups = _num_groups(gid)
    count, mean, _, valid = group_stats(r, gid)
    w = torch.where(valid, lengths, torch.zeros_like(lengths))
    r0 = torch.where(valid, r, torch.zeros_like(r))
    sum_w = _group_sums(w, gid, num_groups)[gid]
    sum_wr = _group_sums(w * r0, gid, num_groups)[gid]
    baseline = torch.where(sum_w > 0, sum_wr / sum_w.clamp(min=1e-300), mean)
    adv = torch.where(_constant_rows(r, gid, valid, num_groups), torch.zeros_like(r), r - baseline)
    return _finish(adv, valid, count).to(rewards.dtype)


@register_advantage("gpg")
def gpg_advantage(
    rewards: torch.Tensor, group_id: torch.Tensor, ctx: AdvantageContext | None = None, *, f_norm: float = 1.0,
) -> torch.Tensor:
    """GPG advantage: group-centred reward, rescaled by the share of rows that carry a gradient.

    Paper: "GPG: A Simple and Strong Reinforcement Learning Baseline for Model Reasoning"
    (Chu et al., arXiv 2504.02546); verl `gpg`.

        A_i = α (r_i − mean_g(r)) / F_norm,   α = N / M

    N = number of valid rows of the batch, M = number of rows whose centred reward is nonzero
    (at least 1): the paper's gradient-estimation correction B / (B − M_0), M_0 = rows with zero
    advantage (with 0/1 rewards: the rows of all-correct or all-wrong groups). verl computes α = bsz / count_nonzero(scores), i.e. counts nonzero
    *rewards*, which differs (all-correct groups count there); we follow the paper.
    A row counts as nonzero when |r_i − mean_g| > 1e-9 · (max_g − min_g), so float rounding of the
    mean does not count the rows of constant groups. F_norm (`f_norm`) is verl's constant divisor
    (default 1). α is logged as `gpg/alpha`.
    """
    r = rewards.double()
    gid = group_id.long()
    num_groups = _num_groups(gid)
    count, mean, _, valid = group_stats(r, gid)
    rng = _group_range(r, gid, valid, num_groups)
    dev = _finish(r - mean, valid, count)
    nonzero = (rng > 0) & ((r - mean).abs() > 1e-9 * rng) & valid & (count >= 2)
    dev = torch.where(nonzero, dev, torch.zeros_like(dev))
    n_valid = int(valid.sum())
    alpha = n_valid / max(int(nonzero.sum()), 1)
    if ctx is not None:
        ctx.metrics["gpg/alpha"] = float(alpha)
    return (alpha * dev / f_norm).to(rewards.dtype)


@register_advantage("passk")
def passk_advantage(
    rewards: torch.Tensor, group_id: torch.Tensor, ctx: AdvantageContext | None = None, *,
    normalize_by_std: bool = False, eps: float = 1e-4, std_unbiased: bool = True,
) -> torch.Tensor:
    """Pass@k advantage: only the best completion of a group gets a (non-negative) advantage.

    Paper: "Optimizing Language Models for Inference Time Objectives using Reinforcement Learning"
    (Tang et al., arXiv 2503.19595); verl `grpo_passk`.

        A_i = r_max,g − r_2nd,g   if i is the best row of its group,   A_i = 0 otherwise
        (with normalize_by_std:   A_i = (r_max,g − r_2nd,g) / (std_g(r) + ε))

    The best row is the lowest row index among those with the group's maximum reward; r_2nd is the
    maximum over the other valid rows, so a tie at the top gives 0. verl divides by the std by
    default (`norm_adv_by_std_in_grpo`); here the default is no division, as the formula above.
    Groups with fewer than two valid rewards get 0 (verl raises).
    """
    r = rewards.double()
    gid = group_id.long()
    n = r.numel()
    num_groups = _num_groups(gid)
    count, _, std, valid = group_stats(r, gid, std_unbiased)
    key = torch.where(valid, r, torch.full_like(r, -math.inf))
    neg = torch.full((num_groups,), -math.inf, dtype=r.dtype, device=r.device)
    gmax = neg.scatter_reduce(0, gid, key, reduce="amax")
    rows = torch.arange(n, device=r.device)
    at_max = valid & (r == gmax[gid])
    best = torch.full((num_groups,), n, dtype=torch.long, device=r.device)
    best = best.scatter_reduce(0, gid, torch.where(at_max, rows, torch.full_like(rows, n)), reduce="amin")
    is_best = rows == best[gid]
    second = neg.scatter_reduce(0, gid, torch.where(is_best, torch.full_like(key, -math.inf), key), reduce="amax")
    gap = (gmax - second)[gid]
    adv = torch.where(is_best & (count >= 2), gap, torch.zeros_like(r))
    if normalize_by_std:
        adv = adv / (std + eps)
    return _finish(adv, valid, count).to(rewards.dtype)


# ---------------------------------------------------------------------------------------------
# Median baseline (MC-GRPO)
# ---------------------------------------------------------------------------------------------


@register_advantage("mc_grpo")
def median_centered_advantage(
    rewards: torch.Tensor, group_id: torch.Tensor, ctx: AdvantageContext | None = None, *,
    scale: str = "mad", scale_eps: float = 1e-3,
) -> torch.Tensor:
    """MC-GRPO advantage: median baseline; the median ("pivot") rollout is left out of the loss.

    Paper: "MC-GRPO: Median-Centered Group Relative Policy Optimization for Small-Rollout
    Reinforcement Learning" (Kim, arXiv 2601.22582); code github.com/lotusroot-kim/MC-GRPO.

        med_g = lower median of the group's valid rewards
        A_i = (r_i − med_g) / (MAD_g + ε),   MAD_g = lower median_j |r_j − med_g|      (scale="mad")
        A_i = (r_i − med_g) / (std_g + ε)                                              (scale="std")
        A_i =  r_i − med_g                                                             (scale="none")

    Sample G+1 rollouts per prompt (an odd group): exactly one row per group is the pivot, gets
    A = 0 and is excluded from the loss (`ctx.loss_mask[pivot] = False`), so G rows carry gradient.
    With ties the pivot is the lowest row index among the rows equal to the median. For an even
    group the lower median is used (what `torch.median` returns). The paper's code divides by the
    MAD (+1e-3) in every MC mode and does not divide by the std; that is the default here. Beware:
    with 0/1 rewards the MAD is always 0, so |A| = 1/ε = 1000 for the minority rows (as in the
    reference code); use scale="none" for unscaled advantages. The scale's ε is its own option
    (`scale_eps`, the reference's 1e-3), not the config's advantage_eps. The number of pivots is
    logged as `mc_grpo/pivots`. Needs a ctx to hand back the loss mask.
    """
    if ctx is None:
        raise ValueError("advantage estimator 'mc_grpo' needs a ctx (AdvantageContext) to exclude its pivot rows "
                         "from the loss through ctx.loss_mask")
    if scale not in ("mad", "std", "none"):
        raise ValueError(f"advantage estimator 'mc_grpo': scale must be 'mad', 'std' or 'none', got {scale!r}")
    r = rewards.double()
    gid = group_id.long()
    n = r.numel()
    num_groups = _num_groups(gid)
    valid = ~torch.isnan(r)
    med, count, order, start = _group_lower_median(r, gid, valid, num_groups)
    dev = torch.where(valid, r - med[gid], torch.zeros_like(r))
    if scale == "mad":
        mad, _, _, _ = _group_lower_median(dev.abs(), gid, valid, num_groups)
        adv = dev / (mad[gid] + scale_eps)
    elif scale == "std":
        _, _, std, _ = group_stats(r, gid)
        adv = dev / (std + scale_eps)
    else:
        adv = dev
    # The pivot: the first row (in (value, index) order) of the group equal to its median.
    below = _group_sums((valid & (r < med[gid])).to(torch.long), gid, num_groups)
    has = count > 0
    pivots = order[(start + below)[has]] if n else order[:0]
    keep = torch.ones(n, dtype=torch.bool, device=r.device)
    keep[pivots] = False
    adv = torch.where(keep, adv, torch.zeros_like(adv))
    adv = _finish(adv, valid, count[gid])
    ctx.loss_mask = keep if ctx.loss_mask is None else (ctx.loss_mask.to(torch.bool) & keep)
    ctx.metrics["mc_grpo/pivots"] = float(pivots.numel())
    return adv.to(rewards.dtype)


# ---------------------------------------------------------------------------------------------
# Virtual max-reward sample (NGRPO)
# ---------------------------------------------------------------------------------------------


@register_advantage("ngrpo")
def ngrpo_advantage(
    rewards: torch.Tensor, group_id: torch.Tensor, ctx: AdvantageContext | None = None, *,
    max_reward: float = 1.0, num_virtual: int = 1, eps: float = 1e-4, std_unbiased: bool = True,
) -> torch.Tensor:
    """NGRPO advantage calibration: each group's statistics include virtual max-reward samples.

    Paper: "NGRPO: Negative-enhanced Group Relative Policy Optimization" (Nan et al., arXiv 2509.18851);
    code github.com/nangongrui-ngr/NGRPO (`compute_ngrpo_outcome_advantage`).

        μ'_g = (Σ_j r_j + k·R) / (n + k)
        σ'_g = √( (Σ_j (r_j − μ'_g)² + k·(R − μ'_g)²) / (n + k − 1) )      (n + k if not std_unbiased)
        A_i = (r_i − μ'_g) / (σ'_g + ε)

    R = `max_reward`, k = `num_virtual` (the reference's add_max_reward_num, default 1), n = the
    group's valid rewards; j runs over the real rows only and only real rows get an advantage. An
    all-wrong group now gets negative advantages; an all-R group still gets 0. Bessel-corrected std
    as the reference (`torch.std`); its ε is 1e-6; here ε defaults to 1e-4
    (TRL's) and `algorithm.advantage_eps` overrides it when set.
    The paper's second mechanism (asymmetric clipping) is a loss option, not part of this estimator.
    """
    if int(num_virtual) != num_virtual or num_virtual < 1:
        raise ValueError(f"advantage estimator 'ngrpo': num_virtual must be a positive integer, got {num_virtual!r}")
    k = float(num_virtual)
    r = rewards.double()
    gid = group_id.long()
    num_groups = _num_groups(gid)
    count, _, _, valid = group_stats(r, gid)
    r0 = torch.where(valid, r, torch.zeros_like(r))
    total = _group_sums(r0, gid, num_groups)[gid] + k * max_reward
    mean = total / (count + k)
    sq = torch.where(valid, (r - mean) ** 2, torch.zeros_like(r))
    ss = _group_sums(sq, gid, num_groups)[gid] + k * (max_reward - mean) ** 2
    std = torch.sqrt(ss / ((count + k - 1) if std_unbiased else (count + k)))
    adv = (r - mean) / (std + eps)
    return _finish(adv, valid, count).to(rewards.dtype)


# ---------------------------------------------------------------------------------------------
# Stratified advantage normalization
# ---------------------------------------------------------------------------------------------


@register_advantage("stratified")
def stratified_advantage(
    rewards: torch.Tensor, group_id: torch.Tensor, ctx: AdvantageContext | None = None, *,
    key: str, blend: float = 0.8, eps: float = 1e-4, std_unbiased: bool = True,
) -> torch.Tensor:
    """Stratified GRPO: standardize within strata of each group, blended with the group estimate.

    Paper: "Stratified GRPO: Handling Structural Heterogeneity in Reinforcement Learning of LLM
    Search Agents" (Zhu et al., arXiv 2510.06214).

        A_SAN,i = (r_i − mean_{g,k}(r)) / (std_{g,k}(r) + ε)      (k = the row's stratum within group g)
        A_GN,i  = (r_i − mean_g(r)) / (std_g(r) + ε)                (plain GRPO over the group)
        A_i     = λ·A_SAN,i + (1 − λ)·A_GN,i                        (λ = `blend`)

    The stratum of a row is `ctx.columns[key]` (e.g. the number of search/tool calls); any values,
    mapped to ints (unhashable ones by repr). Strata are formed inside each prompt's group, as the
    paper's analysis (strata of one prompt's K rollouts). A stratum with a single valid row has no
    peer: its SAN term is 0. The paper blends for finite-sample stability but its λ could not be read
    from the sources available to us (abstract and summaries); the default λ = 0.8 is our choice.
    """
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"advantage estimator 'stratified': blend must be in [0, 1], got {blend}")
    values = _column("stratified", ctx, key, rewards.numel(), " (set advantage_options.key to the stratum column)")
    r = rewards.double()
    gid = group_id.long()
    codes, _ = _codes(values, r.device)
    num_strata = int(codes.max()) + 1 if codes.numel() else 1
    _, cell = torch.unique(gid * num_strata + codes, return_inverse=True)
    a_san = group_mean_std_advantage(r, cell, eps=eps, std_unbiased=std_unbiased)
    a_glob = group_mean_std_advantage(r, gid, eps=eps, std_unbiased=std_unbiased)
    return (blend * a_san + (1 - blend) * a_glob).to(rewards.dtype)


GROUP_ESTIMATORS.update({"batch_std", "reinforce_pp_baseline", "opo", "gpg", "passk", "mc_grpo", "ngrpo", "stratified"})
