"""Curricula: SEC's bandit over prompt categories, and prioritized replay of hard prompts."""
from __future__ import annotations

import math
from typing import Any

import torch

from groupwise.data.samplers.base import (
    RoundOutcome, SamplePlan, SamplerContext, register_sampler, step_generator, weighted_without_replacement,
)
from groupwise.data.samplers.uniform import UniformSampler

__all__ = ["SecSampler", "PrioritizedSampler", "group_abs_advantages", "sec_sampler", "prioritized_sampler"]

_WALK = ("epoch", "position", "seed", "num_prompts")


def group_abs_advantages(rewards: list[list[float]], eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group: the sum of |Aᵢ| and the number of scored completions, with GRPO's group-normalized
    advantages Aᵢ = (rᵢ − mean) / (std + eps) (std the unbiased sample standard deviation, as in verl's
    GRPO estimator; NaN rewards are left out; a group with one scored completion has A = 0)."""
    width = max((len(r) for r in rewards), default=0)
    r = torch.full((len(rewards), max(width, 1)), math.nan, dtype=torch.float64)
    for g, rg in enumerate(rewards):   # one copy per group (variable G is allowed)
        if rg:
            r[g, : len(rg)] = torch.as_tensor(rg, dtype=torch.float64)
    valid = ~torch.isnan(r)
    n = valid.sum(1)
    rz = torch.where(valid, r, torch.zeros_like(r))
    mean = rz.sum(1) / n.clamp(min=1)
    dev = torch.where(valid, rz - mean[:, None], torch.zeros_like(rz))
    std = ((dev ** 2).sum(1) / (n - 1).clamp(min=1)).sqrt()
    abs_adv = torch.where((n > 1)[:, None], dev.abs() / (std[:, None] + eps), torch.zeros_like(dev))
    return abs_adv.sum(1), n


class SecSampler:
    """SEC: a Boltzmann bandit over categories, then uniform prompts within each (see `sec_sampler`)."""

    def __init__(self, ctx: SamplerContext, category_column: str, lr: float, temperature: float):
        if len(ctx.prompts) != ctx.num_prompts:
            raise ValueError(f"data.sampler_options.category_column: sampler 'sec' needs the {ctx.num_prompts} training rows, got {len(ctx.prompts)}")
        labels: list[str] = []
        for i, prompt in enumerate(ctx.prompts):   # once, at construction: read the column of every row
            if category_column not in prompt.columns or prompt.columns[category_column] is None:
                raise ValueError(f"data.sampler_options.category_column '{category_column}' is missing in training row {i}")
            labels.append(str(prompt.columns[category_column]))
        self.names = sorted(set(labels))
        code = {name: c for c, name in enumerate(self.names)}
        self.category = torch.tensor([code[x] for x in labels], dtype=torch.long)
        self.members = torch.argsort(self.category, stable=True)            # prompts grouped by category
        self.sizes = torch.bincount(self.category, minlength=len(self.names))
        self.starts = torch.cumsum(self.sizes, 0) - self.sizes
        self.ctx, self.lr, self.temperature = ctx, lr, temperature
        self.q = torch.zeros(len(self.names), dtype=torch.float64)

    def probabilities(self) -> torch.Tensor:
        """[C] Boltzmann policy softmax(Q / τ)."""
        return torch.softmax(self.q / self.temperature, dim=0)

    def plan(self, num_groups: int, group_size: int, step: int) -> SamplePlan:
        if num_groups == 0:
            return SamplePlan([], [])
        gen = step_generator(self.ctx.seed, step, "sec")
        arms = torch.multinomial(self.probabilities(), num_groups, replacement=True, generator=gen)
        indices = torch.empty(num_groups, dtype=torch.long)
        for c in torch.unique(arms).tolist():   # a loop over the drawn categories
            slots = torch.nonzero(arms == c).flatten()
            size, start = int(self.sizes[c]), int(self.starts[c])
            reps = math.ceil(len(slots) / size)   # distinct prompts unless the category is smaller than its draws
            picks = torch.cat([torch.randperm(size, generator=gen) for _ in range(reps)])[: len(slots)]
            indices[slots] = self.members[start + picks]
        return SamplePlan(indices.tolist(), [group_size] * num_groups)

    def update(self, outcome: RoundOutcome) -> None:
        """TD(0): Q(c) ← α·r(c) + (1 − α)·Q(c) for each category c in the round, r(c) = mean |A| of its completions."""
        if not outcome.indices:
            return
        sums, counts = group_abs_advantages(outcome.rewards)
        cat = self.category[torch.tensor(outcome.indices, dtype=torch.long)]
        total = torch.zeros_like(self.q).index_add_(0, cat, sums)
        n = torch.zeros_like(self.q).index_add_(0, cat, counts.double())
        present = n > 0
        reward = total / n.clamp(min=1)
        self.q = torch.where(present, self.lr * reward + (1 - self.lr) * self.q, self.q)

    def metrics(self) -> dict[str, float]:
        probs = self.probabilities()
        out = {f"sampler/sec_q/{name}": float(self.q[c]) for c, name in enumerate(self.names)}
        out.update({f"sampler/sec_prob/{name}": float(probs[c]) for c, name in enumerate(self.names)})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"q": self.q.clone(), "categories": list(self.names)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["categories"]) != self.names:
            raise ValueError(f"sampler state was saved for categories {list(state['categories'])}, but the data has {self.names}")
        self.q = torch.as_tensor(state["q"], dtype=torch.float64).clone()


@register_sampler("sec")
def sec_sampler(ctx: SamplerContext, *, category_column: str, lr: float = 0.5, temperature: float = 1.0) -> SecSampler:
    """Self-Evolving Curriculum (Chen et al., "Self-Evolving Curriculum for LLM Reasoning",
    arXiv 2505.14970): a non-stationary multi-armed bandit whose arms are the values of a dataset
    column. Each group's category c is drawn from the Boltzmann policy π(c) ∝ exp(Q(c)/τ), then a
    prompt uniformly within c (distinct within the round). After the round, for each category c drawn,

        r(c) = mean over its completions of |Aᵢ|,   Aᵢ = (rᵢ − mean_group) / (std_group + 1e-6),
        Q(c) ← α · r(c) + (1 − α) · Q(c)             (TD(0), Q starts at 0)

    the mean absolute GRPO advantage being the paper's proxy for immediate learning gain. Categories
    not drawn keep their Q (a fork of the reference code also decays them towards 0; the paper's
    update concerns the selected arms). Defaults are the paper's runs: α = 0.5, τ = 1.0 (Countdown;
    it used 0.4 for math and 0.2 for SEC-2D).

    Options:
      category_column: the dataset column whose value is each prompt's category (required); a row
        without it raises ValueError naming the column and the row.
      lr: α, the TD(0) learning rate (default 0.5).
      temperature: τ of the Boltzmann policy (default 1.0).
    """
    if not isinstance(category_column, str) or not category_column:
        raise ValueError(f"data.sampler_options.category_column must be a column name, got {category_column!r}")
    if not 0 < lr <= 1:
        raise ValueError(f"data.sampler_options.lr must be in (0, 1], got {lr}")
    if temperature <= 0:
        raise ValueError(f"data.sampler_options.temperature must be positive, got {temperature}")
    return SecSampler(ctx, category_column, float(lr), float(temperature))


class PrioritizedSampler:
    """A share of each round replays hard prompts by priority; the rest walks the dataset (see `prioritized_sampler`)."""

    def __init__(self, ctx: SamplerContext, hard_fraction: float, threshold: float, alpha: float, eps: float, window: int):
        self.ctx, self.stats = ctx, ctx.stats
        self.walk = UniformSampler(ctx.num_prompts, ctx.seed, shuffle=ctx.shuffle)
        self.hard_fraction, self.threshold, self.alpha, self.eps, self.window = hard_fraction, threshold, alpha, eps, window
        self._metrics: dict[str, float] = {}

    def priorities(self) -> torch.Tensor:
        """[P] (1 − s + ε)^α for seen prompts whose recent success rate s is below the threshold, else 0."""
        rate = self.stats.recent_success_rate(self.window)
        hard = ~torch.isnan(rate) & (rate < self.threshold)
        return torch.where(hard, (1 - torch.nan_to_num(rate) + self.eps) ** self.alpha, torch.zeros_like(rate))

    def plan(self, num_groups: int, group_size: int, step: int) -> SamplePlan:
        weights = self.priorities()
        pool = int((weights > 0).sum())
        n_hard = min(math.floor(self.hard_fraction * num_groups), pool)
        hard = weighted_without_replacement(weights, n_hard, step_generator(self.ctx.seed, step, "prioritized")) if n_hard else []
        seen = int((self.stats.attempts > 0).sum())
        self._metrics = {"sampler/hard_pool_fraction": pool / max(seen, 1), "sampler/replayed_fraction": n_hard / max(num_groups, 1)}
        return SamplePlan(hard + self.walk.next_indices(num_groups - n_hard), [group_size] * num_groups)

    def update(self, outcome: RoundOutcome) -> None:
        """Nothing to keep: success rates come from the trainer's `PromptStats`."""

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        return self.walk.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.walk.load_state_dict({k: state[k] for k in _WALK})


@register_sampler("prioritized")
def prioritized_sampler(ctx: SamplerContext, *, hard_fraction: float = 0.25, threshold: float = 0.5, alpha: float = 0.6,
                        eps: float = 0.01, window: int = 4) -> PrioritizedSampler:
    """Prioritized replay of hard prompts, with the proportional priorities of Prioritized Experience
    Replay (Schaul et al., arXiv 1511.05952): ⌊hard_fraction · B⌋ of the round's B prompts are drawn
    without replacement from the seen prompts whose recent success rate s (mean of their last `window`
    groups) is below `threshold`, with probability ∝

        priority = (1 − s + ε)^α

    and the rest come from the uniform epoch walk; never-seen prompts come only from the walk, and
    fewer are replayed while the hard pool is small. Every group gets G completions.

    Options:
      hard_fraction: share of each round replayed from the hard pool (default 0.25).
      threshold: success rate below which a seen prompt is hard (default 0.5).
      alpha: priority exponent α (default 0.6, PER's value; 0 samples the pool uniformly).
      eps: ε, keeps priorities positive (default 0.01).
      window: groups of history per success rate (default 4).
    """
    if not 0 <= hard_fraction <= 1:
        raise ValueError(f"data.sampler_options.hard_fraction must be in [0, 1], got {hard_fraction}")
    if not 0 < threshold <= 1:
        raise ValueError(f"data.sampler_options.threshold must be in (0, 1], got {threshold}")
    if alpha < 0:
        raise ValueError(f"data.sampler_options.alpha must be ≥ 0, got {alpha}")
    if eps <= 0:
        raise ValueError(f"data.sampler_options.eps must be positive, got {eps}")
    if not 1 <= window <= ctx.stats.history_size:
        raise ValueError(f"data.sampler_options.window must be in 1..{ctx.stats.history_size} (the kept history), got {window}")
    return PrioritizedSampler(ctx, float(hard_fraction), float(threshold), float(alpha), float(eps), int(window))
