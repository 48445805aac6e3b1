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
    """Per group: True when every (non-NaN) reward of the group is equal (no learning signal)."""
    num_groups = int(group_id.max()) + 1
    r = torch.nan_to_num(rewards, nan=0.0)
    inf = torch.full((num_groups,), float("inf"), dtype=r.dtype, device=r.device)
    gmax = (-inf).scatter_reduce(0, group_id, r, reduce="amax")
    gmin = inf.scatter_reduce(0, group_id, r, reduce="amin")
    return gmax == gmin
