"""Build the built-in tokenizer and warm-started model that `groupwise train` uses by default.

    python scripts/build_builtin_model.py            # writes src/groupwise/assets/builtin/

Steps:
1. A character-level tokenizer (`<pad>`, `<bos>`, `<eos>`, then printable ASCII), saved as a
   `PreTrainedTokenizerFast` that prepends `<bos>` and decodes by plain concatenation.
2. A tiny `LlamaForCausalLM` (fp32, tied embeddings).
3. A short supervised warm start on `train_split` rows (loss on the answer and `<eos>` only),
   evaluated every `--eval-every` steps by greedy accuracy on a development set drawn from the
   training distribution; it stops at the first evaluation inside the target window, so the
   model starts reinforcement learning partly trained.
4. Held-out greedy accuracy, mean@8 and pass@8 (temperature 1.0) are printed and written to
   `builtin_model_card.json` beside the weights.

Deterministic for a given machine and thread count (`torch.manual_seed`, `random.Random`).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from groupwise.data.arithmetic import (  # noqa: E402
    BUILTIN_MODEL_DIR,
    __doc__ as TASK_DOC,
    heldout_split,
    is_correct,
    train_split,
)

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MAX_NEW_TOKENS = 8
DEV_SEED = 1_000_003  # the development set that decides when to stop, drawn like training data


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: specials at ids 0..2, then ' '..'~'; other characters are dropped."""
    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    # BPE with no merges splits text into single characters; Fuse joins them back without spaces.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS_ID)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
        model_max_length=64,
    )
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [PAD_ID, BOS_ID, EOS_ID]
    return tokenizer


def _portable_tokenizer_class(out: Path) -> None:
    """Name the class `PreTrainedTokenizerFast`, which transformers 4.x and 5.x both load."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")


# --------------------------------------------------------------------------- model
def build_config(vocab_size: int, args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        torch_dtype="float32",
    )


# --------------------------------------------------------------------------- data
def encode_sft_batch(tokenizer: PreTrainedTokenizerFast, rows: list[dict]) -> tuple[torch.Tensor, ...]:
    """`<bos> prompt answer <eos>` right-padded; labels are -100 except on answer and `<eos>`."""
    prompts = tokenizer([r["prompt"] for r in rows])["input_ids"]
    answers = tokenizer([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]
    length = max(len(p) + len(a) + 1 for p, a in zip(prompts, answers))
    input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        seq = p + a + [EOS_ID]
        input_ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, len(p) : len(seq)] = torch.tensor(a + [EOS_ID])
    return input_ids, (input_ids != PAD_ID).long(), labels


def encode_prompts(tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `<bos> prompt` ids and attention mask."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    tokenizer.padding_side = "right"
    return enc["input_ids"], enc["attention_mask"]


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def generate(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Batched decoding with a KV cache (temperature 0 = greedy).

    Returns [B, T] new ids with T <= MAX_NEW_TOKENS (it stops once every row has emitted EOS),
    PAD after each row's EOS.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    next_pos = position_ids[:, -1:] + 1
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
    tokens = []
    for _ in range(MAX_NEW_TOKENS):
        if temperature == 0.0:
            tok = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / temperature, -1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tok = torch.where(done, torch.full_like(tok, PAD_ID), tok)
        tokens.append(tok)
        done |= tok == EOS_ID
        if done.all():
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], -1)
        out = model(
            input_ids=tok[:, None], attention_mask=attention_mask, position_ids=next_pos,
            past_key_values=past, use_cache=True,
        )
        past, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
    return torch.stack(tokens, -1)


def correctness(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    rows: list[dict],
    samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """[len(rows), samples] bool: completion j for row i is correct (text up to `<eos>`)."""
    model.eval()
    input_ids, attention_mask = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    input_ids = input_ids.repeat_interleave(samples, 0)
    attention_mask = attention_mask.repeat_interleave(samples, 0)
    generator = torch.Generator().manual_seed(seed)
    completions = generate(model, input_ids, attention_mask, temperature, generator)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    answers = [r["answer"] for r in rows for _ in range(samples)]
    ok = torch.tensor([is_correct(t, a) for t, a in zip(texts, answers)])
    return ok.view(len(rows), samples)


def report(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, rows: list[dict]) -> dict:
    """Greedy accuracy, and mean@8 / pass@8 of temperature-1.0 sampling."""
    greedy = correctness(model, tokenizer, rows).float().mean().item()
    sampled = correctness(model, tokenizer, rows, samples=8, temperature=1.0, seed=1234)
    return {
        "greedy_accuracy": round(greedy, 4),
        "mean_at_8": round(sampled.float().mean().item(), 4),
        "pass_at_8": round(sampled.any(-1).float().mean().item(), 4),
    }


# --------------------------------------------------------------------------- training
def warm_start(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace
) -> tuple[int, float]:
    """Supervised training until dev greedy accuracy first lands in [target_low, target_high].

    Returns the number of steps taken and the dev accuracy at the stop.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = 50
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    dev = train_split(DEV_SEED, args.dev_size)
    rows = train_split(args.seed, args.max_steps * args.batch_size)
    acc = 0.0
    for step in range(1, args.max_steps + 1):
        model.train()
        batch = rows[(step - 1) * args.batch_size : step * args.batch_size]
        input_ids, attention_mask, labels = encode_sft_batch(tokenizer, batch)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0:
            acc = correctness(model, tokenizer, dev).sum().item() / len(dev)
            line = f"step {step:5d}  loss {loss.item():.4f}  dev greedy {acc:.3f}"
            if args.verbose:
                line += f"  heldout {report(model, tokenizer, heldout_split())}"
            print(line, flush=True)
            if args.target_low <= acc <= args.target_high and not args.explore:
                return step, acc
    if args.explore:
        return args.max_steps, acc
    raise SystemExit(f"dev accuracy never reached [{args.target_low}, {args.target_high}] in {args.max_steps} steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BUILTIN_MODEL_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=5000)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--dev-size", type=int, default=500)
    parser.add_argument("--target-low", type=float, default=0.25)
    parser.add_argument("--target-high", type=float, default=0.35)
    parser.add_argument("--explore", action="store_true", help="train max-steps, do not stop or save")
    parser.add_argument("--verbose", action="store_true", help="also report held-out numbers at each evaluation")
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    config = build_config(len(tokenizer), args)
    model = LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}")

    start = time.perf_counter()
    steps, dev_accuracy = warm_start(model, tokenizer, args)
    wall = time.perf_counter() - start
    metrics = report(model, tokenizer, heldout_split())
    print(f"SFT steps: {steps}  wall time: {wall:.1f}s")
    print(f"held-out greedy accuracy {metrics['greedy_accuracy']:.3f}  "
          f"mean@8 {metrics['mean_at_8']:.3f}  pass@8 {metrics['pass_at_8']:.3f}  (temperature 1.0)")
    if args.explore:
        return

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, max_new_tokens=MAX_NEW_TOKENS
    )
    model.save_pretrained(out, safe_serialization=True)
    (out / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the package ships it
    tokenizer.save_pretrained(out)
    _portable_tokenizer_class(out)
    card = {
        "task": TASK_DOC.strip().splitlines()[0],
        "task_description": TASK_DOC.strip(),
        "heldout_size": len(heldout_split()),
        **metrics,
        "sampling": {"temperature": 1.0, "samples_per_prompt": 8, "max_new_tokens": MAX_NEW_TOKENS},
        "sft": {
            "steps": steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "warmup_steps": 50, "optimizer": "AdamW(betas=(0.9, 0.98), weight_decay=0.01)",
            "stop_rule": f"first dev greedy accuracy in [{args.target_low}, {args.target_high}], "
                         f"checked every {args.eval_every} steps on {args.dev_size} dev problems",
            "dev_greedy_accuracy_at_stop": round(dev_accuracy, 4),
            "wall_time_s": round(wall, 1),
        },
        "parameters": n_params,
        "config": config.to_diff_dict(),
        "command": " ".join(["python", "scripts/build_builtin_model.py", *map(shlex.quote, sys.argv[1:])]),
    }
    (out / "builtin_model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
