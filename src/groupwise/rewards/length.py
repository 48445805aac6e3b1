"""Length-shaping rewards, each built on an accuracy reward.

- `cosine_scaled`: Yeo et al.'s cosine length-scaled reward (shorter correct better, longer wrong
  less bad);
- `concise_correct`: a length penalty applied to correct answers only, normalized within the
  group (Arora & Zanette), or Kimi k1.5's group length reward (`mode="kimi"`);
- `exit_decay` and its tensor building block `decaying_exit_reward`: S-GRPO's decaying reward
  over the exit positions of a serial group.

DAPO's soft overlong punishment is `soft_overlong` (`groupwise.rewards.builtin`).

Correctness comes from another reward, looked up by name when the reward is built
(`accuracy="exact_answer"`, `accuracy_kwargs={...}`; any registered name or import path): a
completion is correct when its accuracy is ≥ `correct_threshold`, and an accuracy of None makes
the length reward None too. Lengths L_i are token counts, len(completion_ids[i]).
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Sequence

import torch

from groupwise.registry import UnknownPartError
from groupwise.rewards.text import required_column
from groupwise.rewards.contract import (
    RewardError,
    RewardFn,
    _as_float,
    _as_value_list,
    _await_all,
    consecutive_groups,
    context_arguments,
    load_reward_function,
    register_reward,
)

# ----------------------------------------------------------------------------- shared helpers


def _number(reward: str, kwarg: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise RewardError(f"{reward}: {kwarg} must be a finite number, not {value!r}")
    return float(value)


class _Accuracy:
    """The accuracy reward a length reward reads correctness from."""

    def __init__(self, owner: str, accuracy: Any, accuracy_kwargs: Any, correct_threshold: Any):
        import groupwise.rewards  # noqa: F401  (registers the built-ins; lazily, as that package imports this module)

        if not isinstance(accuracy, str) or not accuracy:
            raise RewardError(f"{owner}: accuracy must be the name of a reward (e.g. 'exact_answer'), not {accuracy!r}")
        if accuracy_kwargs is None:
            accuracy_kwargs = {}
        if not isinstance(accuracy_kwargs, dict):
            raise RewardError(f"{owner}: accuracy_kwargs must be a mapping of the accuracy reward's options, "
                              f"not {accuracy_kwargs!r}")
        self.threshold = _number(owner, "correct_threshold", correct_threshold)
        try:
            self.fn = load_reward_function(accuracy, accuracy_kwargs)
        except UnknownPartError as e:
            raise RewardError(f"{owner}: accuracy={accuracy!r} names no reward: {e}") from None
        except RewardError as e:
            raise RewardError(f"{owner}: cannot build the accuracy reward {accuracy!r} from accuracy_kwargs "
                              f"{accuracy_kwargs!r}: {e}") from None
        self.label = f"{accuracy} (the accuracy of {owner})"
        self.context_args = context_arguments(self.fn)

    def correct(self, call: dict[str, Any], context: dict[str, Any], n: int) -> list[bool | None]:
        """Per completion: accuracy ≥ threshold, or None where the accuracy is None."""
        out = self.fn(**call, **{a: context[a] for a in self.context_args})
        if inspect.isawaitable(out):  # an async accuracy reward (e.g. a remote judge)
            (out,) = _await_all([out])
            if isinstance(out, BaseException):
                raise out
        values = [_as_float(self.label, i, x) for i, x in enumerate(_as_value_list(self.label, out, n))]
        return [None if math.isnan(x) else x >= self.threshold for x in values]


def _call(prompts: Any, completions: Sequence[Any], completion_ids: Any, trainer_state: Any,
          group_ids: Any, prompt_ids: Any, reward_context: Any, columns: dict[str, Any]) -> tuple[dict, dict, list[int]]:
    """The TRL arguments and context arguments to pass on, and the group ids (consecutive prompts if none given)."""
    n = len(completions)
    prompts = list(prompts) if prompts is not None else [None] * n
    groups = [int(g) for g in group_ids] if group_ids is not None else consecutive_groups(prompts)
    if len(groups) != n:
        raise RewardError(f"got {len(groups)} group_ids for {n} completions")
    call = dict(prompts=prompts, completions=list(completions), completion_ids=list(completion_ids),
                trainer_state=trainer_state, **columns)
    context = {"group_ids": list(groups), "prompt_ids": prompt_ids, "reward_context": reward_context}
    return call, context, groups


def _lengths(completion_ids: Sequence[Sequence[int]], n: int) -> list[int]:
    if len(completion_ids) != n:
        raise RewardError(f"got {len(completion_ids)} completion_ids for {n} completions")
    return [len(ids) for ids in completion_ids]


def _by_group(groups: Sequence[int]) -> dict[int, list[int]]:
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    return members


# ----------------------------------------------------------------------------- cosine_scaled


@register_reward("cosine_scaled")
def cosine_scaled(accuracy: str = "exact_answer", accuracy_kwargs: dict | None = None, correct_threshold: float = 1.0,
                  min_value_wrong: float = -1.0, max_value_wrong: float = -0.5, min_value_correct: float = 0.5,
                  max_value_correct: float = 1.0, max_len: int = 1000, exceed_length: float | None = None) -> RewardFn:
    r"""Cosine length-scaled reward: shorter correct answers earn more, shorter wrong ones lose more.

    Paper: "Demystifying Long Chain-of-Thought Reasoning in LLMs" (Yeo et al., arXiv 2502.03373),
    the cosine reward of §4; defaults as TRL/open-r1's `get_cosine_scaled_reward`. With
    L_i = len(completion_ids[i]) and x_i = min(L_i, L_max) / L_max (L_max = `max_len`):

        r_i = r_lo + ½ (r_hi − r_lo) (1 + cos(π x_i))
        (r_lo, r_hi) = (min_value_correct, max_value_correct)   if correct_i
        (r_lo, r_hi) = (max_value_wrong,   min_value_wrong)     if wrong

    So a correct answer goes from max_value_correct (L = 0) down to min_value_correct (L ≥ L_max),
    a wrong one from min_value_wrong (L = 0) up to max_value_wrong (L ≥ L_max). With
    `exceed_length` set, r_i = exceed_length whenever L_i > L_max (the paper's penalty for
    exceeding the length budget, replacing the cosine value); by default (None) lengths past
    L_max are clipped to L_max (TRL/open-r1 do not clip, so there the reward turns back up past
    L_max; clipping keeps it monotone in L). correct_i = accuracy_i ≥
    `correct_threshold`; an accuracy of None scores None. Requires
    min_value_correct ≤ max_value_correct and min_value_wrong ≤ max_value_wrong.
    """
    name = "cosine_scaled"
    values = {k: _number(name, k, v) for k, v in (("min_value_wrong", min_value_wrong), ("max_value_wrong", max_value_wrong),
                                                   ("min_value_correct", min_value_correct),
                                                   ("max_value_correct", max_value_correct))}
    if values["min_value_correct"] > values["max_value_correct"]:
        raise RewardError(f"{name}: min_value_correct ({min_value_correct}) must be ≤ max_value_correct ({max_value_correct})")
    if values["min_value_wrong"] > values["max_value_wrong"]:
        raise RewardError(f"{name}: min_value_wrong ({min_value_wrong}) must be ≤ max_value_wrong ({max_value_wrong})")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise RewardError(f"{name}: max_len must be a positive integer (tokens), not {max_len!r}")
    exceed = None if exceed_length is None else _number(name, "exceed_length", exceed_length)
    acc = _Accuracy(name, accuracy, accuracy_kwargs, correct_threshold)
    correct_range = (values["min_value_correct"], values["max_value_correct"])
    wrong_range = (values["max_value_wrong"], values["min_value_wrong"])  # swapped: short wrong answers get the minimum

    def reward(prompts: Any = None, completions: Sequence[Any] = (), completion_ids: Sequence[Sequence[int]] = (),
               trainer_state: Any = None, group_ids: Sequence[int] | None = None, prompt_ids: Any = None,
               reward_context: Any = None, **columns: Any) -> list[float | None]:
        n = len(completions)
        call, context, _ = _call(prompts, completions, completion_ids, trainer_state, group_ids, prompt_ids,
                                 reward_context, columns)
        lengths = _lengths(completion_ids, n)
        scores: list[float | None] = []
        for length, correct in zip(lengths, acc.correct(call, context, n)):
            if correct is None:
                scores.append(None)
            elif exceed is not None and length > max_len:
                scores.append(exceed)
            else:
                lo, hi = correct_range if correct else wrong_range
                x = min(length, max_len) / max_len
                scores.append(lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * x)))
        return scores

    reward.__name__ = name
    return reward


# ----------------------------------------------------------------------------- concise_correct


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


@register_reward("concise_correct")
def concise_correct(accuracy: str = "exact_answer", accuracy_kwargs: dict | None = None, correct_threshold: float = 1.0,
                    mode: str = "arora", alpha: float | None = None) -> RewardFn:
    r"""A length penalty on correct answers, relative to the other answers to the same prompt.

    `mode="arora"` (default). Paper: "Training Language Models to Reason Efficiently" (Arora &
    Zanette, arXiv 2502.04463). With C_g the correct completions of group g (the `group_ids`
    context argument; runs of equal prompts when none is given), and mean/std over the lengths
    L_j, j ∈ C_g (population std, ddof = 0):

        r_i = 1[correct_i] · (1 − α · σ((L_i − mean_{C_g}(L)) / std_{C_g}(L)))

    σ the logistic sigmoid, α = `alpha` ∈ [0, 1] (default 0.1). Where std_{C_g}(L) = 0 (a single
    correct answer, or all correct ones equally long) the normalized length is taken as 0:
    r_i = 1 − α/2, i.e. each such answer counts as of average length — no length comparison is
    possible, and the group's mean correct reward stays the same as with varied lengths. Wrong
    answers score 0; correct ones lie in (1 − α, 1), and a shorter correct answer never scores
    below a longer one of its group.

    `mode="kimi"`. Paper: "Kimi k1.5: Scaling Reinforcement Learning with LLMs" (Kimi Team,
    arXiv 2501.12599), §2.3.3 length penalty, as open-r1's `len_reward` but per group. With
    L_min, L_max over all completions of the group (whatever their correctness):

        λ_i = 0.5 − (L_i − L_min) / (L_max − L_min)      (λ_i = 0 when L_max = L_min)
        r_i = λ_i if correct_i else min(0, λ_i)

    so r ∈ [−0.5, 0.5]. `alpha` applies to mode "arora" only. In both modes L_i =
    len(completion_ids[i]), correct_i = accuracy_i ≥ `correct_threshold`, and an accuracy of
    None scores None (such rows are left out of the correct set C_g).
    """
    name = "concise_correct"
    if mode not in ("arora", "kimi"):
        raise RewardError(f"{name}: mode must be 'arora' (Arora & Zanette) or 'kimi' (Kimi k1.5), not {mode!r}")
    if mode == "kimi" and alpha is not None:
        raise RewardError(f"{name}: alpha applies to mode='arora' only; mode='kimi' has no strength parameter")
    a = 0.1 if alpha is None else _number(name, "alpha", alpha)
    if not 0.0 <= a <= 1.0:
        raise RewardError(f"{name}: alpha must be in [0, 1], not {alpha!r}")
    acc = _Accuracy(name, accuracy, accuracy_kwargs, correct_threshold)

    def reward(prompts: Any = None, completions: Sequence[Any] = (), completion_ids: Sequence[Sequence[int]] = (),
               trainer_state: Any = None, group_ids: Sequence[int] | None = None, prompt_ids: Any = None,
               reward_context: Any = None, **columns: Any) -> list[float | None]:
        n = len(completions)
        call, context, groups = _call(prompts, completions, completion_ids, trainer_state, group_ids, prompt_ids,
                                      reward_context, columns)
        lengths = _lengths(completion_ids, n)
        correct = acc.correct(call, context, n)
        scores: list[float | None] = [None] * n
        for members in _by_group(groups).values():
            if mode == "kimi":
                lo, hi = min(lengths[i] for i in members), max(lengths[i] for i in members)
                for i in members:
                    lam = 0.0 if hi == lo else 0.5 - (lengths[i] - lo) / (hi - lo)
                    if correct[i] is not None:
                        scores[i] = lam if correct[i] else min(0.0, lam)
                continue
            right = [lengths[i] for i in members if correct[i]]
            mean = sum(right) / len(right) if right else 0.0
            std = math.sqrt(sum((x - mean) ** 2 for x in right) / len(right)) if right else 0.0
            for i in members:
                if correct[i] is None:
                    continue
                if not correct[i]:
                    scores[i] = 0.0
                    continue
                z = (lengths[i] - mean) / std if std > 0 else 0.0
                scores[i] = 1.0 - a * _sigmoid(z)
        return scores

    reward.__name__ = name
    return reward


# ----------------------------------------------------------------------------- S-GRPO exit decay


def decaying_exit_reward(correct: torch.Tensor, exit_position: torch.Tensor, group_id: torch.Tensor) -> torch.Tensor:
    r"""S-GRPO's decaying reward over the exits of each serial group; [N] float32.

    Paper: "S-GRPO: Early Exit via Reinforcement Learning in Reasoning Models" (Dai et al.,
    arXiv 2505.07686), the decaying-reward strategy: within a serial group (equal `group_id`),
    exits are ordered front to back by `exit_position` and

        r_i = 1 / 2^(k_i − 1)   if correct_i,     r_i = 0 otherwise
        k_i = 1 + #{j : group_j = group_i, correct_j, exit_position_j < exit_position_i}

    i.e. k_i is the 1-based rank of this exit among its group's correct exits (the paper's
    N_right, the number of correct answers up to and including this exit). Correct exits at the
    same position share a rank, so the result does not depend on row order: correct exits at
    positions 2, 2, 4 get 1, 1, 1/4. The abstract states the rule ("for the correct answers in a
    serial group, we assign rewards that decay according to positions, with lower rewards towards
    the later ones"); the halving per correct exit is the paper's decaying-reward formula as we
    read it; it was not checked against a reference implementation.

    Vectorized: one lexicographic sort by (group, position), a cumulative count of correct exits,
    and per-group / per-tie offsets; runs on the inputs' device. `correct`: [N] bool (or 0/1);
    `exit_position`: [N] real, finite; `group_id`: [N] integer.
    """
    if not (correct.ndim == exit_position.ndim == group_id.ndim == 1):
        raise ValueError(f"decaying_exit_reward: expects 1-D tensors, got shapes {tuple(correct.shape)}, "
                         f"{tuple(exit_position.shape)}, {tuple(group_id.shape)}")
    n = correct.shape[0]
    if exit_position.shape[0] != n or group_id.shape[0] != n:
        raise ValueError(f"decaying_exit_reward: lengths differ: correct {n}, exit_position {exit_position.shape[0]}, "
                         f"group_id {group_id.shape[0]}")
    if exit_position.is_floating_point() and not bool(torch.isfinite(exit_position).all()):
        raise ValueError("decaying_exit_reward: exit_position must be finite")
    if group_id.is_floating_point() or group_id.is_complex():
        raise ValueError(f"decaying_exit_reward: group_id must be an integer tensor, not {group_id.dtype}")
    device = exit_position.device
    if n == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    ok = correct.to(device).bool()
    groups = group_id.to(device).long()
    # lexicographic order (group, position): stable sort by the minor key, then by the major one
    by_position = torch.argsort(exit_position, stable=True)
    order = by_position[torch.argsort(groups[by_position], stable=True)]
    g, p, c = groups[order], exit_position[order], ok[order].long()
    index = torch.arange(n, device=device)
    before = torch.cumsum(c, 0) - c  # correct exits before each row in the whole sorted batch
    new_group = torch.ones(n, dtype=torch.bool, device=device)
    new_group[1:] = g[1:] != g[:-1]
    new_tie = new_group.clone()
    new_tie[1:] |= p[1:] != p[:-1]
    group_start = torch.where(new_group, index, torch.zeros_like(index)).cummax(0).values
    tie_start = torch.where(new_tie, index, torch.zeros_like(index)).cummax(0).values
    # correct exits of the same group strictly earlier: counted at the first row of this position
    earlier = (before - before[group_start])[tie_start]
    sorted_reward = torch.where(c.bool(), torch.pow(0.5, earlier.to(torch.float32)), torch.zeros((), device=device))
    out = torch.empty(n, dtype=torch.float32, device=device)
    out[order] = sorted_reward
    return out


@register_reward("exit_decay")
def exit_decay(accuracy: str = "exact_answer", accuracy_kwargs: dict | None = None, correct_threshold: float = 1.0,
               exit_column: str | None = "exit_position") -> RewardFn:
    r"""S-GRPO's decaying reward for the early-exit answers of a serial group.

    Paper: "S-GRPO: Early Exit via Reinforcement Learning in Reasoning Models" (Dai et al.,
    arXiv 2505.07686). Each group (the `group_ids` context argument; runs of equal prompts when
    none is given) is one serial group: the answers obtained by exiting one reasoning path at
    different positions. With `decaying_exit_reward`:

        r_i = 1 / 2^(k_i − 1)  if correct_i, else 0
        k_i = 1 + #{j in the group of i : correct_j, exit_j < exit_i}

    so the earliest correct exit gets 1, the next 1/2, then 1/4, …; correct_i = accuracy_i ≥
    `correct_threshold`. The exit position exit_i is read from the column `exit_column`
    (default "exit_position"; finite numbers); when that default column is absent, or
    `exit_column=None`, the completion length len(completion_ids[i]) is used instead. A column
    named explicitly must exist. An accuracy of None scores None and does not count as correct.
    """
    name = "exit_decay"
    if exit_column is not None and (not isinstance(exit_column, str) or not exit_column):
        raise RewardError(f"{name}: exit_column must be a column name or None, not {exit_column!r}")
    fallback = exit_column in (None, "exit_position")  # an explicitly named column must exist
    acc = _Accuracy(name, accuracy, accuracy_kwargs, correct_threshold)

    def reward(prompts: Any = None, completions: Sequence[Any] = (), completion_ids: Sequence[Sequence[int]] = (),
               trainer_state: Any = None, group_ids: Sequence[int] | None = None, prompt_ids: Any = None,
               reward_context: Any = None, **columns: Any) -> list[float | None]:
        n = len(completions)
        call, context, groups = _call(prompts, completions, completion_ids, trainer_state, group_ids, prompt_ids,
                                      reward_context, columns)
        if exit_column is None or (fallback and exit_column not in columns):
            positions: list[float] = [float(x) for x in _lengths(completion_ids, n)]
        else:
            column = required_column(name, exit_column, columns)
            if len(column) != n:
                raise RewardError(f"{name}: column '{exit_column}' has {len(column)} values for {n} completions")
            positions = []
            for i, x in enumerate(column):
                if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
                    raise RewardError(f"{name}: column '{exit_column}' has {x!r} for sample {i}; "
                                      f"expected a finite number (the exit position)")
                positions.append(float(x))
        correct = acc.correct(call, context, n)
        r = decaying_exit_reward(torch.tensor([bool(c) for c in correct], dtype=torch.bool),
                                 torch.tensor(positions, dtype=torch.float64), torch.tensor(groups, dtype=torch.long))
        return [None if c is None else float(v) for c, v in zip(correct, r.tolist())]

    reward.__name__ = name
    return reward
