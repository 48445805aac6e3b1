"""Shared-prefix forward (Prefix Grouper) vs the per-sequence layout: time and peak memory.

    python benchmarks/shared_prefix.py                          # prompts 256/1024/2048 × G 4/8/16
    python benchmarks/shared_prefix.py --prompt-lengths 1024 --groups 16 --repeats 2

One group: a prompt of P tokens and G completions of 128 tokens, on a random Llama with
SmolLM2-135M's shape (576 hidden, 30 layers, 9/3 heads, 49,152 vocab), fp32, forward + backward of
Σ log-probs (the update's work). Per-sequence = G rows `[prompt, c_i]` (the usual layout, run in
micro-batches of --micro-rows rows so that it fits in memory, gradients accumulated); shared = one
packed row `[prompt, c_1 … c_G]` through `groupwise.model.packing`.

Theoretical token ratio = G·(P + C) / (P + G·C): how many fewer tokens the linear layers see.
Each cell runs in a fresh process, with one untimed warm-up pass at the measured shape. Peak memory = the resident-set high-water mark (ru_maxrss)
above the level just before the warm-up on CPU, or torch.cuda.max_memory_allocated above the
allocated level on GPU. Prints a table and, as its last line, one JSON object.
Run by hand; never asserted in tests.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import time

import psutil
import torch

from groupwise.model.logprobs import completion_logprobs


def make_model(device: str, dtype: torch.dtype, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).train()


def peak_rss_bytes() -> int:
    """The process's resident-set high-water mark (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def group_batch(prompt_len: int, g: int, completion_len: int, vocab: int, device: str):
    gen = torch.Generator().manual_seed(prompt_len * 100 + g)
    prompt = torch.randint(3, vocab, (1, prompt_len), generator=gen).expand(g, -1)
    completions = torch.randint(3, vocab, (g, completion_len), generator=gen)
    ids = torch.cat([prompt, completions], 1).to(device)
    attn = torch.ones_like(ids)
    cmask = torch.ones(g, completion_len, device=device)
    return ids, attn, cmask, torch.zeros(g, dtype=torch.long, device=device)


def forward_backward(model, ids, attn, cmask, group_id, layout: str, micro_rows: int) -> None:
    rows = torch.arange(ids.shape[0], device=ids.device)
    chunks = [rows] if layout == "shared_prefix" else rows.split(micro_rows)
    for r in chunks:
        logp, _ = completion_logprobs(model, ids[r], attn[r], cmask[r], layout=layout, group_id=group_id[r])
        logp.sum().backward()


def measure(model, layout: str, prompt_len: int, g: int, completion_len: int, repeats: int, micro_rows: int, device: str):
    """Median seconds and peak memory (MiB above the level before the first repeat) of forward+backward."""
    ids, attn, cmask, gid = group_batch(prompt_len, g, completion_len, model.config.vocab_size, device)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = psutil.Process().memory_info().rss
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        forward_backward(model, ids, attn, cmask, gid, layout, micro_rows)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss_bytes()
    model.zero_grad(set_to_none=True)
    return statistics.median(times), (peak - base) / 2**20


def child(args) -> None:
    """One (prompt, G, layout) in a fresh process, so that peak memory is its own."""
    dtype = getattr(torch, args.dtype)
    model = make_model(args.device, dtype, args.layers)
    # warm-up at the measured shape (untimed): the first passes pick kernels and fault in fresh pages,
    # which costs the one large packed row far more than the per-sequence micro-batches
    ids, attn, cmask, gid = group_batch(args.prompt, args.g, args.completion_length, model.config.vocab_size, args.device)
    gc.collect()
    base = psutil.Process().memory_info().rss
    forward_backward(model, ids, attn, cmask, gid, args.layout, args.micro_rows)
    model.zero_grad(set_to_none=True)
    del ids, attn, cmask, gid
    seconds, mib = measure(model, args.layout, args.prompt, args.g, args.completion_length, args.repeats, args.micro_rows, args.device)
    if not args.device.startswith("cuda"):
        mib = (peak_rss_bytes() - base) / 2**20      # the warm-up run has the same shape: same peak
    print(json.dumps({"seconds": seconds, "peak_mib": mib, "params": sum(p.numel() for p in model.parameters())}))


def run_child(args, prompt: int, g: int, layout: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--prompt", str(prompt), "--g", str(g), "--layout", layout,
           "--completion-length", str(args.completion_length), "--repeats", str(args.repeats), "--micro-rows", str(args.micro_rows),
           "--layers", str(args.layers), "--device", args.device, "--dtype", args.dtype]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"benchmark child failed ({' '.join(cmd)}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-lengths", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--completion-length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per cell (median); the first also warms the allocator")
    ap.add_argument("--micro-rows", type=int, default=4, help="per-sequence layout: rows per forward/backward")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--g", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.child:
        return child(args)

    rows = []
    c = args.completion_length
    print(f"random Llama (SmolLM2-135M shape, {args.layers} layers), {args.device} {args.dtype}, completions {c} tokens, "
          f"per-sequence micro-batch {args.micro_rows} rows, {torch.get_num_threads()} threads, median of {args.repeats}")
    header = (f"{'prompt':>6} {'G':>3} | {'per-seq s':>9} {'shared s':>8} {'speedup':>7} {'tok ratio':>9} {'of ratio':>8} | "
              f"{'per-seq MiB':>11} {'shared MiB':>10} {'mem ratio':>9}")
    print(header)
    print("-" * len(header))
    params = None
    for p in args.prompt_lengths:
        for g in args.groups:
            seq = run_child(args, p, g, "padded")
            sh = run_child(args, p, g, "shared_prefix")
            params = sh["params"]
            ratio = g * (p + c) / (p + g * c)
            speedup = seq["seconds"] / sh["seconds"]
            row = {"prompt": p, "G": g, "per_sequence_s": round(seq["seconds"], 3), "shared_s": round(sh["seconds"], 3),
                   "speedup": round(speedup, 2), "token_ratio": round(ratio, 2), "fraction_of_ratio": round(speedup / ratio, 2),
                   "per_sequence_peak_mib": round(seq["peak_mib"]), "shared_peak_mib": round(sh["peak_mib"]),
                   "memory_ratio": round(sh["peak_mib"] / max(seq["peak_mib"], 1), 2)}
            rows.append(row)
            print(f"{p:>6} {g:>3} | {row['per_sequence_s']:>9.2f} {row['shared_s']:>8.2f} {speedup:>6.2f}x {ratio:>8.2f}x "
                  f"{row['fraction_of_ratio']:>7.0%} | {seq['peak_mib']:>11.0f} {sh['peak_mib']:>10.0f} {row['memory_ratio']:>9.2f}", flush=True)
    print(json.dumps({"benchmark": "shared_prefix", "device": args.device, "dtype": args.dtype, "params": params,
                      "completion_length": c, "micro_rows": args.micro_rows, "rows": rows}))


if __name__ == "__main__":
    main()
