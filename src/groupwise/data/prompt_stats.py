"""Per-prompt statistics: what each training prompt's groups scored so far.

Samplers, curricula and guidance read these (VADE's Beta posteriors, variance-aware sampling,
hints once a prompt stagnates); the trainer updates them after every scored round and saves them
in checkpoints, so a resumed run continues with the same statistics.

Every statistic is a tensor over the whole dataset, indexed by the prompt's dataset index; an
update is a handful of scatter-adds whatever the batch (a prompt may appear in several groups of
one batch: each group counts as one attempt).
"""
from __future__ import annotations

from typing import Sequence

import torch

_FIELDS = ("attempts", "samples", "successes", "reward_sum", "reward_sq_sum", "last_step", "last_mean",
           "last_std", "last_success_rate", "history", "history_count")


class PromptStats:
    """Running statistics of `num_prompts` prompts, with the last `history` success rates of each.

    - `attempts[p]`: groups sampled; `samples[p]`: completions scored; `successes[p]`: correct ones;
    - `reward_sum`, `reward_sq_sum`: over every scored completion (mean and variance over all time);
    - `last_step`, `last_mean`, `last_std`, `last_success_rate`: the most recent group (NaN / −1: never);
    - `history[p, :]`: the last `history` groups' success rates, oldest first (NaN-padded on the left).
    """

    def __init__(self, num_prompts: int, history: int = 8):
        if num_prompts < 1 or history < 1:
            raise ValueError(f"PromptStats needs num_prompts ≥ 1 and history ≥ 1, got {num_prompts} and {history}")
        self.num_prompts, self.history_size = int(num_prompts), int(history)
        p = self.num_prompts
        self.attempts = torch.zeros(p, dtype=torch.long)
        self.samples = torch.zeros(p, dtype=torch.long)
        self.successes = torch.zeros(p, dtype=torch.long)
        self.reward_sum = torch.zeros(p, dtype=torch.float64)
        self.reward_sq_sum = torch.zeros(p, dtype=torch.float64)
        self.last_step = torch.full((p,), -1, dtype=torch.long)
        nan = torch.full((p,), float("nan"), dtype=torch.float64)
        self.last_mean, self.last_std, self.last_success_rate = nan.clone(), nan.clone(), nan.clone()
        self.history = torch.full((p, self.history_size), float("nan"), dtype=torch.float64)
        self.history_count = torch.zeros(p, dtype=torch.long)  # success rates recorded so far (all time)

    # ------------------------------------------------------------------ update

    def update(self, indices: Sequence[int], rewards: Sequence[Sequence[float]], correct: Sequence[Sequence[bool]], step: int) -> None:
        """Record one round: group g answered prompt `indices[g]` with `rewards[g]` and `correct[g]`.

        NaN rewards (not applicable) are left out of the reward statistics but still count as samples.
        """
        if not (len(indices) == len(rewards) == len(correct)):
            raise ValueError(f"PromptStats.update: {len(indices)} indices, {len(rewards)} reward groups, {len(correct)} correctness groups")
        if not indices:
            return
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if int(idx.min()) < 0 or int(idx.max()) >= self.num_prompts:
            raise ValueError(f"PromptStats.update: prompt index out of range 0..{self.num_prompts - 1}")
        sizes = [len(r) for r in rewards]
        if sizes != [len(c) for c in correct] or min(sizes) < 1:
            raise ValueError("PromptStats.update: each group needs as many correctness flags as rewards, and at least one")
        width = max(sizes)
        r = torch.full((len(sizes), width), float("nan"), dtype=torch.float64)
        c = torch.zeros(len(sizes), width, dtype=torch.bool)
        present = torch.zeros(len(sizes), width, dtype=torch.bool)
        for g, (rg, cg) in enumerate(zip(rewards, correct)):  # one copy per group (variable G is allowed)
            r[g, : len(rg)] = torch.as_tensor(rg, dtype=torch.float64)
            c[g, : len(cg)] = torch.as_tensor(cg, dtype=torch.bool)
            present[g, : len(rg)] = True
        valid = present & ~torch.isnan(r)
        rz = torch.where(valid, r, torch.zeros_like(r))
        n_valid = valid.sum(1)
        group_mean = rz.sum(1) / n_valid.clamp(min=1)
        group_var = torch.where(valid, (rz - group_mean[:, None]) ** 2, torch.zeros_like(rz)).sum(1) / n_valid.clamp(min=1)
        group_size = present.sum(1)
        group_success = c.sum(1)
        rate = group_success.double() / group_size

        self.attempts.index_add_(0, idx, torch.ones_like(idx))
        self.samples.index_add_(0, idx, group_size)
        self.successes.index_add_(0, idx, group_success)
        self.reward_sum.index_add_(0, idx, rz.sum(1))
        self.reward_sq_sum.index_add_(0, idx, (rz ** 2).sum(1))
        # "last" and the history take the batch's groups in order; a prompt drawn twice gets both,
        # the later one last. Python-level only over repeated prompts, which are rare.
        for g in range(len(sizes)):
            p = int(idx[g])
            self.last_step[p] = step
            self.last_mean[p] = group_mean[g] if n_valid[g] > 0 else float("nan")
            self.last_std[p] = group_var[g].sqrt() if n_valid[g] > 0 else float("nan")
            self.last_success_rate[p] = rate[g]
            self.history[p] = torch.roll(self.history[p], -1)
            self.history[p, -1] = rate[g]
            self.history_count[p] += 1

    # ------------------------------------------------------------------ reading

    def success_rate(self) -> torch.Tensor:
        """[P] float64: successes / samples over all time; NaN for prompts never sampled."""
        s = self.samples.double()
        return torch.where(s > 0, self.successes.double() / s.clamp(min=1), torch.full_like(s, float("nan")))

    def reward_mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[P] mean and (population) variance of every scored reward so far; NaN when none."""
        s = self.samples.double()
        mean = self.reward_sum / s.clamp(min=1)
        var = (self.reward_sq_sum / s.clamp(min=1) - mean ** 2).clamp(min=0)
        none = torch.full_like(s, float("nan"))
        return torch.where(s > 0, mean, none), torch.where(s > 0, var, none)

    def recent_success_rate(self, last: int | None = None) -> torch.Tensor:
        """[P] mean of the last `last` (default: all kept) groups' success rates; NaN if none."""
        h = self.history if last is None else self.history[:, -last:]
        return torch.nanmean(h, dim=1) if h.numel() else torch.full((self.num_prompts,), float("nan"), dtype=torch.float64)

    def metrics(self) -> dict[str, float]:
        """Dataset-level numbers for the step's metrics."""
        seen = self.attempts > 0
        last = self.last_success_rate[seen]
        n = max(int(seen.sum()), 1)
        return {
            "prompts/seen_fraction": float(seen.double().mean()),
            "prompts/solved_fraction": float((last == 1).sum()) / n,     # last group all correct
            "prompts/unsolved_fraction": float((last == 0).sum()) / n,   # last group all wrong
            "prompts/mean_attempts": float(self.attempts[seen].double().mean()) if seen.any() else 0.0,
        }

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (saved as safetensors in the checkpoint)."""
        return {name: getattr(self, name).clone() for name in _FIELDS}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()`; ValueError when it was saved for another dataset size or history."""
        missing = [name for name in _FIELDS if name not in state]
        if missing:
            raise ValueError(f"prompt statistics in the checkpoint lack {', '.join(missing)}")
        p, h = state["history"].shape
        if p != self.num_prompts or h != self.history_size:
            raise ValueError(f"prompt statistics were saved for {p} prompts × {h} history entries, "
                             f"but this run has {self.num_prompts} × {self.history_size}")
        for name in _FIELDS:
            setattr(self, name, state[name].clone().to(getattr(self, name).dtype))
