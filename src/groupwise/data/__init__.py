"""Datasets → `Prompt`s, `Prompt` → text, and the samplers that pick prompts for each step."""
from groupwise.data.datasets import DataError, load_prompts, prompts_from_rows, render_prompt
from groupwise.data.samplers import UniformSampler

__all__ = ["DataError", "load_prompts", "prompts_from_rows", "render_prompt", "UniformSampler"]
