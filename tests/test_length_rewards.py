"""Length-shaping rewards: cosine_scaled, concise_correct, exit_decay and decaying_exit_reward."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from groupwise.rewards.contract import REWARDS, RewardError, RewardRunner
from groupwise.rewards.length import decaying_exit_reward


def flag_accuracy(column: str = "correct"):
    """Test accuracy: the column's value itself (True/False/number/None)."""
    def reward(prompts=None, completions=(), completion_ids=None, **columns):
        if column not in columns:
            raise RewardError(f"needs the dataset column '{column}'")
        return [None if x is None else float(x) for x in columns[column]]
    return reward


def bad_accuracy():
    return lambda completions, **kw: ["yes"] * len(completions)


@pytest.fixture(scope="module", autouse=True)
def test_accuracy_rewards():
    """Register the test-only accuracy rewards for this module only (other tests list the registry)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(REWARDS._items, "test_length_flag_accuracy", flag_accuracy)
        mp.setitem(REWARDS._items, "test_length_bad_accuracy", bad_accuracy)
        yield


FLAG = dict(accuracy="test_length_flag_accuracy")


def call(fn, lengths, correct, group_ids=None, prompts=None, **columns):
    """Call a reward the way the runner does: completion lengths in tokens, correctness in a column."""
    n = len(lengths)
    kwargs = dict(prompts=prompts if prompts is not None else ["p"] * n, completions=["c"] * n,
                  completion_ids=[[7] * L for L in lengths], trainer_state=None, correct=list(correct), **columns)
    if group_ids is not None:
        kwargs["group_ids"] = list(group_ids)
    return fn(**kwargs)


def build(name, **kwargs):
    return REWARDS.get(name)(**{**FLAG, **kwargs})


# ----------------------------------------------------------------------------- cosine_scaled

C25 = 0.5 + 0.25 * (1 + math.cos(math.pi / 4))      # correct at L = L_max/4: 0.92677…
W25 = -0.5 - 0.25 * (1 + math.cos(math.pi / 4))     # wrong at L = L_max/4:  −0.92677…


@pytest.mark.parametrize("length, correct, expected", [
    (0, True, 1.0), (25, True, C25), (50, True, 0.75), (100, True, 0.5), (150, True, 0.5),
    (0, False, -1.0), (25, False, W25), (50, False, -0.75), (100, False, -0.5), (150, False, -0.5),
])
def test_cosine_scaled_values(length, correct, expected):
    # TRL defaults (−1, −0.5, 0.5, 1) with max_len = 100
    (value,) = call(build("cosine_scaled", max_len=100), [length], [correct])
    assert value == pytest.approx(expected, abs=1e-12)


def test_cosine_scaled_custom_range_exceed_length_and_none():
    fn = build("cosine_scaled", max_len=10, min_value_correct=0.0, max_value_correct=2.0,
               min_value_wrong=-3.0, max_value_wrong=-1.0, exceed_length=-5.0)
    values = call(fn, [5, 5, 10, 11, 11, 3], [True, False, True, True, False, None])
    assert values[:5] == pytest.approx([1.0, -2.0, 0.0, -5.0, -5.0], abs=1e-12)
    assert values[5] is None


def test_cosine_scaled_correct_threshold():
    fn = build("cosine_scaled", max_len=100, correct_threshold=0.5)
    assert call(fn, [0, 0, 0], [0.6, 0.4, 0.5]) == pytest.approx([1.0, -1.0, 1.0])


def test_cosine_scaled_with_the_default_accuracy_reward():
    fn = REWARDS.get("cosine_scaled")(max_len=4)  # accuracy="exact_answer" through the registry
    values = fn(prompts=["p"] * 3, completions=["it is 4", "it is 5", "4"], completion_ids=[[1, 2], [1, 2], [1] * 9],
                trainer_state=None, answer=["4", "4", "4"])
    assert values == pytest.approx([0.75, -0.75, 0.5])
    with pytest.raises(RewardError, match="'solution'"):  # the accuracy reward's missing column is named
        REWARDS.get("cosine_scaled")(accuracy_kwargs={"answer_column": "solution"})(
            prompts=["p"], completions=["4"], completion_ids=[[1]], trainer_state=None, answer=["4"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_value_correct=1.0, max_value_correct=0.5), "min_value_correct .* max_value_correct"),
    (dict(min_value_wrong=-0.1, max_value_wrong=-0.5), "min_value_wrong .* max_value_wrong"),
    (dict(max_len=0), "max_len"),
    (dict(max_len=10.5), "max_len"),
    (dict(min_value_wrong="low"), "min_value_wrong"),
    (dict(exceed_length=math.inf), "exceed_length"),
    (dict(correct_threshold=None), "correct_threshold"),
    (dict(accuracy="no_such_reward"), "accuracy='no_such_reward' names no reward"),
    (dict(accuracy=3), "accuracy must be"),
    (dict(accuracy_kwargs={"bogus": 1}), "accuracy_kwargs"),
    (dict(accuracy_kwargs=[1]), "accuracy_kwargs"),
])
def test_cosine_scaled_bad_kwargs(kwargs, message):
    with pytest.raises(RewardError, match=message):
        build("cosine_scaled", **kwargs)


def test_accuracy_from_an_import_path(tmp_path):
    (tmp_path / "my_accuracy.py").write_text(
        "def judge(completions, answer, **kwargs):\n    return [float(c == a) for c, a in zip(completions, answer)]\n")
    fn = REWARDS.get("cosine_scaled")(accuracy=f"{tmp_path / 'my_accuracy.py'}:judge", max_len=2)
    values = fn(prompts=["p"] * 2, completions=["x", "y"], completion_ids=[[1], [1]], trainer_state=None, answer=["x", "x"])
    assert values == pytest.approx([0.75, -0.75])


def test_bad_accuracy_output_is_named():
    fn = REWARDS.get("cosine_scaled")(accuracy="test_length_bad_accuracy")
    with pytest.raises(RewardError, match=r"test_length_bad_accuracy \(the accuracy of cosine_scaled\).*sample 0"):
        call(fn, [1], [True])


_values = st.floats(-5, 5, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(st.lists(_values, min_size=4, max_size=4).map(sorted), st.integers(1, 300),
       st.lists(st.integers(0, 400), min_size=1, max_size=12))
def test_cosine_scaled_monotone_and_bounded(bounds, max_len, lengths):
    w_lo, w_hi, c_lo, c_hi = bounds
    fn = build("cosine_scaled", max_len=max_len, min_value_wrong=w_lo, max_value_wrong=w_hi,
               min_value_correct=c_lo, max_value_correct=c_hi)
    lengths = sorted(lengths)
    right = call(fn, lengths, [True] * len(lengths))
    wrong = call(fn, lengths, [False] * len(lengths))
    eps = 1e-9
    assert all(c_lo - eps <= r <= c_hi + eps for r in right) and all(w_lo - eps <= r <= w_hi + eps for r in wrong)
    assert all(a >= b - eps for a, b in zip(right, right[1:]))   # correct: longer never better
    assert all(a <= b + eps for a, b in zip(wrong, wrong[1:]))   # wrong: longer never worse


# ----------------------------------------------------------------------------- concise_correct

S_NEG, S_POS = 1 / (1 + math.e), 1 / (1 + math.exp(-1))   # σ(−1) = 0.2689…, σ(1) = 0.7310…


def test_concise_correct_arora_values():
    fn = build("concise_correct", alpha=0.2)
    # rows interleave groups: grouping follows group_ids, not order
    lengths = [10, 7, 30, 5, 12, 12, 3, 8]
    correct = [True, True, True, False, True, True, False, None]
    groups = [0, 1, 0, 0, 2, 2, 1, 0]
    values = call(fn, lengths, correct, group_ids=groups)
    # g0: correct lengths 10, 30 → mean 20, std 10, z = ∓1; g1: one correct → σ(0); g2: equal lengths → σ(0)
    expected = [1 - 0.2 * S_NEG, 0.9, 1 - 0.2 * S_POS, 0.0, 0.9, 0.9, 0.0]
    assert values[:7] == pytest.approx(expected, abs=1e-12)
    assert values[7] is None


def test_concise_correct_default_alpha_and_three_correct():
    # lengths 10, 20, 30 → mean 20, population std √(200/3)
    z = 10 / math.sqrt(200 / 3)
    values = call(build("concise_correct"), [10, 20, 30, 40], [True, True, True, False])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert values == pytest.approx([1 - 0.1 * sig(-z), 0.95, 1 - 0.1 * sig(z), 0.0], abs=1e-12)


def test_concise_correct_kimi_values():
    fn = build("concise_correct", mode="kimi")
    lengths = [10, 20, 30, 40, 5, 5, 9]
    correct = [True, False, True, False, True, False, None]
    groups = [0, 0, 0, 0, 1, 1, 2]
    values = call(fn, lengths, correct, group_ids=groups)
    # g0: λ = 0.5, 1/6, −1/6, −0.5; wrong keep min(0, λ). g1: equal lengths → λ = 0. g2: None.
    assert values[:6] == pytest.approx([0.5, 0.0, -1 / 6, -0.5, 0.0, 0.0], abs=1e-12)
    assert values[6] is None


def test_concise_correct_groups_from_the_runner_and_from_prompts():
    fn = build("concise_correct", mode="kimi")
    runner = RewardRunner.from_callables([("concise", fn, 1.0)])
    ids = [[1] * 10, [1] * 20, [1] * 10, [1] * 20]
    columns = {"correct": [True] * 4}
    one_group = runner.score(["p"] * 4, ["c"] * 4, ids, columns, group_ids=[0, 0, 0, 0]).values[:, 0].tolist()
    two_groups = runner.score(["p"] * 4, ["c"] * 4, ids, columns, group_ids=[0, 1, 0, 1]).values[:, 0].tolist()
    assert one_group == [0.5, -0.5, 0.5, -0.5]
    assert two_groups == [0.0, 0.0, 0.0, 0.0]   # each group's lengths are equal
    # called directly without group_ids: runs of equal prompts form the groups
    assert call(fn, [10, 20, 10, 20], [True] * 4, prompts=["a", "a", "b", "b"]) == [0.5, -0.5, 0.5, -0.5]


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="l1"), "mode must be"),
    (dict(alpha=1.5), "alpha"),
    (dict(alpha=-0.1), "alpha"),
    (dict(alpha=math.nan), "alpha"),
    (dict(mode="kimi", alpha=0.1), "alpha applies to mode='arora' only"),
    (dict(accuracy="no_such_reward"), "accuracy"),
])
def test_concise_correct_bad_kwargs(kwargs, message):
    with pytest.raises(RewardError, match=message):
        build("concise_correct", **kwargs)


_rows = st.lists(st.tuples(st.integers(0, 200), st.booleans(), st.integers(0, 2)), min_size=1, max_size=16)


@settings(max_examples=150, deadline=None)
@given(_rows, st.floats(0, 1), st.randoms(use_true_random=False))
def test_concise_correct_arora_properties(rows, alpha, rng):
    lengths, correct, groups = map(list, zip(*rows))
    values = call(build("concise_correct", alpha=alpha), lengths, correct, group_ids=groups)
    for i, (L, ok, g) in enumerate(rows):
        if not ok:
            assert values[i] == 0.0
            continue
        assert 1 - alpha - 1e-12 <= values[i] <= 1 + 1e-12
        for j, (L2, ok2, g2) in enumerate(rows):
            if ok2 and g2 == g and L < L2:
                assert values[i] >= values[j] - 1e-12   # shorter correct never below longer correct
    # permuting the rows permutes the rewards
    perm = list(range(len(rows)))
    rng.shuffle(perm)
    permuted = call(build("concise_correct", alpha=alpha), [lengths[p] for p in perm], [correct[p] for p in perm],
                    group_ids=[groups[p] for p in perm])
    assert permuted == pytest.approx([values[p] for p in perm], abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(_rows)
def test_concise_correct_kimi_properties(rows):
    lengths, correct, groups = map(list, zip(*rows))
    values = call(build("concise_correct", mode="kimi"), lengths, correct, group_ids=groups)
    for i, (L, ok, g) in enumerate(rows):
        assert -0.5 - 1e-12 <= values[i] <= (0.5 if ok else 0.0) + 1e-12
        same = [lengths[j] for j in range(len(rows)) if groups[j] == g]
        if ok and L == min(same) and max(same) > L:
            assert values[i] == pytest.approx(0.5)    # the group's shortest correct answer gets the maximum


# ----------------------------------------------------------------------------- decaying_exit_reward


def test_decaying_exit_reward_values():
    correct = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    position = torch.tensor([5, 1, 0, 3, 3, 9, 1, 12])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # g0 by position: 0 wrong, 1 ✓ (k=1), 3 ✓ (k=2), 5 ✓ (k=3); g1: 1 wrong, 3 ✓, 9 ✓, 12 ✓
    expected = [0.25, 1.0, 0.0, 0.5, 1.0, 0.5, 0.0, 0.25]
    assert decaying_exit_reward(correct, position, group).tolist() == expected


def test_decaying_exit_reward_ties_wrong_first_and_edge_cases():
    # equal positions share a rank (both 1); the next correct exit has 2 correct ones before it: 2^-2.
    # A wrong exit (position 0.5) does not move the rank of later correct ones.
    out = decaying_exit_reward(torch.tensor([True, True, True, False]), torch.tensor([2.0, 2.0, 4.0, 0.5]),
                               torch.tensor([3, 3, 3, 3]))
    assert out.tolist() == [1.0, 1.0, 0.25, 0.0]
    assert decaying_exit_reward(torch.zeros(3, dtype=torch.bool), torch.arange(3), torch.zeros(3, dtype=torch.long)).tolist() == [0.0] * 3
    empty = decaying_exit_reward(torch.zeros(0, dtype=torch.bool), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,) and empty.dtype == torch.float32
    # 0/1 integers for correctness, negative group ids, float positions
    out = decaying_exit_reward(torch.tensor([1, 0, 1]), torch.tensor([0.3, 0.1, 0.2]), torch.tensor([-1, -1, -1]))
    assert out.tolist() == [0.5, 0.0, 1.0]


@pytest.mark.parametrize("args, message", [
    ((torch.ones(2, 1, dtype=torch.bool), torch.zeros(2), torch.zeros(2, dtype=torch.long)), "1-D"),
    ((torch.ones(3, dtype=torch.bool), torch.zeros(2), torch.zeros(3, dtype=torch.long)), "lengths differ"),
    ((torch.ones(2, dtype=torch.bool), torch.tensor([0.0, math.nan]), torch.zeros(2, dtype=torch.long)), "finite"),
    ((torch.ones(2, dtype=torch.bool), torch.zeros(2), torch.zeros(2)), "integer"),
])
def test_decaying_exit_reward_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        decaying_exit_reward(*args)


def _reference(correct, position, group):
    """The formula row by row: 2^−(number of correct exits of the group strictly earlier)."""
    return [0.0 if not c else 0.5 ** sum(1 for c2, p2, g2 in zip(correct, position, group) if c2 and g2 == g and p2 < p)
            for c, p, g in zip(correct, position, group)]


_exits = st.lists(st.tuples(st.booleans(), st.integers(0, 6), st.integers(0, 3)), min_size=1, max_size=24)


@settings(max_examples=200, deadline=None)
@given(_exits, st.randoms(use_true_random=False))
def test_decaying_exit_reward_properties(rows, rng):
    correct, position, group = map(list, zip(*rows))
    out = decaying_exit_reward(torch.tensor(correct), torch.tensor(position), torch.tensor(group)).tolist()
    assert out == _reference(correct, position, group)
    allowed = {0.0} | {0.5 ** k for k in range(len(rows))}
    assert set(out) <= allowed
    for g in set(group):  # the earliest correct exit of each group gets 1
        firsts = [i for i in range(len(rows)) if group[i] == g and correct[i]]
        if firsts:
            earliest = min(position[i] for i in firsts)
            assert all(out[i] == 1.0 for i in firsts if position[i] == earliest)
    assert all(out[i] == 0.0 for i in range(len(rows)) if not correct[i])
    perm = list(range(len(rows)))
    rng.shuffle(perm)
    permuted = decaying_exit_reward(torch.tensor([correct[p] for p in perm]), torch.tensor([position[p] for p in perm]),
                                    torch.tensor([group[p] for p in perm])).tolist()
    assert permuted == [out[p] for p in perm]   # permutation equivariance


def test_decaying_exit_reward_large_batch_is_fast_and_matches():
    g = torch.Generator().manual_seed(0)
    n = 20000
    correct = torch.rand(n, generator=g) < 0.6
    position = torch.randint(0, 50, (n,), generator=g)
    group = torch.randint(0, 500, (n,), generator=g)
    out = decaying_exit_reward(correct, position, group)
    sample = torch.randint(0, n, (50,), generator=g).tolist()
    for i in sample:  # spot-check against the formula
        earlier = int((correct & (group == group[i]) & (position < position[i])).sum())
        assert out[i].item() == (0.5 ** earlier if correct[i] else 0.0)


# ----------------------------------------------------------------------------- exit_decay


def test_exit_decay_from_column_and_from_lengths():
    fn = build("exit_decay")
    lengths = [40, 10, 20, 30, 10, 20]
    correct = [True, True, False, True, True, None]
    groups = [0, 0, 0, 0, 1, 1]
    # with the column: positions decide, not lengths
    values = call(fn, lengths, correct, group_ids=groups, exit_position=[1, 4, 2, 3, 0, 0])
    assert values == [1.0, 0.25, 0.0, 0.5, 1.0, None]
    # without it: the completion length is the exit position
    assert call(fn, lengths, correct, group_ids=groups) == [0.25, 1.0, 0.0, 0.5, 1.0, None]
    # exit_column=None ignores the column
    assert call(build("exit_decay", exit_column=None), lengths, correct, group_ids=groups,
                exit_position=[1, 4, 2, 3, 0, 0]) == [0.25, 1.0, 0.0, 0.5, 1.0, None]
    # a named column
    assert call(build("exit_decay", exit_column="step"), [1, 1], [True, True], step=[7.5, 2.0]) == [0.5, 1.0]


def test_exit_decay_through_the_runner():
    runner = RewardRunner.from_callables([("exit", build("exit_decay"), 1.0)])
    ids = [[1] * 5, [1] * 3, [1] * 5, [1] * 3]
    scores = runner.score(["q"] * 4, ["c"] * 4, ids, {"correct": [True] * 4}, group_ids=[0, 0, 1, 1])
    assert scores.values[:, 0].tolist() == [0.5, 1.0, 0.5, 1.0]


def test_exit_decay_bad_input():
    with pytest.raises(RewardError, match="needs the dataset column 'step'"):
        call(build("exit_decay", exit_column="step"), [1], [True])
    with pytest.raises(RewardError, match=r"column 'exit_position' has 'late' for sample 1"):
        call(build("exit_decay"), [1, 2], [True, True], exit_position=[1, "late"])
    with pytest.raises(RewardError, match=r"column 'exit_position' has nan for sample 0"):
        call(build("exit_decay"), [1], [True], exit_position=[math.nan])
    with pytest.raises(RewardError, match="exit_column"):
        build("exit_decay", exit_column="")
    with pytest.raises(RewardError, match="accuracy_kwargs"):
        build("exit_decay", accuracy_kwargs={"nope": 1})
