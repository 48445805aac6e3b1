"""Reading reward-function inputs: the text of a completion, a required dataset column."""
from __future__ import annotations

from typing import Any, Sequence

from groupwise.rewards.contract import RewardError


def completion_text(completion: Any) -> str:
    """The text to score: the string itself, or the last message's content of a message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        if isinstance(content, list):  # multimodal parts: [{"type": "text", "text": ...}, ...]
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise RewardError(f"cannot read a completion of type {type(completion).__name__}; expected text or a list of messages")


def required_column(reward: str, column: str, columns: dict[str, Any]) -> Sequence[Any]:
    """`columns[column]`, or a RewardError naming the reward, the column and the columns there are."""
    if column not in columns:
        available = ", ".join(sorted(k for k in columns if k != "trainer_state")) or "none"
        raise RewardError(f"reward '{reward}' needs the dataset column '{column}'; the columns available are: {available}")
    return columns[column]
