"""Variance-seeking prompt samplers: MMR1's Variance-Aware Sampling and VADE's Thompson sampler."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from groupwise.data.samplers.base import (
    RoundOutcome, SamplePlan, SamplerContext, register_sampler, step_generator, weighted_without_replacement,
)
from groupwise.data.samplers.uniform import UniformSampler

__all__ = ["VarianceAwareSampler", "VadeSampler", "distinct_n", "variance_aware_sampler", "vade_sampler"]

_WALK = ("epoch", "position", "seed", "num_prompts")


def distinct_n(completions: list[str], n: int = 2) -> float:
    """Distinct-n of a group: unique word n-grams / all word n-grams over its completions (a completion
    shorter than n counts as one n-gram of its words); 0 when there are none."""
    grams: list[tuple[str, ...]] = []
    for text in completions:
        words = text.split()
        grams.extend([tuple(words[i:i + n]) for i in range(len(words) - n + 1)] if len(words) >= n else [tuple(words)])
    return len(set(grams)) / len(grams) if grams else 0.0


def _walk_state(walk: UniformSampler) -> dict[str, Any]:
    return {f"walk_{k}": v for k, v in walk.state_dict().items()}


def _load_walk(walk: UniformSampler, state: dict[str, Any]) -> None:
    walk.load_state_dict({k: state[f"walk_{k}"] for k in _WALK})


def _tensor(state: dict[str, Any], key: str, size: int) -> torch.Tensor:
    t = torch.as_tensor(state[key], dtype=torch.float64)
    if t.shape != (size,):
        raise ValueError(f"sampler state '{key}' has shape {tuple(t.shape)}, but the dataset has {size} prompts")
    return t.clone()


class VarianceAwareSampler:
    """MMR1's VAS: ⌊λ·B⌋ prompts ∝ VPS, the rest from the uniform epoch walk (see `variance_aware_sampler`)."""

    def __init__(self, ctx: SamplerContext, alpha: float, beta: float, mix_ratio: float, refresh_every: int,
                 window: int, ngram: int, prior_score: float | None):
        self.ctx, self.stats = ctx, ctx.stats
        self.walk = UniformSampler(ctx.num_prompts, ctx.seed, shuffle=ctx.shuffle)
        self.alpha, self.beta, self.mix_ratio, self.refresh_every = alpha, beta, mix_ratio, refresh_every
        self.window, self.ngram = window, ngram
        self.prior = alpha * 0.25 + beta * 1.0 if prior_score is None else prior_score   # the largest possible VPS
        self.tds = torch.full((ctx.num_prompts,), math.nan, dtype=torch.float64)        # NaN: no completions seen
        self.vps = torch.full((ctx.num_prompts,), self.prior, dtype=torch.float64)
        self.refreshed_at: int | None = None
        self._metrics: dict[str, float] = {}

    def scores(self) -> torch.Tensor:
        """[P] VPS = α·OVS + β·TDS from the current statistics; the prior score for unseen prompts."""
        p = self.stats.recent_success_rate(self.window)
        ovs = p * (1 - p)
        tds = torch.nan_to_num(self.tds, nan=0.0)
        return torch.where(torch.isnan(p), torch.full_like(p, self.prior), self.alpha * ovs + self.beta * tds)

    def plan(self, num_groups: int, group_size: int, step: int) -> SamplePlan:
        if self.refreshed_at is None or step - self.refreshed_at >= self.refresh_every or step < self.refreshed_at:
            self.vps, self.refreshed_at = self.scores(), step
        n_weighted = math.floor(self.mix_ratio * num_groups)
        weighted = weighted_without_replacement(self.vps, n_weighted, step_generator(self.ctx.seed, step, "variance_aware")) if n_weighted else []
        indices = weighted + self.walk.next_indices(num_groups - n_weighted)
        seen = self.stats.attempts > 0
        self._metrics = {"sampler/vps_mean_selected": float(self.vps[torch.tensor(indices)].mean()) if indices else 0.0,
                         "sampler/vps_mean_seen": float(self.vps[seen].mean()) if bool(seen.any()) else 0.0}
        return SamplePlan(indices, [group_size] * num_groups)

    def update(self, outcome: RoundOutcome) -> None:
        """Record each group's trajectory diversity (distinct-n of its completions), when given."""
        for i, completions in zip(outcome.indices, outcome.completions):   # a loop over the round's groups
            if completions:
                self.tds[i] = distinct_n(completions, self.ngram)

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        return {**_walk_state(self.walk), "tds": self.tds.clone(), "vps": self.vps.clone(),
                "refreshed_at": -1 if self.refreshed_at is None else self.refreshed_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load_walk(self.walk, state)
        self.tds, self.vps = _tensor(state, "tds", self.ctx.num_prompts), _tensor(state, "vps", self.ctx.num_prompts)
        self.refreshed_at = None if int(state["refreshed_at"]) < 0 else int(state["refreshed_at"])


@register_sampler("variance_aware")
def variance_aware_sampler(ctx: SamplerContext, *, alpha: float = 0.8, beta: float = 0.2, mix_ratio: float = 0.5,
                           refresh_every: int = 1, window: int = 1, ngram: int = 2,
                           prior_score: float | None = None) -> VarianceAwareSampler:
    """Variance-Aware Sampling (Leng et al., "MMR1: Enhancing Multimodal Reasoning with Variance-Aware
    Sampling and Open Resources", arXiv 2509.21268, §3): each prompt's Variance Promotion Score

        VPS(x) = α · OVS(x) + β · TDS(x),   OVS(x) = P(x)(1 − P(x)),   TDS(x) = Diversity({yᵢ})

    with P(x) the pass rate (mean success rate of the prompt's last `window` groups, from the trainer's
    statistics) and TDS the distinct-n of its last group's completions (the paper names inverse
    self-BLEU or distinct-n; TDS is 0 until completions of the prompt are given). ⌊λ·B⌋ of the round's B prompts are drawn ∝ VPS (distinct within the
    round; the paper draws with replacement), the other B − ⌊λ·B⌋ from the uniform epoch walk; every
    group gets G completions. The paper re-rolls every prompt each T_update steps; here VPS is
    recomputed from the statistics already gathered every `refresh_every` plans (no extra rollouts),
    and prompts never sampled score `prior_score`, by default the largest possible VPS α/4 + β, so
    they are explored first (standing in for the paper's initial pass over the dataset).
    Defaults α = 0.8, β = 0.2, λ = 0.5 are the paper's main setting.

    Options:
      alpha: weight α of the outcome variance score (default 0.8).
      beta: weight β of the trajectory diversity score (default 0.2).
      mix_ratio: λ, the fraction of each round drawn ∝ VPS (default 0.5).
      refresh_every: plans between VPS refreshes, the paper's T_update (default 1).
      window: groups of history per pass rate (default 1: the last group, as the paper's fresh N rollouts).
      ngram: n of distinct-n (default 2).
      prior_score: VPS of prompts not yet sampled (default None: α/4 + β).
    """
    if alpha < 0 or beta < 0 or alpha + beta <= 0:
        raise ValueError(f"data.sampler_options.alpha and data.sampler_options.beta must be ≥ 0 and not both 0, got {alpha}, {beta}")
    if not 0 <= mix_ratio <= 1:
        raise ValueError(f"data.sampler_options.mix_ratio must be in [0, 1], got {mix_ratio}")
    if refresh_every < 1:
        raise ValueError(f"data.sampler_options.refresh_every must be at least 1, got {refresh_every}")
    if not 1 <= window <= ctx.stats.history_size:
        raise ValueError(f"data.sampler_options.window must be in 1..{ctx.stats.history_size} (the kept history), got {window}")
    if ngram < 1:
        raise ValueError(f"data.sampler_options.ngram must be at least 1, got {ngram}")
    if prior_score is not None and prior_score < 0:
        raise ValueError(f"data.sampler_options.prior_score must be ≥ 0 or null, got {prior_score}")
    return VarianceAwareSampler(ctx, float(alpha), float(beta), float(mix_ratio), int(refresh_every), int(window), int(ngram),
                                None if prior_score is None else float(prior_score))


class VadeSampler:
    """VADE: Beta posteriors, Thompson draws, the most informative candidates (see `vade_sampler`)."""

    def __init__(self, ctx: SamplerContext, prior_alpha: float, prior_beta: float, global_decay: float,
                 local_decay: float, candidate_factor: float):
        self.ctx = ctx
        self.walk = UniformSampler(ctx.num_prompts, ctx.seed, shuffle=ctx.shuffle)
        self.a0, self.b0 = prior_alpha, prior_beta
        self.global_decay, self.local_decay, self.candidate_factor = global_decay, local_decay, candidate_factor
        self.alpha = torch.full((ctx.num_prompts,), prior_alpha, dtype=torch.float64)
        self.beta = torch.full((ctx.num_prompts,), prior_beta, dtype=torch.float64)
        self._metrics: dict[str, float] = {}

    def plan(self, num_groups: int, group_size: int, step: int) -> SamplePlan:
        if num_groups == 0:
            return SamplePlan([], [])
        cand = torch.tensor(self.walk.next_indices(max(num_groups, math.ceil(self.candidate_factor * num_groups))), dtype=torch.long)
        gen = step_generator(self.ctx.seed, step, "vade")
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
        p = torch.from_numpy(rng.beta(self.alpha[cand].numpy(), self.beta[cand].numpy()))   # Thompson draws p̃ ~ Beta(α, β)
        gain = p * (1 - p)
        chosen = cand[torch.sort(gain, descending=True, stable=True).indices[:num_groups]]
        a, b = self.alpha[chosen], self.beta[chosen]
        self._metrics = {"sampler/posterior_mean_selected": float((a / (a + b)).mean()),
                         "sampler/thompson_gain_selected": float(gain.sort(descending=True).values[:num_groups].mean()),
                         "sampler/evidence_mean": float((self.alpha + self.beta - self.a0 - self.b0).mean())}
        return SamplePlan(chosen.tolist(), [group_size] * num_groups)

    def update(self, outcome: RoundOutcome) -> None:
        """Two-scale decay towards the prior, then add the round's successes and failures."""
        g = self.global_decay   # every prompt, every round: evidence fades as the policy moves on
        self.alpha = self.a0 + g * (self.alpha - self.a0)
        self.beta = self.b0 + g * (self.beta - self.b0)
        if not outcome.indices:
            return
        idx = torch.tensor(outcome.indices, dtype=torch.long)
        wins = torch.tensor([float(sum(bool(c) for c in cs)) for cs in outcome.correct], dtype=torch.float64)
        total = torch.tensor([float(len(cs)) for cs in outcome.correct], dtype=torch.float64)
        seen = idx.unique()   # revisited prompts: their older evidence fades by local_decay per visit
        self.alpha[seen] = self.a0 + self.local_decay * (self.alpha[seen] - self.a0)
        self.beta[seen] = self.b0 + self.local_decay * (self.beta[seen] - self.b0)
        self.alpha.index_add_(0, idx, wins)
        self.beta.index_add_(0, idx, total - wins)

    def metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        return {**_walk_state(self.walk), "alpha": self.alpha.clone(), "beta": self.beta.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _load_walk(self.walk, state)
        self.alpha, self.beta = _tensor(state, "alpha", self.ctx.num_prompts), _tensor(state, "beta", self.ctx.num_prompts)


@register_sampler("vade")
def vade_sampler(ctx: SamplerContext, *, prior_alpha: float = 1.0, prior_beta: float = 1.0, global_decay: float = 0.99,
                 local_decay: float = 0.8, candidate_factor: float = 4.0) -> VadeSampler:
    """VADE (Hu et al., "VADE: Variance-Aware Dynamic Sampling via Online Sample-Level Difficulty
    Estimation for Multimodal RL", arXiv 2511.18902): each prompt's success probability has a Beta(α, β)
    posterior; a round draws the next ⌈candidate_factor · B⌉ prompts of the uniform epoch walk as
    candidates, samples p̃ ~ Beta(α, β) for each (Thompson sampling) and keeps the B with the largest
    information gain p̃(1 − p̃) (the Bernoulli variance, largest at p̃ = 1/2); each gets G completions.
    After a round, with prior (α₀, β₀), s successes and f failures of a group:

        every prompt:        α ← α₀ + γ_global · (α − α₀),   β ← β₀ + γ_global · (β − β₀)
        each sampled prompt: α ← α₀ + γ_local · (α − α₀) + s,   β ← β₀ + γ_local · (β − β₀) + f

    (two-scale prior decay: slow fading of all evidence with training time, faster fading of a
    prompt's own evidence each time it is re-evaluated, so old outcomes of a changing policy count
    less). The paper's components are Beta posteriors, a Thompson sampler maximizing information gain
    and a two-scale prior decay; the exact gain function, decay form and default rates here are our
    choices, not verified against the reference code.

    Options:
      prior_alpha, prior_beta: the Beta prior (α₀, β₀) of every prompt (default 1, 1: uniform).
      global_decay: γ_global, per round, for every prompt (default 0.99).
      local_decay: γ_local, per evaluation, for the evaluated prompts (default 0.8).
      candidate_factor: candidates per selected prompt, from the uniform walk (default 4).
    """
    if prior_alpha <= 0 or prior_beta <= 0:
        raise ValueError(f"data.sampler_options.prior_alpha and prior_beta must be positive, got {prior_alpha}, {prior_beta}")
    for key, value in (("global_decay", global_decay), ("local_decay", local_decay)):
        if not 0 <= value <= 1:
            raise ValueError(f"data.sampler_options.{key} must be in [0, 1], got {value}")
    if candidate_factor < 1:
        raise ValueError(f"data.sampler_options.candidate_factor must be at least 1, got {candidate_factor}")
    return VadeSampler(ctx, float(prior_alpha), float(prior_beta), float(global_decay), float(local_decay), float(candidate_factor))
