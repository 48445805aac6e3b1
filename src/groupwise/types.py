"""The typed objects that flow one way through a training step.

prompts ──► Sampler ──► Rollout engine ──► Rewards ──► Advantages ──► Update

Each arrow carries exactly one of these. Nothing here knows about losses or files.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


# Where a row of a group came from (`RolloutBatch.source`); the update treats each kind differently.
ROW_ON_POLICY = 0      # sampled now from the policy
ROW_REPLAY = 1         # RePO: a past completion of the prompt; ratio against its stored sampling log-probs
ROW_TEACHER = 2        # LUFFY / AMPO: a reference solution; behaviour probability unknown (policy shaping)
ROW_EXPLANATION = 3    # ExPO: sampled with the answer in view, trained as a positive under the plain prompt
ROW_REUSED = 4         # AR3PO: a past correct completion in an all-wrong group (in the group's statistics, not trained on)
ROW_SOURCES = ("on_policy", "replay", "teacher", "explanation", "reused")


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
    source: torch.Tensor | None = None    # [N] long ROW_* kind; None = every row on-policy

    @property
    def row_source(self) -> torch.Tensor:
        return self.source if self.source is not None else torch.zeros_like(self.group_id)

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

    def rows_of_groups(self, groups: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices of the given groups, ordered group by group, and their new group ids 0…len−1."""
        device = self.group_id.device
        wanted = torch.tensor(groups, dtype=torch.long, device=device)
        rows = torch.nonzero(torch.isin(self.group_id, wanted), as_tuple=True)[0]
        remap = torch.full((len(self.prompts),), -1, dtype=torch.long, device=device)
        remap[wanted] = torch.arange(len(groups), device=device)
        new_gid = remap[self.group_id[rows]]
        order = torch.argsort(new_gid, stable=True)
        return rows[order], new_gid[order]

    def select_groups(self, groups: list[int]) -> "RolloutBatch":
        """The sub-batch holding the given groups (renumbered 0…len(groups)−1, in that order)."""
        rows, new_gid = self.rows_of_groups(groups)
        return RolloutBatch(
            prompts=[self.prompts[g] for g in groups],
            prompt_ids=self.prompt_ids[rows], prompt_mask=self.prompt_mask[rows],
            completion_ids=self.completion_ids[rows], completion_mask=self.completion_mask[rows],
            sampling_logprobs=self.sampling_logprobs[rows], group_id=new_gid, finished=self.finished[rows],
            completions_text=[self.completions_text[i] for i in rows.tolist()],
            source=None if self.source is None else self.source[rows],
        )

    @staticmethod
    def concatenate(batches: list["RolloutBatch"], pad_id: int) -> "RolloutBatch":
        """One batch from several (prompts re-left-padded, completions re-right-padded to common widths)."""
        if len(batches) == 1:
            return batches[0]
        tp = max(b.prompt_ids.shape[1] for b in batches)
        tc = max(b.completion_ids.shape[1] for b in batches)
        left = lambda t, w, v: torch.nn.functional.pad(t, (w - t.shape[1], 0), value=v)  # noqa: E731
        right = lambda t, w, v: torch.nn.functional.pad(t, (0, w - t.shape[1]), value=v)  # noqa: E731
        offsets, total = [], 0
        for b in batches:
            offsets.append(total)
            total += len(b.prompts)
        return RolloutBatch(
            prompts=[p for b in batches for p in b.prompts],
            prompt_ids=torch.cat([left(b.prompt_ids, tp, pad_id) for b in batches]),
            prompt_mask=torch.cat([left(b.prompt_mask, tp, 0) for b in batches]),
            completion_ids=torch.cat([right(b.completion_ids, tc, pad_id) for b in batches]),
            completion_mask=torch.cat([right(b.completion_mask, tc, 0) for b in batches]),
            sampling_logprobs=torch.cat([right(b.sampling_logprobs, tc, 0.0) for b in batches]),
            group_id=torch.cat([b.group_id + off for b, off in zip(batches, offsets)]),
            finished=torch.cat([b.finished for b in batches]),
            completions_text=[t for b in batches for t in b.completions_text],
            source=None if all(b.source is None for b in batches) else torch.cat([b.row_source for b in batches]),
        )

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
    function_errors: list[int] | None = None  # the same, per function [K]

    def total(self) -> torch.Tensor:
        """Weighted sum over functions, NaN treated as absent; a row NaN for every function stays NaN."""
        v = self.values
        all_nan = torch.isnan(v).all(dim=-1)
        total = torch.nansum(v * self.weights, dim=-1)
        return torch.where(all_nan, torch.full_like(total, float("nan")), total)


def _sum_lists(lists: list[list[int] | None]) -> list[int] | None:
    present = [x for x in lists if x is not None]
    return [sum(col) for col in zip(*present)] if present else None


@dataclass
class ScoredGroups:
    """A rollout with its scores (what dynamic sampling filters and concatenates)."""

    rollout: RolloutBatch
    scores: Scores

    def select_groups(self, groups: list[int]) -> "ScoredGroups":
        rows, _ = self.rollout.rows_of_groups(groups)
        s = self.scores
        return ScoredGroups(self.rollout.select_groups(groups), Scores(s.values[rows.cpu()], s.names, s.weights, s.num_errors, s.function_errors))

    @staticmethod
    def concatenate(parts: list["ScoredGroups"], pad_id: int) -> "ScoredGroups":
        s0 = parts[0].scores
        return ScoredGroups(
            RolloutBatch.concatenate([p.rollout for p in parts], pad_id),
            Scores(torch.cat([p.scores.values for p in parts]), s0.names, s0.weights, sum(p.scores.num_errors for p in parts),
                   _sum_lists([p.scores.function_errors for p in parts])),
        )


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
    group_id: torch.Tensor | None = None  # [N] for group-aware surrogates (DisCO); groups contiguous
    source: torch.Tensor | None = None    # [N] ROW_* kind of each row; None = all on-policy
    behaviour_logprobs: torch.Tensor | None = None   # [N, Tc] stored sampling log-probs (replayed rows' π_old)
    is_weights: torch.Tensor | None = None           # [N, Tc] π_old(trainer) / π_sampler correction (vLLM), detached

    @classmethod
    def of_rollout(cls, rollout: "RolloutBatch", completion_mask: torch.Tensor, max_completion_length: int) -> "TrainBatch":
        """The update's inputs for a rollout, trained where `completion_mask` is 1; advantages
        are zeros until the estimator has run. Replayed rows (RePO) keep their sampling
        log-probs: they are trained against the policy that sampled them."""
        replayed = rollout.source is not None and bool((rollout.source == ROW_REPLAY).any())
        return cls(
            input_ids=torch.cat([rollout.prompt_ids, rollout.completion_ids], 1),
            attention_mask=torch.cat([rollout.prompt_mask, rollout.completion_mask], 1),
            completion_mask=completion_mask,
            advantages=torch.zeros(completion_mask.shape[0], device=completion_mask.device),
            old_logprobs=None,
            ref_logprobs=None,
            max_completion_length=max_completion_length,
            group_id=rollout.group_id,
            source=rollout.source,
            behaviour_logprobs=rollout.sampling_logprobs if replayed else None,
        )

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
            group_id=take(self.group_id),
            source=take(self.source),
            behaviour_logprobs=take(self.behaviour_logprobs),
            is_weights=take(self.is_weights),
        )


def move_tensors(obj: Any, device: torch.device | str) -> Any:
    """A copy of a dataclass (nested dataclasses too) with every tensor field on `device`; None stays None."""
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, torch.Tensor) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
                changes[f.name] = move_tensors(value, device)
        return dataclasses.replace(obj, **changes) if changes else obj
    return obj
