"""Generation with a Hugging Face transformers model: KV-cached, continuously batched, seeded.

Our own decode loop over time steps (every step advances all active rows at once) so that it
returns exactly what RL needs — the sampling log-prob of every generated token under the
temperature-scaled distribution, and whether each completion finished (EOS) or was truncated.

Infinite Sampling (arXiv 2506.22950), see `rollout.scheduling`: at most `slots` sequences are
decoded at once; in "continuous" mode a finished sequence leaves the KV cache at once and a
pending one (from any group) is prefilled into the freed slot; in "micro_group" mode the next
sequences are admitted only when every slot is empty. Each sequence samples with its own
counter-based random numbers, so the completions do not depend on the schedule.

transformers' own continuous batching (`generate_batch`, paged attention) is not used: it draws
with `torch.multinomial` from the global generator over whatever requests share a batch, so a
sequence's tokens would depend on the schedule.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from groupwise.model.logprobs import position_ids_from_mask
from groupwise.model.packing import unsupported_reason
from groupwise.rollout.base import SamplingParams, group_sizes
from groupwise.rollout.fast_decode import LlamaFastDecoder, fast_decode_supported
from groupwise.rollout.packed_linear import packed_linears
from groupwise.rollout.scheduling import (
    LengthOrder, LengthPredictor, concurrent_sequences, kv_bytes_per_token, order_sequences, sequence_uniforms,
)
from groupwise.types import Prompt, RolloutBatch


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to −inf; the most likely token always stays."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p   # mass before this token already ≥ p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_categorical(probs: torch.Tensor, uniforms: torch.Tensor, block: int = 256) -> torch.Tensor:
    """One draw per row from the categorical `probs[N, V]`, by inverting its CDF at `uniforms[N]`.

        v = min{ v : Σ_{w≤v} p_w > u · Σ_w p_w },   u ~ U[0, 1)

    One uniform number per row, where torch.multinomial (and the exponential race) spend a random
    number per vocabulary entry: 28–31 ms per call for 32 rows × 49k vocab on 2 CPU cores, a fifth
    of a 135M model's decode step. The CDF is inverted in two levels, in float64: over the masses
    of blocks of `block` consecutive tokens (b = the first block whose cumulative mass exceeds
    u·Σp), then within block b at u·Σp − (mass before b). That is the same token as one cumulative
    sum over the vocabulary, without materialising it (1.2 ms for 32 × 49k in float64 on 2 cores).
    A zero-probability token (top-k/top-p filtered) leaves the CDF flat, so it is never drawn; when
    float rounding puts the target past the last token with mass, that token is drawn.
    """
    n, v = probs.shape
    blocks_n = -(-v // block)
    if blocks_n * block != v:
        probs = F.pad(probs, (0, blocks_n * block - v))
    blocks = probs.view(n, blocks_n, block)
    mass = blocks.sum(-1, dtype=torch.float64)                               # [N, blocks]
    cdf = mass.cumsum(-1)
    target = uniforms.to(device=probs.device, dtype=torch.float64).view(-1, 1) * cdf[:, -1:]
    b = torch.minimum(torch.searchsorted(cdf, target, right=True), _last_nonzero(mass))
    before = torch.where(b > 0, cdf.gather(-1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    inside = blocks.gather(1, b.view(n, 1, 1).expand(n, 1, block)).view(n, block)
    i = torch.minimum(torch.searchsorted(inside.double().cumsum(-1), target - before, right=True), _last_nonzero(inside))
    return (b * block + i).squeeze(-1)


def _last_nonzero(x: torch.Tensor) -> torch.Tensor:
    """`[N, 1]` index of each row's last positive entry (0 when there is none)."""
    index = torch.arange(x.shape[-1], device=x.device)
    return torch.where(x > 0, index, 0).amax(-1, keepdim=True)


def _eos_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return sorted(ids)


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


class HFRolloutEngine:
    """Generates with the training model itself (colocated, no weight copies).

    `max_concurrent_sequences` / `kv_cache_budget_mb` bound the sequences decoded at once;
    `scheduling` is "continuous" (refill freed slots at once) or "micro_group" (admit the next
    micro-group when all slots are empty); `length_order` sorts the pending queue by each
    prompt's predicted completion length (the mean of its earlier completions);
    `packed_matmul` decodes through oneDNN-prepacked weights (`rollout.packed_linear`) where available;
    `fast_decode` runs the decode steps of a plain Llama or Qwen2 model through `rollout.fast_decode` (fewer,
    larger operations) where available.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_concurrent_sequences: int | None = None,
        kv_cache_budget_mb: float | None = None,
        scheduling: str = "continuous",
        length_order: LengthOrder = "none",
        max_prompt_length: int | None = None,
        packed_matmul: bool = False,
        fast_decode: bool = False,
    ):
        if scheduling not in ("continuous", "micro_group"):
            raise ValueError(f"HFRolloutEngine: scheduling must be 'continuous' or 'micro_group', not {scheduling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_concurrent_sequences = max_concurrent_sequences
        self.kv_cache_budget_mb = kv_cache_budget_mb
        self.scheduling = scheduling
        self.length_order = length_order
        self.max_prompt_length = max_prompt_length
        self.packed_matmul = packed_matmul
        self.fast_decode = fast_decode
        self._fast: LlamaFastDecoder | None = None   # set for one generate call
        self.lengths = LengthPredictor(default=0.0)
        self._use_slots: bool | None = None       # decided on first use (slot KV cache, else DynamicCache)
        self._row_offset = 0                      # set by generate: this call's first row in the whole batch
        self.last_stats: dict[str, float] = {}
        self.pad_id = int(tokenizer.pad_token_id)
        self.eos_ids = _eos_ids(model, tokenizer)
        if not self.eos_ids:
            raise ValueError("the tokenizer and the model's generation_config define no eos token: completions could never finish")

    # The engine decodes with the trainer's own module: nothing to push, nothing to free.
    def sync_weights(self, model: torch.nn.Module) -> None:
        """No-op: generation uses the trained module itself."""

    def sleep(self) -> None:
        """No-op (the vLLM engine frees its memory during the update)."""

    def wake_up(self) -> None:
        """No-op."""

    def tokenize_prompts(self, prompt_texts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(prompt_texts, add_special_tokens=True)["input_ids"]
        if self.max_prompt_length is not None:
            ids = [r[-self.max_prompt_length:] for r in ids]   # left-truncate, keep the question's end
        return ids

    def slots_for(self, rows: list[list[int]], max_new_tokens: int) -> int:
        param = next(self.model.parameters())
        per_token = kv_bytes_per_token(self.model.config, param.dtype)
        longest = max(len(r) for r in rows) + max_new_tokens
        return concurrent_sequences(len(rows), self.max_concurrent_sequences, self.kv_cache_budget_mb, per_token * longest)

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
        """`row_offset`: the first row's index in the whole batch when this call generates one
        rank's share of it; row i samples with the random numbers of row `row_offset + i`, so a
        batch split over ranks gets exactly the completions one process would."""
        device = next(self.model.parameters()).device
        self._row_offset = int(row_offset)
        sizes = group_sizes(num_generations, len(prompts))
        prompt_rows = self.tokenize_prompts(prompt_texts)
        rows = [r for r, g in zip(prompt_rows, sizes) for _ in range(g)]
        group_id = torch.arange(len(prompts)).repeat_interleave(torch.tensor(sizes, dtype=torch.long))
        keys = [p.index if p.index >= 0 else text for p, text in zip(prompts, prompt_texts)]
        row_keys = [k for k, g in zip(keys, sizes) for _ in range(g)]
        slots = self.slots_for(rows, params.max_new_tokens)
        order = order_sequences([self.lengths.predict(k) for k in row_keys], self.length_order, slots)

        was_training = self.model.training
        self.model.eval()
        try:
            rows_at_once = min(slots, len(rows))
            if self.fast_decode and self._slots_supported() and fast_decode_supported(self.model):
                self._fast = LlamaFastDecoder(self.model, rows_at_once)   # its own prepacked weights: prefill runs plain
            with nullcontext() if self._fast is not None else packed_linears(self.model, rows_at_once if self.packed_matmul else 0):
                ids, lengths, logprobs, finished = self._decode(rows, order, params, seed, slots, device)
        finally:
            self._fast = None
            self.model.train(was_training)
        self.lengths.update(row_keys, lengths.tolist())

        width = max(int(lengths.max()), 1)
        completion_mask = (torch.arange(width, device=device) < lengths[:, None]).long()
        completion_ids = ids[:, :width].masked_fill(completion_mask == 0, self.pad_id)
        prompt_ids, prompt_mask = _left_pad(rows, self.pad_id, device)
        texts = self.tokenizer.batch_decode(
            [r[: int(n)] for r, n in zip(completion_ids.tolist(), lengths.tolist())], skip_special_tokens=True,
        )
        return RolloutBatch(
            prompts=list(prompts),
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            sampling_logprobs=logprobs[:, :width] * completion_mask,
            group_id=group_id.to(device),
            finished=finished,
            completions_text=texts,
        )

    def _prefill(self, prompts: list[list[int]], device: torch.device):
        from transformers import DynamicCache

        input_ids, attn = _left_pad(prompts, self.pad_id, device)
        positions = position_ids_from_mask(attn)
        out = self.model(
            input_ids=input_ids, attention_mask=attn, position_ids=positions,
            past_key_values=DynamicCache(config=self.model.config), use_cache=True, logits_to_keep=1,
        )
        return out.past_key_values, attn, out.logits[:, -1]

    def _slots_supported(self) -> bool:
        if self._use_slots is None:
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            self._use_slots = unsupported_reason(type(base), base.config) is None
        return self._use_slots

    def _decode(self, rows, order, params: SamplingParams, seed: int, slots: int, device: torch.device):
        """Decode with the slot KV cache when the model's attention allows it, else with DynamicCache."""
        if self._slots_supported():
            return self._decode_slots(rows, order, params, seed, slots, device)
        return self._decode_dynamic(rows, order, params, seed, slots, device)

    def _sample(self, logits: torch.Tensor, params: SamplingParams, seed: int, seqs: torch.Tensor, steps: torch.Tensor):
        """The next tokens and their log-probabilities under the temperature-scaled, unfiltered distribution."""
        scaled = logits.float() if params.temperature == 1.0 else logits.float() / params.temperature
        filtered = params.top_k or params.top_p < 1.0
        if params.greedy or filtered:
            logp_all = torch.log_softmax(scaled, dim=-1)
            if params.greedy:
                nxt = scaled.argmax(-1)
            else:
                probs = torch.softmax(filter_top_k_top_p(scaled, params.top_k, params.top_p), dim=-1)
                nxt = sample_categorical(probs, sequence_uniforms(seed, seqs + self._row_offset, steps))
            return nxt, logp_all.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
        # Unfiltered: one softmax serves both; a drawn token has p > 0, so its log is finite.
        probs = torch.softmax(scaled, dim=-1)
        nxt = sample_categorical(probs, sequence_uniforms(seed, seqs + self._row_offset, steps))
        return nxt, probs.gather(-1, nxt.unsqueeze(-1)).squeeze(-1).log()

    def _prefill_slots(self, prompts: list[list[int]], device: torch.device):
        """Prefill distinct prompts as one packed row (`model.packing`'s shared-prefix layout: no
        padding, and a prefix all of them share, such as a chat template's system prompt, encoded
        once): their keys/values `[layers, B, kv_heads, P, D]` (slots past a prompt's own length
        are filler) and the logits after each prompt's last token."""
        from groupwise.model.logprobs import decoder_and_head
        from groupwise.model.packing import build_layout, packed_hidden_states

        b = len(prompts)
        ids, attn = _left_pad(prompts, self.pad_id, device)
        layout = build_layout(ids, attn, 0, torch.arange(b, device=device), share_prefix=True)
        decoder, head = decoder_and_head(self.model)
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        hidden = packed_hidden_states(decoder, layout, kv_sink=kv)
        rows = torch.arange(b, device=device)
        logits = head(hidden[layout.block_index[rows, layout.block_valid.sum(1) - 1]])
        root = layout.root_len   # prompt j's tokens: the root, then its block
        index = torch.cat([torch.arange(root, device=device).expand(b, root), layout.block_index], dim=1)
        keys = torch.stack([k[0][:, index] for k, _ in kv]).transpose(1, 2)        # [layers, B, kv, P, D]
        values = torch.stack([v[0][:, index] for _, v in kv]).transpose(1, 2)
        return keys, values, logits

    def _decode_slots(self, rows, order, params: SamplingParams, seed: int, slots: int, device: torch.device):
        """The continuous-batching loop over a `SlotKVCache`; same contract as `_decode_dynamic`."""
        from groupwise.rollout.slot_cache import SlotKVCache, slot_forward
        from groupwise.rollout.scheduling import text_config

        n, max_new = len(rows), params.max_new_tokens
        cfg = text_config(self.model.config)
        param = next(self.model.parameters())
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        capacity = max(len(r) for r in rows) + max_new
        cache = SlotKVCache(cfg.num_hidden_layers, slots, capacity, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
                            head_dim, param.dtype, device)
        eos = torch.tensor(self.eos_ids, device=device)
        ids = torch.full((n, max_new), self.pad_id, dtype=torch.long, device=device)
        logps = torch.zeros(n, max_new, dtype=torch.float32, device=device)
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        slot_seq = torch.zeros(slots, dtype=torch.long, device=device)     # the sequence in each slot
        logits = torch.zeros(0, device=device)
        pending = list(reversed(order))
        remaining: dict[tuple[int, ...], int] = {}
        for r in rows:
            remaining[tuple(r)] = remaining.get(tuple(r), 0) + 1
        prompt_kv: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        refill_at = 1                               # an admission copies only the prompt's KV into the freed slot
        steps = admissions = prefills = busy = 0
        while pending or cache.active:
            free = slots - cache.active
            if pending and (cache.active == 0 or (self.scheduling == "continuous" and free >= min(refill_at, len(pending)))):
                new = [pending.pop() for _ in range(min(free, len(pending)))]
                missing = list(dict.fromkeys(tuple(rows[i]) for i in new if tuple(rows[i]) not in prompt_kv))
                if missing:                       # prefix caching: each prompt is prefilled once per call
                    k, v, lg = self._prefill_slots([list(m) for m in missing], device)
                    for j, m in enumerate(missing):
                        prompt_kv[m] = (k[:, j, :, : len(m)], v[:, j, :, : len(m)], lg[j])
                    prefills += 1
                new_logits = []
                for i in new:
                    key = tuple(rows[i])
                    pk, pv, lg = prompt_kv[key]
                    cache.put(cache.active, pk, pv)
                    slot_seq[cache.active] = i
                    cache.active += 1
                    new_logits.append(lg)
                    remaining[key] -= 1
                    if remaining[key] == 0:
                        del prompt_kv[key]
                logits = torch.cat([logits.view(-1, new_logits[0].shape[-1]), torch.stack(new_logits)])
                admissions += 1
            r = cache.active
            seqs = slot_seq[:r]
            t = lengths[seqs]
            nxt, lp = self._sample(logits, params, seed, seqs, t)
            ids[seqs, t] = nxt
            logps[seqs, t] = lp
            lengths[seqs] = t + 1
            hit_eos = torch.isin(nxt, eos)
            finished[seqs] = hit_eos
            done = hit_eos | (t + 1 >= max_new)
            steps += 1
            busy += r
            if bool(done.any()):
                for s in sorted(done.nonzero().squeeze(-1).tolist(), reverse=True):   # refill a freed slot from the last
                    last = cache.active - 1
                    if s != last:
                        cache.move(last, s)
                        slot_seq[s] = slot_seq[last]
                        nxt[s] = nxt[last]
                    cache.active -= 1
                nxt = nxt[: cache.active]
            if cache.active == 0:
                logits = torch.zeros(0, device=device)
                continue
            cache.begin_decode()
            pos = cache.lens[: cache.active].clone()
            if self._fast is not None:
                logits = self._fast.step(nxt, pos, cache)
            else:
                logits = slot_forward(self.model, nxt.unsqueeze(-1), pos.unsqueeze(-1), cache, torch.zeros_like(pos))
            cache.lens[: cache.active] += 1
        self.last_stats = {"decode_steps": float(steps), "slots": float(slots), "admissions": float(admissions),
                           "prefill_calls": float(prefills), "slot_utilization": busy / max(steps * slots, 1)}
        return ids, lengths, logps, finished

    def _decode_dynamic(self, rows: list[list[int]], order: list[int], params: SamplingParams, seed: int, slots: int, device: torch.device):
        """Decode every row (admitted in `order`, at most `slots` at once) to EOS or max_new_tokens.

        Returns `(ids[N, max_new], lengths[N], logprobs[N, max_new], finished[N])` in row order.
        """
        n, max_new = len(rows), params.max_new_tokens
        eos = torch.tensor(self.eos_ids, device=device)
        ids = torch.full((n, max_new), self.pad_id, dtype=torch.long, device=device)
        logps = torch.zeros(n, max_new, dtype=torch.float32, device=device)
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        finished = torch.zeros(n, dtype=torch.bool, device=device)
        pending = list(reversed(order))             # pop() from the end = next in order
        prompts = _PromptCache(self, [rows[i] for i in order], device)
        refill_at = max(1, slots // 8)              # admit in small batches: each admission copies the cache once
        active = torch.zeros(0, dtype=torch.long, device=device)   # row of each cache slot
        cache = attn = next_pos = logits = None
        steps = admitted_rounds = 0
        busy_slot_steps = 0
        while pending or active.numel():
            free = slots - active.numel()
            if pending and (active.numel() == 0 or (self.scheduling == "continuous" and free >= min(refill_at, len(pending)))):
                new = [pending.pop() for _ in range(min(free, len(pending)))]
                kv, a, p, lg = prompts.admit([rows[i] for i in new])
                cache, attn = _merge_caches(self.model.config, cache, attn, kv, a)
                next_pos = p if next_pos is None else torch.cat([next_pos, p])
                logits = lg if logits is None else torch.cat([logits, lg])
                active = torch.cat([active, torch.tensor(new, dtype=torch.long, device=device)])
                admitted_rounds += 1
            t = lengths[active]
            nxt, lp = self._sample(logits, params, seed, active, t)
            ids[active, t] = nxt
            logps[active, t] = lp
            lengths[active] = t + 1
            hit_eos = torch.isin(nxt, eos)
            finished[active] = hit_eos
            done = hit_eos | (t + 1 >= max_new)
            steps += 1
            busy_slot_steps += active.numel()
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(-1)
                active, nxt, next_pos, attn = active[keep], nxt[keep], next_pos[keep], attn[keep]
                cache = _select_rows(cache, keep) if active.numel() else None
                if active.numel():
                    cache, attn = _trim_left(cache, attn)
                else:
                    attn = next_pos = logits = None
                    continue
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            out = self.model(
                input_ids=nxt.unsqueeze(-1), attention_mask=attn, position_ids=next_pos.unsqueeze(-1),
                past_key_values=cache, use_cache=True,
            )
            cache, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
        self.last_stats = {"decode_steps": float(steps), "slots": float(slots), "admissions": float(admitted_rounds),
                           "prefill_calls": float(prompts.prefill_calls),
                           "slot_utilization": busy_slot_steps / max(steps * slots, 1)}
        return ids, lengths, logps, finished


def _cache_layers(cache):
    for layer in cache.layers:
        if type(layer).__name__ != "DynamicLayer":
            raise ValueError(f"continuous sampling needs plain dynamic KV-cache layers, not {type(layer).__name__}; "
                             f"set rollout.scheduling: micro_group")
    return cache.layers


def _select_rows(cache, rows: torch.Tensor):
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[rows], layer.values[rows]
    return cache


def _trim_left(cache, attn: torch.Tensor):
    """Drop the leading cache columns that no remaining row attends to (they were another row's)."""
    used = attn.bool().any(0)
    first = int(used.nonzero()[0]) if bool(used.any()) else 0
    if first == 0 or any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
        return cache, attn
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    return cache, attn[:, first:]


def _merge_caches(config, cache, attn_a, new_kv: list[tuple[torch.Tensor, torch.Tensor]], attn_b):
    """Stack new rows' per-layer (keys, values) under a KV cache, left-padding the shorter in time."""
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
        for i, (k, v) in enumerate(new_kv):
            cache.update(k, v, i)
        return cache, attn_b
    ta, tb = attn_a.shape[1], attn_b.shape[1]
    width = max(ta, tb)

    def pad(x: torch.Tensor, t: int) -> torch.Tensor:   # [B, H, T, D]: zeros on the left of time
        return torch.nn.functional.pad(x, (0, 0, width - t, 0)) if t < width else x

    for layer, (k, v) in zip(_cache_layers(cache), new_kv):
        layer.keys = torch.cat([pad(layer.keys, ta), pad(k, tb)])
        layer.values = torch.cat([pad(layer.values, ta), pad(v, tb)])
    attn = torch.cat([
        torch.nn.functional.pad(attn_a, (width - ta, 0)),
        torch.nn.functional.pad(attn_b, (width - tb, 0)),
    ])
    return cache, attn


class _PromptCache:
    """Prefix caching within one generate call: each distinct prompt is prefilled once, and the G
    sequences of a group start from copies of its KV cache and first-token logits."""

    def __init__(self, engine: HFRolloutEngine, rows_in_order: list[list[int]], device: torch.device):
        self.engine, self.device = engine, device
        self.remaining: dict[tuple[int, ...], int] = {}
        for r in rows_in_order:
            self.remaining[tuple(r)] = self.remaining.get(tuple(r), 0) + 1
        self.entries: dict[tuple[int, ...], tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]] = {}
        self.prefill_calls = 0

    def admit(self, prompts: list[list[int]]):
        """(per-layer (keys, values) [n, H, P, D], attention mask [n, P], next positions [n], logits [n, V])."""
        keys = [tuple(p) for p in prompts]
        missing = list(dict.fromkeys(k for k in keys if k not in self.entries))
        if missing:
            cache, attn, logits = self.engine._prefill([list(k) for k in missing], self.device)
            lengths = attn.sum(1).tolist()
            for i, (k, n) in enumerate(zip(missing, lengths)):
                self.entries[k] = ([(layer.keys[i : i + 1, :, -n:], layer.values[i : i + 1, :, -n:]) for layer in cache.layers], logits[i])
            self.prefill_calls += 1
        width = max(len(k) for k in keys)
        per_layer = []
        for li in range(len(self.entries[keys[0]][0])):
            ks = [torch.nn.functional.pad(self.entries[k][0][li][0], (0, 0, width - len(k), 0)) for k in keys]
            vs = [torch.nn.functional.pad(self.entries[k][0][li][1], (0, 0, width - len(k), 0)) for k in keys]
            per_layer.append((torch.cat(ks), torch.cat(vs)))
        lengths = torch.tensor([len(k) for k in keys], device=self.device)
        attn = (torch.arange(width, device=self.device) >= width - lengths[:, None]).long()
        logits = torch.stack([self.entries[k][1] for k in keys])
        for k in keys:                       # free a prompt's cache once its last sequence is admitted
            self.remaining[k] -= 1
            if self.remaining[k] == 0:
                del self.entries[k]
        return per_layer, attn, lengths, logits
