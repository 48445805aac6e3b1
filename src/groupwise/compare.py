"""`groupwise compare RECIPE… --steps N`: several recipes on the same task, model and seed, one table.

A recipe contributes its `algorithm` and `guidance` sections, `rollout.num_generations` and its
sampler (`data.sampler`, `data.sampler_options`); everything else (model,
data, rewards, optimizer, schedule) comes from one base config (default: the built-in default), so
the comparison isolates the algorithm. A spec may carry its own overrides after a colon:
`grpo:rollout.num_generations=2` or `dapo:algorithm.eps_high=0.3,optimizer.lr=2e-4`.
Into the output directory go `compare.json` and the runs' overlaid report (`report.png`, `report.html`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from groupwise.config import ConfigError, build_config, builtin_config_path, load_raw

RECIPES_DIR = Path(__file__).resolve().parent / "configs"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if p.stem != "builtin")


def resolve_recipe(spec: str) -> tuple[str, Path, list[str]]:
    """'name[:k=v,k=v]' or 'path.yaml[:…]' → (label, file, overrides)."""
    head, _, tail = spec.partition(":")
    overrides = [o for o in tail.split(",") if o] if tail else []
    path = Path(head)
    if not path.is_file():
        path = RECIPES_DIR / f"{head}.yaml"
    if not path.is_file():
        raise ConfigError(f"recipe '{head}' is neither a file nor a known recipe; known: {', '.join(recipe_names())}")
    return spec, path, overrides


def recipe_config(base_raw: dict[str, Any], recipe_file: Path, overrides: list[str]):
    recipe = load_raw(recipe_file)
    raw = json.loads(json.dumps(base_raw))  # deep copy
    raw["algorithm"] = recipe.get("algorithm", {})
    raw["guidance"] = recipe.get("guidance", {})
    for key in ("sampler", "sampler_options"):
        if key in recipe.get("data", {}):
            raw.setdefault("data", {})[key] = recipe["data"][key]
    generations = recipe.get("rollout", {}).get("num_generations")
    if generations is not None:
        raw.setdefault("rollout", {})["num_generations"] = generations
    return build_config(raw, overrides)


def compare(specs: list[str], *, steps: int, base: str | None = None, out_dir: str | None = None, overrides: list[str] | None = None) -> list[dict[str, Any]]:
    from groupwise.trainer import Trainer

    out = Path(out_dir or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    base_raw = load_raw(base or builtin_config_path())
    resolved = [resolve_recipe(s) for s in specs]
    configs = []
    for i, (label, path, own) in enumerate(resolved):  # validate every recipe before training any
        run_dir = out / f"{i:02d}-{path.stem}"
        configs.append((label, recipe_config(base_raw, path, [*(overrides or []), f"schedule.steps={steps}", f"run_dir={run_dir}", *own])))
    rows = []
    for label, cfg in configs:
        start = time.perf_counter()
        trainer = Trainer(cfg)
        result = trainer.train()
        lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        tail = lines[-max(1, len(lines) // 10):]
        rows.append({
            "recipe": label,
            "advantage": cfg.algorithm.advantage,
            "loss": cfg.algorithm.loss,
            "G": cfg.rollout.num_generations,
            "accuracy_before": result.eval_before.get("greedy_accuracy"),
            "accuracy_after": result.eval_after.get("greedy_accuracy"),
            "train_reward_last10pct": sum(r["reward/mean"] for r in tail) / len(tail),
            "tokens_generated": sum(r["tokens_generated"] for r in lines),
            "seconds": time.perf_counter() - start,
            "run_dir": str(result.run_dir),
        })
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    from groupwise.report import write_report

    png, page = write_report([r["run_dir"] for r in rows], out, names=[r["recipe"] for r in rows])
    print(f"report: {page} (figure: {png})")
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="groupwise compare (held-out greedy accuracy on the same task, model and seed)")
    for col in ("recipe", "advantage", "loss", "G", "acc before", "acc after", "train reward", "tokens", "time (s)"):
        table.add_column(col, justify="left" if col in ("recipe", "advantage", "loss") else "right")
    pct = lambda x: "–" if x is None else f"{x:.1%}"  # noqa: E731
    for r in rows:
        table.add_row(r["recipe"], r["advantage"], r["loss"], str(r["G"]), pct(r["accuracy_before"]), pct(r["accuracy_after"]),
                      f"{r['train_reward_last10pct']:.3f}", f"{r['tokens_generated']:.0f}", f"{r['seconds']:.0f}")
    Console().print(table)
