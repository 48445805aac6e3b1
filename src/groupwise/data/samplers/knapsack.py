"""Knapsack RL: the round's rollout budget split across its prompts by a knapsack over per-prompt value.

Li et al., "Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget Allocation" (arXiv 2509.25849);
reference code github.com/liziniu/KnapsackRL (`verl/trainer/ppo/exploration_utils.py`, `rl_dataset.py`).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from groupwise.data.samplers.base import RoundOutcome, SamplePlan, SamplerContext, register_sampler
from groupwise.data.samplers.uniform import UniformSampler

__all__ = ["KnapsackSampler", "knapsack_sampler", "knapsack_value", "knapsack_extra", "knapsack_extra_dp"]


def knapsack_value(p: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """Value of `n` rollouts for a prompt of success rate `p`: P(non-zero gradient) × InfoGain,
    `(1 − pⁿ − (1 − p)ⁿ) · p(1 − p)²` (0 when p is 0 or 1)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    n = torch.as_tensor(n, dtype=torch.float64)
    return (1 - p ** n - (1 - p) ** n) * p * (1 - p) ** 2


def knapsack_extra_dp(values: torch.Tensor, extra: int) -> torch.Tensor:
    """Exact knapsack by dynamic programming: `values[i, k]` is item i's value with k extra units
    (k = 0…K); returns per-item extra units summing to min(extra, E·K) with the largest total value."""
    e, width = values.shape
    budget = min(int(extra), e * (width - 1))
    w = torch.arange(budget + 1)
    src = w[:, None] - torch.arange(width)[None, :]
    valid = src >= 0
    dp = torch.full((budget + 1,), -math.inf, dtype=torch.float64)
    dp[0] = 0.0
    choice = torch.zeros(e, budget + 1, dtype=torch.long)
    for i in range(e):  # a loop over the round's prompts, only reached when the greedy is not exact
        cand = torch.where(valid, dp[src.clamp(min=0)] + values[i].double()[None, :], torch.tensor(-math.inf, dtype=torch.float64))
        dp, choice[i] = cand.max(dim=1)
    out, left = torch.zeros(e, dtype=torch.long), budget
    for i in reversed(range(e)):
        out[i] = choice[i, left]
        left -= int(out[i])
    return out


def knapsack_extra(p: torch.Tensor, extra: int, lo: int, hi: int) -> torch.Tensor:
    """Extra rollouts (0…hi−lo each) on top of `lo` for prompts of success rate `p` (0 < p < 1),
    maximizing Σ value(lo + extra_i); they sum to min(extra, E·(hi − lo)).

    The marginal gain of the (N+1)-th rollout is p(1−p)² · (pᴺ(1−p) + (1−p)ᴺp), non-increasing in N,
    so the value is concave in N and taking the largest marginal gains (a vectorized top-k over the
    [E, hi−lo] gain table) is an exact solution of the knapsack. The table is checked; should a
    row ever increase, the exact dynamic program (`knapsack_extra_dp`) is used instead."""
    p = p.double()
    e, k = p.numel(), hi - lo
    if extra <= 0 or k <= 0 or e == 0:
        return torch.zeros(e, dtype=torch.long)
    n = lo + torch.arange(k, dtype=torch.float64)
    q = p[:, None]
    gains = q * (1 - q) ** 2 * (q ** n * (1 - q) + (1 - q) ** n * q)           # value(n + 1) − value(n)
    if bool((gains[:, 1:] > gains[:, :-1] * (1 + 1e-9) + 1e-15).any()):
        values = knapsack_value(q, lo + torch.arange(k + 1, dtype=torch.float64))
        return knapsack_extra_dp(values, extra)
    take = min(int(extra), e * k)
    order = torch.sort(gains.flatten(), descending=True, stable=True).indices[:take]
    return torch.bincount(order // k, minlength=e)


def spread(room: torch.Tensor, amount: int) -> torch.Tensor:
    """`amount` units split as evenly as possible over slots that take at most `room[i]` each (the
    remainder to the earliest slots with room left); sums to min(amount, Σ room)."""
    room = room.clamp(min=0)
    amount = min(int(amount), int(room.sum()))
    if amount <= 0:
        return torch.zeros_like(room)
    lo, hi = 0, int(room.max())
    while lo < hi:   # the largest level q with Σ min(room, q) ≤ amount
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if int(room.clamp(max=mid).sum()) <= amount else (lo, mid - 1)
    out = room.clamp(max=lo)
    rest = amount - int(out.sum())
    out[torch.nonzero(room > lo).flatten()[:rest]] += 1
    return out


class KnapsackSampler:
    """Uniform epoch walk for the prompts; knapsack-allocated group sizes (see `knapsack_sampler`)."""

    def __init__(self, ctx: SamplerContext, min_group_size: int, max_group_size: int | None, confidence: float,
                 fallback: bool, min_samples: int, window: int, unseen_success_rate: float | None):
        self.stats = ctx.stats
        self.walk = UniformSampler(ctx.num_prompts, ctx.seed, shuffle=ctx.shuffle)
        self.lo, self.hi = min_group_size, max_group_size
        self.confidence, self.fallback = confidence, fallback
        self.min_samples, self.window, self.unseen = min_samples, window, unseen_success_rate
        self._metrics: dict[str, float] = {}

    def success_rates(self, idx: torch.Tensor) -> torch.Tensor:
        """[len(idx)] float64: mean success rate of each prompt's last `window` groups; NaN while the
        prompt has fewer than `min_samples` scored completions (or `unseen_success_rate` if set)."""
        hist = self.stats.history[idx][:, -self.window:]
        seen = ~torch.isnan(hist)
        rate = torch.where(seen, hist, torch.zeros_like(hist)).sum(1) / seen.sum(1).clamp(min=1)
        known = (self.stats.samples[idx] >= self.min_samples) & seen.any(1)
        fill = math.nan if self.unseen is None else float(self.unseen)
        return torch.where(known, rate, torch.full_like(rate, fill))

    def allocate(self, p: torch.Tensor, group_size: int) -> torch.Tensor:
        """Group sizes (long, summing to len(p) × group_size) for prompts of estimated success rate p."""
        lo, hi = self.lo, self.hi if self.hi is not None else 4 * group_size
        if not lo <= group_size <= hi:
            key = "min_group_size" if lo > group_size else "max_group_size"
            raise ValueError(f"data.sampler_options.{key}: need min_group_size ≤ group size ≤ max_group_size, "
                             f"got {lo} ≤ {group_size} ≤ {hi}")
        known = ~torch.isnan(p)
        eff, zero = known & (p > 0) & (p < 1), known & (p == 0)
        sizes = torch.where(known, torch.tensor(lo), torch.tensor(group_size)).long()   # unseen: the plain G
        remaining = len(p) * group_size - int(sizes.sum())
        room, extra, spilled = hi - sizes, torch.zeros_like(sizes), 0
        if bool(eff.any()):
            budget = remaining
            if self.fallback:   # more budget than the effective prompts need: the excess goes to all-fail prompts
                base = torch.where(eff, torch.maximum(p, 1 - p), torch.full_like(p, 0.5))
                cost = (math.log(1 - self.confidence) / torch.log(base)).clamp(max=hi).floor()
                need = int(cost[eff].sum())
                if need < remaining:
                    target = zero if bool(zero.any()) else ~eff
                    extra += spread(room * target, remaining - need)
                    spilled = int(extra.sum())
                    budget = remaining - spilled
            extra[eff] += knapsack_extra(p[eff], budget, lo, hi)
        else:   # nothing in (0, 1): all-fail prompts first, else back towards G
            target = zero if bool(zero.any()) else known
            extra += spread(room * target, remaining)
        left = remaining - int(extra.sum())
        if left > 0:   # every target at max_group_size: the rest wherever there is room
            extra += spread(room - extra, left)
        sizes = sizes + extra
        self._metrics = {
            "sampler/mean_group_size": float(sizes.double().mean()), "sampler/min_group_size": float(sizes.min()),
            "sampler/max_group_size": float(sizes.max()), "sampler/effective_prompt_fraction": float(eff.double().mean()),
            "sampler/fallback_budget_fraction": spilled / max(len(p) * group_size, 1),
        }
        return sizes

    def plan(self, num_groups: int, group_size: int, step: int) -> SamplePlan:
        if num_groups == 0:
            return SamplePlan([], [])
        indices = self.walk.next_indices(num_groups)
        sizes = self.allocate(self.success_rates(torch.tensor(indices, dtype=torch.long)), group_size)
        return SamplePlan(indices, sizes.tolist())

    def update(self, outcome: RoundOutcome) -> None:
        """Nothing to keep: the success rates come from the trainer's `PromptStats`."""

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        return self.walk.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.walk.load_state_dict(state)


@register_sampler("knapsack")
def knapsack_sampler(ctx: SamplerContext, *, min_group_size: int = 2, max_group_size: int | None = None,
                     confidence: float = 0.9, fallback: bool = True, min_samples: int = 8, window: int = 2,
                     unseen_success_rate: float | None = None) -> KnapsackSampler:
    """Knapsack RL (Li et al., "Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget
    Allocation", arXiv 2509.25849): the round's prompts come from the uniform epoch walk, then the
    budget B = num_groups × G rollouts is split to maximize Σᵢ value(Nᵢ, pᵢ) subject to Σ Nᵢ = B and
    min_group_size ≤ Nᵢ ≤ max_group_size, with

        value(N, p) = (1 − pᴺ − (1 − p)ᴺ) · p(1 − p)²       (P(non-zero GRPO gradient) × InfoGain)

    as in the paper and its reference code. The value is concave in N (marginal gains non-increasing),
    so a top-k over marginal gains is exact (the DP of the reference code gives the same optimum).
    p is the mean success rate of the prompt's last `window` groups (the reference uses its last 16
    rewards). Following the reference code: prompts with too little history keep G rollouts; prompts
    with p = 0 or p = 1 get min_group_size; and when the prompts with 0 < p < 1 need fewer rollouts
    than remain — Σ min(max, ln(1 − confidence) / ln max(p, 1 − p)), the rollouts for a non-zero
    gradient with probability `confidence` — the excess is spread evenly over the all-fail prompts
    (or, if none, the other non-effective ones) before the knapsack allocates the rest, so hard
    prompts get large budgets instead of a clipped p. Group sizes always sum exactly to B.

    Options:
      min_group_size: fewest completions of a group (default 2; the reference's min_n/negative_n/positive_n).
      max_group_size: most completions of a group (default None: 4 × G; the reference script uses 128 with G = 8).
      confidence: α of the reference's cost estimate ln(1 − α)/ln max(p, 1 − p) (default 0.9).
      fallback: give the budget the effective prompts do not need to the all-fail prompts (default True).
      min_samples: scored completions a prompt needs before its p is trusted (default 8, the reference's min_buffer_length).
      window: how many of the prompt's last groups estimate p (default 2).
      unseen_success_rate: p assumed for prompts without enough history; None (default) gives them G.
    """
    if min_group_size < 1:
        raise ValueError(f"data.sampler_options.min_group_size must be at least 1, got {min_group_size}")
    if max_group_size is not None and max_group_size < min_group_size:
        raise ValueError(f"data.sampler_options.max_group_size ({max_group_size}) must be ≥ min_group_size ({min_group_size})")
    if not 0 < confidence < 1:
        raise ValueError(f"data.sampler_options.confidence must be in (0, 1), got {confidence}")
    if min_samples < 1:
        raise ValueError(f"data.sampler_options.min_samples must be at least 1, got {min_samples}")
    if not 1 <= window <= ctx.stats.history_size:
        raise ValueError(f"data.sampler_options.window must be in 1..{ctx.stats.history_size} (the kept history), got {window}")
    if unseen_success_rate is not None and not 0 <= unseen_success_rate <= 1:
        raise ValueError(f"data.sampler_options.unseen_success_rate must be in [0, 1] or null, got {unseen_success_rate}")
    return KnapsackSampler(ctx, int(min_group_size), None if max_group_size is None else int(max_group_size),
                           float(confidence), bool(fallback), int(min_samples), int(window), unseen_success_rate)
