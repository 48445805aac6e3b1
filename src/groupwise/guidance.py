"""Replay, reuse and help on failure: what a step adds to its groups besides the fresh samples.

The trainer calls, per step: `apply_hints` before rendering prompts (Scaf-GRPO), `more_stages` after
the first scoring (AR3PO adaptive rollouts), `after_round` once a round is scored (hint levels),
and `augment` on the collected groups (RePO replay, AR3PO reuse, LUFFY/AMPO teacher rows, ExPO
self-explanations), which also stores this step's completions for later replay. The math of those
rows lives in `algorithms/off_policy.py` and `algorithms/objective.py`; the stores in `data/`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from groupwise.batching import split_by_group
from groupwise.data.guidance import HintScheduler, self_explanation_prompt
from groupwise.data.prompt_stats import PromptStats
from groupwise.data.replay import ReplayBuffer, adaptive_rollout_stages
from groupwise.data.samplers.base import step_generator
from groupwise.rollout.augment import extra_rows, merge_into_groups, unscored
from groupwise.types import (
    ROW_EXPLANATION, ROW_ON_POLICY, ROW_REPLAY, ROW_REUSED, ROW_SOURCES, ROW_TEACHER, Prompt, RolloutBatch, ScoredGroups,
)

@dataclass
class GeneratedRound:
    """Freshly generated, scored groups and each row's correctness."""

    scored: ScoredGroups
    correct: torch.Tensor   # [N] bool


# generate(prompts, group_sizes, seed, prompt_texts=None) -> GeneratedRound (on-policy rows)
Generate = Callable[..., GeneratedRound]


class Guidance:
    def __init__(self, cfg: Any, prompts: list[Prompt], stats: PromptStats, tokenizer: Any, pad_id: int, seed: int):
        self.cfg, self.prompts, self.tokenizer, self.pad_id, self.seed = cfg, prompts, tokenizer, pad_id, seed
        self.num_generations = None
        g = cfg
        self.replay = ReplayBuffer(len(prompts), g.replay.capacity) if g.replay.per_group else None
        self.correct = ReplayBuffer(len(prompts), 4) if g.adaptive_rollout.reuse_correct else None   # AR3PO: correct ones only
        self.hints = None
        if g.hints.column:
            self.hints = HintScheduler(prompts, stats, column=g.hints.column, patience=g.hints.patience,
                                       warmup_steps=g.hints.warmup_steps, max_level=g.hints.max_level, template=g.hints.template)
        if g.teacher.column:
            missing = [i for i, p in enumerate(prompts) if g.teacher.column not in p.columns]
            if len(missing) == len(prompts):
                raise ValueError(f"guidance.teacher.column '{g.teacher.column}' is not a column of the training data")
        if g.self_explanation.enabled:
            missing = [i for i, p in enumerate(prompts) if not str(p.columns.get(g.self_explanation.answer_column) or "").strip()]
            if missing:
                raise ValueError(f"guidance.self_explanation.answer_column '{g.self_explanation.answer_column}' is empty or missing in training row {missing[0]}")

    @property
    def active(self) -> bool:
        g = self.cfg
        return self.replay is not None or self.correct is not None or bool(g.teacher.column) or g.self_explanation.enabled

    # ------------------------------------------------------------------ before / during collection

    def apply_hints(self, prompts: list[Prompt]) -> list[Prompt]:
        return [self.hints.apply(p) for p in prompts] if self.hints is not None else prompts

    def after_round(self, indices: list[int], correct_by_group: list[list[bool]], step: int) -> None:
        if self.hints is not None:
            self.hints.update(indices, [sum(c) / len(c) for c in correct_by_group], step)

    def more_stages(self, part: ScoredGroups, correct: torch.Tensor, prompts: list[Prompt], generate: Generate, seed: int,
                    num_generations: int) -> tuple[ScoredGroups, torch.Tensor, int]:
        """AR3PO adaptive rollouts: stages 2…S sample `per_stage` more for every prompt with no correct
        completion yet; they join their groups as ordinary on-policy rows (so group sizes vary)."""
        ar, added = self.cfg.adaptive_rollout, 0
        per_stage = ar.per_stage or num_generations
        for stage in range(1, ar.stages):
            counts = [sum(c) for c in split_by_group(correct.tolist(), part.rollout.group_id)]
            more = adaptive_rollout_stages(counts, stage, num_stages=ar.stages, per_stage=per_stage)
            groups = [g for g, k in enumerate(more) if k > 0]
            if not groups:
                break
            extra = generate([prompts[g] for g in groups], [more[g] for g in groups], seed + stage)
            extra_correct = extra.correct
            part, order = merge_into_groups(part, extra.scored, groups, self.pad_id)
            correct = torch.cat([correct, extra_correct])[order.cpu()]
            added += extra.scored.rollout.num_completions
        return part, correct, added

    # ------------------------------------------------------------------ after collection

    def augment(self, collected: ScoredGroups, correct: torch.Tensor, step: int, render: Callable[[Prompt], str],
                generate: Generate, score: Callable[[RolloutBatch], Any]) -> tuple[ScoredGroups, torch.Tensor, dict[str, float]]:
        """The collected groups plus their extra rows, the rows' known rewards (NaN: use the scores)
        and counts per kind. This step's fresh completions are stored afterwards (replayed later)."""
        g, base = self.cfg, collected.rollout
        gen = step_generator(self.seed, step, "guidance")
        wrong = [not any(c) for c in split_by_group(correct.tolist(), base.group_id)]
        pieces: list[tuple[ScoredGroups, list[int], list[float]]] = []   # (rows, target groups, known rewards)
        explanation_tokens = 0.0

        def stored_rows(entries: list[tuple[int, Any]], source: int) -> None:
            if entries:
                groups = [t for t, _ in entries]
                rows = extra_rows(base, groups, [e.completion_ids for _, e in entries], [e.behaviour_logprobs for _, e in entries],
                                  source, pad_id=self.pad_id, texts=self.tokenizer.batch_decode([e.completion_ids for _, e in entries], skip_special_tokens=True))
                pieces.append((ScoredGroups(rows, unscored(rows, collected.scores)), groups, [e.reward for _, e in entries]))

        if self.replay is not None:   # RePO
            chosen = [(grp, e) for grp, p in enumerate(base.prompts) if self.replay.count(p.index) >= g.replay.min_stored
                      for e in self.replay.sample(p.index, g.replay.per_group, g.replay.strategy, gen)]
            stored_rows(chosen, ROW_REPLAY)
        if self.correct is not None:   # AR3PO response reuse
            chosen = [(grp, e) for grp, p in enumerate(base.prompts) if wrong[grp]
                      for e in self.correct.sample(p.index, 1, "random_correct", gen)]
            stored_rows(chosen, ROW_REUSED)
        if g.teacher.column:   # LUFFY / AMPO
            groups, texts = [], []
            for grp, p in enumerate(base.prompts):
                if g.teacher.all_wrong_only and not wrong[grp]:
                    continue
                value = p.columns.get(g.teacher.column)
                solutions = [value] if isinstance(value, str) else list(value or [])
                for text in [t for t in solutions if isinstance(t, str) and t.strip()][: g.teacher.max_per_group]:
                    groups.append(grp)
                    texts.append(text)
            if groups:
                eos = self.tokenizer.eos_token_id
                ids = [r + ([eos] if eos is not None else []) for r in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
                rows = extra_rows(base, groups, ids, None, ROW_TEACHER, pad_id=self.pad_id, texts=texts)
                pieces.append((ScoredGroups(rows, score(rows)), groups, [float("nan")] * len(groups)))
        if g.self_explanation.enabled:   # ExPO
            se = g.self_explanation
            groups = [grp for grp in range(len(base.prompts)) if wrong[grp] or not se.all_wrong_only]
            if groups:
                asked = [self_explanation_prompt(base.prompts[grp], str(base.prompts[grp].columns[se.answer_column]), se.template) for grp in groups]
                sampled = generate(asked, [1] * len(groups), self.seed * 7 + step, prompt_texts=[render(p) for p in asked]).scored.rollout
                lengths = sampled.completion_lengths.tolist()
                ids = [r[: int(n)] for r, n in zip(sampled.completion_ids.tolist(), lengths)]
                rows = extra_rows(base, groups, ids, None, ROW_EXPLANATION, pad_id=self.pad_id, texts=sampled.completions_text,
                                  finished=sampled.finished.tolist())
                pieces.append((ScoredGroups(rows, score(rows)), groups, [float("nan")] * len(groups)))
                explanation_tokens = float(sum(lengths))

        self._remember(collected, correct, step)
        known = torch.full((base.num_completions,), float("nan"))
        merged = collected
        for rows, groups, rewards in pieces:
            merged, order = merge_into_groups(merged, rows, groups, self.pad_id)
            known = torch.cat([known, torch.tensor(rewards, dtype=known.dtype)])[order.cpu()]
        source = merged.rollout.row_source
        metrics = {f"guidance/{name}_rows": float((source == k).sum()) for k, name in enumerate(ROW_SOURCES) if k != ROW_ON_POLICY}
        metrics["guidance/generated_tokens"] = explanation_tokens
        return merged, known, metrics

    def _remember(self, collected: ScoredGroups, correct: torch.Tensor, step: int) -> None:
        if self.replay is None and self.correct is None:
            return
        r = collected.rollout
        totals = collected.scores.total().tolist()
        lengths = r.completion_lengths.tolist()
        ids, lps = r.completion_ids.tolist(), r.sampling_logprobs.tolist()
        for row, gid in enumerate(r.group_id.tolist()):   # one entry per completion (rows, not tokens)
            n, p = int(lengths[row]), r.prompts[gid].index
            if n == 0 or totals[row] != totals[row]:   # empty or NaN-scored completions are not kept
                continue
            entry = (p, ids[row][:n], lps[row][:n], totals[row], bool(correct[row]), step)
            if self.replay is not None:
                self.replay.add(*entry)
            if self.correct is not None and entry[4]:
                self.correct.add(*entry)

    def estimator_inputs(self, scored: torch.Tensor, group_id: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the advantage estimator reads once extra rows are in: ExPO explanations are no group
        member (NaN: left out of the statistics, A = 0); under RePO's `split` mode replayed rows form a
        group of their own beside the fresh rows of the same prompt."""
        if not self.active:
            return scored, group_id
        scored = torch.where(source == ROW_EXPLANATION, torch.full_like(scored, float("nan")), scored)
        if self.cfg.replay.advantage == "split":
            group_id = group_id * 2 + (source == ROW_REPLAY).long()
        return scored, group_id

    # ------------------------------------------------------------------ metrics and checkpoints

    def metrics(self) -> dict[str, float]:
        out = self.hints.metrics() if self.hints is not None else {}
        if self.replay is not None:
            out["guidance/replay_buffer"] = float(len(self.replay))
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for name, part in (("replay", self.replay), ("correct", self.correct), ("hints", self.hints)):
            if part is not None:
                state.update({f"{name}.{k}": v for k, v in part.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, part in (("replay", self.replay), ("correct", self.correct), ("hints", self.hints)):
            if part is not None:
                own = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(name + ".")}
                if own:
                    part.load_state_dict(own)
