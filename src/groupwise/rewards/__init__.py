"""Reward functions: the TRL contract, validation of their outputs, and the built-ins.

Built-ins, by module (each registers its rewards in `REWARDS` on import):

- `builtin`: format (regex), soft_overlong (DAPO);  `text`: helpers that read the inputs;
- `math`: exact_answer, math_verify, majority_vote (TTRL);
- `code`: code_tests (sandboxed execution, `sandbox.py`);
- `structure`: think_answer_format, json_schema;
- `length`: cosine_scaled, concise_correct, exit_decay (S-GRPO);
- `model_based`: self_certainty (Intuitor), reward_model (a local sequence classifier).
"""
from groupwise.rewards.contract import (
    REWARDS,
    RewardContext,
    RewardError,
    RewardRunner,
    RewardTimedOut,
    load_reward_function,
    register_reward,
)
from groupwise.rewards import builtin  # noqa: F401  (registers the built-ins)
from groupwise.rewards import code  # noqa: F401
from groupwise.rewards import math  # noqa: F401
from groupwise.rewards import length  # noqa: F401
from groupwise.rewards import model_based  # noqa: F401
from groupwise.rewards import structure  # noqa: F401

__all__ = ["REWARDS", "RewardContext", "RewardError", "RewardRunner", "RewardTimedOut", "load_reward_function", "register_reward"]
