"""Memory planner: the expected per-device memory of a run, from the model's `config.json` alone.

`groupwise plan CONFIG` prints it; `Trainer` refuses a config that cannot fit before any weight is
loaded (`model.check_memory`). Nothing here reads weights: the model is built on the `meta` device
(shapes only), so parameter counts — and LoRA adapter counts — are exact and cost milliseconds.

The estimate is an upper-bound-minded sketch, not a profiler. What each term assumes:

* parameters: Σ numel of the meta-built model (tied embeddings counted once) × bytes of `model.dtype`.
* reference: a second frozen copy of the same size when `algorithm.kl.coef > 0` and LoRA is off
  (with LoRA the reference is the base model with the adapter disabled: no copy).
* gradients: trainable × bytes of the trainable dtype (full fine-tuning: `model.dtype`; LoRA:
  float32, as peft keeps adapters in float32). Gradients stay allocated between steps
  (`zero_grad(set_to_none=True)` runs at the start of the next update), so they coexist with generation.
* optimizer: AdamW's two moments, 2 × trainable × bytes of the trainable dtype (8 bytes per
  trainable parameter in float32).
* activations: one micro-batch of `rows` completions (`optimizer.micro_batch_size`, else the whole
  mini-batch), each `P + C` tokens (P: prompt length estimate, C: `rollout.max_new_tokens`; with
  `model.shared_prefix` a group's prompt counts once). Per token and decoder layer we count the
  tensors autograd saves in a Llama-style block with SDPA attention (no `[T, T]` scores):
  E = 4·hidden (two norm inputs and outputs) + 2·q_dim (queries, attention output) + 2·kv_dim
  (keys, values) + 4·intermediate (gate, up, act(gate), act(gate)·up), in `model.dtype` bytes.
  (For a GPT block with intermediate = 4·hidden this is 24·hidden elements, a little above
  Megatron's 17·hidden of Korthikanti et al. 2022, which shares some of these buffers.)
  Without checkpointing: tokens · layers · E. With `model.gradient_checkpointing` only each
  layer's input is kept, plus one layer recomputed at a time: tokens · (layers · hidden + E).
  Plus 2·hidden per token for the final norm and the last hidden state.
* logits: `groupwise.model.logprobs` never materializes `[N, T, vocab]`: the head runs on the M =
  rows · C completion positions in chunks of 512 rows and recomputes them in backward, where two
  float32 `[chunk, vocab]` buffers are alive (log p in place of the logits, then p, turned into the
  logits' gradient in place). So: the M gathered hidden states (model dtype) + 2 · min(512, M) · vocab · 4 bytes
  (+ M · vocab · 4 when that fits `model.keep_head_probs_mb`: the softmax kept for the backward pass) (+ a float32 `[vocab, hidden]`
  accumulator for the head's gradient under full fine-tuning).
* kv_cache: sequences decoded at once (`rollout.scheduling.concurrent_sequences` over one round's
  completions, bounded by `rollout.max_concurrent_sequences` / `rollout.kv_cache_budget_mb`) ×
  (P + C) × `kv_bytes_per_token` (keys and values of every layer, in `model.dtype`).

* packed: CPU float32 decoding with `rollout.packed_matmul` or `rollout.fast_decode` holds oneDNN-prepacked copies of the weights
  during generation (about their size in touched memory).

Generation and the update do not overlap in time, so the peak is
parameters + reference + gradients + optimizer + max(activations + logits, kv_cache + packed).

P is `data.max_prompt_length` when set, else 16 tokens for the built-in arithmetic task (its prompts
are under 12 tokens), else 256 tokens; `MemoryPlan.prompt_length_source` says which.

The device's memory: `device_bytes` when given; else the environment variable
`GROUPWISE_DEVICE_MEMORY_BYTES` (an integer number of bytes: for tests and for planning another
machine); else the CUDA device's total memory when the run uses CUDA; else the machine's available
RAM (psutil, or `os.sysconf`).

Several processes (torchrun, `world_size` > 1): each rank decodes and trains on its share of the
rows (completions / world_size). Under `distributed.strategy: fsdp2` parameters, gradients and
optimizer states are divided by `world_size`, and generation and the no-grad passes hold the
parameters whole again (`gathered_parameters`), so the generation phase adds one full copy; under
ddp every rank holds everything. The reference model is sharded the same way and gathered only
for its own no-grad pass (never at the same time as the policy), so it adds no gathered term.

`rollout.backend: vllm`: the engine holds its own copy of the weights and its KV cache. On CUDA
it takes `rollout.vllm.gpu_memory_utilization` × the device's memory; on the CPU the weights
plus `rollout.vllm.kv_cache_gb`. With sleep mode (CUDA and `rollout.vllm.sleep_mode`) it frees
that during the update, so it counts in the generation phase only (in place of our KV cache);
otherwise it stays through the update (the `engine` term).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from groupwise.config import Config
from groupwise.model.loading import ModelLoadError, resolve_device, resolve_model_path
from groupwise.rollout.scheduling import concurrent_sequences, kv_bytes_per_token, text_config

DEVICE_MEMORY_ENV = "GROUPWISE_DEVICE_MEMORY_BYTES"
BUILTIN_PROMPT_TOKENS = 16
DEFAULT_PROMPT_TOKENS = 256
LOGPROB_CHUNK_ROWS = 512           # `completion_logprobs`' default chunk_rows
LOGIT_BUFFERS = 2                  # float32 [chunk, vocab] tensors alive in ChunkedHeadLogprob (log p, then p / its gradient)

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TERMS = ("parameters", "reference", "gradients", "optimizer", "activations", "logits", "kv_cache")


@dataclass
class MemoryPlan:
    """Expected bytes per device of each term, and whether their peak fits the device."""

    parameters: int
    reference: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    kv_cache: int
    device_bytes: int
    device_source: str
    num_parameters: int
    trainable_parameters: int
    rows_per_micro_batch: int
    tokens_per_sequence: int
    prompt_length: int
    prompt_length_source: str
    concurrent_sequences: int
    world_size: int = 1
    gathered_parameters: int = 0   # FSDP2: the whole parameters, held during generation
    engine: int = 0                # vLLM's memory when it is not freed during the update
    packed_weights: int = 0        # rollout.packed_matmul / fast_decode: oneDNN-prepacked copies of the weights, during generation
    knobs: dict[str, Any] = field(default_factory=dict)   # current values quoted by advice()

    def terms(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in TERMS}

    @property
    def total(self) -> int:
        """Peak: persistent state plus the larger of the update phase and the generation phase."""
        persistent = self.parameters + self.reference + self.gradients + self.optimizer + self.engine
        return persistent + max(self.activations + self.logits, self.kv_cache + self.gathered_parameters + self.packed_weights)

    @property
    def fits(self) -> bool:
        return self.total <= self.device_bytes

    def largest_term(self) -> str:
        return max(TERMS, key=lambda k: getattr(self, k))

    def advice(self) -> str:
        """One sentence: the shortfall, the largest term, and the config keys that shrink it."""
        k = self.knobs
        key = self.largest_term()
        if key == "parameters":
            fix = ("set model.dtype: bfloat16 (now float32) or use a smaller model (model.path)" if k["dtype"] == "float32"
                   else "use a smaller model (model.path)")
        elif key == "reference":
            fix = "set algorithm.kl.coef: 0 or use LoRA (model.lora.enabled), whose reference needs no second copy of the weights"
        elif key in ("gradients", "optimizer"):
            fix = (f"lower model.lora.r (now {k['lora_r']})" if k["lora"]
                   else "use LoRA (model.lora.enabled: true) to train an adapter instead of every weight")
        elif key in ("activations", "logits"):
            mb = k["micro_batch_size"]
            if mb is None or mb > 1:
                fix = f"lower optimizer.micro_batch_size (now {mb if mb is not None else f'unset, the whole mini-batch of {self.rows_per_micro_batch}'})"
                fix += "" if k["gradient_checkpointing"] else " or enable model.gradient_checkpointing"
            else:
                fix = ("enable model.gradient_checkpointing or lower rollout.max_new_tokens" if not k["gradient_checkpointing"]
                       else f"lower rollout.max_new_tokens (now {k['max_new_tokens']}) or data.max_prompt_length")
        else:
            fix = (f"set rollout.max_concurrent_sequences or rollout.kv_cache_budget_mb "
                   f"(now {self.concurrent_sequences} sequences decoded at once)")
        return (f"the run needs about {_fmt(self.total)} per device but {_fmt(self.device_bytes)} is available "
                f"({self.device_source}); the largest term is {key} ({_fmt(getattr(self, key))}): {fix}")


def _fmt(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def prompt_length_estimate(cfg: Config) -> tuple[int, str]:
    if cfg.data.max_prompt_length is not None:
        return cfg.data.max_prompt_length, "data.max_prompt_length"
    if cfg.data.train == "builtin:arithmetic":
        return BUILTIN_PROMPT_TOKENS, "built-in arithmetic task"
    return DEFAULT_PROMPT_TOKENS, f"default {DEFAULT_PROMPT_TOKENS} tokens (set data.max_prompt_length)"


def meta_model(cfg: Config) -> torch.nn.Module:
    """The configured causal LM built on the `meta` device: every shape, no storage, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(cfg.model.path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ModelLoadError(f"cannot read the model architecture in '{path}' to plan memory: {e}") from e


def lora_parameter_count(model: torch.nn.Module, target_modules: list[str] | str, r: int) -> int:
    """r · (in + out) per targeted linear, matched as peft does: a module whose name equals a target
    or ends with '.target'; 'all-linear' means every Linear (or GPT-2 Conv1D) but the output head."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()  # type: ignore[assignment]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            fan_in, fan_out = module.in_features, module.out_features
        elif Conv1D and isinstance(module, Conv1D):
            fan_in, fan_out = module.weight.shape
        else:
            continue
        if target_modules == "all-linear":
            chosen = module is not head
        else:
            chosen = any(name == t or name.endswith("." + t) for t in target_modules)
        if chosen:
            total += r * (fan_in + fan_out)
    return total


def _device_bytes(cfg: Config, device_bytes: int | None) -> tuple[int, str]:
    if device_bytes is not None:
        return int(device_bytes), "given"
    env = os.environ.get(DEVICE_MEMORY_ENV)
    if env:
        try:
            return int(float(env)), DEVICE_MEMORY_ENV
        except ValueError:
            raise ModelLoadError(f"{DEVICE_MEMORY_ENV} must be a number of bytes, got {env!r}") from None
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory), f"cuda:{index} total memory"
    try:
        import psutil

        return int(psutil.virtual_memory().available), "available RAM"
    except ImportError:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")), "available RAM"


def plan_memory(cfg: Config, *, device_bytes: int | None = None, world_size: int = 1) -> MemoryPlan:
    """Expected per-device memory of `cfg` (see the module docstring for what each term assumes)."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    model = meta_model(cfg)
    text = text_config(model.config)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.model.dtype]
    b = _DTYPE_BYTES[cfg.model.dtype]
    hidden, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden

    n_params = sum(p.numel() for p in model.parameters())
    lora = cfg.model.lora
    if lora.enabled:
        trainable, train_b = lora_parameter_count(model, lora.target_modules, lora.r), 4
    else:
        trainable, train_b = n_params, b

    parameters = n_params * b + (trainable * train_b if lora.enabled else 0)
    reference = n_params * b if cfg.algorithm.kl.coef > 0 and not lora.enabled else 0
    gradients = trainable * train_b
    optimizer = 2 * trainable * train_b

    # Update phase: one micro-batch.
    roll = cfg.rollout
    completions = cfg.completions_per_step + roll.prompts_per_step * cfg.guidance.replay.per_group
    completions = -(-completions // world_size)   # this rank's share
    mini = max(1, completions // cfg.algorithm.mini_batches)
    rows = min(cfg.optimizer.micro_batch_size or mini, mini)
    prompt_len, prompt_source = prompt_length_estimate(cfg)
    seq_len = prompt_len + roll.max_new_tokens
    if cfg.model.shared_prefix:
        tokens = math.ceil(rows / roll.num_generations) * prompt_len + rows * roll.max_new_tokens
    else:
        tokens = rows * seq_len
    per_layer = 4 * hidden + 2 * heads * head_dim + 2 * kv_heads * head_dim + 4 * intermediate
    kept = layers * hidden + per_layer if cfg.model.gradient_checkpointing else layers * per_layer
    activations = tokens * (kept + 2 * hidden) * b
    completion_tokens = rows * roll.max_new_tokens
    logits = completion_tokens * hidden * b + LOGIT_BUFFERS * min(LOGPROB_CHUNK_ROWS, completion_tokens) * vocab * 4
    if not lora.enabled:
        logits += vocab * hidden * 4
    if 0 < completion_tokens * vocab * 4 <= cfg.model.keep_head_probs_mb * 2**20:
        logits += completion_tokens * vocab * 4          # the head's softmax, kept for the backward pass

    # Generation phase: the KV cache of the sequences decoded at once.
    per_token = kv_bytes_per_token(model.config, dtype)
    slots = concurrent_sequences(completions, roll.max_concurrent_sequences, roll.kv_cache_budget_mb, per_token * seq_len)
    kv_cache = slots * seq_len * per_token

    dev_bytes, dev_source = _device_bytes(cfg, device_bytes)
    engine = 0
    if roll.backend == "vllm":
        on_cuda = resolve_device(cfg.device).type == "cuda"
        vllm_bytes = (int(roll.vllm.gpu_memory_utilization * dev_bytes) if on_cuda
                      else n_params * b + int(roll.vllm.kv_cache_gb * 2**30))
        if on_cuda and roll.vllm.sleep_mode:
            kv_cache = vllm_bytes          # freed for the update, back for generation
        else:
            kv_cache, engine = 0, vllm_bytes
    # CPU float32 decoding prepacks every linear layer's weight for oneDNN (about their size, touched):
    # rollout.packed_matmul, or rollout.fast_decode's own stacked copies.
    packed = n_params * b if (roll.backend == "hf" and (roll.packed_matmul or roll.fast_decode) and cfg.model.dtype == "float32"
                              and resolve_device(cfg.device).type == "cpu") else 0
    fsdp = world_size > 1 and cfg.distributed.strategy == "fsdp2"
    shard = (lambda n: -(-n // world_size)) if fsdp else (lambda n: n)  # noqa: E731 - ceil division
    return MemoryPlan(
        parameters=shard(parameters), reference=shard(reference), gradients=shard(gradients), optimizer=shard(optimizer),
        gathered_parameters=parameters - shard(parameters) if fsdp else 0, engine=engine, packed_weights=packed,
        activations=activations, logits=logits, kv_cache=kv_cache, device_bytes=dev_bytes, device_source=dev_source,
        num_parameters=n_params, trainable_parameters=trainable, rows_per_micro_batch=rows, tokens_per_sequence=seq_len,
        prompt_length=prompt_len, prompt_length_source=prompt_source, concurrent_sequences=slots, world_size=world_size,
        knobs={"backend": roll.backend, "dtype": cfg.model.dtype, "lora": lora.enabled, "lora_r": lora.r, "micro_batch_size": cfg.optimizer.micro_batch_size,
               "gradient_checkpointing": cfg.model.gradient_checkpointing, "max_new_tokens": roll.max_new_tokens},
    )


def format_plan(plan: MemoryPlan) -> str:
    """A small aligned table of the terms, the peak and the device, in MiB / GiB."""
    notes = {
        "parameters": f"{plan.num_parameters:,} params",
        "gradients": f"{plan.trainable_parameters:,} trainable",
        "optimizer": "AdamW, 2 moments",
        "activations": f"{plan.rows_per_micro_batch} rows x {plan.tokens_per_sequence} tokens",
        "logits": "chunked head",
        "kv_cache": (f"{plan.concurrent_sequences} sequences x {plan.tokens_per_sequence} tokens" if plan.knobs.get("backend") != "vllm"
                     else "vLLM (gpu_memory_utilization), freed during the update" if plan.kv_cache else "vLLM: see engine"),
    }
    width = max(len(k) for k in TERMS)
    lines = [f"{'term':<{width}}  {'memory':>11}  note"]
    for key, value in plan.terms().items():
        lines.append(f"{key:<{width}}  {_fmt(value):>11}  {notes.get(key, '')}".rstrip())
    if plan.engine:
        lines.append(f"{'engine':<{width}}  {_fmt(plan.engine):>11}  vLLM's weights + KV cache, kept through the update")
    if plan.gathered_parameters:
        lines.append(f"{'gathered':<{width}}  {_fmt(plan.gathered_parameters):>11}  FSDP2: the other ranks' parameter shards, during generation")
    if plan.packed_weights:
        lines.append(f"{'packed':<{width}}  {_fmt(plan.packed_weights):>11}  CPU decoding: oneDNN-prepacked weights (rollout.packed_matmul / fast_decode), during generation")
    gen = "kv_cache" + (" + gathered" if plan.gathered_parameters else "") + (" + packed" if plan.packed_weights else "")
    persistent = "params+ref+grads+optimizer" + ("+engine" if plan.engine else "")
    lines.append(f"{'peak':<{width}}  {_fmt(plan.total):>11}  {persistent}+max(activations+logits, {gen})")
    lines.append(f"{'device':<{width}}  {_fmt(plan.device_bytes):>11}  {plan.device_source}"
                 + (f", world_size {plan.world_size}" if plan.world_size > 1 else ""))
    lines.append(f"prompt length {plan.prompt_length} tokens ({plan.prompt_length_source}); "
                 + ("fits" if plan.fits else "does NOT fit"))
    return "\n".join(lines)


def check_memory_fits(cfg: Any, world_size: int = 1) -> None:
    """Raise ConfigError, naming what to change, when the config's expected peak exceeds the device."""
    from groupwise.config import ConfigError

    plan = plan_memory(cfg, world_size=world_size)
    if not plan.fits:
        raise ConfigError(f"{plan.advice()} (or set model.check_memory: false to skip this check)")
