"""One full training step, timed part by part, against the compute floor of this machine.

    python benchmarks/step.py                       # the built-in model, then a random ~135M Llama
    python benchmarks/step.py --models builtin --steps 30
    python benchmarks/step.py --variants off            # only the padded layout

Variants: "off" runs the update and the old/reference log-probs on padded rows; "on" uses the
shared-prefix packed layout (`model.shared_prefix: true`). Generation is the same engine in both
(continuous batching with prefix caching; a random model never stops early, so it decodes every
row for all 64 tokens).

The ~135M model has SmolLM2-135M's shape (576 hidden, 30 layers, 9/3 heads, 49,152 vocab) with
random weights and the built-in tokenizer, at TRL's benchmark settings: 8 prompts × G 4 × 64 new
tokens. A random model almost never emits EOS, so every completion runs the full 64 tokens.

Compute floor = the FLOPs the step needs (matmuls only: 2·params per token for generation and for
no-grad forwards, 6·params per token for forward+backward; the LM head only where a token is
generated or scored) ÷ the measured fp32 matmul rate. Prints a table and, as its last line, one
JSON object. Run by hand; never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from groupwise.config import load_config
from groupwise.model.loading import builtin_model_dir
from groupwise.trainer import Trainer

PARTS = ("generation", "scoring", "prepare", "update", "step")
VARIANTS = {"off": ["model.shared_prefix=false", "model.padding_free=false"], "on": ["model.shared_prefix=true"]}


def matmul_flops_per_second(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def make_135m(directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(builtin_model_dir() / name, directory / name)
    return directory


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(body matmul params, LM-head params); embeddings are lookups, not matmuls."""
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    return total - embed, head


def run(name: str, model_path: str, overrides: list[str], steps: int, warmup: int, run_dir: Path) -> dict:
    cfg = load_config(None, [f"model.path={model_path}", f"run_dir={run_dir}", "eval.before_and_after=false",
                             "logging.progress=none", "logging.samples_every=0", "checkpoint.save_final=false",
                             f"schedule.steps={steps + warmup}", *overrides])
    trainer = Trainer(cfg)
    rows = []
    for i in range(steps + warmup):
        m = trainer.train_step()
        if i >= warmup:
            rows.append(m)
    body, head = param_counts(trainer.model)
    med = {p: statistics.median(r[f"time/{p}"] for r in rows) for p in PARTS}
    n = cfg.completions_per_step
    gen_tokens = statistics.median(r["tokens_generated"] for r in rows)
    prompt_tokens = n * 8  # built-in prompts: "<bos>ab+cd=" ≈ 7–8 tokens
    passes = cfg.algorithm.num_iterations
    extra_forwards = (1 if trainer.optimizer_steps_per_step > 1 else 0) + (1 if cfg.algorithm.kl.coef > 0 else 0)
    tokens = prompt_tokens + gen_tokens
    flops = (
        2 * body * tokens + 2 * head * gen_tokens                                   # generation (prefill + decode)
        + extra_forwards * (2 * body * tokens + 2 * head * gen_tokens)              # π_old / π_ref forwards
        + passes * (6 * body * tokens + 6 * head * gen_tokens)                      # forward + backward
    )
    return {"model": name, "params_matmul": body, "completions": n, "generated_tokens": gen_tokens,
            "seconds": med, "flops": flops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="builtin,135m")
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default: 20 builtin, 3 for 135m)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", default="off,on", help="off: padded layout; on: shared-prefix packed layout (model.shared_prefix)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rate = matmul_flops_per_second()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models.split(","):
            for variant in args.variants.split(","):
                layout = VARIANTS[variant]
                if name == "builtin":
                    r = run(name, "builtin", layout, args.steps or 20, 3, tmp / f"run-builtin-{variant}")
                elif name == "135m":
                    path = tmp / "llama135m"
                    if not path.exists():
                        make_135m(path)
                    overrides = ["rollout.prompts_per_step=8", "rollout.num_generations=4", "rollout.max_new_tokens=64", "optimizer.lr=1e-6"]
                    r = run(name, str(path), overrides + layout, args.steps or 3, 2, tmp / f"run-135m-{variant}")   # 2 warm-ups: the heap grows first
                else:
                    raise SystemExit(f"unknown model '{name}' (builtin, 135m)")
                r["variant"] = variant
                results.append(r)

    print(f"\nfp32 matmul rate on this machine: {rate / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)\n")
    print(f"{'model':<9}{'layout':>8}{'completions':>12}{'gen tok':>9}{'generation':>12}{'scoring':>9}{'prepare':>9}{'update':>9}{'step':>9}{'floor':>9}{'step/floor':>12}")
    for r in results:
        s = r["seconds"]
        r["floor_seconds"] = r["flops"] / rate
        r["step_over_floor"] = s["step"] / r["floor_seconds"]
        print(f"{r['model']:<9}{r['variant']:>8}{r['completions']:>12}{r['generated_tokens']:>9.0f}{s['generation']:>11.3f}s{s['scoring']:>8.3f}s"
              f"{s['prepare']:>8.3f}s{s['update']:>8.3f}s{s['step']:>8.3f}s{r['floor_seconds']:>8.3f}s{r['step_over_floor']:>11.1f}×")
    print(json.dumps({"matmul_gflops": rate / 1e9, "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
