"""Filters: what to exclude from the update before it runs (masks and weights, pure tensors)."""
from __future__ import annotations

import math

import torch


def mask_truncated_completions(completion_mask: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering: completions that hit the length limit get no loss at all.

    Paper: "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv 2503.14476).

        m'_it = m_it · 1[o_i ended with EOS]
    """
    return completion_mask * finished.to(completion_mask.dtype).unsqueeze(-1)


def zero_variance_groups(rewards: torch.Tensor, group_id: torch.Tensor) -> torch.Tensor:
    """Per group: True when its valid (non-NaN) rewards are all equal, i.e. it carries no learning signal.

    A group with no valid reward at all also counts as zero-variance.
    """
    num_groups = int(group_id.max()) + 1
    valid = ~torch.isnan(rewards)
    inf = torch.full((num_groups,), float("inf"), dtype=rewards.dtype, device=rewards.device)
    gmax = (-inf).scatter_reduce(0, group_id, torch.where(valid, rewards, -torch.inf), reduce="amax")
    gmin = inf.scatter_reduce(0, group_id, torch.where(valid, rewards, torch.inf), reduce="amin")
    return gmax <= gmin


# =============================================================================================
# Group filters (DAPO dynamic sampling) and sample filters (GFPO, D³S)
# =============================================================================================

def _num_groups(group_id: torch.Tensor) -> int:
    return int(group_id.max()) + 1 if group_id.numel() else 0


def _rank_within_group(score: torch.Tensor, group_id: torch.Tensor, num_groups: int):
    """Sort rows by (group, score ascending, row index) with two stable sorts, no loop over groups.

    Returns `(order[N], rank[N], count[G], start[G])`: `order` lists the rows group by group, each
    group ascending by `score` (ties by row index); `rank[i]` is row i's position inside its group;
    `start[g]` is where group g begins in `order`.
    """
    order = torch.argsort(score, stable=True)
    order = order[torch.argsort(group_id[order], stable=True)]
    count = torch.bincount(group_id, minlength=num_groups)
    start = torch.cumsum(count, 0) - count
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - start[group_id[order]]
    return order, rank, count, start


def dynamic_sampling_keep(rewards: torch.Tensor, group_id: torch.Tensor, *, keep_singletons: bool = False) -> torch.Tensor:
    """DAPO dynamic sampling: per group, True when it carries a learning signal (reward std > 0).

    Paper: "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (Yu et al., arXiv 2503.14476),
    §3.2 "Dynamic Sampling": over-sample and filter out prompts whose accuracy is 0 or 1, i.e. keep

        keep_g = 1[ std({r_i : i ∈ g, r_i not NaN}) > 0 ]  ⇔  max_g(r) > min_g(r)

    NaN rewards ("not applicable") are ignored; a group with no valid reward, or with a single
    one, is constant and dropped. `keep_singletons=True` keeps groups of exactly one row, as
    verl's `filter_groups` does (`std > 0 or len == 1`) so that G = 1 runs are not emptied.
    Returns `keep_groups[num_groups]` bool, indexed by group id (`num_groups = max(group_id) + 1`).
    """
    group_id = group_id.long()
    if group_id.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=group_id.device)
    keep = ~zero_variance_groups(rewards, group_id)
    if keep_singletons:
        keep = keep | (torch.bincount(group_id, minlength=keep.numel()) == 1)
    return keep


def select_groups(keep_groups: torch.Tensor, group_id: torch.Tensor, target_groups: int) -> torch.Tensor:
    """Row indices (ascending) of the first `target_groups` kept groups, in group-id order.

    DAPO dynamic sampling (arXiv 2503.14476), batch filling: after filtering, the batch is cut to
    exactly `target_groups` groups (verl's recipe truncates to `train_batch_size × n` rows). Only
    whole groups are returned. When fewer than `target_groups` groups are kept, all kept groups
    are returned: the caller (the trainer, not this function) then generates more prompts,
    concatenates the new groups under fresh group ids and calls this again, until enough are kept
    or a cap on rounds is reached (verl: `filter_groups.max_num_gen_batches`, ≤ 0 = unlimited;
    verl raises an error at the cap, a trainer may instead fill up with dropped groups).
    """
    if target_groups < 0:
        raise ValueError(f"target_groups must be ≥ 0, got {target_groups}")
    keep_groups = keep_groups.bool()
    chosen_ids = torch.nonzero(keep_groups).flatten()[:target_groups]
    chosen = torch.zeros_like(keep_groups)
    chosen[chosen_ids] = True
    return torch.nonzero(chosen[group_id.long()]).flatten()


GFPO_METRICS = ("length", "token_efficiency")


def gfpo_keep(
    rewards: torch.Tensor, group_id: torch.Tensor, lengths: torch.Tensor, k: int | torch.Tensor, metric: str = "length"
) -> torch.Tensor:
    """GFPO: per group, keep the k completions that are shortest or most token-efficient.

    Paper: "Sample More to Think Less: Group Filtered Policy Optimization for Concise Reasoning"
    (Shrivastava et al., arXiv 2508.09726). Sample a larger group G per prompt, rank it by a metric
    and train on the retained subset S (|S| = k) only:

        length:            S = the k completions with the smallest |o_i|
        token_efficiency:  S = the k completions with the largest r_i / |o_i|   (|o_i| clamped to ≥ 1)

    Ties are broken by row index (the lower index is kept), so the result is deterministic. A NaN
    reward ranks last under `token_efficiency` (it is ignored by `length`). A group with ≤ k rows
    keeps all of them: exactly min(k, |g|) rows are kept per group. `k` may also be a tensor of
    one k per group (`k[num_groups]`), as in the paper's Adaptive Difficulty GFPO, which gives
    harder prompts a larger k; choosing those k is the caller's business.

    Advantages (paper, Eq. for Â; also TRL's `GFPOTrainer`): the group statistics are taken over
    the retained subset only, and filtered-out completions get no gradient,

        Â_i = (r_i − mean_S(r)) / std_S(r) · 1[i ∈ S].

    So compose it as: `keep = gfpo_keep(...)`; `rows = keep.nonzero().flatten()`; run the
    advantage estimator on `rewards[rows], group_id[rows]` and train on those rows only (or give
    the other rows a zero loss mask). Running the estimator on the full group and masking
    afterwards is *not* GFPO: the baseline would include the discarded long completions.
    """
    if metric not in GFPO_METRICS:
        raise ValueError(f"unknown GFPO metric '{metric}'; known: {', '.join(GFPO_METRICS)}")
    group_id = group_id.long()
    if group_id.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=group_id.device)
    if metric == "length":
        score = lengths.double()                        # ascending: shortest first
    else:
        eff = rewards.double() / lengths.double().clamp(min=1)
        score = torch.where(torch.isnan(eff), torch.full_like(eff, torch.inf), -eff)   # largest efficiency first
    num_groups = _num_groups(group_id)
    _, rank, _, _ = _rank_within_group(score, group_id, num_groups)
    if isinstance(k, torch.Tensor):
        k_row = k.to(device=group_id.device, dtype=torch.long)[group_id]
    else:
        if k < 0:
            raise ValueError(f"k must be ≥ 0, got {k}")
        k_row = torch.full_like(group_id, int(k))
    return rank < k_row


def d3s_sample_keep(advantages: torch.Tensor, group_id: torch.Tensor, k: int) -> torch.Tensor:
    """D³S sample level: per group, keep the k rollouts whose advantages have the largest variance.

    Paper: "Learning More with Less: A Dynamic Dual-Level Down-Sampling Framework for Efficient
    Policy Optimization" (Wang et al., arXiv 2509.22115). Its sample-level step "selects a subset of
    rollouts to maximize advantage variance Var(A)", which the paper shows bounds the policy
    gradient norm from above. We solve that selection exactly, per group:

        S* = argmax_{S ⊆ g, |S| = min(k, |g|)}  (1/|S|) Σ_{i∈S} (A_i − mean_S(A))²

    A maximizer always consists of the j smallest and the k − j largest advantages for some j
    (swapping a kept value for an excluded one farther out on the same side of mean_S never lowers
    the sum of squares), so we sort each group and try every j = 0..k with prefix sums: O(N log N
    + G·k), no loop over groups. Among equally good splits the smallest j wins (more rows taken
    from the top); inside a sorted group equal advantages are ordered by row index. For k = 1 every
    subset has variance 0 and the largest advantage is kept. The paper's exact selection code was
    not available to us (only its abstract); "maximize Var(A)" is implemented literally here.

    Per-group selection is the paper's intra-group variant; pass `group_id = zeros(N)` to select
    k rollouts across the whole batch (its cross-group variant). Advantages are those computed on
    the full groups; the paper's dynamic schedule (aggressive down-sampling early, relaxed later)
    is the caller's, by varying k over training. Returns `keep_rows[N]` bool.
    """
    group_id = group_id.long()
    n = group_id.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=group_id.device)
    if k < 0:
        raise ValueError(f"k must be ≥ 0, got {k}")
    num_groups = _num_groups(group_id)
    a = advantages.double()
    # centre per group first: the variance is shift-invariant and the prefix sums stay small
    count = torch.bincount(group_id, minlength=num_groups).double()
    mean = torch.zeros(num_groups, dtype=a.dtype, device=a.device).index_add_(0, group_id, a) / count.clamp(min=1)
    a = a - mean[group_id]
    order, rank, cnt, start = _rank_within_group(a, group_id, num_groups)
    sa = a[order]
    zero = sa.new_zeros(1)
    p1 = torch.cat([zero, torch.cumsum(sa, 0)])
    p2 = torch.cat([zero, torch.cumsum(sa * sa, 0)])
    kk = cnt.clamp(max=k)                                            # [G] rows kept per group
    j = torch.arange(k + 1, device=a.device).unsqueeze(0)            # [1, k+1] rows taken from the bottom
    jc = torch.minimum(j, kk.unsqueeze(1))                           # [G, k+1]
    m = kk.unsqueeze(1) - jc                                         # rows taken from the top
    s, e = start.unsqueeze(1), (start + cnt).unsqueeze(1)
    tot = p1[s + jc] - p1[s] + p1[e] - p1[e - m]
    sq = p2[s + jc] - p2[s] + p2[e] - p2[e - m]
    size = kk.unsqueeze(1).clamp(min=1).double()
    var = sq / size - (tot / size) ** 2
    var = torch.where(j <= kk.unsqueeze(1), var, torch.full_like(var, -torch.inf))
    best_j = var.argmax(1)                                           # first maximum → smallest j
    jb, kg, cg = best_j[group_id], kk[group_id], cnt[group_id]
    return (rank < jb) | (rank >= cg - (kg - jb))


def _near_int(x: float) -> int | None:
    k = round(x)
    return k if abs(x - k) <= 1e-9 * max(1.0, abs(x)) else None


def _ceil_count(x: float) -> int:
    """⌈x⌉ of a count computed in floating point; within 1e-9 (relative) of an integer counts as
    that integer (0.3 · 10 = 3.0000000000000004 → 3)."""
    k = _near_int(x)
    return k if k is not None else math.ceil(x)


def _floor_count(x: float) -> int:
    """⌊x⌋ of a count computed in floating point, with the same snapping (0.7 · 10 = 6.999… → 7)."""
    k = _near_int(x)
    return k if k is not None else math.floor(x)


def d3s_token_mask(advantages: torch.Tensor, entropy: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """D³S token level: keep the top `ratio` fraction of valid tokens by |A_{i,t}| · H_{i,t}.

    Paper: "Learning More with Less: A Dynamic Dual-Level Down-Sampling Framework for Efficient
    Policy Optimization" (Wang et al., arXiv 2509.22115): tokens are prioritized by "a high product
    of advantage magnitude and policy entropy", |A_{i,t}| × H_{i,t}, i.e. where the policy is both
    uncertain and the update large. Rule used here, global over the batch: with M valid tokens
    (mask ≠ 0), exactly n = ⌈ratio · M⌉ of them are kept (ratio · M within 1e-9 of an integer
    counts as that integer) — the n largest scores, ties broken by flat position (row-major,
    earlier first), so the count is exact even when many scores are 0 (tokens of zero-advantage
    groups). Masked tokens are never un-masked; the result has
    `mask`'s dtype. `advantages` is [N] (one per sequence, broadcast over tokens) or [N, T].
    The paper's schedule (small ratio early, relaxed later) is the caller's.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    score = (adv.detach().abs() * entropy.detach()).expand_as(entropy).reshape(-1)
    valid_idx = torch.nonzero(mask.reshape(-1) != 0).flatten()
    m = valid_idx.numel()
    n_keep = _ceil_count(ratio * m)
    keep = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    if n_keep > 0:
        s = score[valid_idx]
        s = torch.nan_to_num(s.float() if s.dtype in (torch.float16, torch.bfloat16) else s, nan=0.0)
        threshold = torch.kthvalue(s, m - n_keep + 1).values             # the n_keep-th largest score
        above, at = s > threshold, s == threshold
        # all scores above the threshold, then the earliest ties until exactly n_keep (O(M), no sort)
        keep_valid = above | (at & (torch.cumsum(at.long(), 0) <= n_keep - above.sum()))
        keep[valid_idx[keep_valid]] = True
    keep = keep.view(mask.shape)
    return mask & keep if mask.dtype == torch.bool else mask * keep.to(mask.dtype)


def top_entropy_token_mask(entropy: torch.Tensor, mask: torch.Tensor, rho: float) -> torch.Tensor:
    """Train only on the highest-entropy ("forking") tokens: the top ρ fraction of the batch (80/20).

    Paper: "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective Reinforcement
    Learning for LLM Reasoning" (Wang et al., arXiv 2506.01939); TRL's `top_entropy_quantile` = ρ.
    TRL keeps tokens with H_t ≥ quantile_{1−ρ}(H of the valid tokens) (`torch.quantile`, linear
    interpolation, global over the batch). With the M valid entropies sorted ascending,
    v_0 ≤ … ≤ v_{M−1}, and p = (1 − ρ)(M − 1), that threshold is v_⌊p⌋ + (p − ⌊p⌋)(v_⌈p⌉ − v_⌊p⌋):
    either v_⌈p⌉ itself or strictly between v_⌊p⌋ and v_⌈p⌉, so the kept set is exactly

        m'_t = m_t · 1[H_t ≥ v_⌈(1−ρ)(M−1)⌉]    i.e. the n = 1 + ⌊ρ (M − 1)⌋ largest, plus ties.

    We compute it from that order statistic directly (no interpolation rounding; ρ(M − 1) within
    1e-9 of an integer counts as that integer, so 0.7 · 10 = 6.999… gives 7). Ties at the
    threshold are kept, so more than n tokens may remain; ρ = 1 returns the mask unchanged and
    ρ = 0 keeps the maximum-entropy token(s) (as TRL). Masked tokens are never un-masked; the
    result has `mask`'s dtype. Across ranks TRL gathers all entropies first; this function sees
    what it is given.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    valid = mask != 0
    values = entropy[valid]
    m = values.numel()
    if rho >= 1.0 or m == 0:
        return mask.clone()
    n_keep = min(m, 1 + _floor_count(rho * (m - 1)))
    threshold = torch.kthvalue(values, m - n_keep + 1).values      # the n_keep-th largest
    keep = valid & (entropy >= threshold)
    return mask & keep if mask.dtype == torch.bool else mask * keep.to(mask.dtype)
