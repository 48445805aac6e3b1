"""Rollout engines behind one protocol (transformers today; vLLM later)."""
from groupwise.rollout.base import RolloutEngine, SamplingParams
from groupwise.rollout.hf import HFRolloutEngine


def rollout_engine(model, tokenizer, config) -> HFRolloutEngine:
    """The engine a config asks for (`rollout.*`), generating with `model`."""
    roll = config.rollout
    return HFRolloutEngine(
        model,
        tokenizer,
        max_concurrent_sequences=roll.max_concurrent_sequences,
        kv_cache_budget_mb=roll.kv_cache_budget_mb,
        scheduling=roll.scheduling,
        length_order=roll.length_order,
        max_prompt_length=config.data.max_prompt_length,
    )


__all__ = ["HFRolloutEngine", "RolloutEngine", "SamplingParams", "rollout_engine"]
