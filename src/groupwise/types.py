"""The typed objects that flow one way through a training step.

prompts ──► Sampler ──► Rollout engine ──► Rewards ──► Advantages ──► Update

Each arrow carries exactly one of these. Nothing here knows about losses or files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Prompt:
    """One dataset row as the policy sees it.

    Exactly one of `text` and `messages` is set. `columns` holds the row's other columns
    (answer, tests, …): they are passed unchanged to reward functions as keyword arguments.
    `index` is the row's position in its dataset, used for per-prompt statistics.
    """

    text: str | None
    messages: list[dict[str, Any]] | None
    columns: dict[str, Any] = field(default_factory=dict)
    index: int = -1

    @property
    def as_reward_input(self) -> str | list[dict[str, Any]]:
        """What TRL-style reward functions receive as `prompts[i]`: text or message list."""
        return self.text if self.text is not None else self.messages  # type: ignore[return-value]


@dataclass
class RolloutBatch:
    """G completions for each of P prompts; groups are contiguous (N = P·G rows).

    Layout: prompts left-padded, completions right-padded, so `[prompt_ids | completion_ids]`
    is one left-aligned-at-the-seam sequence per row.
    """

    prompts: list[Prompt]                 # length P (one per group)
    prompt_ids: torch.Tensor              # [N, Tp] long, left-padded
    prompt_mask: torch.Tensor             # [N, Tp] long (1 = real token)
    completion_ids: torch.Tensor          # [N, Tc] long, right-padded
    completion_mask: torch.Tensor         # [N, Tc] long (1 = generated token, EOS included)
    sampling_logprobs: torch.Tensor       # [N, Tc] float: log π_sampler(token) at sampling temperature
    group_id: torch.Tensor                # [N] long, contiguous: 0,0,…,0,1,1,…
    finished: torch.Tensor                # [N] bool: EOS was generated (else truncated at max_new_tokens)
    completions_text: list[str]           # length N, decoded without special tokens

    @property
    def num_completions(self) -> int:
        return int(self.completion_ids.shape[0])

    @property
    def truncated(self) -> torch.Tensor:
        return ~self.finished

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def prompt_of_row(self, row: int) -> Prompt:
        return self.prompts[int(self.group_id[row])]

    def row_columns(self) -> dict[str, list[Any]]:
        """Each dataset column as a per-completion list (a prompt's value repeated over its group)."""
        rows = [self.prompts[g] for g in self.group_id.tolist()]
        keys = self.prompts[0].columns.keys() if self.prompts else []
        return {k: [p.columns.get(k) for p in rows] for k in keys}


@dataclass
class Scores:
    """Reward-function outputs: `values[n, k]` for completion n and function k (NaN = not applicable)."""

    values: torch.Tensor                  # [N, K] float32
    names: list[str]
    weights: torch.Tensor                 # [K]
    num_errors: int = 0                   # scores replaced by 0 under rewards.on_error: zero

    def total(self) -> torch.Tensor:
        """Weighted sum over functions, NaN treated as absent; a row NaN for every function stays NaN."""
        v = self.values
        all_nan = torch.isnan(v).all(dim=-1)
        total = torch.nansum(v * self.weights, dim=-1)
        return torch.where(all_nan, torch.full_like(total, float("nan")), total)


@dataclass
class TrainBatch:
    """Everything the update consumes, one row per completion."""

    input_ids: torch.Tensor               # [N, Tp+Tc]
    attention_mask: torch.Tensor          # [N, Tp+Tc]
    completion_mask: torch.Tensor         # [N, Tc] float; 0 where a token must not be trained on
    advantages: torch.Tensor              # [N] (sequence level) or [N, Tc] (token level)
    old_logprobs: torch.Tensor | None     # [N, Tc] behaviour policy; None ⇒ detached current (μ=1, one step)
    ref_logprobs: torch.Tensor | None     # [N, Tc] reference policy, only when a KL term is on
    max_completion_length: int            # the configured limit (Dr. GRPO's constant)

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def completion_length(self) -> int:
        return int(self.completion_mask.shape[1])

    def select(self, rows: torch.Tensor) -> "TrainBatch":
        """The sub-batch of the given row indices (micro/mini-batching)."""
        take = lambda t: None if t is None else t[rows]  # noqa: E731
        return TrainBatch(
            input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows],
            completion_mask=self.completion_mask[rows],
            advantages=self.advantages[rows],
            old_logprobs=take(self.old_logprobs),
            ref_logprobs=take(self.ref_logprobs),
            max_completion_length=self.max_completion_length,
        )
