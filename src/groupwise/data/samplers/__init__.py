"""Samplers and curricula: which prompts each round uses and how many completions each gets.

Select one with `data.sampler` (options in `data.sampler_options`); see `base.py` for the contract.
"""
from groupwise.data.samplers.base import (
    SAMPLERS, RoundOutcome, SamplePlan, Sampler, SamplerContext, build_sampler, check_sampler_options, register_sampler,
)
from groupwise.data.samplers.uniform import UniformSampler
# imported for registration: variance_aware, vade, knapsack, sec, prioritized
from groupwise.data.samplers import curriculum, knapsack, variance  # noqa: F401  (isort: skip)

__all__ = [
    "SAMPLERS", "RoundOutcome", "SamplePlan", "Sampler", "SamplerContext", "UniformSampler", "build_sampler",
    "check_sampler_options", "register_sampler",
]
