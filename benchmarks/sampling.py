"""Micro-group, continuous and length-aware sampling (Infinite Sampling): memory and throughput.

    python benchmarks/sampling.py                      # 135M-shaped random Llama, CPU fp32
    python benchmarks/sampling.py --layers 8 --max-new-tokens 160   # a quicker look

A random model never stops by itself, so the benchmark gives it prompt-dependent, widely spread
completion lengths: a hook on the logits makes EOS rare (hazard --hazard per token) until the
sequence reaches position --stop-position and likely (hazard 0.5) after it. A prompt of p tokens
therefore yields completions of about min(Geometric(hazard), stop − p) tokens: long for short
prompts, short for long ones, and predictable from the prompt's earlier completions.

1. Memory: one prompt × G = 64 decoded all at once (full group) vs in micro-groups of
   --slots; peak resident memory above the level before decoding (fresh process each).
2. Throughput: --prompts prompts × G = 64, --slots slots, after one warm-up round that gives the
   length predictor its history; generated tokens per second of naive micro-groups (the next
   micro-group starts when all slots are free) vs continuous refill, without and with
   length-aware ordering (those two get a warm-up round of 8 completions per prompt first, as the
   length history).

Prints a table and, as its last line, one JSON object. Run by hand; never asserted in tests.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import subprocess
import sys
import time

import psutil
import torch

from groupwise.model.loading import builtin_model_dir
from groupwise.rollout import HFRolloutEngine, SamplingParams
from groupwise.types import Prompt


def make_engine(args, slots: int | None, scheduling: str, order: str) -> HFRolloutEngine:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    tok = AutoTokenizer.from_pretrained(str(builtin_model_dir()), local_files_only=True)
    eos = tok.eos_token_id
    early = math.log(args.hazard / (1 - args.hazard) * (cfg.vocab_size - 1))   # logits of a random model are ≈ equal
    late = math.log(cfg.vocab_size - 1)                                         # hazard 0.5

    last_positions = {}

    def remember_positions(module, fwd_args, kwargs):      # the decoder sees every forward's position ids
        last_positions["pos"] = kwargs["position_ids"][:, -1]

    def eos_hazard(module, fwd_args, output):               # the LM head's logits, [rows, vocab] or [rows, 1, vocab]
        pos = last_positions["pos"]
        bias = torch.where(pos >= args.stop_position, late, early)
        output[..., eos] += bias.view(-1, *([1] * (output.dim() - 2)))
        return output

    model.get_decoder().register_forward_pre_hook(remember_positions, with_kwargs=True)
    model.get_output_embeddings().register_forward_hook(eos_hazard)
    return HFRolloutEngine(model, tok, max_concurrent_sequences=slots, scheduling=scheduling, length_order=order)


def prompts_of(lengths: list[int]) -> tuple[list[Prompt], list[str]]:
    texts = [("0123456789+-=" * 400)[: n - 1] for n in lengths]      # + BOS = n tokens with the char tokenizer
    return [Prompt(text=t, messages=None, index=i) for i, t in enumerate(texts)], texts


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> None:
    engine = make_engine(args, args.child_slots, args.child_scheduling, args.child_order)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    lengths = [int(x) for x in args.child_prompts.split(",")]
    prompts, texts = prompts_of(lengths)
    engine.generate(*prompts_of([8]), 2, SamplingParams(max_new_tokens=4), seed=99)     # warm-up: kernels
    if args.child_warm_round:                       # a length history: 8 earlier completions per prompt
        engine.generate(prompts, texts, 8, params, seed=1)
    gc.collect()
    base = psutil.Process().memory_info().rss
    start = time.perf_counter()
    out = engine.generate(prompts, texts, args.group, params, seed=2)
    seconds = time.perf_counter() - start
    tokens = int(out.completion_lengths.sum())
    print(json.dumps({"seconds": seconds, "tokens": tokens, "peak_mib": (peak_rss() - base) / 2**20,
                      "lengths_min": int(out.completion_lengths.min()), "lengths_max": int(out.completion_lengths.max()),
                      "lengths_std": float(out.completion_lengths.float().std()), **engine.last_stats}))


def run_child(args, prompts: list[int], slots: int, scheduling: str, order: str, warm_round: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", "--child-prompts", ",".join(map(str, prompts)), "--child-slots", str(slots),
           "--child-scheduling", scheduling, "--child-order", order, "--layers", str(args.layers), "--group", str(args.group),
           "--max-new-tokens", str(args.max_new_tokens), "--hazard", str(args.hazard), "--stop-position", str(args.stop_position)]
    if warm_round:
        cmd.append("--child-warm-round")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"benchmark child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--prompts", type=int, nargs="+", default=[16, 144], help="prompt lengths (tokens) of the throughput run")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--hazard", type=float, default=0.005)
    ap.add_argument("--stop-position", type=int, default=256)
    ap.add_argument("--parts", nargs="+", choices=["memory", "throughput"], default=["memory", "throughput"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-prompts", help=argparse.SUPPRESS)
    ap.add_argument("--child-slots", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-scheduling", help=argparse.SUPPRESS)
    ap.add_argument("--child-order", help=argparse.SUPPRESS)
    ap.add_argument("--child-warm-round", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    print(f"random Llama (SmolLM2-135M shape, {args.layers} layers), cpu fp32, {torch.get_num_threads()} threads; "
          f"G = {args.group}, max_new_tokens {args.max_new_tokens}, EOS hazard {args.hazard} before position {args.stop_position}")
    report: dict = {"benchmark": "sampling", "layers": args.layers, "group": args.group, "slots": args.slots}
    if "memory" in args.parts:
        report["memory"] = memory_part(args)
    if "throughput" in args.parts:
        report["throughput"] = throughput_part(args)
    print(json.dumps(report))


def memory_part(args) -> dict:
    one = [args.prompts[0]]
    full = run_child(args, one, args.group, "micro_group", "none", False)
    micro = run_child(args, one, args.slots, "micro_group", "none", False)
    print(f"\n1. memory, 1 prompt × G {args.group} (completion lengths {full['lengths_min']}–{full['lengths_max']}, std {full['lengths_std']:.0f})")
    print(f"{'decoding':<28} {'slots':>5} {'peak MiB':>9} {'tokens/s':>9}")
    for name, r in (("full group", full), (f"micro-groups of {args.slots}", micro)):
        print(f"{name:<28} {int(r['slots']):>5} {r['peak_mib']:>9.0f} {r['tokens'] / r['seconds']:>9.1f}")
    mem_ratio = micro["peak_mib"] / max(full["peak_mib"], 1e-9)
    print(f"micro / full peak memory: {mem_ratio:.2f}")
    return {"full_peak_mib": round(full["peak_mib"]), "micro_peak_mib": round(micro["peak_mib"]), "ratio": round(mem_ratio, 2),
            "full_tokens_per_s": round(full["tokens"] / full["seconds"], 1), "micro_tokens_per_s": round(micro["tokens"] / micro["seconds"], 1)}


def throughput_part(args) -> dict:

    runs = {
        "naive micro-groups": ("micro_group", "none"),
        "continuous": ("continuous", "none"),
        "continuous + longest first": ("continuous", "longest_first"),
        "continuous + shortest first": ("continuous", "shortest_first"),
        "continuous + longest, then SJF": ("continuous", "longest_then_shortest"),
    }
    results = {name: run_child(args, args.prompts, args.slots, sch, order, order != "none") for name, (sch, order) in runs.items()}
    first = next(iter(results.values()))
    print(f"\n2. throughput, prompts of {args.prompts} tokens × G {args.group}, {args.slots} slots "
          f"(completion lengths {first['lengths_min']}–{first['lengths_max']}, std {first['lengths_std']:.0f})")
    print(f"{'scheduling':<31} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'decode steps':>12} {'slot use':>8} {'vs naive':>8}")
    base_tps = first["tokens"] / first["seconds"]
    rows = {}
    for name, r in results.items():
        tps = r["tokens"] / r["seconds"]
        rows[name] = {"seconds": round(r["seconds"], 2), "tokens": r["tokens"], "tokens_per_s": round(tps, 1),
                      "decode_steps": int(r["decode_steps"]), "slot_utilization": round(r["slot_utilization"], 3),
                      "speedup_vs_naive": round(tps / base_tps, 2)}
        print(f"{name:<31} {r['seconds']:>8.1f} {r['tokens']:>7} {tps:>9.1f} {int(r['decode_steps']):>12} "
              f"{r['slot_utilization']:>7.0%} {tps / base_tps:>7.2f}x")
    return rows


if __name__ == "__main__":
    main()
