"""Math rewards: answer extraction, exact_answer, math_verify (worker pool, timeouts) and majority_vote (TTRL)."""
from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from groupwise.rewards import REWARDS, RewardError, RewardRunner
from groupwise.rewards.math import (
    DEFAULT_EXTRACT,
    answers_equal,
    exact_answer,
    extract_answer,
    last_boxed,
    majority_vote,
    math_verify_reward,
)

# sympy evaluates 9^(9^9) = 9**387420489, a 1.2-gigabit integer: minutes of CPU in one process.
PATHOLOGICAL = r"$9^{9^{9}}$"


def call(fn, completions, group_ids=None, prompts=None, **columns):
    """Call a reward the way the runner does (group_ids only when given, as for a context argument)."""
    n = len(completions)
    extra = {} if group_ids is None else {"group_ids": group_ids}
    return fn(prompts=prompts or ["p"] * n, completions=completions, completion_ids=[[0]] * n,
              trainer_state=None, **columns, **extra)


def in_thread(work, timeout=60.0):
    """Run `work()` on a fresh non-main thread and return its result (re-raising its exception)."""
    box = {}

    def run():
        try:
            box["value"] = work()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)  # daemon: a hung call fails the test, not pytest's exit
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still running after {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def alive(pid):
    """Whether a process with this id exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pid, timeout=5.0):
    end = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < end:
        time.sleep(0.02)
    return not alive(pid)


@pytest.fixture(scope="module")
def verify():
    fn = math_verify_reward(workers=2)
    yield fn
    fn.close()


# ----------------------------------------------------------------------------- extraction

EXTRACTION_CASES = [
    # boxed: last complete box, nested braces, \fbox, truncated box skipped, empty box is no answer
    ("boxed", r"\boxed{42}", "42"),
    ("boxed", r"first \boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    ("boxed", r"so $\boxed{\frac{a}{b^{2}} + \sqrt{2}}$.", r"\frac{a}{b^{2}} + \sqrt{2}"),
    ("boxed", r"\boxed{3} and then \boxed{4", "3"),
    ("boxed", r"\boxed{\frac{1}{2", None),
    ("boxed", r"\fbox{7}", "7"),
    ("boxed", r"\boxed {5}", "5"),
    ("boxed", r"\boxed{ -3 }", "-3"),
    ("boxed", r"\boxed{}", None),
    ("boxed", "no box here: 5", None),
    # answer_is: last occurrence, case-insensitive, to the end of the line or sentence, wrappers off
    ("answer_is", "So the answer is 42.", "42"),
    ("answer_is", r"The final answer is $\frac{1}{2}$.", r"\frac{1}{2}"),
    ("answer_is", "Final answer: 3.5. Let me check that again.", "3.5"),
    ("answer_is", "ANSWER: -7", "-7"),
    ("answer_is", "**Final Answer:** 12", "12"),
    ("answer_is", "The answer is: 5 apples\nand more text", "5 apples"),
    ("answer_is", "Final Answer:\n\n$x = 2$", "x = 2"),
    ("answer_is", "first the answer is 1; no wait, the answer is 2.", "2"),
    ("answer_is", r"The final answer is $\boxed{9}$.", "9"),
    ("answer_is", "the answer is 3. Hmm, so the answer is", "3"),
    ("answer_is", "I answered 5 questions", None),
    # answer_tag: last complete tag, stripped; an unclosed or empty tag is no answer
    ("answer_tag", "<think>hmm</think><answer>42</answer>", "42"),
    ("answer_tag", "<answer> 1 </answer> then <answer>2</answer>", "2"),
    ("answer_tag", "<answer>\n\\frac{1}{2}\n</answer>", r"\frac{1}{2}"),
    ("answer_tag", "<ANSWER>7</ANSWER>", "7"),
    ("answer_tag", "<answer>5", None),
    ("answer_tag", "<answer>  </answer>", None),
    # last_number: sign kept unless it is a hyphen/minus between numbers; thousands separators dropped
    ("last_number", "x = -1,234.5.", "-1234.5"),
    ("last_number", "3-5 gives 2", "2"),
    ("last_number", "it costs .5 dollars", ".5"),
    ("last_number", "from 5 down to -7", "-7"),
    ("last_number", "total 1,234,567 items", "1234567"),
    ("last_number", "no digits", None),
    # full
    ("full", "  Paris \n", "Paris"),
    ("full", "   ", None),
    # regex: group 1 of the last match, or the whole match without a group
    (r"regex:#### (\S+)", "work...\n#### 72", "72"),
    (r"regex:Result=(\d+)", "Result=1, Result=22", "22"),
    (r"regex:\d+", "a 1 b 23 c", "23"),
    (r"regex:#### (\S+)", "no marker", None),
]


@pytest.mark.parametrize("extract, text, expected", EXTRACTION_CASES)
def test_extractors(extract, text, expected):
    assert extract_answer(text, extract) == expected


@pytest.mark.parametrize("text, expected", [
    (r"The answer is 6. \boxed{5} then 7", "5"),     # boxed first, wherever it is
    ("The answer is 6. Then 7 more", "6"),            # then "the answer is"
    ("just 7 and 8", "8"),                            # then the last number
    ("nothing at all", None),
])
def test_default_chain_first_hit_wins(text, expected):
    assert DEFAULT_EXTRACT == ("boxed", "answer_is", "last_number")
    assert extract_answer(text, DEFAULT_EXTRACT) == expected == extract_answer(text, list(DEFAULT_EXTRACT))
    assert extract_answer(text) == expected


def test_custom_chain_order_matters():
    text = r"<answer>3</answer> \boxed{4}"
    assert extract_answer(text, ["answer_tag", "boxed"]) == "3"
    assert extract_answer(text, ["boxed", "answer_tag"]) == "4"
    assert extract_answer("plain words", ["answer_tag", "full"]) == "plain words"


@pytest.mark.parametrize("extract, message", [
    ("first_number", r"extract must be one of boxed, answer_is, answer_tag, last_number, full.*unknown extractor 'first_number'"),
    (["boxed", "nope"], r"extract must be one of .*unknown extractor 'nope'"),
    ([], r"extract must be one of .*not \[\]"),
    (5, r"extract must be one of .*not 5"),
    ("regex:(unclosed", r"extract 'regex:\(unclosed' is not a valid regular expression"),
])
def test_bad_extract_names_the_option(extract, message):
    for factory in (exact_answer, math_verify_reward, majority_vote):
        with pytest.raises(RewardError, match=f"{factory.__name__.replace('_reward', '')}: {message}"):
            factory(extract=extract)
    with pytest.raises(RewardError, match=message):
        extract_answer("x", extract)


_FILLER = st.text(alphabet="bcdfghijklmopqtuvxyz BCDXYZ!?;'", max_size=30)  # no digit, '.', '-', 'a' (no "answer")


@settings(max_examples=150, deadline=None)
@given(_FILLER, _FILLER, st.integers(-10**12, 10**12), st.booleans(),
       st.one_of(st.none(), st.from_regex(r"[0-9]{1,4}", fullmatch=True)))
def test_a_number_in_random_text_is_extracted(before, after, n, commas, fraction):
    shown = (f"{n:,}" if commas else str(n)) + (f".{fraction}" if fraction else "")
    expected = str(n) + (f".{fraction}" if fraction else "")
    assert extract_answer(f"{before} {shown} {after}", "last_number") == expected
    stated = extract_answer(f"{before}. The answer is {shown}. {after}", DEFAULT_EXTRACT)
    assert stated == shown and answers_equal(stated, expected)


_PLAIN = st.text(alphabet="abxyz0123456789+-*/^_ =.,()[]", max_size=6)
_BALANCED = st.recursive(_PLAIN, lambda inner: st.one_of(
    st.tuples(_PLAIN, inner, _PLAIN).map(lambda t: f"{t[0]}{{{t[1]}}}{t[2]}"),
    st.lists(inner, max_size=3).map("".join)), max_leaves=12)
_NO_BRACES = st.text(alphabet="abc xyz123.,$()", max_size=20)


@settings(max_examples=150, deadline=None)
@given(_NO_BRACES, _BALANCED, _NO_BRACES, _BALANCED)
def test_boxed_with_random_nested_braces(before, content, between, truncated):
    text = f"{before}\\boxed{{{content}}}{between}"
    assert last_boxed(text) == (content.strip() or None)
    # a generation cut off inside a later box: the complete one still counts
    assert last_boxed(f"{text}\\boxed{{{truncated}") == (content.strip() or None)


# ----------------------------------------------------------------------------- exact_answer


def test_answers_equal_cases():
    assert answers_equal("85", "85.0") and answers_equal(" 85.00 ", 85) and answers_equal("1,234", "1234")
    assert answers_equal("-7", "-7.0") and answers_equal("Paris", " Paris ")
    assert not answers_equal("85", "86") and not answers_equal("paris", "Paris") and not answers_equal("1/2", "0.5")


def test_exact_answer_with_new_extractors_and_chains():
    chain = exact_answer(extract=["boxed", "answer_is", "last_number"])
    completions = [r"\boxed{1,234} or 5", "The answer is 85.0. Then 3", "nothing", "<answer>7</answer>", "so -7"]
    assert call(chain, completions, answer=["1234", "85", "0", "7", "-7"]) == [1.0, 1.0, 0.0, 1.0, 1.0]
    tag = exact_answer(extract="answer_tag")
    assert call(tag, ["<answer>Paris</answer>", "<answer>paris</answer>", "Paris"], answer=["Paris"] * 3) == [1.0, 0.0, 0.0]
    gsm8k = REWARDS.get("exact_answer")(extract=r"regex:#### (\S+)")
    assert call(gsm8k, ["so\n#### 72", "#### 1,000", "72"], answer=["72", "1000", "72"]) == [1.0, 1.0, 0.0]
    # the defaults are unchanged: last number, column "answer"
    assert call(REWARDS.get("exact_answer")(), ["so the answer is 85", "85 or 86"], answer=["85", "85"]) == [1.0, 0.0]


# ----------------------------------------------------------------------------- math_verify

# (reference, completion, expected score), by equivalence class; the completion is given whole
MATH_VERIFY_CASES = [
    # fractions and decimals
    ("0.5", "The answer is 1/2", 1.0),
    ("0.5", r"$\frac{1}{2}$", 1.0),
    ("0.5", r"so $\dfrac{1}{2}$", 1.0),
    ("0.5", r"\boxed{\tfrac12}", 1.0),
    (r"\frac{1}{2}", "so x = 0.5", 1.0),
    (r"\dfrac{3}{4}", r"\boxed{0.75}", 1.0),
    (r"\frac{3}{4}", r"\boxed{\frac{4}{3}}", 0.0),
    ("0.5", "0.25", 0.0),
    # percentages: X% equals X/100 and X; a plain 0.5 is not 50
    (r"50\%", r"\boxed{0.5}", 1.0),
    (r"50\%", r"\boxed{50}", 1.0),
    (r"50\%", r"\boxed{50\%}", 1.0),
    (r"12.5\%", r"\boxed{12.5}", 1.0),
    (r"12.5\%", r"\boxed{0.125}", 1.0),
    ("0.5", r"\boxed{50\%}", 1.0),
    ("0.125", r"\boxed{12.5\%}", 1.0),
    ("0.5", r"\boxed{50}", 0.0),
    ("50", r"\boxed{0.5}", 0.0),
    # thousands separators, in the answer and in the completion
    ("1234", r"\boxed{1,234}", 1.0),
    ("1,234", r"\boxed{1234}", 1.0),
    ("1234", r"\boxed{1{,}234}", 1.0),
    ("1234", r"\boxed{1\,234}", 1.0),
    (r"1\,234", "The total is 1234.", 1.0),
    ("1234567", "$1,234,567$", 1.0),
    ("1234", r"\boxed{1.234}", 0.0),
    # negative numbers (a Unicode minus too)
    ("-3", r"\boxed{-3}", 1.0),
    ("-3", "x = \u22123", 1.0),
    ("-3", r"$-\frac{6}{2}$", 1.0),
    ("-3", r"\boxed{3}", 0.0),
    # LaTeX forms; a bare reference is read whole ("2\sqrt{3}" is not 2)
    (r"2\sqrt{3}", r"\boxed{\sqrt{12}}", 1.0),
    (r"2\sqrt{3}", r"\boxed{2}", 0.0),
    ("x^2+1", r"\boxed{1+x^2}", 1.0),
    (r"\frac{\pi}{6}", r"\boxed{\frac{\pi}{6}}", 1.0),
    ("(1,2)", r"\boxed{(1, 2)}", 1.0),
    # boxes: nested braces; a truncated last box leaves the earlier one
    ("12", r"\boxed{{12}}", 1.0),
    ("12", r"\boxed{\frac{24}{2}} and then \boxed{13", 1.0),
    ("12", r"\boxed{13} then \boxed{12", 0.0),
    # garbage scores 0 and never raises
    ("0.5", "garbage ###", 0.0),
    ("0.5", "", 0.0),
    ("0.5", r"\frac{ }}} $$$ \boxed{", 0.0),
    ("7", "9" * 5000, 0.0),  # beyond Python's int-string limit: an error inside the worker
]


def test_math_verify_equivalence_classes(verify):
    golds, completions, expected = zip(*MATH_VERIFY_CASES)
    assert call(verify, list(completions), answer=list(golds)) == list(expected)
    assert verify.timeouts == 0


def test_math_verify_extract_option():
    boxed = math_verify_reward(extract="boxed", workers=1)
    try:
        completions = [r"\boxed{\dfrac12}", "The answer is 1/2", r"\boxed{50\%}", r"\boxed{2} \boxed{\frac{1}{2}"]
        # math-verify alone finds 1/2 in the second; with extract="boxed" there is nothing to compare
        assert call(boxed, completions, answer=["0.5"] * 4) == [1.0, 0.0, 1.0, 0.0]
    finally:
        boxed.close()


def test_math_verify_none_and_unparseable_references(verify):
    chat = [{"role": "user", "content": "?"}, {"role": "assistant", "content": r"\boxed{4}"}]
    completions = ["1", "1", "1", "1", chat]
    assert call(verify, completions, answer=[None, "", "$$", "\\", 4]) == [None, None, None, None, 1.0]
    boxed = math_verify_reward(extract="boxed", workers=1)
    try:  # nothing extracted still scores None, not 0, when the reference is unusable
        assert call(boxed, ["no box", "no box"], answer=["$$", "1"]) == [None, 0.0]
    finally:
        boxed.close()


def test_math_verify_bad_options_and_missing_column():
    fn = REWARDS.get("math_verify")(answer_column="solution", workers=1)
    with pytest.raises(RewardError, match=r"'solution'.*available are: answer, level"):
        call(fn, ["4"], answer=["4"], level=[1])
    assert fn.pool.pids() == []  # it failed before starting any worker
    for kwargs, message in [(dict(timeout_s=0), "timeout_s must be a positive number"),
                            (dict(timeout_s=float("inf")), "timeout_s must be"), (dict(timeout_s="5"), "timeout_s must be"),
                            (dict(workers=0), "workers must be a positive integer"), (dict(workers=1.5), "workers must be"),
                            (dict(workers=True), "workers must be")]:
        with pytest.raises(RewardError, match=f"math_verify: {message}"):
            REWARDS.get("math_verify")(**kwargs)
        with pytest.raises(RewardError, match=f"majority_vote: {message}"):
            REWARDS.get("majority_vote")(equivalence="math_verify", **kwargs)


def test_pathological_input_times_out_from_any_thread(caplog):
    fn = math_verify_reward(timeout_s=1.0, workers=2)
    try:
        assert call(fn, ["1", "1"], answer=["1", "2"]) == [1.0, 0.0]  # start the workers outside the timing
        completions = [PATHOLOGICAL, r"\boxed{1}", "2"]
        with caplog.at_level(logging.DEBUG, logger="groupwise.rewards"):
            for run in (lambda work: work(), in_thread):  # main thread, then a fresh one
                start = time.monotonic()
                assert run(lambda: call(fn, completions, answer=["1"] * 3)) == [0.0, 1.0, 0.0]
                elapsed = time.monotonic() - start
                # the worker really was busy for its whole timeout (timeouts counts only jobs stopped by a
                # deadline), and the call came back soon after it
                assert 1.0 <= elapsed < 1.0 + 3.0
            assert fn.timeouts == 2 and fn.last_metrics["math_verify/timeouts"] == 1.0
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "timeout_s = 1 s" in r.getMessage()]
        assert len(warnings) == 1  # logged once; the second timeout is only counted
        # the timer inside the worker stopped sympy (CPython checks for signals inside big-integer
        # multiplication), so no worker had to be killed; the kill path is tested with a stopped worker below
        assert fn.pool.restarts == 0 and "stopped by its timer" in warnings[0].getMessage()
        assert call(fn, ["1/2"], answer=["0.5"]) == [1.0]
    finally:
        fn.close()


def test_a_stuck_worker_is_killed_and_replaced():
    fn = math_verify_reward(timeout_s=0.5, workers=1)
    pid = None
    try:
        assert call(fn, ["1"], answer=["1"]) == [1.0]
        (pid,) = fn.pool.pids()
        # a stopped process is as stuck as one inside a long C call: no timer of its own can fire
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        assert in_thread(lambda: call(fn, [r"\boxed{1}"], answer=["1"]), timeout=10) == [0.0]
        assert 1.5 <= time.monotonic() - start < 4.5  # killed at timeout_s + 1 s grace
        assert fn.timeouts == 1 and fn.pool.restarts == 1 and fn.last_metrics["math_verify/worker_restarts"] == 1.0
        assert not alive(pid)
        (new_pid,) = fn.pool.pids()
        assert new_pid != pid and call(fn, [r"\boxed{1}"], answer=["1"]) == [1.0]
        # a worker that died while idle: the job is not lost, it runs on a replacement
        os.kill(new_pid, signal.SIGKILL)
        assert wait_dead(new_pid)
        assert call(fn, ["1/2"], answer=["0.5"]) == [1.0]
        assert fn.timeouts == 1 and fn.pool.restarts == 2
    finally:
        if pid is not None and alive(pid):  # never leave a stopped process behind, even when failing
            os.kill(pid, signal.SIGKILL)
        fn.close()


def test_close_and_garbage_collection_leave_no_worker():
    fn = math_verify_reward(workers=2)
    assert call(fn, ["1/2"], answer=["0.5"]) == [1.0]
    pids = fn.pool.pids()
    assert len(pids) == 2 and all(alive(p) for p in pids)
    fn.close()
    assert fn.pool.pids() == [] and not any(alive(p) for p in pids)
    assert call(fn, ["1/2"], answer=["0.5"]) == [1.0]  # workers start again on demand
    pids = fn.pool.pids()
    del fn
    gc.collect()
    assert not any(alive(p) for p in pids)


def test_workers_die_with_the_interpreter():
    script = textwrap.dedent(r'''
        import threading, time
        from groupwise.rewards.math import math_verify_reward
        fn = math_verify_reward(workers=1, timeout_s=60)
        call = lambda c: fn(prompts=["p"], completions=[c], completion_ids=[[0]], answer=["1"])
        assert call("1") == [1.0]
        print(fn.pool.pids()[0], flush=True)
        threading.Thread(target=call, args=(r"$9^{9^{9}}$",), daemon=True).start()
        time.sleep(0.5)  # the worker is now busy for up to 60 s: only the exit hook can stop it
    ''')
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[0])
    try:
        assert wait_dead(pid, timeout=3.0)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_concurrent_calls_are_serialized(verify):
    results = []
    threads = [threading.Thread(target=lambda a=a: results.append((a, call(verify, [r"\boxed{2}"] * 3, answer=[a] * 3))))
               for a in ("2", "3", "2.0", "4")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(results) == [("2", [1.0] * 3), ("2.0", [1.0] * 3), ("3", [0.0] * 3), ("4", [0.0] * 3)]


# ----------------------------------------------------------------------------- majority_vote


def boxed(answer):
    return f"so \\boxed{{{answer}}}." if answer is not None else "I give up."


def test_majority_vote_exact_hand_computed():
    fn = REWARDS.get("majority_vote")()
    # group 0: answers 2, 2.0 (= 2), 3, none, 3, 3 -> 3 wins with three votes
    # group 1: 1/2, 0.5 differ as strings; 7 and 7 -> 7 wins
    # group 2: nobody answers -> all 0
    # group 3: a tie between 5 and 6 -> 5, which appears first
    completions = ["x = 2", r"\boxed{2.0}", "The answer is 3.", "nothing", "3", r"\boxed{3}",
                   r"\boxed{1/2}", "0.5", r"\boxed{7}", "Final answer: 7",
                   "no idea", "none",
                   r"\boxed{5}", r"\boxed{6}", r"\boxed{6}", r"\boxed{5}"]
    groups = [0] * 6 + [1] * 4 + [2] * 2 + [3] * 4
    assert call(fn, completions, group_ids=groups) == [0, 0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 0, 1]
    # interleaved groups; and without group_ids, runs of equal prompts form the groups
    assert call(fn, [boxed(1), boxed(2), boxed(1), boxed(2), boxed(3)], group_ids=[0, 1, 0, 1, 1]) == [1, 1, 1, 1, 0]
    assert call(fn, [boxed(1), boxed(1), boxed(2), boxed(2)], prompts=["a", "a", "b", "b"]) == [1, 1, 1, 1]
    with pytest.raises(RewardError, match="majority_vote: got 2 group ids for 3 completions"):
        call(fn, ["1", "2", "3"], group_ids=[0, 0])


def test_majority_vote_extract_option():
    tags = REWARDS.get("majority_vote")(extract="answer_tag")
    completions = ["<answer>Paris</answer>", "Paris", "<answer>Lyon</answer>", "<answer> Paris </answer>"]
    assert call(tags, completions, group_ids=[0] * 4) == [1, 0, 0, 1]


def test_majority_vote_math_verify_equivalence():
    mv = majority_vote(equivalence="math_verify", workers=2)
    exact = majority_vote()
    try:
        # group 0: 1/2, 0.5, \frac{1}{2} are one class (3 votes) against 2 (2 votes)
        # group 1: 50% = 0.5 (2 votes) ties with 7 (2 votes); the class seen first wins
        # group 2: 1,234 = 1234 = 1{,}234 against -1234 and nothing
        completions = [boxed(r"\frac{1}{2}"), boxed("0.5"), boxed("2"), boxed("2"), boxed("1/2"),
                       boxed(r"50\%"), boxed("0.5"), boxed("7"), boxed("7"),
                       boxed("1,234"), boxed("-1234"), boxed("1{,}234"), boxed(None), boxed("1234")]
        groups = [0] * 5 + [1] * 4 + [2] * 5
        assert call(mv, completions, group_ids=groups) == [1, 1, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1, 0, 1]
        # by strings and numbers only, 2 and 7 win, and 1{,}234 is not 1234
        assert call(exact, completions, group_ids=groups) == [0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 1]
        assert mv.timeouts == 0 and mv.last_metrics["majority_vote/jobs"] > 0
    finally:
        mv.close()
    assert not hasattr(exact, "pool")  # exact voting starts no process


def test_majority_vote_pathological_answer_costs_one_timeout():
    mv = majority_vote(equivalence="math_verify", timeout_s=1.0, workers=2)
    try:
        # the tower comes first, so it would open a class and be compared with every other answer
        completions = [boxed("9^{9^{9}}"), boxed("1"), boxed("1.0"), boxed("2"), boxed("3"), boxed("4")]
        assert call(mv, [boxed(1), boxed(2)], group_ids=[0, 0]) == [1, 0]  # start the workers outside the timing
        start = time.monotonic()
        assert call(mv, completions, group_ids=[0] * 6) == [0, 1, 1, 0, 0, 0]
        assert time.monotonic() - start < 1.0 + 3.0
        assert mv.timeouts == 1  # its check alone overran; it then stood apart, compared with nothing
    finally:
        mv.close()


def test_majority_vote_from_the_runner_gets_group_ids():
    runner = RewardRunner([SimpleNamespace(name="majority_vote", weight=1.0, kwargs={})])
    completions = [boxed(1), boxed(2), boxed(1), boxed(2), boxed(2), boxed(3)]
    # one prompt text for all, but two groups by id: the context argument decides, not the prompts
    scores = runner.score(["p"] * 6, completions, [[1]] * 6, {}, group_ids=[0, 1, 0, 1, 0, 1])
    assert scores.values[:, 0].tolist() == [1, 1, 1, 1, 0, 0]


_ANSWERS = st.sampled_from(["1", "2", "2.0", "x", None])  # "2" and "2.0" are one answer


def _key(answer):
    return None if answer is None else "2" if answer == "2.0" else answer


@settings(max_examples=120, deadline=None)
@given(st.lists(_ANSWERS, min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_majority_vote_invariants(answers, rng):
    fn = majority_vote()
    rewards = call(fn, [boxed(a) for a in answers], group_ids=[0] * len(answers))
    assert set(rewards) <= {0.0, 1.0}
    keys = [_key(a) for a in answers]
    votes = {k: keys.count(k) for k in keys if k is not None}
    if not votes:
        assert rewards == [0.0] * len(answers)
        return
    top = max(votes.values())
    winner = next(k for k in keys if k is not None and votes[k] == top)  # ties: the first to appear
    assert rewards == [1.0 if k == winner else 0.0 for k in keys]  # the majority's completions, and only they
    assert sum(rewards) == top
    # permuting the group permutes the rewards (when the majority is unique: ties go to the first seen)
    order = list(range(len(answers)))
    rng.shuffle(order)
    permuted = call(fn, [boxed(answers[i]) for i in order], group_ids=[0] * len(answers))
    if list(votes.values()).count(top) == 1:
        assert permuted == [rewards[i] for i in order]
    else:
        assert sum(permuted) == top
    # another group in the same batch, interleaved, changes nothing
    mixed = call(fn, [c for a in answers for c in (boxed(a), boxed("9"))], group_ids=[g for _ in answers for g in (0, 1)])
    assert mixed[0::2] == rewards and mixed[1::2] == [1.0] * len(answers)
