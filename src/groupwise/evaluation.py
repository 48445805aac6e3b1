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
    if not prompts:
        return {}
    data, ev = config.data, config.eval
    texts = [render_prompt(p, tokenizer, chat_template=data.chat_template, system_prompt=data.system_prompt) for p in prompts]
    max_new = ev.max_new_tokens or config.rollout.max_new_tokens
    idx = accuracy_index(config.rewards, reward_runner.names)
    threshold = config.rewards.correct_threshold

    greedy = engine.generate(prompts, texts, 1, SamplingParams(max_new_tokens=max_new, greedy=True), seed=seed)
    g_scores = score_rollout(reward_runner, greedy)
    result = {
        "num_prompts": float(len(prompts)),
        "greedy_accuracy": float(correct_mask(g_scores, idx, threshold).float().mean()),
        "greedy_reward": float(torch.nanmean(g_scores.total())),
        "greedy_length": float(greedy.completion_lengths.float().mean()),
    }
    if k > 0:
        sampled = engine.generate(
            prompts, texts, k, SamplingParams(max_new_tokens=max_new, temperature=ev.temperature, top_p=config.rollout.top_p, top_k=config.rollout.top_k), seed=seed + 1
        )
        s_scores = score_rollout(reward_runner, sampled)
        correct = correct_mask(s_scores, idx, threshold).view(len(prompts), k).sum(-1).tolist()
        result[f"pass@{k}"] = sum(pass_at_k(k, c, k) for c in correct) / len(prompts)
        result[f"mean@{k}"] = sum(correct) / (k * len(prompts))
        result["sampled_reward"] = float(torch.nanmean(s_scores.total()))
    return result
