"""The `code_tests` reward: run the completion's Python against test cases in a sandbox.

Test cases come from one dataset column (default `tests`), one value per sample, in the shapes of
the usual code-RL datasets (a JSON string of any of these is parsed first):

- stdin/stdout, APPS/TACO style: `{"inputs": [...], "outputs": [...]}`; CodeContests style:
  `{"input": [...], "output": [...]}`; or a list of `{"input": "...", "output": "..."}`. The
  program reads the input on stdin; it passes when it exits with code 0 and its output equals the
  expected one line by line, each line stripped (and leading/trailing blank lines ignored);
- call-based, APPS/TACO style: `{"inputs": [[args...], ...], "outputs": [...], "fn_name": "f"}`:
  passes when `f(*args)` (or `Solution().f(*args)`) equals the output (or `[output]`, as APPS
  wraps some results in a list);
- assert-style, MBPP/HumanEval style: a list of assert statements (`test_list`; each one is a
  test), `{"test_list": [...], "test_setup_code": "..."}`, or one string of Python (one test).
  The statements run after the program, in the same module; a test passes when the whole
  program returns normally, which the sandbox checks with a token printed only after the asserts
  (so `sys.exit(0)` or `os._exit(0)` before them fails).

A value of None scores None (not applicable). The code is the last ```python (or ```py) fenced
block of the completion, or the whole text when there is none; an unterminated last block (a
truncated generation) counts up to the end of the text.

Each test is one sandboxed execution (`groupwise.rewards.sandbox`); all the executions of one call
run on a bounded thread pool. After each call `reward.last_metrics` holds counts and timings and
which isolation is in force (`sandbox/network_namespace` = 1.0 when the network namespace is).
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

from groupwise.rewards.text import completion_text
from groupwise.rewards.contract import RewardError, RewardFn, register_reward
from groupwise.rewards.sandbox import ExecResult, Sandbox, SandboxError, isolation

logger = logging.getLogger("groupwise.rewards")

NAME = "code_tests"

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str:
    """The content of the last ```python / ```py block of `text`, or `text` itself if it has none."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


# ----------------------------------------------------------------------------- test cases


@dataclass(frozen=True)
class TestCase:
    """One test: `kind="stdio"` (`stdin` → `expected` output) or `kind="assert"` (`source` runs after the program)."""

    kind: str
    stdin: str = ""
    expected: str = ""
    source: str = ""


class _Malformed(ValueError):
    pass


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    raise _Malformed(f"{what} is a {type(value).__name__}, not text")


def _call_source(fn_name: str, args: Any, expected: Any) -> str:
    if not isinstance(args, list):
        args = [args]
    return (
        "import json as _gw_json\n"
        f"_gw_args = _gw_json.loads({json.dumps(args)!r})\n"
        f"_gw_expected = _gw_json.loads({json.dumps(expected)!r})\n"
        f"_gw_fn = globals().get({fn_name!r})\n"
        f"if _gw_fn is None and 'Solution' in globals():\n"
        f"    _gw_fn = getattr(Solution(), {fn_name!r})\n"
        "_gw_out = _gw_fn(*_gw_args)\n"
        "if isinstance(_gw_out, tuple):\n"
        "    _gw_out = list(_gw_out)\n"
        "assert _gw_out == _gw_expected or [_gw_out] == _gw_expected, 'wrong answer'\n"
    )


def _from_io_lists(inputs: Any, outputs: Any, fn_name: Any) -> list[TestCase]:
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise _Malformed("its inputs and outputs must be lists")
    if len(inputs) != len(outputs):
        raise _Malformed(f"it has {len(inputs)} inputs for {len(outputs)} outputs")
    if fn_name is not None:
        if not isinstance(fn_name, str) or not fn_name.isidentifier():
            raise _Malformed(f"its fn_name {fn_name!r} is not a Python identifier")
        try:
            return [TestCase("assert", source=_call_source(fn_name, a, e)) for a, e in zip(inputs, outputs)]
        except (TypeError, ValueError) as err:
            raise _Malformed(f"its call arguments are not JSON values ({err})") from None
    return [TestCase("stdio", stdin=_text(i, f"input {k}"), expected=_text(o, f"output {k}"))
            for k, (i, o) in enumerate(zip(inputs, outputs))]


def parse_tests(value: Any) -> list[TestCase] | None:
    """The test cases of one sample (see the module docstring for the accepted shapes); None for None.

    Raises ValueError with the reason when the value is malformed or holds no test.
    """
    if value is None:
        return None
    if isinstance(value, str):
        stripped = value.strip()
        if stripped[:1] in ("{", "["):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError as e:
                raise _Malformed(f"it is not valid JSON ({e})") from None
        else:
            if not stripped:
                raise _Malformed("it is an empty string")
            return [TestCase("assert", source=value)]
    if isinstance(value, dict):
        if "inputs" in value or "outputs" in value:
            cases = _from_io_lists(value.get("inputs"), value.get("outputs"), value.get("fn_name") or None)
        elif "input" in value and "output" in value:
            if isinstance(value["input"], list) and isinstance(value["output"], list):
                cases = _from_io_lists(value["input"], value["output"], value.get("fn_name") or None)
            else:
                cases = [TestCase("stdio", stdin=_text(value["input"], "input"), expected=_text(value["output"], "output"))]
        elif "test_list" in value:
            tests = value["test_list"]
            if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
                raise _Malformed("its test_list must be a list of strings")
            setup = value.get("test_setup_code") or ""
            imports = value.get("test_imports") or []
            if not isinstance(setup, str) or not isinstance(imports, list):
                raise _Malformed("its test_setup_code must be a string and test_imports a list")
            prefix = "".join(f"{line}\n" for line in imports) + (setup + "\n" if setup else "")
            cases = [TestCase("assert", source=prefix + t) for t in tests]
        else:
            raise _Malformed(f"it is a dict with keys {sorted(value)[:6]}, not inputs/outputs, input/output or test_list")
    elif isinstance(value, (list, tuple)):
        cases = []
        for k, item in enumerate(value):
            if isinstance(item, str):
                cases.append(TestCase("assert", source=item))
            elif isinstance(item, dict) and "input" in item and "output" in item:
                cases.append(TestCase("stdio", stdin=_text(item["input"], f"input {k}"),
                                      expected=_text(item["output"], f"output {k}")))
            else:
                raise _Malformed(f"its item {k} is a {type(item).__name__}, not an assert string or an input/output dict")
    else:
        raise _Malformed(f"it is a {type(value).__name__}, not a list, dict or JSON string")
    if not cases:
        raise _Malformed("it holds no test case")
    return cases


def outputs_match(actual: str, expected: str) -> bool:
    """Equal line by line after stripping each line and dropping leading/trailing blank lines."""
    return [line.strip() for line in actual.strip().splitlines()] == [line.strip() for line in expected.strip().splitlines()]


def run_test(sandbox: Sandbox, code: str, case: TestCase) -> tuple[bool, ExecResult]:
    """Run one test case of `code` in `sandbox`: (passed, what the execution did)."""
    if case.kind == "stdio":
        result = sandbox.run(code, stdin=case.stdin)
        return result.ok and outputs_match(result.stdout, case.expected), result
    return sandbox.run_asserts(f"{code}\n\n{case.source}\n")


# ----------------------------------------------------------------------------- the reward


@register_reward("code_tests")
def code_tests(tests_column: str = "tests", timeout_s: float = 5.0, memory_mb: int = 512,
               max_output_bytes: int = 1 << 20, mode: str = "fraction", workers: int | None = None) -> RewardFn:
    r"""Execution reward for code: r_i = (tests passed) / (tests) ∈ [0, 1], or 1[all passed] with `mode="all"`.

    The completion's Python (last ```python block, else the whole text) runs once per test case in
    a fresh sandboxed process (`groupwise.rewards.sandbox`): no network, a read-only file tree but
    for its temporary working directory, a scrubbed environment, its own unprivileged uid when
    running as root, and the limits `timeout_s` (wall clock per test; RLIMIT_CPU too), `memory_mb`
    (RLIMIT_AS) and `max_output_bytes` (stdout+stderr). A program that times out, crashes, runs out
    of memory or writes too much fails that test. The test cases are read from the column
    `tests_column` (formats: see `groupwise.rewards.code`); None scores None. Executions run on a
    pool of `workers` threads (default: the number of CPU cores); in `mode="all"` the remaining
    tests of a sample are skipped after its first failure.

    As used for code RL by e.g. DeepSeek-R1 (arXiv 2501.12948) and CodeRL (arXiv 2207.01780).
    """
    if mode not in ("fraction", "all"):
        raise RewardError(f"{NAME}: mode must be 'fraction' or 'all', not {mode!r}")
    if not isinstance(tests_column, str) or not tests_column:
        raise RewardError(f"{NAME}: tests_column must be a column name, not {tests_column!r}")
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise RewardError(f"{NAME}: workers must be a positive integer, not {workers!r}")
    try:
        sandbox = Sandbox(timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes)
    except ValueError as e:
        raise RewardError(str(e).replace("sandbox:", f"{NAME}:", 1)) from None
    pool: list[ThreadPoolExecutor] = []
    pool_lock = threading.Lock()

    def executor() -> ThreadPoolExecutor:
        """The reward's thread pool, created on first use."""
        with pool_lock:
            if not pool:
                pool.append(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="groupwise-code"))
            return pool[0]

    def reward(prompts: Any = None, completions: Sequence[Any] = (), completion_ids: Any = None,
               **columns: Any) -> list[float | None]:
        """One score per completion: its fraction (or all-or-nothing) of the sample's tests passed."""
        start = time.monotonic()
        if tests_column not in columns:
            available = ", ".join(sorted(k for k in columns if k != "trainer_state")) or "none"
            raise RewardError(f"reward '{NAME}' found no dataset column '{tests_column}' for sample 0 "
                              f"(the columns available are: {available})")
        column = columns[tests_column]
        if len(column) != len(completions):
            raise RewardError(f"reward '{NAME}' has no value in column '{tests_column}' for sample "
                              f"{min(len(column), len(completions))} ({len(column)} values for {len(completions)} completions)")
        all_cases: list[list[TestCase] | None] = []
        for i, value in enumerate(column):  # validate everything before running anything
            try:
                all_cases.append(parse_tests(value))
            except ValueError as e:
                raise RewardError(f"reward '{NAME}' cannot read column '{tests_column}' of sample {i}: {e}") from None
        codes = [extract_code(completion_text(c)) for c in completions]

        futures: list[list[Future[tuple[bool, ExecResult]]]] = []
        pool_ = executor()
        for code, cases in zip(codes, all_cases):
            futures.append([pool_.submit(run_test, sandbox, code, case) for case in cases or []])
        scores: list[float | None] = []
        results: list[ExecResult] = []
        skipped = 0
        try:
            for cases, sample_futures in zip(all_cases, futures):
                if cases is None:
                    scores.append(None)
                    continue
                passed, failed = 0, False
                for fut in sample_futures:
                    if fut.cancelled():
                        skipped += 1
                        continue
                    ok, result = fut.result()
                    results.append(result)
                    passed += ok
                    if not ok and mode == "all" and not failed:
                        failed = True
                        for other in sample_futures:
                            other.cancel()  # those not started yet
                scores.append(passed / len(cases) if mode == "fraction" else float(passed == len(cases)))
        except SandboxError as e:
            for sample_futures in futures:
                for fut in sample_futures:
                    fut.cancel()
            raise RewardError(f"reward '{NAME}': the sandbox failed: {e}") from e
        reward.last_metrics = _metrics(results, skipped, scores, time.monotonic() - start)
        return scores

    reward.__name__ = NAME
    reward.last_metrics = {}  # type: ignore[attr-defined]
    reward.isolation = isolation  # type: ignore[attr-defined]
    reward.sandbox = sandbox  # type: ignore[attr-defined]
    return reward


def _metrics(results: list[ExecResult], skipped: int, scores: list[float | None], elapsed: float) -> dict[str, float]:
    n = len(results)
    count = lambda status: float(sum(r.status == status for r in results))  # noqa: E731
    scored = [s for s in scores if s is not None]
    metrics = {
        "code_tests/executions": float(n),
        "code_tests/skipped": float(skipped),
        "code_tests/timeouts": count("timeout"),
        "code_tests/runtime_errors": count("error"),
        "code_tests/killed_by_signal": count("signal"),
        "code_tests/output_limit": count("output_limit"),
        "code_tests/mean_score": sum(scored) / len(scored) if scored else float("nan"),
        "code_tests/exec_time_mean_s": sum(r.elapsed_s for r in results) / n if n else 0.0,
        "code_tests/wall_time_s": elapsed,
        "code_tests/executions_per_s": n / elapsed if elapsed > 0 else 0.0,
    }
    metrics.update(isolation().as_metrics())
    return metrics
