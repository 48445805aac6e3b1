"""Reward functions: the TRL contract, validation of their outputs, and the built-ins.

Built-ins (see `builtin.py`): exact_answer, math_verify, format, soft_overlong.
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

__all__ = ["REWARDS", "RewardContext", "RewardError", "RewardRunner", "RewardTimedOut", "load_reward_function", "register_reward"]
