"""Prompt samplers on the built-in task at a fixed budget of generated tokens (issue 6).

    python benchmarks/samplers.py                                   # all samplers + repo, ar3po; 1 seed
    python benchmarks/samplers.py --samplers uniform knapsack --seeds 0 1 2
    python benchmarks/samplers.py --token-budget 20000 --samplers uniform knapsack   # a smoke check
    python benchmarks/samplers.py --train-size 20000            # the recipe's own dataset size

Each sampler trains the built-in recipe (0.9M-parameter Llama, two-digit arithmetic, GRPO, G = 8,
32 prompts per step) from the same warm start, one step after another, until the cumulative
`tokens_generated` (every generated token of the step) reaches --token-budget; samplers spend
different numbers of tokens per step, so they run different numbers of steps. Then the held-out
split (200 prompts) is scored once with greedy decoding.

Per sampler: steps, tokens generated, the fraction of zero-variance groups (all rewards of the
group equal, so GRPO gives every completion a zero advantage; over all groups of all steps), the
fraction of completions in groups with non-zero variance (Knapsack RL's "effective gradient
ratio"; knapsack varies group sizes, so this differs from 1 − the group fraction), final held-out
greedy accuracy, its difference from uniform (same seed), and wall seconds. Both fractions are
counted from the per-group rewards each round hands to `sampler.update`; the group fraction is
checked against the step metric `frac_reward_zero_std`. With several seeds: mean ± sample
standard deviation. 200 held-out prompts: one accuracy has a standard error of about 3 points.

The built-in recipe has 20,000 training prompts, so at 32 a step the uniform epoch walk reaches no
prompt twice before step 625: samplers that rank prompts by their own history see almost none
within a default-length run. Knapsack in particular gives prompts without history the plain G and
takes its prompts from the same walk, so it is step for step identical to uniform until then
(--set data.train_size=… makes prompts come back sooner). The benchmark therefore defaults to
--train-size 2000: every prompt is visited about 10 times in the budget. `repo` and `ar3po` are
uniform sampling plus RePO replay (4 replayed rows per group) or AR3PO stages (3 stages of 4 more
completions for unsolved prompts, reuse of a past correct completion); AR3PO's extra stages count
against the token budget, replayed rows generate nothing.

The default (6 samplers × ≈ 590 steps) takes about 8 minutes on 2 idle CPU cores. When other
processes keep the cores busy, torch's default 2 threads slow a step down 20-fold or more (0.13 s →
3–5 s measured); --threads 1 then runs at about 0.2–0.6 s a step.

Prints a table and, as its last line, one JSON object. Run by hand; never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from groupwise.config import load_config
from groupwise.trainer import Trainer

SAMPLERS = ["uniform", "variance_aware", "vade", "knapsack", "sec", "prioritized"]
OPTIONS = {"sec": "{category_column: category}"}   # the built-in rows carry a `category` column (add / sub, carry / borrow)
# Replay and reuse (issue 6, item 3) measured the same way: uniform prompts, extra rows in the groups.
VARIANTS = {
    "repo": ["guidance.replay.per_group=4", "guidance.replay.min_stored=4", "guidance.replay.strategy=highest"],
    "ar3po": ["guidance.adaptive_rollout.stages=3", "guidance.adaptive_rollout.per_stage=4", "guidance.adaptive_rollout.reuse_correct=true"],
}
DEFAULT_BUDGET = 480_000   # ≈ 600 uniform steps (the default `groupwise train` run) at ≈ 800 tokens a step
DEFAULT_TRAIN_SIZE = 2000  # each prompt comes back ≈ every 63 steps (≈ 10 visits), so per-prompt history exists


def run(sampler: str, seed: int, budget: float, run_dir: Path, extra: list[str]) -> dict:
    variant = VARIANTS.get(sampler, [])
    overrides = [f"run_dir={run_dir}", f"seed={seed}", f"data.sampler={'uniform' if variant else sampler}", "eval.before_and_after=false",
                 "logging.progress=none", "logging.samples_every=0", "checkpoint.save_final=false", "checkpoint.every=0",
                 "schedule.steps=1000000"]   # constant learning rate in the recipe, so the step count changes nothing
    if sampler in OPTIONS:
        overrides.append(f"data.sampler_options={OPTIONS[sampler]}")
    overrides += variant + extra
    start = time.perf_counter()
    trainer = Trainer(load_config(None, overrides))
    before = trainer.evaluate()["greedy_accuracy"]

    groups: list[tuple[int, bool]] = []   # every group of every round: (completions, zero variance)
    sampler_update = trainer.sampler.update

    def record(outcome) -> None:
        for rewards in outcome.rewards:
            valid = {r for r in rewards if not math.isnan(r)}
            groups.append((len(rewards), len(valid) <= 1))
        sampler_update(outcome)

    trainer.sampler.update = record
    steps, tokens, metric_zero_groups, train_accuracy = 0, 0.0, 0.0, []
    while tokens < budget:
        seen = len(groups)
        m = trainer.train_step()
        steps, tokens = steps + 1, tokens + m["tokens_generated"]
        metric_zero_groups += m["frac_reward_zero_std"] * (len(groups) - seen)
        train_accuracy.append(m["accuracy"])
    after = trainer.evaluate()["greedy_accuracy"]

    zero = sum(z for _, z in groups)
    completions = sum(n for n, _ in groups)
    return {
        "sampler": sampler, "seed": seed, "steps": steps, "tokens": tokens, "groups": len(groups), "completions": completions,
        "zero_variance_groups": zero / len(groups),
        "zero_variance_groups_from_metric": metric_zero_groups / len(groups),
        "effective_completions": sum(n for n, z in groups if not z) / completions,
        "train_accuracy_last_10_steps": statistics.mean(train_accuracy[-10:]),
        "accuracy_before": before, "accuracy": after, "eval_prompts": len(trainer.eval_prompts),
        "seconds": time.perf_counter() - start,
    }


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(values: list[float], fmt: str, width: int) -> str:
    m, s = mean_sd(values)
    text = format(m, fmt) + (f"±{format(s, fmt.lstrip('+'))}" if len(values) > 1 else "")
    return f"{text:>{width}}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samplers", nargs="+", default=SAMPLERS + list(VARIANTS), choices=SAMPLERS + list(VARIANTS))
    ap.add_argument("--train-size", type=int, default=DEFAULT_TRAIN_SIZE, help="built-in training prompts (default %(default)d; "
                    "the recipe's 20000 are not revisited within 600 steps, so history-based samplers would equal uniform)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--token-budget", type=float, default=DEFAULT_BUDGET, help="generated tokens per run (default %(default)d)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 is far faster when "
                    "other processes keep the cores busy)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further config overrides for every run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    samplers = ["uniform"] + [s for s in args.samplers if s != "uniform"]   # uniform first: the baseline
    args.set = [f"data.train_size={args.train_size}"] + args.set

    start = time.perf_counter()
    runs: dict[str, list[dict]] = {s: [] for s in samplers}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for s in samplers:
                r = run(s, seed, args.token_budget, Path(tmp) / f"{s}-{seed}", args.set)
                runs[s].append(r)
                print(f"  {s:<15} seed {seed}: {r['steps']} steps, {r['tokens']:.0f} tokens, held-out {r['accuracy']:.1%} "
                      f"({r['seconds']:.0f} s)", flush=True)
    wall = time.perf_counter() - start

    before = {seed: runs["uniform"][i]["accuracy_before"] for i, seed in enumerate(args.seeds)}
    if any(r["accuracy_before"] != before[r["seed"]] for rs in runs.values() for r in rs):
        print("warning: held-out accuracy before training differs between samplers of the same seed")
    mismatch = max(abs(r["zero_variance_groups"] - r["zero_variance_groups_from_metric"]) for rs in runs.values() for r in rs)
    base = {r["seed"]: r["accuracy"] for r in runs["uniform"]}

    task = "built-in task" + (f" with {' '.join(args.set)}" if args.set else "")
    print(f"\n{task}, {args.token_budget:.0f} generated tokens per run, seeds {args.seeds}, torch threads {torch.get_num_threads()}; "
          f"held-out greedy accuracy before training: {cell(list(before.values()), '.1%', 0).strip()} "
          f"({runs['uniform'][0]['eval_prompts']} prompts)")
    print(f"{'sampler':<15}{'steps':>10}{'tokens':>16}{'zero-var groups':>16}{'effective compl.':>17}"
          f"{'held-out acc':>16}{'vs uniform':>16}{'seconds':>10}")
    summary = {}
    for s, rs in runs.items():
        col = {k: [r[k] for r in rs] for k in rs[0] if k not in ("sampler", "seed")}
        delta = [r["accuracy"] - base[r["seed"]] for r in rs]
        print(f"{s:<15}{cell(col['steps'], '.0f', 10)}{cell(col['tokens'], '.0f', 16)}{cell(col['zero_variance_groups'], '.1%', 16)}"
              f"{cell(col['effective_completions'], '.1%', 17)}{cell(col['accuracy'], '.1%', 16)}{cell(delta, '+.1%', 16)}"
              f"{cell(col['seconds'], '.0f', 10)}")
        col["accuracy_vs_uniform"] = delta
        keys = ("steps", "tokens", "zero_variance_groups", "effective_completions", "accuracy", "accuracy_vs_uniform", "seconds")
        summary[s] = {k: mean_sd(col[k])[0] for k in keys}
        if len(rs) > 1:
            summary[s]["sd"] = {k: mean_sd(col[k])[1] for k in keys}
        summary[s]["runs"] = rs
    print(f"zero-variance groups as counted here vs the step metric frac_reward_zero_std: largest difference {mismatch:.2g}")
    print(f"wall time: {wall:.0f} s")
    print(json.dumps({"benchmark": "samplers", "token_budget": args.token_budget, "seeds": args.seeds, "overrides": args.set,
                      "threads": torch.get_num_threads(), "accuracy_before": before, "metric_mismatch": mismatch,
                      "wall_seconds": wall, "samplers": summary}))


if __name__ == "__main__":
    main()
