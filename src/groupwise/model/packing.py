"""Padding-free and shared-prefix forward passes: the tokens of a micro-batch as one packed row.

Prefix Grouper: Efficient GRPO Training through Shared-Prefix Forward (arXiv 2506.05433).
A group of G completions of one prompt is normally run as G rows `[prompt, c_i]`, so the prompt
is encoded G times. Here every token of the micro-batch appears exactly once in one flat row:

    [ prompt_1 | prompt_2 | … | c_11 | c_12 | … | c_21 | … ]        (no padding at all)

and a custom attention function (registered with transformers' AttentionInterface) computes,
for every layer,

    prefix block b:   softmax(q_P k_Pᵀ / √d + causal) v_P                     (each prompt once)
    completion i:     softmax(q_i [k_P(i); k_i]ᵀ / √d + [0; causal]) [v_P(i); v_i]

i.e. a prompt token attends causally within its prompt, and a completion token attends to its
whole prompt and causally to itself; position ids restart after the prompt (p, p+1, …), so every
hidden state equals the per-sequence layout's up to floating-point rounding. Linear layers (most
of the FLOPs) see each prompt once and no padding; attention pads only inside its own blocks.

Prompts of different groups often begin alike: a chat template's system prompt is the same for
every question (24 of SmolLM2's ~36 prompt tokens on the arithmetic task). The longest prefix
common to all the micro-batch's prompts becomes a root segment R, encoded once, and each prompt
block keeps only its own suffix:

    [ R | suffix_1 | suffix_2 | … | c_11 | … ]
    root:             softmax(q_R k_Rᵀ / √d + causal) v_R
    suffix block b:   softmax(q_b [k_R; k_b]ᵀ / √d + [0; causal]) [v_R; v_b]
    completion i:     softmax(q_i [k_R; k_b(i); k_i]ᵀ / √d + [0; 0; causal]) [v_R; v_b(i); v_i]

The root is kept at least one token shorter than every prompt, so each block still holds the
prompt's last token (it predicts the first completion token).

With sharing off (`share_prefix=False`) every row is its own block `[prompt_i, c_i]`: that is the
plain padding-free (packed) layout, with no completion blocks.

Models qualify when their attention goes through transformers' attention interface
(`_supports_attention_backend`), every layer is full causal attention (no sliding window, no
logit soft-capping, no attention sinks), and the model is decoder-only.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTENTION_NAME = "groupwise_packed"


@dataclass
class PackedLayout:
    """Where each token of a micro-batch sits in the packed row, and how attention reads it.

    `flat` is the packed token order: every prefix block's tokens, then every completion's.
    Block tensors are right-padded; padded slots point at flat index 0 and are masked.
    """

    input_ids: torch.Tensor          # [1, F] packed tokens
    position_ids: torch.Tensor       # [1, F] positions restarting at 0 per sequence
    block_index: torch.Tensor        # [B, Lb] flat index of each prefix-block slot
    block_valid: torch.Tensor        # [B, Lb] bool
    completion_index: torch.Tensor   # [N, Lc] flat index of each completion slot (Lc may be 0)
    completion_block: torch.Tensor   # [N] the prefix block each completion reads
    completion_mask: torch.Tensor    # [N, 1, Lc, R + Lb + Lc] bool: root, whole block, causal self
    scatter_index: torch.Tensor      # [F] slot of each flat token in cat(root, block slots, completion slots)
    predictor_index: torch.Tensor    # [N, Tc] flat index of the hidden state predicting completion token (i, t)
    root_len: int = 0                # R: flat tokens 0 … R−1 are the prefix common to every block
    block_mask: torch.Tensor | None = None   # [B, 1, Lb, R + Lb] bool when R > 0: root, causal within the block

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def build_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_width: int,
    group_id: torch.Tensor | None = None,
    *,
    share_prefix: bool,
    drop_last_token: bool = False,
) -> PackedLayout:
    """Pack `[N, Tp + Tc]` rows (prompt left-padded, completion right-padded) into one flat row.

    With `share_prefix`, rows with the same `group_id` must carry the same prompt; each prompt
    becomes one block that all its completions read. With `drop_last_token`, each row's last
    completion token is left out of the row: when only the predictions of completion tokens are
    read, its hidden state is dead work (it predicts nothing, and no token attends to it, being
    the last of its sequence). Every `predictor_index` entry of a real token stays valid.
    Vectorized: no loop over rows or tokens.
    """
    device = input_ids.device
    n, width = input_ids.shape
    tp = width - completion_width
    am = attention_mask.bool()
    p_len = am[:, :tp].sum(1)
    c_len = am[:, tp:].sum(1)
    if drop_last_token:
        c_len = (c_len - 1).clamp(min=0)
    if bool((p_len == 0).any()):
        raise ValueError("build_layout: every row needs at least one prompt token (the one that predicts its first completion token)")
    if share_prefix:
        if group_id is None:
            raise ValueError("build_layout: share_prefix needs group_id")
        _, row_block = torch.unique(group_id, return_inverse=True)
        num_blocks = int(row_block.max()) + 1
        leader = torch.full((num_blocks,), n, dtype=torch.long, device=device)
        leader = leader.scatter_reduce(0, row_block, torch.arange(n, device=device), reduce="amin")
        same_prompt = (input_ids[:, :tp] == input_ids[leader[row_block], :tp]) | ~am[:, :tp]
        if not bool(same_prompt.all()) or not bool((p_len == p_len[leader[row_block]]).all()):
            bad = int((~same_prompt.all(1) | (p_len != p_len[leader[row_block]])).nonzero()[0])
            raise ValueError(f"build_layout: row {bad} has the group_id of row {int(leader[row_block[bad]])} but a different prompt")
        block_len = p_len[leader]
        comp_len = c_len
    else:
        row_block = torch.arange(n, device=device)
        leader = row_block
        block_len = p_len + c_len              # the whole sequence is one causal block
        comp_len = torch.zeros_like(c_len)

    # Block slots: the valid tokens of a row are contiguous ([pad | prompt | completion | pad]).
    lb = int(block_len.max())
    slot = torch.arange(lb, device=device)
    block_valid = slot < block_len[:, None]
    start = (tp - p_len[leader])[:, None]
    src = (start + slot).clamp(max=width - 1)
    block_ids = input_ids[leader].gather(1, src)
    root = common_root_length(block_ids, block_len) if share_prefix else 0
    if root:   # blocks keep their suffixes after the root: slot s of block b is its token R + s
        block_len = block_len - root
        lb = int(block_len.max())
        slot = torch.arange(lb, device=device)
        block_valid = slot < block_len[:, None]
        root_ids = block_ids[0, :root]
        block_ids = block_ids.gather(1, (root + slot).clamp(max=block_ids.shape[1] - 1).expand(len(block_len), -1))
    lc = int(comp_len.max()) if n else 0
    cslot = torch.arange(lc, device=device)
    comp_valid = cslot < comp_len[:, None]
    comp_ids = input_ids[:, tp : tp + lc]

    block_offset = root + torch.cumsum(block_len, 0) - block_len
    total_prefix = root + int(block_len.sum())
    comp_offset = total_prefix + torch.cumsum(comp_len, 0) - comp_len
    block_index = torch.where(block_valid, block_offset[:, None] + slot, 0)
    completion_index = torch.where(comp_valid, comp_offset[:, None] + cslot, 0)

    flat_ids = torch.cat([block_ids[block_valid], comp_ids[comp_valid]])
    positions = torch.cat([(root + slot).expand_as(block_valid)[block_valid], (p_len[:, None] + cslot)[comp_valid]])
    scatter_index = torch.cat([
        torch.arange(block_valid.numel(), device=device)[block_valid.flatten()],
        block_valid.numel() + torch.arange(comp_valid.numel(), device=device)[comp_valid.flatten()],
    ])
    block_mask = None
    if root:   # the root comes first in the flat row and in the attention outputs
        flat_ids = torch.cat([root_ids, flat_ids])
        positions = torch.cat([torch.arange(root, device=device), positions])
        scatter_index = torch.cat([torch.arange(root, device=device), root + scatter_index])
        causal_b = torch.ones(lb, lb, dtype=torch.bool, device=device).tril()
        block_mask = torch.cat([torch.ones(1, 1, lb, root, dtype=torch.bool, device=device), causal_b[None, None]], dim=-1)
        block_mask = block_mask.expand(len(block_len), 1, lb, root + lb)

    # A completion slot sees the root, its block's valid slots and, causally, its own earlier slots.
    causal = torch.ones(lc, lc, dtype=torch.bool, device=device).tril()
    completion_mask = torch.cat([
        torch.ones(n, 1, lc, root, dtype=torch.bool, device=device),
        block_valid[row_block][:, None, None, :].expand(n, 1, lc, lb),
        causal.expand(n, 1, lc, lc),
    ], dim=-1)

    # The hidden state at flat index f predicts the token after it in its sequence.
    t = torch.arange(completion_width, device=device)
    if share_prefix:
        last_prompt = block_offset[row_block] + p_len - root - 1
        prev_completion = comp_offset[:, None] + t - 1
        predictor = torch.where(t == 0, last_prompt[:, None], prev_completion)
    else:
        predictor = (block_offset + p_len - 1)[:, None] + t
    total = total_prefix + int(comp_len.sum())
    predictor = predictor.clamp(max=max(total - 1, 0))
    return PackedLayout(
        input_ids=flat_ids.unsqueeze(0),
        position_ids=positions.unsqueeze(0),
        block_index=block_index,
        block_valid=block_valid,
        completion_index=completion_index,
        completion_block=row_block,
        completion_mask=completion_mask,
        scatter_index=scatter_index,
        predictor_index=predictor,
        root_len=root,
        block_mask=block_mask,
    )


def common_root_length(block_ids: torch.Tensor, block_len: torch.Tensor) -> int:
    """The number of leading tokens all blocks share, kept below every block's length (so each
    block keeps its last token); 0 for fewer than two blocks. `block_ids` `[B, Lb]` left-aligned."""
    if block_ids.shape[0] < 2:
        return 0
    limit = int(block_len.min()) - 1
    if limit <= 0:
        return 0
    same = (block_ids[:, :limit] == block_ids[:1, :limit]).all(0)
    return int(same.long().cumprod(0).sum())


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     packed_layout: PackedLayout | None = None, kv_sink: list | None = None, **kwargs):
    """transformers attention function for a `PackedLayout` (see the module docstring).

    query `[1, H, F, D]`, key/value `[1, Hkv, F, D]`; returns `([1, F, H, D], None)`. With
    `kv_sink` (a list) each layer appends its `(key, value)`: a prefill keeps them as its KV cache.
    """
    if packed_layout is None:
        raise RuntimeError("packed_attention called without a packed_layout (use model.packing.packed_forward)")
    if kv_sink is not None:
        kv_sink.append((key, value))
    lay = packed_layout
    gqa = key.shape[1] != query.shape[1]
    q, k, v = query[0], key[0], value[0]                        # [H, F, D]

    def blocks(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:   # [H, F, D] → [R, H, L, D]
        r, length = index.shape
        return x.index_select(1, index.flatten()).view(x.shape[0], r, length, x.shape[-1]).transpose(0, 1)

    qb, kb, vb = blocks(q, lay.block_index), blocks(k, lay.block_index), blocks(v, lay.block_index)
    pieces = []
    if lay.root_len:   # the root attends causally to itself; every block reads it before its own slots
        r = lay.root_len
        qr, kr, vr = q[None, :, :r], k[None, :, :r], v[None, :, :r]
        out_r = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, scale=scaling, enable_gqa=gqa)
        pieces.append(out_r[0].transpose(0, 1))
        kb = torch.cat([kr.expand(kb.shape[0], -1, -1, -1), kb], dim=2)
        vb = torch.cat([vr.expand(vb.shape[0], -1, -1, -1), vb], dim=2)
        out_b = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=lay.block_mask, scale=scaling, enable_gqa=gqa)
    else:   # right-padded blocks: plain causal attention never lets a real query see a padded key
        out_b = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scaling, enable_gqa=gqa)
    pieces.append(out_b.transpose(1, 2).reshape(-1, q.shape[0], q.shape[-1]))
    if lay.completion_index.shape[1] > 0:
        qc, kc, vc = blocks(q, lay.completion_index), blocks(k, lay.completion_index), blocks(v, lay.completion_index)
        keys = torch.cat([kb[lay.completion_block], kc], dim=2)
        values = torch.cat([vb[lay.completion_block], vc], dim=2)
        out_c = F.scaled_dot_product_attention(qc, keys, values, attn_mask=lay.completion_mask, scale=scaling, enable_gqa=gqa)
        pieces.append(out_c.transpose(1, 2).reshape(-1, q.shape[0], q.shape[-1]))
    out = torch.cat(pieces).index_select(0, lay.scatter_index)  # [F, H, D]
    return out.unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention)


def unsupported_reason(model_class: type, config) -> str | None:
    """Why a model of `model_class` with `config` cannot run a packed / shared-prefix layout, or
    None when it can. Needs only the class and config, so a bad choice is refused before loading."""
    name = model_class.__name__
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model"
    if not getattr(model_class, "_supports_attention_backend", False):
        return f"{name}'s attention does not go through transformers' attention interface, so it cannot take a custom layout"
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return f"{name} has {sorted(set(layer_types) - {'full_attention'})} layers; only full causal attention can be packed"
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return f"{name} uses sliding-window attention; only full causal attention can be packed"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1.0):
        return f"{name} rescales its output logits outside the LM head"
    if getattr(config, "attn_logit_softcapping", None):
        return f"{name} soft-caps attention logits, which scaled_dot_product_attention cannot"
    if "sink" in " ".join(getattr(config, "layer_types", None) or []) or getattr(config, "attention_sink", False):
        return f"{name} has attention sinks, which scaled_dot_product_attention cannot"
    return None


def unsupported_reason_for_path(path: str) -> str | None:
    """`unsupported_reason` for the causal LM stored in a local directory (reads config.json only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if model_class is None:
        return f"{type(config).__name__} has no causal-LM class in transformers"
    return unsupported_reason(model_class, config)


@contextlib.contextmanager
def _attention_implementation(model: torch.nn.Module, name: str):
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def packed_hidden_states(decoder: torch.nn.Module, layout: PackedLayout, kv_sink: list | None = None) -> torch.Tensor:
    """The decoder's last hidden states `[F, H]` for the packed row; `kv_sink`: see `packed_attention`."""
    _register()
    # A ready-made 4D mask makes transformers skip building an [F, F] one; packed_attention ignores it.
    dummy_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=layout.input_ids.device)
    extra = {"kv_sink": kv_sink} if kv_sink is not None else {}
    with _attention_implementation(decoder, ATTENTION_NAME):
        out = decoder(
            input_ids=layout.input_ids,
            position_ids=layout.position_ids,
            attention_mask=dummy_mask,
            use_cache=False,
            packed_layout=layout,
            **extra,
        )
    return out.last_hidden_state[0]
