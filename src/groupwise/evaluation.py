"""Held-out evaluation: greedy accuracy, and pass@k / mean@k from k samples per prompt."""
from __future__ import annotations

from math import comb
from typing import Any

import torch

from groupwise.data.datasets import render_prompt
from groupwise.rollout.base import SamplingParams
from groupwise.types import Prompt, RolloutBatch, Scores


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., "Evaluating Large Language
    Models Trained on Code", arXiv 2107.03374):  pass@k = 1 − C(n−c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@k needs k ≤ n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def accuracy_index(rewards_cfg: Any, names: list[str]) -> int:
    """Which reward function decides 'correct': the configured one, else the first."""
    if rewards_cfg.accuracy_function is None:
        return 0
    return [f.name for f in rewards_cfg.functions].index(rewards_cfg.accuracy_function)


def score_rollout(reward_runner: Any, rollout: RolloutBatch, trainer_state: dict | None = None) -> Scores:
    """Call every reward function on a rollout with the TRL contract (prompts repeated per completion)."""
    prompts = [rollout.prompts[g] for g in rollout.group_id.tolist()]
    completion_ids = [ids[: int(n)] for ids, n in zip(rollout.completion_ids.tolist(), rollout.completion_lengths.tolist())]
    prompt_ids = [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(rollout.prompt_ids.tolist(), rollout.prompt_mask.tolist())]
    return reward_runner.score(
        [p.as_reward_input for p in prompts], rollout.completions_text, completion_ids, rollout.row_columns(),
        trainer_state=trainer_state, group_ids=rollout.group_id.tolist(), prompt_ids=prompt_ids,
    )


def correct_mask(scores: Scores, index: int, threshold: float) -> torch.Tensor:
    v = scores.values[:, index]
    return (~torch.isnan(v)) & (v >= threshold)


def evaluation_sums(
    engine: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    reward_runner: Any,
    config: Any,
    *,
    k: int = 0,
    seed: int = 0,
    row_offset: int = 0,
) -> dict[str, float]:
    """Sums and counts over `prompts`, a share of the held-out set starting at prompt `row_offset`
    (its sampled rows draw as in one call over the whole set). Shares add: sum them over ranks,
    then `evaluation_means`. Greedy decoding, and with k > 0 k samples per prompt at eval.temperature."""
    if not prompts:
        return {}
    data, ev = config.data, config.eval
    texts = [render_prompt(p, tokenizer, chat_template=data.chat_template, system_prompt=data.system_prompt) for p in prompts]
    max_new = ev.max_new_tokens or config.rollout.max_new_tokens
    idx = accuracy_index(config.rewards, reward_runner.names)
    threshold = config.rewards.correct_threshold

    greedy = engine.generate(prompts, texts, 1, SamplingParams(max_new_tokens=max_new, greedy=True), seed=seed, row_offset=row_offset)
    g_scores = score_rollout(reward_runner, greedy)
    g_reward = g_scores.total()
    sums = {
        "num_prompts": float(len(prompts)),
        "greedy_correct": float(correct_mask(g_scores, idx, threshold).sum()),
        "greedy_reward_sum": float(torch.nansum(g_reward)),
        "greedy_reward_count": float((~torch.isnan(g_reward)).sum()),
        "greedy_length_sum": float(greedy.completion_lengths.float().sum()),
    }
    if k > 0:
        params = SamplingParams(max_new_tokens=max_new, temperature=ev.temperature, top_p=config.rollout.top_p, top_k=config.rollout.top_k)
        sampled = engine.generate(prompts, texts, k, params, seed=seed + 1, row_offset=row_offset * k)
        s_scores = score_rollout(reward_runner, sampled)
        correct = correct_mask(s_scores, idx, threshold).view(len(prompts), k).sum(-1).tolist()
        s_reward = s_scores.total()
        sums.update({
            "pass_sum": float(sum(pass_at_k(k, c, k) for c in correct)),
            "sampled_correct": float(sum(correct)),
            "sampled_reward_sum": float(torch.nansum(s_reward)),
            "sampled_reward_count": float((~torch.isnan(s_reward)).sum()),
        })
    return sums


def evaluation_means(sums: dict[str, float], k: int = 0) -> dict[str, float]:
    """The reported figures from (summed) `evaluation_sums`: greedy accuracy, mean reward over the
    completions with a reward (NaN when none has one), mean length; pass@k and mean@k."""
    n = sums.get("num_prompts", 0.0)
    if n == 0:
        return {}

    def mean(total: str, count: str) -> float:
        return sums[total] / sums[count] if sums[count] else float("nan")

    result = {
        "num_prompts": n,
        "greedy_accuracy": sums["greedy_correct"] / n,
        "greedy_reward": mean("greedy_reward_sum", "greedy_reward_count"),
        "greedy_length": sums["greedy_length_sum"] / n,
    }
    if k > 0:
        result[f"pass@{k}"] = sums["pass_sum"] / n
        result[f"mean@{k}"] = sums["sampled_correct"] / (k * n)
        result["sampled_reward"] = mean("sampled_reward_sum", "sampled_reward_count")
    return result


def evaluate(
    engine: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    reward_runner: Any,
    config: Any,
    *,
    k: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """Greedy accuracy and mean reward; with k > 0 also pass@k and mean@k at eval.temperature."""
    return evaluation_means(evaluation_sums(engine, tokenizer, prompts, reward_runner, config, k=k, seed=seed), k)
