"""Replay, reuse and guidance inside real training steps on the built-in model."""
from __future__ import annotations

import json

import pytest
import torch

import groupwise.trainer as trainer_module
from groupwise.trainer import Trainer
from groupwise.types import ROW_EXPLANATION, ROW_ON_POLICY, ROW_REPLAY, ROW_REUSED, ROW_TEACHER


def write_rows(path, n=12, **extra_columns):
    rows = []
    for i in range(n):
        a, b = 10 + 7 * i, 3 + 5 * i
        row = {"prompt": f"{a}+{b}=", "answer": str(a + b)}
        for name, make in extra_columns.items():
            row[name] = make(a, b)
        rows.append(row)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def capture(monkeypatch):
    """Record what the objective receives for every micro-batch."""
    calls = []
    real = trainer_module.policy_objective

    def spy(parts, logp, old, adv, mask, counts, **kw):
        calls.append({"logp": logp.detach(), "old": old.detach(), "adv": adv.detach(), "mask": mask.detach(), "source": kw.get("source")})
        return real(parts, logp, old, adv, mask, counts, **kw)

    monkeypatch.setattr(trainer_module, "policy_objective", spy)
    return calls


def test_replayed_rows_use_their_stored_logprobs_and_split_advantages(small_config, capture):
    cfg = small_config(**{"guidance.replay.per_group": 2, "guidance.replay.strategy": "recent", "data.sampler_options": "{}",
                          "data.shuffle": False, "data.train_size": 4, "schedule.steps": 2})
    t = Trainer(cfg)
    t.train_step()
    assert len(t.guidance.replay) == 16 and not any((c["source"] == ROW_REPLAY).any() for c in capture if c["source"] is not None)
    capture.clear()
    stored = {p: [e.behaviour_logprobs for e in t.guidance.replay.sample(p, 2, "recent")] for p in range(4)}
    metrics = t.train_step()
    assert metrics["guidance/replay_rows"] == 8.0                   # 2 per group × 4 groups
    call = capture[0]
    source, old, mask = call["source"], call["old"], call["mask"]
    replay = torch.nonzero(source == ROW_REPLAY).flatten()
    assert len(replay) == 8
    # ratio π_θ / π_behaviour: the old log-probs of replayed rows are the stored sampling ones
    all_stored = [lp for p in range(4) for lp in stored[p]]
    for row in replay.tolist():
        n = int(mask[row].sum())
        assert any(len(s) == n and torch.allclose(old[row, :n], torch.tensor(s), atol=1e-6) for s in all_stored)
    fresh = torch.nonzero(source == ROW_ON_POLICY).flatten()
    assert torch.allclose(old[fresh], call["logp"][fresh])       # μ = 1: ratio 1 for fresh rows
    # split advantages: within each group, replayed rows are normalized among themselves (mean 0)
    adv = call["adv"]
    for g0 in range(0, len(source), 6):                             # groups of 4 fresh + 2 replayed, contiguous
        rows = slice(g0, g0 + 6)
        assert source[rows].tolist() == [0, 0, 0, 0, 1, 1]
        assert abs(float(adv[rows][4:].sum())) < 1e-5 and abs(float(adv[rows][:4].sum())) < 1e-5


def test_teacher_rows_join_all_wrong_groups_with_luffy_shaping(small_config, tmp_path, capture):
    data = write_rows(tmp_path / "train.jsonl", solution=lambda a, b: str(a + b))
    cfg = small_config(**{"data.train": str(data), "data.eval": str(data), "guidance.teacher.column": "solution",
                          "schedule.steps": 1, "rollout.temperature": 5.0})   # hot sampling: groups come back all wrong
    t = Trainer(cfg)
    metrics = t.train_step()
    source = capture[0]["source"]
    n_teacher = int((source == ROW_TEACHER).sum())
    assert n_teacher == metrics["guidance/teacher_rows"] > 0
    assert metrics["guidance/teacher_rows"] == round(metrics["prompts/unsolved_fraction"] * 4)   # one per all-wrong group
    adv = capture[0]["adv"]
    assert (adv[source == ROW_TEACHER] > 0).all()                   # the only correct row of its group: positive advantage


def test_explanations_are_untrained_by_advantage_but_pulled_up_by_nll(small_config, tmp_path, capture):
    data = write_rows(tmp_path / "train.jsonl")
    cfg = small_config(**{"data.train": str(data), "data.eval": str(data), "guidance.self_explanation.enabled": True,
                          "guidance.self_explanation.template": " {answer}=", "guidance.self_explanation.all_wrong_only": False,
                          "schedule.steps": 1})
    t = Trainer(cfg)
    metrics = t.train_step()
    source, adv = capture[0]["source"], capture[0]["adv"]
    assert metrics["guidance/explanation_rows"] == 4 == int((source == ROW_EXPLANATION).sum())
    assert (adv[source == ROW_EXPLANATION] == 0).all()              # not a group member
    assert metrics["guidance/generated_tokens"] > 0


def test_adaptive_stages_and_reuse(small_config, tmp_path, capture):
    data = write_rows(tmp_path / "train.jsonl", n=4)
    cfg = small_config(**{"data.train": str(data), "data.eval": str(data), "guidance.adaptive_rollout.stages": 3,
                          "guidance.adaptive_rollout.per_stage": 2, "guidance.adaptive_rollout.reuse_correct": True,
                          "data.shuffle": False, "schedule.steps": 1, "rollout.temperature": 5.0})
    t = Trainer(cfg)
    tok = t.tokenizer
    for p in t.train_prompts:   # a correct answer from an earlier step, for every prompt
        ids = tok(p.columns["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        t.guidance.correct.add(p.index, ids, [-0.5] * len(ids), 1.0, True, 0)
    m = t.train_step()
    assert m["adaptive_rollout/extra_completions"] > 0                  # unsolved prompts got more samples
    assert m["guidance/reused_rows"] == round(m["prompts/unsolved_fraction"] * 4) > 0   # one per all-wrong group
    call = capture[0]
    reused = call["source"] == ROW_REUSED
    assert (call["mask"][reused] == 0).all()                           # counted in the statistics, never trained
    assert (call["adv"][reused] > 0).all()
    fresh_in_wrong_groups = []
    rows = call["source"].tolist()
    for i, s in enumerate(rows):            # the fresh rows just before a reused row share its (all-wrong) group
        if s == ROW_REUSED:
            j = i - 1
            while j >= 0 and rows[j] == ROW_ON_POLICY and call["adv"][j] < 0:
                fresh_in_wrong_groups.append(j)
                j -= 1
    assert fresh_in_wrong_groups, "wrong rows of a group with a reused correct row get negative advantages"


def test_hints_enter_stagnating_prompts_and_leave_once_solved(small_config, tmp_path, monkeypatch):
    data = write_rows(tmp_path / "train.jsonl", n=4, hints=lambda a, b: [f"{a + b}", f"{a + b}="])
    cfg = small_config(**{"data.train": str(data), "data.eval": str(data), "guidance.hints.column": "hints",
                          "guidance.hints.warmup_steps": 0, "data.shuffle": False, "schedule.steps": 6})
    t = Trainer(cfg)
    texts_seen = []
    real = t.engine.generate

    def spy(prompts, texts, *args, **kw):
        texts_seen.append(list(texts))
        return real(prompts, texts, *args, **kw)

    monkeypatch.setattr(t.engine, "generate", spy)
    levels = []
    for _ in range(6):
        m = t.train_step()
        levels.append(t.guidance.hints.levels.clone())
    assert any("Hint:" in text for texts in texts_seen for text in texts)
    assert "hints/active_fraction" in m
    # a level only rises after an all-wrong group and falls after a solved one (checked on the statistics)
    last = t.prompt_stats.last_success_rate
    for p in range(4):
        if levels[-1][p] > levels[-2][p]:
            assert last[p] == 0
        if levels[-1][p] < levels[-2][p]:
            assert last[p] > 0


def test_guidance_state_survives_resume(small_config):
    over = {"guidance.replay.per_group": 1, "guidance.adaptive_rollout.reuse_correct": True, "schedule.steps": 2}
    first = Trainer(small_config(**over))
    first.train()
    resumed = Trainer(small_config(**{**over, "schedule.steps": 3}), resume=True)
    assert len(resumed.guidance.replay) == len(first.guidance.replay) > 0
    resumed.train()


def test_bad_guidance_config_is_named(small_config, tmp_path):
    from groupwise.config import ConfigError

    with pytest.raises(ConfigError, match="guidance.replay.strategy 'best_of' is unknown"):
        small_config(**{"guidance.replay.strategy": "best_of"})
    with pytest.raises(ConfigError, match="choose one"):
        small_config(**{"guidance.adaptive_rollout.stages": 2, "algorithm.dynamic_sampling.enabled": True})
    with pytest.raises(ConfigError, match="rewards.aggregation 'normalize_then_sum' needs every reward function's score"):
        small_config(**{"rewards.aggregation": "normalize_then_sum", "guidance.replay.per_group": 2})
    with pytest.raises(ConfigError, match="guidance.hints.template must contain"):
        small_config(**{"guidance.hints.template": "no placeholder"})
    with pytest.raises(ValueError, match="guidance.teacher.column 'solution' is not a column"):
        Trainer(small_config(**{"guidance.teacher.column": "solution"}))
    data = write_rows(tmp_path / "t.jsonl")
    with pytest.raises(ValueError, match="answer_column 'gold' is empty or missing in training row 0"):
        Trainer(small_config(**{"data.train": str(data), "data.eval": str(data), "guidance.self_explanation.enabled": True,
                                "guidance.self_explanation.answer_column": "gold"}))


@pytest.mark.parametrize("extra", [
    {"model.shared_prefix": True},
    {"algorithm.num_iterations": 2, "algorithm.mini_batches": 2, "optimizer.micro_batch_size": 4},
    {"algorithm.kl.coef": 0.05, "algorithm.kl.placement": "reward"},
])
def test_extra_rows_with_other_layouts_and_updates(small_config, tmp_path, extra):
    data = write_rows(tmp_path / "train.jsonl", n=4, solution=lambda a, b: str(a + b))
    cfg = small_config(**{"data.train": str(data), "data.eval": str(data), "guidance.replay.per_group": 1,
                          "guidance.teacher.column": "solution", "guidance.teacher.all_wrong_only": False,
                          "data.shuffle": False, "schedule.steps": 2, **extra})
    t = Trainer(cfg)
    rows = [t.train_step() for _ in range(2)]
    assert rows[1]["guidance/replay_rows"] == 4 and rows[1]["guidance/teacher_rows"] == 4
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in rows)
