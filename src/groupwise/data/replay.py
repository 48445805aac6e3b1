"""Past completions per prompt, for replay (RePO) and response reuse (AR3PO); AR3PO's staged rollout rule.

RePO ("RePO: Replay-Enhanced Policy Optimization", Li et al., arXiv 2506.09340; reference code
SihengLi99/RePO `src/replay_grpo_trainer.py`, verified): every on-policy completion is pushed into a
per-prompt FIFO (`deque(maxlen=max_cache_size)`, oldest evicted) together with its per-token
behaviour log-probs and reward. When a prompt is drawn again and its FIFO holds at least
`min_cache_to_replay` entries, `num_replays` of them are retrieved *before* this step's completions
are added, appended to the prompt's group, and trained with the PPO clip against their stored
log-probs (see `algorithms.off_policy`). The paper's script: 8 on-policy + 8 replayed,
max_cache_size = min_cache_to_replay = 16, strategy `highest_k`.

AR3PO ("Improving Sampling Efficiency in RLVR through Adaptive Rollout and Response Reuse", Zhang et
al., arXiv 2509.25808): see `adaptive_rollout_stages` and `ReplayBuffer.latest_correct`. Its code is
not in the reference index, so its rules below are from the paper's description only (not verified
against the reference code).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import torch

# strategy name → canonical name (RePO's `replay_strategy` values are accepted as aliases)
_STRATEGIES = {
    "all": "all", "random": "random", "random_k": "random", "recent": "recent", "recent_k": "recent",
    "highest": "highest", "highest_k": "highest", "reward": "highest", "best": "highest",
    "max_variance": "max_variance", "max_variance_k": "max_variance", "random_correct": "random_correct",
}
_STATE_KEYS = ("ids", "logprobs", "offsets", "prompt", "reward", "correct", "step", "meta")


@dataclass
class ReplayEntry:
    """One stored completion: token ids, the behaviour policy's per-token log-probs (float32), reward."""

    prompt_index: int
    completion_ids: list[int]
    behaviour_logprobs: list[float]
    reward: float
    correct: bool
    step: int


class ReplayBuffer:
    """Per-prompt FIFO of past completions, at most `capacity_per_prompt` each (oldest evicted first).

    Token ids are kept as int32 and log-probs as float32 tensors (one pair per entry), so 100k
    entries stay compact; `state_dict()` flattens them into a handful of tensors.

    Sampling strategies (RePO §replay strategies; reference `_replay_step`), k' = min(k, count):
      - `all`: every stored entry (k ignored), oldest first;
      - `random` (`random_k`): k' entries uniformly without replacement (`torch.randperm`);
      - `recent` (`recent_k`): the k' newest, oldest first;
      - `highest` (`highest_k`, `reward`): the k' highest rewards (stable: ties keep the older first);
      - `max_variance` (`max_variance_k`): the size-k' subset whose rewards have the largest
        (population) variance, ties broken by the larger reward sum, returned oldest first. The
        reference enumerates all C(n, k') subsets; for a fixed size, swapping any kept value for a
        more extreme left-out one never lowers the variance (the objective is convex in each value),
        so an optimum always lies among "j lowest + (k'−j) highest", the k'+1 candidates checked here.
      - `random_correct`: k' entries drawn at random among the correct ones (AR3PO picks a past
        correct response at random).
    """

    def __init__(self, num_prompts: int, capacity_per_prompt: int = 8):
        if int(num_prompts) < 1:
            raise ValueError(f"ReplayBuffer: num_prompts must be ≥ 1, got {num_prompts}")
        if int(capacity_per_prompt) < 1:
            raise ValueError(f"ReplayBuffer: capacity_per_prompt must be ≥ 1, got {capacity_per_prompt}")
        self.num_prompts, self.capacity = int(num_prompts), int(capacity_per_prompt)
        # per prompt: (ids int32, logprobs float32, reward, correct, step), oldest first
        self._store: list[deque] = [deque(maxlen=self.capacity) for _ in range(self.num_prompts)]
        self._size = 0

    # ------------------------------------------------------------------ writing

    def _check_index(self, prompt_index: int) -> int:
        if not isinstance(prompt_index, int) or isinstance(prompt_index, bool) or not 0 <= prompt_index < self.num_prompts:
            raise ValueError(f"ReplayBuffer: prompt_index must be an int in 0..{self.num_prompts - 1}, got {prompt_index!r}")
        return prompt_index

    def add(self, prompt_index: int, completion_ids: list[int], behaviour_logprobs: list[float],
            reward: float, correct: bool, step: int) -> None:
        """Store one completion of `prompt_index`; the prompt's oldest entry is evicted beyond capacity."""
        p = self._check_index(prompt_index)
        ids = torch.as_tensor(list(completion_ids), dtype=torch.long)
        lp = torch.as_tensor(list(behaviour_logprobs), dtype=torch.float32)
        if ids.dim() != 1 or lp.shape != ids.shape:
            raise ValueError(f"ReplayBuffer.add (prompt {p}): completion_ids ({ids.numel()}) and "
                             f"behaviour_logprobs ({lp.numel()}) must be flat lists of one length")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= 2**31):
            raise ValueError(f"ReplayBuffer.add (prompt {p}): completion_ids must be token ids in 0..2^31-1")
        if not torch.isfinite(lp).all() or (lp > 1e-3).any():
            raise ValueError(f"ReplayBuffer.add (prompt {p}): behaviour_logprobs must be finite log-probabilities ≤ 0")
        if not torch.isfinite(torch.tensor(float(reward))):
            raise ValueError(f"ReplayBuffer.add (prompt {p}): reward must be finite, got {reward}")
        buf = self._store[p]
        if len(buf) == self.capacity:
            self._size -= 1
        buf.append((ids.to(torch.int32), lp, float(reward), bool(correct), int(step)))
        self._size += 1

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return self._size

    def count(self, prompt_index: int) -> int:
        """Entries stored for one prompt (RePO replays only once this reaches `min_cache_to_replay`)."""
        return len(self._store[self._check_index(prompt_index)])

    def _entry(self, p: int, rec) -> ReplayEntry:
        ids, lp, reward, correct, step = rec
        return ReplayEntry(p, ids.tolist(), lp.tolist(), reward, correct, step)

    def entries(self, prompt_index: int) -> list[ReplayEntry]:
        """All entries of one prompt, oldest first."""
        p = self._check_index(prompt_index)
        return [self._entry(p, r) for r in self._store[p]]

    def sample(self, prompt_index: int, k: int, strategy: str = "random",
               generator: torch.Generator | None = None) -> list[ReplayEntry]:
        """Up to k stored entries of one prompt chosen by `strategy` (see the class docstring)."""
        p = self._check_index(prompt_index)
        if strategy not in _STRATEGIES:
            raise ValueError(f"ReplayBuffer.sample: unknown strategy {strategy!r}; choose from {sorted(_STRATEGIES)}")
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"ReplayBuffer.sample: k must be an int ≥ 0, got {k!r}")
        recs = list(self._store[p])
        name = _STRATEGIES[strategy]
        if name == "all":
            chosen = list(range(len(recs)))
        elif name in ("random", "random_correct"):
            pool = [i for i, r in enumerate(recs) if name == "random" or r[3]]
            perm = torch.randperm(len(pool), generator=generator).tolist()
            chosen = [pool[i] for i in perm[: min(k, len(pool))]]
        elif name == "recent":
            chosen = list(range(len(recs) - min(k, len(recs)), len(recs)))
        elif name == "highest":
            chosen = sorted(range(len(recs)), key=lambda i: -recs[i][2])[: min(k, len(recs))]
        else:
            chosen = self._max_variance(torch.tensor([r[2] for r in recs], dtype=torch.float64), min(k, len(recs)))
        return [self._entry(p, recs[i]) for i in chosen]

    @staticmethod
    def _max_variance(rewards: torch.Tensor, k: int) -> list[int]:
        if k == 0:
            return []
        order = torch.argsort(rewards, stable=True).tolist()
        best, best_key = None, None
        for j in range(k + 1):  # j lowest + (k − j) highest
            idx = order[:j] + (order[len(order) - (k - j):] if k - j else [])
            vals = rewards[idx]
            var, total = float(vals.var(unbiased=False)), float(vals.sum())
            # Equal variances computed from different subsets differ in the last bits; compare
            # them with a tolerance so the documented tie-break (larger sum) decides.
            if best_key is None:
                better = True
            elif abs(var - best_key[0]) <= 1e-9 * max(1.0, abs(var)):
                better = total > best_key[1]
            else:
                better = var > best_key[0]
            if better:
                best, best_key = idx, (var, total)
        return sorted(best)

    def latest_correct(self, prompt_index: int) -> ReplayEntry | None:
        """The newest correct entry of a prompt, or None (AR3PO response reuse).

        AR3PO (arXiv 2509.25808, §response reuse; from the paper, not verified against the reference
        code): when a prompt's group is still all wrong after the last adaptive-rollout stage, one
        wrong response of the group is replaced by a correct response of the same prompt generated at
        an earlier step (the paper draws it at random from its buffer of correct responses: use
        `sample(p, 1, "random_correct", g)` for that; this method is the deterministic variant). Its
        importance ratio is not trusted (the old policy that produced it may be far away); the paper
        offers (I) recomputing its token log-probs with the current policy, i.e. treating it as
        on-policy (behaviour = current, ratio 1 at the start of the update), or (II, best in its
        ablation) stop-gradient: the reused row enters the group's reward mean / std, so the wrong
        rows get negative advantages, but its own loss is masked out. New correct responses are added
        to the buffer after every step. With a shared buffer, correct entries can be evicted by wrong
        ones; give AR3PO a buffer that only receives correct completions if that matters.
        """
        p = self._check_index(prompt_index)
        for rec in reversed(self._store[p]):
            if rec[3]:
                return self._entry(p, rec)
        return None

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors only: ids (int32) and logprobs (float32) concatenated, offsets [E+1], per-entry
        prompt / reward / correct / step, and meta = [num_prompts, capacity]; entries by prompt, oldest first."""
        recs = [(p, r) for p, buf in enumerate(self._store) for r in buf]
        lengths = torch.tensor([r[0].numel() for _, r in recs], dtype=torch.long)
        offsets = torch.zeros(len(recs) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        return {
            "ids": torch.cat([r[0] for _, r in recs]) if recs else torch.zeros(0, dtype=torch.int32),
            "logprobs": torch.cat([r[1] for _, r in recs]) if recs else torch.zeros(0, dtype=torch.float32),
            "offsets": offsets,
            "prompt": torch.tensor([p for p, _ in recs], dtype=torch.long),
            "reward": torch.tensor([r[2] for _, r in recs], dtype=torch.float64),
            "correct": torch.tensor([r[3] for _, r in recs], dtype=torch.bool),
            "step": torch.tensor([r[4] for _, r in recs], dtype=torch.long),
            "meta": torch.tensor([self.num_prompts, self.capacity], dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()`; ValueError when a key is missing or it was saved for another dataset size."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"replay buffer state lacks {', '.join(missing)}")
        num_prompts, capacity = (int(x) for x in state["meta"].tolist())
        if num_prompts != self.num_prompts:
            raise ValueError(f"replay buffer was saved for {num_prompts} prompts, this run has {self.num_prompts}")
        offsets, prompt = state["offsets"].long(), state["prompt"].long()
        n = prompt.numel()
        if offsets.numel() != n + 1 or any(state[k].numel() != n for k in ("reward", "correct", "step")) \
                or int(offsets[-1]) != state["ids"].numel() or state["logprobs"].numel() != state["ids"].numel():
            raise ValueError("replay buffer state is inconsistent (offsets, ids, logprobs and per-entry fields disagree)")
        ids, lps = state["ids"].to(torch.int32), state["logprobs"].to(torch.float32)
        store = [deque(maxlen=self.capacity) for _ in range(self.num_prompts)]
        for e, p in enumerate(prompt.tolist()):
            if not 0 <= p < self.num_prompts:
                raise ValueError(f"replay buffer state: entry {e} has prompt index {p} out of range")
            a, b = int(offsets[e]), int(offsets[e + 1])
            store[p].append((ids[a:b].clone(), lps[a:b].clone(), float(state["reward"][e]),
                             bool(state["correct"][e]), int(state["step"][e])))
        self._store = store
        self._size = sum(len(b) for b in store)


def adaptive_rollout_stages(correct_counts: Sequence[int], stage: int, *, num_stages: int, per_stage: int) -> list[int]:
    """How many responses each prompt gets in the next stage of AR3PO's adaptive rollout.

    Paper: "Improving Sampling Efficiency in RLVR through Adaptive Rollout and Response Reuse"
    (Zhang et al., arXiv 2509.25808), § adaptive rollout: generation runs in at most S stages; each
    stage samples k responses for every prompt still in the pool, and a prompt leaves the pool as
    soon as it has at least one correct response. After `stage` stages (0 = none yet):

        n_i = k   if stage < S and c_i = 0,        n_i = 0 otherwise

    with c_i = correct responses of prompt i over all stages so far, k = `per_stage`,
    S = `num_stages`. A prompt's group is the union of its stages' responses (k·s_i responses, so
    group sizes differ across prompts); easy prompts stop after one stage, hard ones get up to k·S.
    Prompts still all wrong after stage S are candidates for response reuse
    (`ReplayBuffer.latest_correct`). From the paper's description; not verified against the
    reference code.
    """
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"adaptive_rollout_stages: num_stages must be an int ≥ 1, got {num_stages!r}")
    if not isinstance(per_stage, int) or per_stage < 1:
        raise ValueError(f"adaptive_rollout_stages: per_stage must be an int ≥ 1, got {per_stage!r}")
    if not isinstance(stage, int) or not 0 <= stage <= num_stages:
        raise ValueError(f"adaptive_rollout_stages: stage must be an int in 0..{num_stages}, got {stage!r}")
    counts = list(correct_counts)
    for i, c in enumerate(counts):
        if isinstance(c, bool) or int(c) != c or c < 0:
            raise ValueError(f"adaptive_rollout_stages: correct_counts row {i} must be an int ≥ 0, got {c!r}")
    more = stage < num_stages
    return [per_stage if more and c == 0 else 0 for c in counts]
