"""Throughput of the sandboxed `code_tests` reward: executions per second on this machine.

    python benchmarks/code_reward.py                 # 1,000 programs, one pool thread per core
    python benchmarks/code_reward.py --programs 200 --workers 4

Scores --programs small programs (a mix: a quarter correct stdin/stdout solutions, a quarter wrong
answers, a quarter runtime errors, a quarter MBPP-style assert tests of which half pass), one test
case each, so one sandboxed execution per program, in one call of the reward, on a pool of
--workers threads. For scale it also times --baseline plain `python -I -c pass` spawns (no
sandbox, one at a time) and the same number of sandboxed executions one at a time.

Prints a table and, as its last line, one JSON object. Run by hand; never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from groupwise.rewards import load_reward_function
from groupwise.rewards.sandbox import Sandbox, isolation


def programs(n: int) -> tuple[list[str], list[object], list[float]]:
    """n (completion, tests, expected score) triples, cycling through four kinds."""
    completions, tests, expected = [], [], []
    for i in range(n):
        a, b = i % 97, (i * 7) % 89
        kind = i % 4
        if kind == 0:  # correct stdin/stdout
            completions.append("```python\na, b = map(int, input().split())\nprint(a + b)\n```")
            tests.append([{"input": f"{a} {b}\n", "output": f"{a + b}\n"}])
            expected.append(1.0)
        elif kind == 1:  # wrong answer
            completions.append("a, b = map(int, input().split())\nprint(a - b - 1)")
            tests.append([{"input": f"{a} {b}\n", "output": f"{a + b}\n"}])
            expected.append(0.0)
        elif kind == 2:  # runtime error
            completions.append("a, b = map(int, input().split())\nprint(a // 0)")
            tests.append([{"input": f"{a} {b}\n", "output": f"{a + b}\n"}])
            expected.append(0.0)
        else:  # assert style, half right
            right = (i // 4) % 2 == 0
            body = "return x * x" if right else "return x + x"
            completions.append(f"```python\ndef sq(x):\n    {body}\n```")
            tests.append([f"assert sq({a + 3}) == {(a + 3) ** 2}"])
            expected.append(1.0 if right else 0.0)
    return completions, tests, expected


def main() -> None:
    """Parse the options, run the measurements, print the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--baseline", type=int, default=50, help="sequential spawns timed for comparison")
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--memory-mb", type=int, default=512)
    args = parser.parse_args()

    iso = isolation()
    completions, tests, expected = programs(args.programs)
    reward = load_reward_function("code_tests", {"timeout_s": args.timeout_s, "memory_mb": args.memory_mb,
                                                 "workers": args.workers})
    reward(prompts=["p"], completions=[completions[0]], completion_ids=[[0]], tests=[tests[0]])  # warm-up

    start = time.perf_counter()
    scores = reward(prompts=["p"] * len(completions), completions=completions,
                    completion_ids=[[0]] * len(completions), tests=tests)
    wall = time.perf_counter() - start
    metrics = dict(reward.last_metrics)
    wrong = sum(s != e for s, e in zip(scores, expected))

    box = Sandbox(timeout_s=args.timeout_s, memory_mb=args.memory_mb)
    seq = []
    for i in range(args.baseline):
        t = time.perf_counter()
        box.run("a, b = map(int, input().split())\nprint(a + b)", stdin=f"{i} {i}\n")
        seq.append(time.perf_counter() - t)
    bare = []
    for _ in range(args.baseline):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)
        bare.append(time.perf_counter() - t)

    rate = len(completions) / wall
    print(f"sandbox: {iso.describe()}")
    print(f"machine: {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}, {args.workers} workers\n")
    print(f"{'measurement':<46} {'value':>10}")
    rows = [
        ("programs scored (1 execution each)", f"{len(completions)}"),
        ("wall time, s", f"{wall:.2f}"),
        ("sandboxed executions / s (pool)", f"{rate:.1f}"),
        ("mean latency of one execution in the pool, ms", f"{metrics['code_tests/exec_time_mean_s'] * 1e3:.1f}"),
        ("scores different from the expected ones", f"{wrong}"),
        ("sequential sandboxed execution, median ms", f"{statistics.median(seq) * 1e3:.1f}"),
        ("sequential bare `python -I -c pass`, median ms", f"{statistics.median(bare) * 1e3:.1f}"),
        ("sandbox overhead per execution, ms", f"{(statistics.median(seq) - statistics.median(bare)) * 1e3:.1f}"),
    ]
    for name, value in rows:
        print(f"{name:<46} {value:>10}")
    print(json.dumps({
        "programs": len(completions), "workers": args.workers, "cpu_cores": os.cpu_count(),
        "wall_s": round(wall, 3), "executions_per_s": round(rate, 2),
        "pool_exec_latency_mean_ms": round(metrics["code_tests/exec_time_mean_s"] * 1e3, 2),
        "sequential_exec_median_ms": round(statistics.median(seq) * 1e3, 2),
        "bare_python_spawn_median_ms": round(statistics.median(bare) * 1e3, 2),
        "wrong_scores": wrong, "isolation": {k: v for k, v in vars(iso).items()},
    }))


if __name__ == "__main__":
    main()
