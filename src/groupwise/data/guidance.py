"""In-prompt guidance for prompts the policy cannot solve yet: tiered hints (Scaf-GRPO), self-explanation (ExPO).

Both only change the *prompt*; hint and answer tokens are never trained on (they are prompt
tokens, outside the completion mask).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence

import torch

from groupwise.data.prompt_stats import PromptStats
from groupwise.types import Prompt

# Scaf-GRPO's tiers, abstract → concrete, with the reference dataset's column names as aliases
_TIERS = ("knowledge", "planning", "solution")
_TIER_ALIASES = {"knowledge": "knowledge", "knowledge_components_parts": "knowledge",
                 "planning": "planning", "planning_skeleton_parts": "planning",
                 "solution": "solution", "solution_breakdown_parts": "solution"}
_TIER_LABELS = {"knowledge": "Knowledge Hints", "planning": "Planning Hints", "solution": "Solution Hints"}

DEFAULT_HINT_TEMPLATE = "\n\nHint: {hint}"
DEFAULT_EXPO_TEMPLATE = ("\n\nThe correct final answer is {answer}. Explain step by step how to reach this "
                         "answer, and end with the final answer.")


def _append(prompt: Prompt, suffix: str, what: str) -> Prompt:
    """A copy of `prompt` with `suffix` appended to its text or to its last user message."""
    if prompt.text is not None:
        return dataclasses.replace(prompt, text=prompt.text + suffix, columns=dict(prompt.columns))
    messages = copy.deepcopy(prompt.messages or [])
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError(f"{what}: prompt row {prompt.index} has no user message to append to")
    last = messages[users[-1]]
    content = last.get("content")
    if isinstance(content, str):
        last["content"] = content + suffix
    elif isinstance(content, list):
        content.append({"type": "text", "text": suffix})
    else:
        raise ValueError(f"{what}: prompt row {prompt.index}: the last user message's content must be a "
                         f"string or a list of parts, got {type(content).__name__}")
    return dataclasses.replace(prompt, messages=messages, columns=dict(prompt.columns))


def _strings(value: Any, column: str, row: int) -> list[str]:
    if isinstance(value, str):
        return [value.strip()] if value.strip() else []
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ValueError(f"hint column {column!r}, row {row}: expected a string or a list of strings, got {value!r}")


def hint_levels(value: Any, *, column: str = "hints", row: int = -1) -> list[tuple[str, str]]:
    """The (tier label, hint text) of each hint level 1…L of one prompt, abstract first.

    - None, "", [] or {}: no hints (L = 0);
    - a string: one level;
    - a list of strings: one level per string, in order (tiers from abstract to concrete);
    - a dict of named tiers `knowledge`, `planning`, `solution` (Scaf-GRPO's three tiers; the
      reference dataset's `knowledge_components_parts`, `planning_skeleton_parts`,
      `solution_breakdown_parts` are accepted too), taken in that order. A tier given as a list of
      parts gives one level per prefix, parts[:1], parts[:2], … (the reference code's cumulative
      levels, up to 4 parts per tier: 12 levels in all), joined by spaces; a string tier is one level.
    Anything else raises ValueError naming the column and row.
    """
    if value is None:
        return []
    if isinstance(value, dict):
        unknown = [k for k in value if k not in _TIER_ALIASES]
        if unknown:
            raise ValueError(f"hint column {column!r}, row {row}: unknown hint tier(s) {unknown}; "
                             f"expected {sorted(_TIER_ALIASES)}")
        tiers: dict[str, Any] = {}
        for k, v in value.items():
            name = _TIER_ALIASES[k]
            if name in tiers:
                raise ValueError(f"hint column {column!r}, row {row}: tier {name!r} is given twice")
            tiers[name] = v
        levels = []
        for name in _TIERS:
            v = tiers.get(name)
            if v is None:
                continue
            parts = _strings(v, column, row)
            if isinstance(v, str):
                levels += [(_TIER_LABELS[name], p) for p in parts]
            else:
                levels += [(_TIER_LABELS[name], " ".join(parts[:j])) for j in range(1, len(parts) + 1)]
        return levels
    return [("Hint", h) for h in _strings(value, column, row)]


class HintScheduler:
    """Per-prompt hint levels that rise while a prompt stagnates and fall once it is solved.

    Paper: "Scaf-GRPO: Scaffolded Group Relative Policy Optimization for Enhancing LLM Reasoning"
    (Zhang et al., arXiv 2510.19807); reference code dvlab-research/Scaf-GRPO
    (`hint_mix_grpo/trainer/ray_trainer.py`, `sh/hint_mix_grpo/bs256_6k_mix.sh`).

    Rule, applied by `update` to each group g of prompt p with success rate r_g at level ℓ_p:

        solved:     r_g > threshold                                  → ℓ_p ← max(ℓ_p − 1, 0)
        stagnating: step ≥ warmup_steps, ℓ_p < L_p, at least `patience` groups seen at level ℓ_p,
                    and the last `patience` success rates of p (stats.history) are all 0
                                                                      → ℓ_p ← ℓ_p + 1
        otherwise ℓ_p is kept. L_p = number of hint levels of p (capped by `max_level`).

    Level 0 means no hint, so a prompt solved unaided keeps no hint, and a solved hinted prompt
    has its scaffold withdrawn one level at a time. `warmup_steps` is Scaf-GRPO's guidance-exemption
    period: no round with step ≤ warmup_steps is hinted (reference: `global_steps > warmup_steps`,
    50 in its script). `patience = 1` matches the reference, which intervenes on the first all-wrong
    group after the warm-up. `update` may run before or after `stats.update` of the same round: the
    current round's rate is taken from `success_rates` when stats has not recorded step `step` yet.

    How the reference uses the hints (not done here; the integrator's part): after the unhinted
    rollout, every all-wrong group's prompt is re-generated once per hint level (cumulative parts of
    the knowledge, then solution tiers; the planning tier is commented out in the released code),
    the lowest level giving a correct response is kept, and that one response replaces ONE failed
    response of the group (`replace_num=1`); with the default `replace_hint_prompt=False` the row
    keeps its hinted prompt. Old log-probs are recomputed after the replacement (the hinted row is
    on-policy under its hinted prompt, ratio 1 at the start) and the advantage is plain GRPO over
    the mixed group. The reference keeps no level between steps; this scheduler does, trading the
    reference's search over all levels per step for one escalation per round. Hint text is built by
    `template.format(hint=…, tier=…)` (`tier` is "Knowledge Hints" etc. for dict columns, "Hint"
    otherwise); the reference writes "Question: {q}\\n{tier}: {hint}".
    """

    def __init__(self, prompts: Sequence[Prompt], stats: PromptStats, *, column: str = "hints",
                 patience: int = 1, warmup_steps: int = 50, max_level: int | None = None,
                 success_threshold: float = 0.0, template: str = DEFAULT_HINT_TEMPLATE):
        if stats.num_prompts != len(prompts):
            raise ValueError(f"HintScheduler: {len(prompts)} prompts but statistics for {stats.num_prompts}")
        if not isinstance(patience, int) or not 1 <= patience <= stats.history_size:
            raise ValueError(f"HintScheduler: patience must be an int in 1..{stats.history_size} (the statistics' history), got {patience!r}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"HintScheduler: warmup_steps must be an int ≥ 0, got {warmup_steps!r}")
        if max_level is not None and (not isinstance(max_level, int) or max_level < 0):
            raise ValueError(f"HintScheduler: max_level must be None or an int ≥ 0, got {max_level!r}")
        if not 0.0 <= success_threshold < 1.0:
            raise ValueError(f"HintScheduler: success_threshold must be in [0, 1), got {success_threshold}")
        try:
            template.format(hint="", tier="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"HintScheduler: template must use only {{hint}} and {{tier}}: {e}") from None
        if "{hint}" not in template:
            raise ValueError("HintScheduler: template must contain {hint}")
        self.stats, self.column, self.template = stats, column, template
        self.patience, self.warmup_steps, self.success_threshold = patience, warmup_steps, float(success_threshold)
        self._levels: list[list[tuple[str, str]]] = []
        for i, p in enumerate(prompts):
            if p.index not in (i, -1):
                raise ValueError(f"HintScheduler: prompt at position {i} has index {p.index}; prompts must be in dataset order")
            lv = hint_levels(p.columns.get(column), column=column, row=i)
            self._levels.append(lv if max_level is None else lv[:max_level])
        n = len(prompts)
        self.num_levels = torch.tensor([len(lv) for lv in self._levels], dtype=torch.long)
        self.levels = torch.zeros(n, dtype=torch.long)
        self.rounds_at_level = torch.zeros(n, dtype=torch.long)

    def _index(self, i: Any) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.levels.numel():
            raise ValueError(f"HintScheduler: prompt index must be an int in 0..{self.levels.numel() - 1}, got {i!r}")
        return i

    def level(self, prompt_index: int) -> int:
        """The prompt's current hint level (0 = no hint)."""
        return int(self.levels[self._index(prompt_index)])

    def hint(self, prompt_index: int, level: int | None = None) -> str:
        """The formatted hint text of a prompt at `level` (default: its current level); "" at level 0."""
        p = self._index(prompt_index)
        lv = int(self.levels[p]) if level is None else level
        if not isinstance(lv, int) or not 0 <= lv <= int(self.num_levels[p]):
            raise ValueError(f"HintScheduler: level must be in 0..{int(self.num_levels[p])} for prompt {p}, got {lv!r}")
        if lv == 0:
            return ""
        tier, text = self._levels[p][lv - 1]
        return self.template.format(hint=text, tier=tier)

    def apply(self, prompt: Prompt, *, level: int | None = None) -> Prompt:
        """A copy of `prompt` with its current (or the given) level's hint appended to the text or to
        the last user message; at level 0 the prompt itself is returned unchanged."""
        p = self._index(prompt.index)
        suffix = self.hint(p, level)
        return prompt if not suffix else _append(prompt, suffix, "HintScheduler.apply")

    def update(self, indices: Sequence[int], success_rates: Sequence[float], step: int) -> None:
        """Decide the next round's levels from this round's groups (prompt `indices[g]`, rate `success_rates[g]`)."""
        if len(indices) != len(success_rates):
            raise ValueError(f"HintScheduler.update: {len(indices)} indices but {len(success_rates)} success rates")
        for g, (i, r) in enumerate(zip(indices, success_rates)):
            p = self._index(int(i))
            r = float(r)
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"HintScheduler.update: success rate of group {g} (prompt {p}) must be in [0, 1], got {r}")
            self.rounds_at_level[p] += 1
            if r > self.success_threshold:
                self.levels[p] = max(int(self.levels[p]) - 1, 0)
                self.rounds_at_level[p] = 0
            elif (r == 0.0 and step >= self.warmup_steps and self.levels[p] < self.num_levels[p]
                  and self.rounds_at_level[p] >= self.patience and self._stagnant(p, r, step)):
                self.levels[p] += 1
                self.rounds_at_level[p] = 0

    def _stagnant(self, p: int, rate: float, step: int) -> bool:
        """The last `patience` success rates of p, this round's included, are all 0."""
        hist = self.stats.history[p]
        if int(self.stats.last_step[p]) == step:       # stats already holds this round
            window = hist[hist.numel() - self.patience:]
        else:
            window = torch.cat([hist[hist.numel() - self.patience + 1:], torch.tensor([rate], dtype=hist.dtype)])
        return bool((window == 0).all())

    def metrics(self) -> dict[str, float]:
        """`hints/active_fraction`: prompts with a hint now (over the whole dataset); `hints/mean_level`."""
        return {"hints/active_fraction": float((self.levels > 0).double().mean()),
                "hints/mean_level": float(self.levels.double().mean())}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"level": self.levels.clone(), "rounds_at_level": self.rounds_at_level.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore `state_dict()`; ValueError for a missing key, another dataset size, or levels above a prompt's hints."""
        for k in ("level", "rounds_at_level"):
            if k not in state:
                raise ValueError(f"hint scheduler state lacks {k}")
            if state[k].shape != self.levels.shape:
                raise ValueError(f"hint scheduler state {k} has shape {tuple(state[k].shape)}, this run has {tuple(self.levels.shape)}")
        level = state["level"].long()
        bad = torch.nonzero((level < 0) | (level > self.num_levels))
        if bad.numel():
            p = int(bad[0])
            raise ValueError(f"hint scheduler state: prompt {p} is at level {int(level[p])} but has {int(self.num_levels[p])} hint levels")
        self.levels, self.rounds_at_level = level.clone(), state["rounds_at_level"].long().clone()


def self_explanation_prompt(prompt: Prompt, answer: str, template: str = DEFAULT_EXPO_TEMPLATE) -> Prompt:
    """A copy of `prompt` conditioned on the ground-truth answer, to sample a self-explanation from.

    Paper: "ExPO: Unlocking Hard Reasoning with Self-Explanation-Guided Reinforcement Learning"
    (Zhou et al., arXiv 2507.02834). The policy explains the known answer, c̃ ~ π_θ(· | q, a*); the
    explanation is then trained as a positive sample under the *plain* prompt q (the answer hidden):
    ExP-GRPO adds β·log π_θ(c̃, a* | q) (β = 0.04 in the paper's ablation; 0.5 hurts) to the GRPO
    objective. c̃ is not a member of the group, gets no advantage and no ratio: it is an SFT term on
    the current policy's own explanation, which gives a gradient even when every rollout is wrong.
    ExP-DPO instead prefers c̃ over the policy's own (wrong) CoT. The explanation is regenerated
    with the current policy (online) so it stays in-distribution.

    `template.format(answer=…)` is appended to the text or the last user message. The default
    wording is ours: ExPO's exact prompt was not found (not verified against the reference code).
    """
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"self_explanation_prompt: answer for prompt row {prompt.index} must be a non-empty string, got {answer!r}")
    if "{answer}" not in template:
        raise ValueError("self_explanation_prompt: template must contain {answer}")
    try:
        suffix = template.format(answer=answer.strip())
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"self_explanation_prompt: template must use only {{answer}}: {e}") from None
    return _append(prompt, suffix, "self_explanation_prompt")
