"""Rollout engines behind one protocol (transformers today; vLLM and micro-group scheduling later)."""
from groupwise.rollout.base import RolloutEngine, SamplingParams
from groupwise.rollout.hf import HFRolloutEngine

__all__ = ["HFRolloutEngine", "RolloutEngine", "SamplingParams"]
