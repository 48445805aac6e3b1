"""Generation A/B of the HF engine's decode paths, in one process on the vs_trl setting.

    python benchmarks/decode.py --model smollm2            # SmolLM2-135M, 8 prompts × 4 × 64 tokens
    python benchmarks/decode.py --model builtin --rounds 20
    python benchmarks/decode.py --attention          # slot decode attention alone, vs SDPA

Variants (`rollout.*` switches of the same engine, alternated round by round so a shared
machine's drift falls on all of them alike):

- `fast`: `fast_decode` (one product for q/k/v and one for gate/up, fused rotary) over
  oneDNN-prepacked weights: the default;
- `packed`: the model's own forward with `packed_matmul` (oneDNN-prepacked linears);
- `plain`: the model's own forward with plain `F.linear`.

`--attention` times one layer's decode attention instead (SmolLM2-135M's shapes: 32 rows, 9 query
and 3 key/value heads of 64, cached widths 40 / 70 / 100): `slot_cache.slot_attention` against
the same cache write followed by `scaled_dot_product_attention` with a boolean mask made per
call (what it replaced), median microseconds per call.

Each round is one `engine.generate` of the step's prompts with a fresh seed after one unmeasured
warm-up round per variant. Prints the median milliseconds per generated token of each variant and
its ratio to `plain`; the last line is one JSON object. Run by hand; never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {
    "fast": {"fast_decode": True, "packed_matmul": True},
    "packed": {"fast_decode": False, "packed_matmul": True},
    "plain": {"fast_decode": False, "packed_matmul": False},
}


def attention_benchmark(repeats: int = 300) -> dict:
    import torch
    import torch.nn.functional as F

    from groupwise.rollout.slot_cache import SlotKVCache, slot_attention

    rows, heads, kv, d, layers = 32, 9, 3, 64, 30

    class Layer:
        layer_idx = layers // 2

    def sdpa_attention(q, k, v, cache):   # the cache write, then SDPA over the slots with a per-call boolean mask
        r = q.shape[0]
        ks, vs = cache.keys[Layer.layer_idx], cache.values[Layer.layer_idx]
        index = cache.lens[:r]
        ks[cache._rows, :, index] = k[:, :, 0]
        vs[cache._rows, :, index] = v[:, :, 0]
        w = cache._width
        mask = (torch.arange(w) <= index[:, None])[:, None, None, :]
        return F.scaled_dot_product_attention(q, ks[:r, :, :w], vs[:r, :, :w], attn_mask=mask, enable_gqa=True).transpose(1, 2)

    def timed(fn) -> float:
        samples = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            samples.append((time.perf_counter() - t0) / repeats * 1e6)
        return statistics.median(samples)

    torch.manual_seed(0)
    out = {}
    with torch.inference_mode():
        for width in (40, 70, 100):
            cache = SlotKVCache(layers, rows, width + 16, kv, d, torch.float32, "cpu")
            cache.keys.normal_()
            cache.values.normal_()
            cache.active = rows
            cache.lens[:rows] = torch.randint(width - 10, width, (rows,))
            cache.begin_decode()
            q, k, v = torch.randn(rows, heads, 1, d), torch.randn(rows, kv, 1, d), torch.randn(rows, kv, 1, d)
            ours = slot_attention(Layer, q, k, v, None, slot_cache=cache)[0]
            ref = sdpa_attention(q, k, v, cache)
            assert torch.allclose(ours, ref, atol=1e-5), "slot_attention and SDPA disagree"
            out[width] = {"slot_attention_us": timed(lambda: slot_attention(Layer, q, k, v, None, slot_cache=cache)),
                          "sdpa_us": timed(lambda: sdpa_attention(q, k, v, cache))}
    return out


def main() -> None:
    import torch

    from vs_trl import DEFAULT_SMOLLM2_DIR, benchmark_spec, groupwise_overrides, has_chat_template, resolve_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="builtin, smollm2, or a local Hugging Face model directory")
    ap.add_argument("--smollm2-dir", default=str(DEFAULT_SMOLLM2_DIR))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", "-G", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 8 for builtin, else 64")
    ap.add_argument("--rounds", type=int, default=5, help="measured rounds per variant")
    ap.add_argument("--variants", default="fast,packed,plain")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--attention", action="store_true", help="time one layer's slot decode attention against SDPA instead")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attention:
        res = attention_benchmark()
        print(f"decode attention, 32 rows × 9 heads (3 kv) × 64, {torch.get_num_threads()} threads; median µs per layer call")
        print(f"{'width':>6}{'slot_attention':>16}{'SDPA':>8}")
        for width, r in res.items():
            print(f"{width:>6}{r['slot_attention_us']:>16.0f}{r['sdpa_us']:>8.0f}")
        print(json.dumps({"attention": res}))
        return
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names or args.rounds < 1:
        raise SystemExit(f"--variants takes a comma list of {', '.join(VARIANTS)} (got {args.variants!r}); --rounds must be ≥ 1")

    from groupwise.config import load_config
    from groupwise.data.datasets import render_prompt
    from groupwise.rollout import SamplingParams
    from groupwise.trainer import Trainer

    model_path, model_name = resolve_model(args)
    builtin = model_name == "builtin"
    chat = has_chat_template(model_path)
    max_new = args.max_new_tokens or (8 if builtin else 64)
    spec = benchmark_spec(model_path, builtin, chat, prompts=args.prompts, generations=args.generations, max_new_tokens=max_new,
                          run_dir=tempfile.mkdtemp(prefix="decode-ab-"))
    cfg = load_config(None, groupwise_overrides(spec))
    trainer = Trainer(cfg)
    engine = trainer.engine
    prompts = trainer.train_prompts[: args.prompts]
    texts = [render_prompt(p, trainer.tokenizer, chat_template=cfg.data.chat_template, system_prompt=cfg.data.system_prompt)
             for p in prompts]
    params = SamplingParams(max_new_tokens=max_new, temperature=1.0, top_p=1.0, top_k=0)

    def one_round(name: str, seed: int) -> tuple[float, int]:
        for key, value in VARIANTS[name].items():
            setattr(engine, key, value)
        t0 = time.perf_counter()
        out = engine.generate(prompts, texts, args.generations, params, seed=seed)
        return time.perf_counter() - t0, int(out.completion_mask.sum())

    with torch.no_grad():
        for name in names:
            one_round(name, seed=10_000)
        per_token: dict[str, list[float]] = {n: [] for n in names}
        tokens: dict[str, list[int]] = {n: [] for n in names}
        for rnd in range(args.rounds):
            for name in (names if rnd % 2 == 0 else names[::-1]):
                seconds, n = one_round(name, seed=rnd)
                per_token[name].append(seconds / max(n, 1) * 1e3)
                tokens[name].append(n)

    print(f"model {model_name}, {args.prompts} prompts × G {args.generations} × {max_new} new tokens, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds per variant")
    print(f"{'variant':<8}{'ms/token (med)':>16}{'min':>8}{'tokens (med)':>14}{'vs plain':>10}")
    base = statistics.median(per_token["plain"]) if "plain" in per_token else None
    summary = {}
    for name in names:
        med = statistics.median(per_token[name])
        summary[name] = {"ms_per_token_median": med, "ms_per_token_min": min(per_token[name]),
                         "tokens_median": statistics.median(tokens[name]), "ms_per_token": per_token[name]}
        ratio = f"{base / med:.2f}×" if base else "-"
        print(f"{name:<8}{med:>16.3f}{min(per_token[name]):>8.3f}{statistics.median(tokens[name]):>14.0f}{ratio:>10}")
    print(json.dumps({"model": model_name, "prompts": args.prompts, "generations": args.generations,
                      "max_new_tokens": max_new, "rounds": args.rounds, "summary": summary}))


if __name__ == "__main__":
    main()
