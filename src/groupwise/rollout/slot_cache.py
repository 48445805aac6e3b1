"""A preallocated, slot-indexed KV cache for continuous batching, read by a custom attention function.

transformers' DynamicCache grows by `torch.cat` at every decode step, copying the whole cache
each time, and refilling a row means padding and re-stacking it. Here each layer's keys and
values live in one tensor `[slots, kv_heads, capacity, head_dim]` allocated once (its size is the
KV budget). Slot r holds its sequence left-aligned: tokens 0 … lens[r]−1, positions equal to
indices. A decode step writes each slot's new key/value at index lens[r] and attends over
`[:, :, :width]` (a view, no copy) with the mask j ≤ lens[r]. The active slots are always the first
R (a finished slot is refilled from the last one), so the batch never carries idle rows.

The attention itself is two batched products and a softmax over `[R · kv_heads]` small matrices,
with the step's additive mask built once for all layers instead of a boolean mask converted by
`scaled_dot_product_attention` in every layer. `python benchmarks/decode.py --attention`
(SmolLM2-135M's shapes, 32 rows, 40–100 cached tokens, 2-core CPU) measured it 0–25% faster
than SDPA, in 8 of 9 width × run measurements: a small gain on a decode step; most of either is
per-matrix overhead of the tiny products.

The attention function is registered with transformers' AttentionInterface, so it works for the
models `groupwise.model.packing.unsupported_reason` accepts (the same conditions).
"""
from __future__ import annotations

import torch

from groupwise.model.logprobs import decoder_and_head
from groupwise.model.packing import _attention_implementation

ATTENTION_NAME = "groupwise_slots"


class SlotKVCache:
    def __init__(self, num_layers: int, slots: int, capacity: int, kv_heads: int, head_dim: int, dtype, device):
        shape = (num_layers, slots, kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lens = torch.zeros(slots, dtype=torch.long, device=device)
        self.active = 0                      # slots 0 … active−1 are in use
        self._bias: torch.Tensor | None = None   # [active, width] 0 where a slot's token is visible, −inf after
        self._rows: torch.Tensor | None = None
        self._width = 0

    def begin_decode(self) -> None:
        """Before a decode forward: the write index of each active slot and the mask it implies."""
        lens = self.lens[: self.active]
        self._width = int(lens.max()) + 1
        visible = torch.arange(self._width, device=lens.device) <= lens[:, None]
        self._bias = torch.zeros(visible.shape, dtype=torch.float32, device=lens.device).masked_fill_(~visible, float("-inf"))
        self._rows = torch.arange(self.active, device=lens.device)

    def put(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write a prompt's `[layers, kv_heads, P, head_dim]` keys/values into `slot`."""
        n = keys.shape[2]
        self.keys[:, slot, :, :n] = keys
        self.values[:, slot, :, :n] = values
        self.lens[slot] = n

    def move(self, src: int, dst: int) -> None:
        n = int(self.lens[src])
        self.keys[:, dst, :, :n] = self.keys[:, src, :, :n]
        self.values[:, dst, :, :n] = self.values[:, src, :, :n]
        self.lens[dst] = n


def slot_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                   slot_cache: SlotKVCache | None = None, **kwargs):
    """A decode step: write this step's key/value into each active slot, attend over the slot's
    tokens. (Prompts are prefilled in a packed row by `model.packing`, which returns their keys/values.)"""
    if slot_cache is None:
        raise RuntimeError("slot_attention called without a slot_cache")
    r, heads, _, d = query.shape                  # [R, H, 1, D]; key/value [R, kv, 1, D]
    kv = key.shape[1]
    k_store, v_store = slot_cache.keys[module.layer_idx], slot_cache.values[module.layer_idx]
    rows, index = slot_cache._rows, slot_cache.lens[:r]
    k_store[rows, :, index] = key[:, :, 0]
    v_store[rows, :, index] = value[:, :, 0]
    w = slot_cache._width
    keys = k_store[:r, :, :w].reshape(r * kv, w, d)   # a view: slots are whole [kv, capacity, D] blocks
    values = v_store[:r, :, :w].reshape(r * kv, w, d)
    # query head i reads kv head i // (H / kv): the H heads are kv groups of H / kv consecutive ones
    scores = torch.bmm(query.reshape(r * kv, heads // kv, d), keys.transpose(1, 2)).view(r, heads, w)
    scale = scaling if scaling is not None else d ** -0.5
    probs = torch.softmax(torch.add(slot_cache._bias[:, None, :], scores.float(), alpha=scale), dim=-1)
    out = torch.bmm(probs.to(values.dtype).view(r * kv, heads // kv, w), values)
    return out.view(r, 1, heads, d), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, slot_attention)


def slot_forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: SlotKVCache, last: torch.Tensor) -> torch.Tensor:
    """Run the decoder with `slot_attention` and return the logits at column `last[i]` of each row."""
    _register()
    decoder, head = decoder_and_head(model)
    dummy = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=input_ids.device)   # skips transformers' mask building
    with _attention_implementation(decoder, ATTENTION_NAME):
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=dummy, use_cache=False,
                         slot_cache=cache).last_hidden_state
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(h)
