"""Filters: what to exclude from the update before it runs (masks and weights, pure tensors)."""
from __future__ import annotations

import torch


def mask_truncated_completions(completion_mask: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering: completions that hit the length limit get no loss at all.

    Paper: "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (arXiv 2503.14476).

        m'_it = m_it · 1[o_i ended with EOS]
    """
    return completion_mask * finished.to(completion_mask.dtype).unsqueeze(-1)


def zero_variance_groups(rewards: torch.Tensor, group_id: torch.Tensor) -> torch.Tensor:
    """Per group: True when its valid (non-NaN) rewards are all equal, i.e. it carries no learning signal.

    A group with no valid reward at all also counts as zero-variance.
    """
    num_groups = int(group_id.max()) + 1
    valid = ~torch.isnan(rewards)
    inf = torch.full((num_groups,), float("inf"), dtype=rewards.dtype, device=rewards.device)
    gmax = (-inf).scatter_reduce(0, group_id, torch.where(valid, rewards, -torch.inf), reduce="amax")
    gmin = inf.scatter_reduce(0, group_id, torch.where(valid, rewards, torch.inf), reduce="amin")
    return gmax <= gmin
