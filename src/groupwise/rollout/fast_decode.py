"""A decode step for Llama-architecture models (Llama, Qwen2) on the CPU with fewer, larger operations.

One decode step multiplies a few dozen rows by every weight of the model; at that size the time
not spent in matrix products goes to per-operation overhead (dispatch, allocation, Python): the
transformers Llama layer runs about 45 small tensor operations and 7 module calls per layer.
This step computes the same function with about 20 operations per layer:

* q, k and v come from one product with the three weights stacked (`[q; k; v]`), the MLP's gate and
  up projections from one product with `[gate; up]`; every weight (and the LM head) is reordered
  once per generation round for oneDNN's inner-product primitive (see `packed_linear`);
* rotary embedding is applied to q and k together: `x·cos + roll(x, D/2)·sin±`, where `sin±` is
  sin with its first half negated (so `roll(x, D/2)·sin± = rotate_half(x)·sin`);
* attention is `slot_attention`'s decode path (writes the step's key/value into the slot cache).

Used for float32 weights on the CPU when the decoder is exactly transformers' `LlamaModel` or
`Qwen2Model` (Llama with q/k/v biases, which are stacked like the weights; no sliding-window
layers) with plain `nn.Linear` projections (no adapters) and SiLU MLPs; otherwise the engine
runs the model's own forward. Equal to that forward up to float32 rounding (the stacked products sum in another
order): the tests compare the two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from groupwise.rollout.packed_linear import onednn_linear_available, prepack_weight, prepacked_linear
from groupwise.rollout.slot_cache import slot_attention


def _families() -> dict[type, tuple[type, ...]]:
    """Decoder class → (decoder layer, attention, MLP, RMSNorm) classes of the architectures this
    step computes exactly: Llama, and Qwen2 (Llama with q/k/v biases; sliding-window layers refused)."""
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    return {
        llama.LlamaModel: (llama.LlamaDecoderLayer, llama.LlamaAttention, llama.LlamaMLP, llama.LlamaRMSNorm),
        qwen2.Qwen2Model: (qwen2.Qwen2DecoderLayer, qwen2.Qwen2Attention, qwen2.Qwen2MLP, qwen2.Qwen2RMSNorm),
    }


def fast_decode_supported(model: torch.nn.Module) -> bool:
    """The conditions in the module doc: fp32 CPU weights, oneDNN, a plain Llama or Qwen2 decoder."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = getattr(base, "model", None), base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    family = _families().get(type(decoder))
    if family is None or type(head) is not torch.nn.Linear or not onednn_linear_available():
        return False
    layer_cls, attn_cls, mlp_cls, norm_cls = family
    params = list(base.parameters())
    if not params or any(type(p) is not torch.nn.Parameter or p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return False   # sharded (DTensor), not on the CPU, or not float32
    for layer in decoder.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if (type(layer) is not layer_cls or type(attn) is not attn_cls or type(mlp) is not mlp_cls
                or type(layer.input_layernorm) is not norm_cls or type(layer.post_attention_layernorm) is not norm_cls):
            return False
        if getattr(attn, "sliding_window", None):
            return False
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(m) is not torch.nn.Linear for m in linears):
            return False
    if getattr(decoder.config, "hidden_act", None) not in ("silu", "swish"):
        return False
    return type(decoder.norm) is norm_cls


class _Packed:
    """A weight (and bias) reordered for oneDNN; called on `[rows, in]`."""

    def __init__(self, weights: list[torch.Tensor], biases: list[torch.Tensor | None], rows: int):
        w = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.weight = prepack_weight(w, rows)
        if all(b is None for b in biases):
            self.bias = None
        else:
            self.bias = torch.cat([b if b is not None else w_.new_zeros(w_.shape[0]) for b, w_ in zip(biases, weights)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return prepacked_linear(x, self.weight, self.bias)


class LlamaFastDecoder:
    """Built once per generation round (the weights are reordered then); `step` runs one decode step."""

    def __init__(self, model: torch.nn.Module, rows: int):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.decoder = base.model
        cfg = self.decoder.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        first = self.decoder.layers[0].self_attn
        self.head_dim, self.scaling = first.head_dim, first.scaling
        self.layers = []
        with torch.no_grad():
            for layer in self.decoder.layers:
                a, m = layer.self_attn, layer.mlp
                self.layers.append((
                    a, layer.input_layernorm.weight.detach(), layer.input_layernorm.variance_epsilon,
                    _Packed([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], rows),
                    _Packed([a.o_proj.weight], [a.o_proj.bias], rows),
                    layer.post_attention_layernorm.weight.detach(), layer.post_attention_layernorm.variance_epsilon,
                    _Packed([m.gate_proj.weight, m.up_proj.weight], [m.gate_proj.bias, m.up_proj.bias], rows),
                    _Packed([m.down_proj.weight], [m.down_proj.bias], rows),
                ))
            head = base.get_output_embeddings()
            self.head = _Packed([head.weight], [head.bias], rows)
            self.norm = (self.decoder.norm.weight.detach(), self.decoder.norm.variance_epsilon)
            self.intermediate = self.decoder.layers[0].mlp.gate_proj.out_features

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """Logits `[r, vocab]` for `tokens` `[r]` at `positions` `[r]`; writes their keys/values into
        `cache` (a `SlotKVCache` after `begin_decode`, slots 0 … r−1)."""
        r, h, kv, d = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        x = self.decoder.embed_tokens(tokens)                                   # [r, hidden]
        cos, sin = self.decoder.rotary_emb(x[:, None], positions[:, None])      # [r, 1, d]
        sin_signed = torch.cat((-sin[..., : d // 2], sin[..., d // 2:]), dim=-1)
        for attn_module, w_in, eps_in, qkv_proj, o_proj, w_post, eps_post, gate_up, down in self.layers:
            qkv = qkv_proj(torch.rms_norm(x, (x.shape[-1],), w_in, eps_in)).view(r, h + 2 * kv, d)
            qk = qkv[:, : h + kv]
            qk = torch.addcmul(qk * cos, qk.roll(d // 2, dims=-1), sin_signed)    # rotary on q and k at once
            attn, _ = slot_attention(attn_module, qk[:, :h, None], qk[:, h:, None], qkv[:, h + kv:, None], None,
                                     scaling=self.scaling, slot_cache=cache)   # writes k, v into the cache; [r, 1, h, d]
            x = x + o_proj(attn.reshape(r, h * d))
            gu = gate_up(torch.rms_norm(x, (x.shape[-1],), w_post, eps_post))
            x = x + down(F.silu(gu[:, : self.intermediate]).mul_(gu[:, self.intermediate:]))
        return self.head(torch.rms_norm(x, (x.shape[-1],), *self.norm))
