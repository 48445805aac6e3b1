"""Replay buffer (RePO, AR3PO), AR3PO's staged rollout, Scaf-GRPO hint scheduling, ExPO prompts."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from groupwise.data.guidance import HintScheduler, hint_levels, self_explanation_prompt
from groupwise.data.prompt_stats import PromptStats
from groupwise.data.replay import ReplayBuffer, adaptive_rollout_stages
from groupwise.types import Prompt


def _fill(buf: ReplayBuffer, p: int, rewards, start=0):
    for s, r in enumerate(rewards, start=start):
        buf.add(p, [s, s + 1], [-0.5, -0.25], float(r), r == 1.0, s)


# ------------------------------------------------------------------------ replay buffer

def test_eviction_keeps_the_newest_per_prompt():
    b = ReplayBuffer(3, capacity_per_prompt=3)
    _fill(b, 0, [0.1, 0.2, 0.3, 0.4, 0.5])
    _fill(b, 2, [1.0])
    assert len(b) == 4 and b.count(0) == 3 and b.count(1) == 0
    assert [e.step for e in b.entries(0)] == [2, 3, 4]
    e = b.entries(2)[0]
    assert (e.prompt_index, e.completion_ids, e.behaviour_logprobs, e.reward, e.correct) == (2, [0, 1], [-0.5, -0.25], 1.0, True)


def test_strategies():
    b = ReplayBuffer(1, capacity_per_prompt=8)
    _fill(b, 0, [0.5, 1.0, 0.0, 1.0, 0.25, 0.0])
    steps = lambda es: [e.step for e in es]  # noqa: E731
    assert steps(b.sample(0, 99, "all")) == [0, 1, 2, 3, 4, 5]
    assert steps(b.sample(0, 2, "recent")) == [4, 5] == steps(b.sample(0, 2, "recent_k"))
    assert steps(b.sample(0, 3, "highest")) == [1, 3, 0]          # ties keep the older first
    assert steps(b.sample(0, 3, "reward")) == [1, 3, 0]
    # max variance of 2: one 1.0 and one 0.0 (var 0.25), oldest first
    assert sorted(e.reward for e in b.sample(0, 2, "max_variance")) == [0.0, 1.0]
    g = torch.Generator().manual_seed(0)
    r = steps(b.sample(0, 4, "random", g))
    assert len(set(r)) == 4 and set(r) <= set(range(6))
    assert r == steps(b.sample(0, 4, "random_k", torch.Generator().manual_seed(0)))
    rc = b.sample(0, 5, "random_correct", g)
    assert sorted(e.step for e in rc) == [1, 3]
    assert b.sample(0, 0, "recent") == [] and b.sample(0, 10, "recent") == b.sample(0, 6, "recent")
    with pytest.raises(ValueError, match="strategy"):
        b.sample(0, 1, "oldest")
    with pytest.raises(ValueError, match="prompt_index"):
        b.sample(1, 1, "all")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, -1.0, 3.0]), min_size=1, max_size=8), st.integers(0, 8))
@example([0.0, 0.0, 3.0, 3.0, 3.0, 0.0], 5)  # {0,0,3,3,3} and {0,0,0,3,3} tie at 2.16 up to rounding
def test_max_variance_matches_brute_force(rewards, k):
    b = ReplayBuffer(1, capacity_per_prompt=8)
    _fill(b, 0, rewards)
    got = torch.tensor([e.reward for e in b.sample(0, k, "max_variance")], dtype=torch.float64)
    kk = min(k, len(rewards))
    assert got.numel() == kk
    if kk == 0:
        return
    cands = [(torch.tensor(c, dtype=torch.float64).var(unbiased=False).item(), sum(c))
             for c in itertools.combinations(rewards, kk)]
    best_var = max(v for v, _ in cands)
    # Ties in variance (equal up to rounding) are broken by the larger reward sum.
    best_sum = max(t for v, t in cands if v == pytest.approx(best_var, rel=1e-9, abs=1e-12))
    assert got.var(unbiased=False).item() == pytest.approx(best_var) and got.sum().item() == pytest.approx(best_sum)


def test_latest_correct():
    b = ReplayBuffer(2, capacity_per_prompt=4)
    assert b.latest_correct(0) is None
    _fill(b, 0, [1.0, 0.0, 1.0, 0.0])
    assert b.latest_correct(0).step == 2
    _fill(b, 0, [0.0, 0.0, 0.0], start=4)        # evicts every correct entry
    assert b.latest_correct(0) is None and b.latest_correct(1) is None


def test_add_rejects_bad_rows():
    b = ReplayBuffer(2)
    with pytest.raises(ValueError, match="one length"):
        b.add(0, [1, 2], [-0.1], 1.0, True, 0)
    with pytest.raises(ValueError, match="reward"):
        b.add(0, [1], [-0.1], float("nan"), True, 0)
    with pytest.raises(ValueError, match="log-prob"):
        b.add(0, [1], [0.5], 1.0, True, 0)
    with pytest.raises(ValueError, match="prompt_index"):
        b.add(2, [1], [-0.1], 1.0, True, 0)


entry = st.tuples(st.integers(0, 3), st.lists(st.integers(0, 50_000), max_size=6), st.floats(-3, 3), st.booleans())


@settings(max_examples=50, deadline=None)
@given(st.lists(entry, max_size=30), st.integers(1, 4))
def test_state_dict_round_trip(rows, capacity):
    b = ReplayBuffer(4, capacity_per_prompt=capacity)
    for step, (p, ids, reward, correct) in enumerate(rows):
        b.add(p, ids, [-0.1 * (i + 1) for i in range(len(ids))], reward, correct, step)
    state = b.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    c = ReplayBuffer(4, capacity_per_prompt=capacity)
    c.load_state_dict(state)
    assert len(c) == len(b)
    for p in range(4):
        assert c.entries(p) == b.entries(p)
    for k, v in c.state_dict().items():
        assert torch.equal(v, state[k])


def test_load_state_dict_rejects_other_sizes():
    b = ReplayBuffer(3)
    _fill(b, 1, [1.0])
    with pytest.raises(ValueError, match="3 prompts"):
        ReplayBuffer(4).load_state_dict(b.state_dict())
    bad = b.state_dict()
    del bad["offsets"]
    with pytest.raises(ValueError, match="offsets"):
        ReplayBuffer(3).load_state_dict(bad)


# ------------------------------------------------------------------------ AR3PO staged rollout

def test_adaptive_rollout_stages_by_hand():
    assert adaptive_rollout_stages([0, 0, 0, 0], 0, num_stages=3, per_stage=4) == [4, 4, 4, 4]
    # after stage 1: prompts 1 and 3 found a correct response and leave the pool
    assert adaptive_rollout_stages([0, 2, 0, 1], 1, num_stages=3, per_stage=4) == [4, 0, 4, 0]
    assert adaptive_rollout_stages([1, 2, 0, 1], 2, num_stages=3, per_stage=4) == [0, 0, 4, 0]
    assert adaptive_rollout_stages([1, 2, 0, 1], 3, num_stages=3, per_stage=4) == [0, 0, 0, 0]
    # a whole rollout: prompt i is solved at stage solve_at[i] (never for prompt 3)
    solve_at, counts, sizes, stage = [1, 2, 3, None], [0, 0, 0, 0], [0, 0, 0, 0], 0
    while any(n := adaptive_rollout_stages(counts, stage, num_stages=3, per_stage=2)):
        stage += 1
        for i, k in enumerate(n):
            sizes[i] += k
            counts[i] += int(k > 0 and solve_at[i] == stage)
    assert sizes == [2, 4, 6, 6] and counts == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="row 1"):
        adaptive_rollout_stages([0, -1], 0, num_stages=2, per_stage=2)
    with pytest.raises(ValueError, match="stage"):
        adaptive_rollout_stages([0], 3, num_stages=2, per_stage=2)


# ------------------------------------------------------------------------ hints

def test_hint_levels_parsing():
    assert hint_levels(None) == [] and hint_levels("") == [] and hint_levels([]) == [] and hint_levels({}) == []
    assert hint_levels("use parity") == [("Hint", "use parity")]
    assert hint_levels(["abstract", " ", "concrete"]) == [("Hint", "abstract"), ("Hint", "concrete")]
    levels = hint_levels({"solution": "x = 3", "knowledge_components_parts": ["a", "b"], "planning": []})
    assert levels == [("Knowledge Hints", "a"), ("Knowledge Hints", "a b"), ("Solution Hints", "x = 3")]
    with pytest.raises(ValueError, match="'hints', row 4.*tier"):
        hint_levels({"method": "x"}, row=4)
    with pytest.raises(ValueError, match="'tips', row 2"):
        hint_levels(7, column="tips", row=2)


def _prompts():
    return [
        Prompt("What is 2+3?", None, {"hints": ["think of addition", "2+3 = 5"]}, 0),
        Prompt(None, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Solve x+1=2."},
                      {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Now x+2=4."}],
               {"hints": {"knowledge": "subtract", "solution": "x = 2"}}, 1),
        Prompt("No hints here.", None, {"hints": None}, 2),
        Prompt("Missing column.", None, {}, 3),
    ]


def _round(stats, sched, rates, step, stats_first=True):
    groups = [[1.0] * int(r * 4) + [0.0] * (4 - int(r * 4)) for r in rates]
    if stats_first:
        stats.update(list(range(len(rates))), groups, [[x == 1.0 for x in g] for g in groups], step)
    sched.update(list(range(len(rates))), rates, step)
    if not stats_first:
        stats.update(list(range(len(rates))), groups, [[x == 1.0 for x in g] for g in groups], step)


@pytest.mark.parametrize("stats_first", [True, False])
def test_levels_rise_after_patience_only_after_warmup_and_fall_once_solved(stats_first):
    stats = PromptStats(4, history=4)
    h = HintScheduler(_prompts(), stats, patience=2, warmup_steps=3)
    assert h.num_levels.tolist() == [2, 2, 0, 0]
    for step in range(3):                                # warm-up: all wrong, but no hints
        _round(stats, h, [0.0, 0.0, 0.0, 0.0], step, stats_first)
        assert h.levels.tolist() == [0, 0, 0, 0]
    _round(stats, h, [0.0, 0.0, 0.0, 0.0], 3, stats_first)
    assert h.levels.tolist() == [1, 1, 0, 0]              # prompts without hints stay at 0
    _round(stats, h, [0.0, 0.0, 0.0, 0.0], 4, stats_first)
    assert h.levels.tolist() == [1, 1, 0, 0]              # one all-wrong group at level 1 < patience
    _round(stats, h, [0.0, 0.25, 0.0, 0.0], 5, stats_first)
    assert h.levels.tolist() == [2, 0, 0, 0]              # 0 escalates, 1 solved at level 1 → back down
    for step in (6, 7, 8):
        _round(stats, h, [0.0, 0.0, 0.0, 0.0], step, stats_first)
    assert h.level(0) == 2 and h.level(1) == 1            # 0 capped at its 2 levels
    _round(stats, h, [0.5, 0.0, 0.0, 0.0], 9, stats_first)
    _round(stats, h, [0.5, 0.0, 0.0, 0.0], 10, stats_first)
    assert h.level(0) == 0                                # solved twice: hints withdrawn one level a time
    assert h.metrics() == {"hints/active_fraction": 0.25, "hints/mean_level": pytest.approx(h.levels.double().mean().item())}


def test_success_threshold_and_max_level():
    stats = PromptStats(4, history=2)
    h = HintScheduler(_prompts(), stats, warmup_steps=0, max_level=1, success_threshold=0.5)
    assert h.num_levels.tolist() == [1, 1, 0, 0]
    h.update([0, 0], [0.0, 0.0], 0)
    assert h.level(0) == 1
    h.update([0], [0.5], 1)                               # not above the threshold: kept
    assert h.level(0) == 1
    h.update([0], [0.75], 2)
    assert h.level(0) == 0


def test_apply_text_and_chat_prompts():
    stats = PromptStats(4)
    prompts = _prompts()
    h = HintScheduler(prompts, stats, warmup_steps=0, template="\n\n{tier}: {hint}")
    assert h.apply(prompts[0]) is prompts[0]               # level 0: unchanged
    h.update([0, 1, 2], [0.0, 0.0, 0.0], 0)
    t = h.apply(prompts[0])
    assert t.text == "What is 2+3?\n\nHint: think of addition" and prompts[0].text == "What is 2+3?"
    assert t.columns == prompts[0].columns and t.index == 0
    c = h.apply(prompts[1])
    assert c.messages[-1]["content"] == "Now x+2=4.\n\nKnowledge Hints: subtract"
    assert c.messages[1]["content"] == "Solve x+1=2." and prompts[1].messages[-1]["content"] == "Now x+2=4."
    assert h.apply(prompts[1], level=2).messages[-1]["content"].endswith("Solution Hints: x = 2")
    assert h.apply(prompts[2]) is prompts[2]
    with pytest.raises(ValueError, match="level"):
        h.apply(prompts[0], level=3)
    with pytest.raises(ValueError, match="prompt index"):
        h.apply(Prompt("?", None, {}, -1))


def test_scheduler_rejects_bad_setup():
    with pytest.raises(ValueError, match="patience"):
        HintScheduler(_prompts(), PromptStats(4, history=2), patience=3)
    with pytest.raises(ValueError, match="statistics"):
        HintScheduler(_prompts(), PromptStats(5))
    with pytest.raises(ValueError, match="'hints', row 0"):
        HintScheduler([Prompt("q", None, {"hints": 3}, 0)], PromptStats(1))
    with pytest.raises(ValueError, match="hint"):
        HintScheduler(_prompts(), PromptStats(4), template="no placeholder")
    h = HintScheduler(_prompts(), PromptStats(4))
    with pytest.raises(ValueError, match="group 0"):
        h.update([0], [1.5], 0)


def test_scheduler_state_round_trip():
    stats = PromptStats(4)
    h = HintScheduler(_prompts(), stats, warmup_steps=0)
    h.update([0, 1], [0.0, 0.0], 0)
    h.update([0], [0.0], 1)
    g = HintScheduler(_prompts(), stats, warmup_steps=0)
    g.load_state_dict(h.state_dict())
    assert g.levels.tolist() == h.levels.tolist() == [2, 1, 0, 0]
    assert torch.equal(g.rounds_at_level, h.rounds_at_level)
    bad = h.state_dict()
    bad["level"] = torch.tensor([0, 0, 1, 0])
    with pytest.raises(ValueError, match="prompt 2"):
        g.load_state_dict(bad)
    with pytest.raises(ValueError, match="shape"):
        g.load_state_dict({"level": torch.zeros(3, dtype=torch.long), "rounds_at_level": torch.zeros(3, dtype=torch.long)})


# ------------------------------------------------------------------------ ExPO

def test_self_explanation_prompt():
    p = Prompt("What is 2+3?", None, {"answer": "5"}, 7)
    q = self_explanation_prompt(p, "5")
    assert q.text.startswith("What is 2+3?\n\nThe correct final answer is 5.") and p.text == "What is 2+3?"
    assert q.index == 7 and q.columns == {"answer": "5"}
    chat = Prompt(None, [{"role": "user", "content": [{"type": "text", "text": "Solve."}]}], {}, 1)
    c = self_explanation_prompt(chat, "42", template=" (answer: {answer})")
    assert c.messages[0]["content"][-1] == {"type": "text", "text": " (answer: 42)"}
    assert len(chat.messages[0]["content"]) == 1
    with pytest.raises(ValueError, match="row 7"):
        self_explanation_prompt(p, " ")
    with pytest.raises(ValueError, match="answer"):
        self_explanation_prompt(p, "5", template="explain")
    with pytest.raises(ValueError, match="no user message"):
        self_explanation_prompt(Prompt(None, [{"role": "system", "content": "s"}], {}, 0), "5")
