"""Advantage estimators with statistics that persist across steps (kept in `ctx.state`).

BNPO fits a Beta distribution to the policy's success rates; DCPO's smooth advantage
standardization keeps running per-prompt statistics. The state holds plain floats, ints and
lists only, so it round-trips through JSON in checkpoints and resume stays exact.
"""
from __future__ import annotations

import math

import torch

from groupwise.algorithms.advantages import GROUP_ESTIMATORS, AdvantageContext, _finish, _group_sums, group_stats, register_advantage
from groupwise.algorithms.advantages_family import _codes, _column, _constant_rows, _num_groups  # shared vectorized helpers

# ---------------------------------------------------------------------------------------------
# Beta normalization (BNPO)
# ---------------------------------------------------------------------------------------------


def _beta_pdf(p: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    log_b = math.lgamma(alpha) + math.lgamma(beta) - math.lgamma(alpha + beta)
    logp = torch.xlogy(torch.tensor(alpha - 1.0, dtype=p.dtype), p) + torch.xlogy(
        torch.tensor(beta - 1.0, dtype=p.dtype), 1 - p) - log_b
    return torch.exp(logp)


@register_advantage("bnpo")
def bnpo_advantage(
    rewards: torch.Tensor, group_id: torch.Tensor, ctx: AdvantageContext | None = None, *,
    min_value: float = 0.0, max_value: float = 1.0, momentum: float = 0.0, max_weight: float = 1e6,
) -> torch.Tensor:
    """BNPO advantage: reward minus the group success rate, divided by a Beta density at that rate.

    Paper: "BNPO: Beta Normalization Policy Optimization" (Xiao et al., arXiv 2506.02864); code
    github.com/changyi7231/BNPO (`compute_bnpo_outcome_advantage`).

        s_i = (r_i − min_value) / (max_value − min_value)          (rewards mapped into [0, 1])
        p_g = mean_g(s)                                              (Monte-Carlo success rate)
        μ = mean over groups of p_g,  σ² = unbiased var over groups of p_g
        a = (μ(1−μ)/σ² − 1)·μ,   b = (μ(1−μ)/σ² − 1)·(1−μ)          (method-of-moments Beta(a, b) fit of p)
        α = max(1 + a/3, 1),     β = max(1 + b/3, 1)
        A_i = (s_i − p_g) / f(p_g; α, β),   1/f clamped to ≤ max_weight (1e6, as the reference)

    f is the Beta(α, β) density. State update, in `ctx.state["bnpo"]` (JSON: floats and an int):
    the reference re-fits (μ, σ²) on every batch, which is `momentum = 0` (default). With momentum m
    > 0 the moments are an exponential moving average across steps, μ_t = m·μ_{t−1} + (1−m)·μ_batch
    (σ² likewise) — an option of ours. If a batch has fewer than two usable groups or σ² = 0, the
    stored (α, β) are reused (Beta(1, 1), i.e. A = s − p, before any state exists). Only groups with
    at least two valid rewards enter the fit (the reference also counts singletons, with p = 0).
    The advantage is in the [0, 1]-mapped reward units, as in the reference. The paper's advantage
    decomposition for several reward functions is not part of this estimator (it sees summed rewards).
    Logs `bnpo/alpha`, `bnpo/beta`. Rewards outside [min_value, max_value] raise ValueError.
    """
    if not max_value > min_value:
        raise ValueError(f"advantage estimator 'bnpo': max_value ({max_value}) must exceed min_value ({min_value})")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"advantage estimator 'bnpo': momentum must be in [0, 1), got {momentum}")
    r = rewards.double()
    gid = group_id.long()
    num_groups = _num_groups(gid)
    valid = ~torch.isnan(r)
    s = (r - min_value) / (max_value - min_value)
    sv = s[valid]
    if sv.numel() and (sv.min() < -1e-9 or sv.max() > 1 + 1e-9):
        raise ValueError(f"advantage estimator 'bnpo': rewards must lie in [min_value, max_value] = "
                         f"[{min_value}, {max_value}]; got [{float(r[valid].min())}, {float(r[valid].max())}]")
    s = s.clamp(0.0, 1.0)
    count, p, _, _ = group_stats(s, gid)                      # per-row count and success rate p_g
    count_g = _group_sums(valid.to(r.dtype), gid, num_groups)
    sum_g = _group_sums(torch.where(valid, s, torch.zeros_like(s)), gid, num_groups)
    usable = count_g >= 2
    p_groups = (sum_g / count_g.clamp(min=1))[usable]

    state = ctx.state.get("bnpo") if ctx is not None else None
    mu = var = None
    if p_groups.numel() >= 2:
        mu, var = float(p_groups.mean()), float(p_groups.var(correction=1))
        if state is not None and momentum > 0 and state.get("p_mean") is not None:
            mu = momentum * float(state["p_mean"]) + (1 - momentum) * mu
            var = momentum * float(state["p_var"]) + (1 - momentum) * var
    if mu is not None and var > 0 and 0.0 < mu < 1.0:
        c = mu * (1 - mu) / var - 1
        alpha, beta = max(1 + c * mu / 3, 1.0), max(1 + c * (1 - mu) / 3, 1.0)
    elif state is not None and "alpha" in state:
        alpha, beta = float(state["alpha"]), float(state["beta"])
        mu, var = state.get("p_mean"), state.get("p_var")
    else:
        alpha, beta = 1.0, 1.0
    weight = (1.0 / _beta_pdf(p, alpha, beta)).clamp(max=max_weight)
    adv = torch.where(valid, weight * (s - p), torch.zeros_like(s))
    adv = torch.where(_constant_rows(r, gid, valid, num_groups), torch.zeros_like(adv), adv)
    if ctx is not None:
        steps = int(state.get("steps", 0)) if state is not None else 0
        ctx.state["bnpo"] = {
            "alpha": float(alpha), "beta": float(beta),
            "p_mean": None if mu is None else float(mu), "p_var": None if var is None else float(var),
            "steps": steps + 1,
        }
        ctx.metrics["bnpo/alpha"] = float(alpha)
        ctx.metrics["bnpo/beta"] = float(beta)
    return _finish(adv, valid, count).to(rewards.dtype)


# ---------------------------------------------------------------------------------------------
# Smooth advantage standardization across steps (DCPO)
# ---------------------------------------------------------------------------------------------


@register_advantage("dcpo_sas")
def dcpo_sas_advantage(
    rewards: torch.Tensor, group_id: torch.Tensor, ctx: AdvantageContext | None = None, *,
    key: str = "prompt_index", normalize_by_std: bool = True, eps: float = 1e-6,
) -> torch.Tensor:
    """DCPO smooth advantage standardization (SAS): blend this step's and the prompt's cumulative statistics.

    Paper: "DCPO: Dynamic Clipping Policy Optimization" (Yang et al., arXiv 2509.02333); code
    github.com/lime-RL/DCPO (`compute_dcpo_outcome_advantage`, `get_mean_std`).

    For a prompt seen in t earlier steps (i = t + 1 with this one), with this step's group statistics
    (μ_new, σ_new, Bessel-corrected) and the stored cumulative ones (μ_old, σ_old):

        μ_tot  = (t·μ_old + μ_new) / (t + 1)
        σ²_tot = (t·σ²_old + σ²_new + t/(t+1)·(μ_new − μ_old)²) / (t + 1)      (t = 0: μ_tot = μ_new, σ_tot = σ_new)
        Â_new = (r − μ_new)/σ_new,  Â_tot = (r − μ_tot)/σ_tot      (0 where σ ≤ ε; no ε in the divisor)
        SA_1 = (1/i)·Â_tot + (1 − 1/i)·Â_new,   SA_2 = (1/i)·Â_new + (1 − 1/i)·Â_tot
        A_i  = SA_1 if |SA_1| < |SA_2| else SA_2

    Without `normalize_by_std`, Â_new = r − μ_new and Â_tot = r − μ_tot. The cumulative statistics
    weight every step equally (a mixture of per-step distributions), as the reference. On a prompt's
    first visit A equals GRPO without ε; on a later visit a constant group still gets a signal from
    its history. State: `ctx.state["dcpo_sas"][str(prompt key)] = [i, μ_tot, σ_tot]` (one entry per
    prompt seen). The prompt key is `ctx.columns[key]` (default `prompt_index`): it must identify
    the prompt across steps; rows sharing a key in one batch are pooled into one group. Keys with
    fewer than two valid rewards in this step get A = 0 and no state update (the reference raises).
    The reference's `user_old_mean_ratio` (default 1) is not exposed. ε is a threshold here (default
    1e-6, the reference's); `algorithm.advantage_eps` overrides it only when set. Logs `dcpo_sas/revisited` (prompts with history).
    """
    values = _column("dcpo_sas", ctx, key, rewards.numel(),
                     " — a per-row prompt identity stable across steps; set advantage_options.key to such a column")
    assert ctx is not None
    r = rewards.double()
    codes, keys = _codes(values, r.device)
    keys = [str(k) for k in keys]
    num_keys = len(keys)
    count, mean_new, std_new, valid = group_stats(r, codes)   # per row, over the rows sharing its key

    store = ctx.state.setdefault("dcpo_sas", {})
    old = [store.get(k, [0, 0.0, 0.0]) for k in keys]         # state I/O (dict look-ups), not math
    t = torch.tensor([float(o[0]) for o in old], dtype=r.dtype, device=r.device)[codes]
    mu_old = torch.tensor([float(o[1]) for o in old], dtype=r.dtype, device=r.device)[codes]
    sd_old = torch.tensor([float(o[2]) for o in old], dtype=r.dtype, device=r.device)[codes]

    mu_tot = (t * mu_old + mean_new) / (t + 1)
    var_tot = (t * sd_old ** 2 + std_new ** 2 + t / (t + 1) * (mean_new - mu_old) ** 2) / (t + 1)
    sd_tot = torch.sqrt(var_tot)

    def standardize(mu: torch.Tensor, sd: torch.Tensor) -> torch.Tensor:
        if not normalize_by_std:
            return r - mu
        return torch.where(sd > eps, (r - mu) / sd.clamp(min=eps), torch.zeros_like(r))

    a_new, a_tot = standardize(mean_new, std_new), standardize(mu_tot, sd_tot)
    i = t + 1
    sa1 = a_tot / i + (1 - 1 / i) * a_new
    sa2 = a_new / i + (1 - 1 / i) * a_tot
    adv = torch.where(sa1.abs() < sa2.abs(), sa1, sa2)
    adv = _finish(adv, valid, count)

    # Per-key values for the state (every row of a key carries the same statistics).
    first = torch.full((num_keys,), r.numel(), dtype=torch.long, device=r.device)
    first = first.scatter_reduce(0, codes, torch.arange(r.numel(), device=r.device), reduce="amin")
    upd = (count[first] >= 2).tolist()
    new_i, new_mu, new_sd = i[first].tolist(), mu_tot[first].tolist(), sd_tot[first].tolist()
    for j, k in enumerate(keys):                               # state I/O
        if upd[j]:
            store[k] = [int(new_i[j]), float(new_mu[j]), float(new_sd[j])]
    ctx.metrics["dcpo_sas/revisited"] = float(sum(1 for j, o in enumerate(old) if upd[j] and o[0] > 0))
    return adv.to(rewards.dtype)


GROUP_ESTIMATORS.update({"bnpo", "dcpo_sas"})
