"""Shared fixtures: small, fast configs on the built-in model (no network, CPU only)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def small_overrides(run_dir, **extra) -> list[str]:
    """`--set` overrides for a run of a few seconds on the built-in model."""
    base = {
        "run_dir": str(run_dir),
        "schedule.steps": 3,
        "rollout.prompts_per_step": 4,
        "rollout.num_generations": 4,
        "rollout.max_new_tokens": 6,
        "data.train_size": 500,
        "data.eval_size": 16,
        "eval.before_and_after": False,
        "logging.progress": "none",
        "logging.samples_every": 1,
        "checkpoint.every": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def small_config(tmp_path):
    from groupwise.config import load_config

    def make(run_dir=None, **extra):
        return load_config(None, small_overrides(run_dir or tmp_path / "run", **extra))

    return make
