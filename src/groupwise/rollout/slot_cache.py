"""A preallocated, slot-indexed KV cache for continuous batching, read by a custom attention function.

transformers' DynamicCache grows by `torch.cat` at every decode step, copying the whole cache
each time, and refilling a row means padding and re-stacking it. Here each layer's keys and
values live in one tensor `[slots, kv_heads, capacity, head_dim]` allocated once (its size is the
KV budget). Slot r holds its sequence left-aligned: tokens 0 … lens[r]−1, positions equal to
indices. A decode step writes each slot's new key/value at index lens[r] and attends over
`[:, :, :width]` (a view, no copy) with the mask j ≤ lens[r]. The active slots are always the first
R (a finished slot is refilled from the last one), so the batch never carries idle rows.

The attention function is registered with transformers' AttentionInterface, so it works for the
models `groupwise.model.packing.unsupported_reason` accepts (the same conditions).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from groupwise.model.packing import _attention_implementation

ATTENTION_NAME = "groupwise_slots"


class SlotKVCache:
    def __init__(self, num_layers: int, slots: int, capacity: int, kv_heads: int, head_dim: int, dtype, device):
        shape = (num_layers, slots, kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lens = torch.zeros(slots, dtype=torch.long, device=device)
        self.active = 0                      # slots 0 … active−1 are in use
        self._mask: torch.Tensor | None = None
        self._width = 0

    def begin_decode(self) -> None:
        """Before a decode forward: the write index of each active slot and the mask it implies."""
        lens = self.lens[: self.active]
        self._width = int(lens.max()) + 1
        self._mask = (torch.arange(self._width, device=lens.device) <= lens[:, None])[:, None, None, :]

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
    gqa = key.shape[1] != query.shape[1]
    layer = module.layer_idx
    r = query.shape[0]
    rows = torch.arange(r, device=query.device)
    index = slot_cache.lens[:r]
    k_store, v_store = slot_cache.keys[layer], slot_cache.values[layer]
    k_store[rows, :, index] = key[:, :, 0]
    v_store[rows, :, index] = value[:, :, 0]
    w = slot_cache._width
    out = F.scaled_dot_product_attention(query, k_store[:r, :, :w], v_store[:r, :, :w], attn_mask=slot_cache._mask,
                                         scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, slot_attention)


def slot_forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: SlotKVCache, last: torch.Tensor) -> torch.Tensor:
    """Run the decoder with `slot_attention` and return the logits at column `last[i]` of each row."""
    _register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    dummy = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=input_ids.device)   # skips transformers' mask building
    with _attention_implementation(decoder, ATTENTION_NAME):
        hidden = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=dummy, use_cache=False,
                         slot_cache=cache).last_hidden_state
    h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(h)
