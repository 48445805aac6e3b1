"""Rollout engines behind one protocol: transformers (`hf`, default) and vLLM (`vllm`, optional)."""
from groupwise.rollout.base import RolloutEngine, SamplingParams
from groupwise.rollout.hf import HFRolloutEngine


def rollout_engine(model, tokenizer, config):
    """The engine a config asks for (`rollout.*`), generating with `model` (hf) or with an
    in-process vLLM engine that is kept in sync with `model` (vllm)."""
    roll = config.rollout
    if roll.backend == "vllm":
        from groupwise.rollout.vllm import VLLMRolloutEngine   # imports vLLM itself (a clear error if missing)

        return VLLMRolloutEngine(
            model,
            tokenizer,
            model_path=config.model.path,
            vllm_config=roll.vllm,
            max_new_tokens=max(roll.max_new_tokens, config.eval.max_new_tokens or 0),   # eval may generate longer
            max_prompt_length=config.data.max_prompt_length,
            seed=config.seed,
        )
    return HFRolloutEngine(
        model,
        tokenizer,
        max_concurrent_sequences=roll.max_concurrent_sequences,
        kv_cache_budget_mb=roll.kv_cache_budget_mb,
        scheduling=roll.scheduling,
        length_order=roll.length_order,
        packed_matmul=roll.packed_matmul,
        fast_decode=roll.fast_decode,
        max_prompt_length=config.data.max_prompt_length,
    )


__all__ = ["HFRolloutEngine", "RolloutEngine", "SamplingParams", "rollout_engine"]
