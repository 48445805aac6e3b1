"""Per-token log-probabilities of completions under a causal LM, without a [N, T, vocab] tensor.

The decoder runs once over `[prompt | completion]`; the LM head is applied only at the hidden
states that predict real completion tokens (padding is skipped), in chunks of rows, so the
largest logits tensor is `[chunk, vocab]`.
"""
from __future__ import annotations

import torch

from groupwise.algorithms.regularizers import entropy_from_logits
from groupwise.model.packing import build_layout, packed_hidden_states


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 after left padding: cumsum(mask) − 1, clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _decoder_and_head(model: torch.nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def completion_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    chunk_rows: int = 4096,
    layout: str = "padded",
    group_id: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(o_t | prompt, o_<t) / T-scaled, for every completion position; 0 at padding.

    `input_ids` is `[N, Tp + Tc]` with the completion in the last `Tc` columns, `completion_mask`
    is `[N, Tc]`. Logits are divided by the sampling temperature, as the sampler did, so that the
    ratio π_θ / π_old compares the same distributions (TRL does the same).
    The entropy is detached unless `entropy_grad` (an entropy bonus in the loss needs its gradient).

    `layout` picks how the decoder sees the rows (`groupwise.model.packing`): "padded" (the rows
    as given), "packed" (padding-free: one flat row, no pad tokens), or "shared_prefix" (packed,
    and rows with the same `group_id` encode their common prompt once: Prefix Grouper).
    Returns `(logp[N, Tc], entropy[N, Tc] or None)`.
    """
    decoder, head = _decoder_and_head(model)
    n, tc = completion_mask.shape
    targets = input_ids[:, -tc:]
    keep = completion_mask.bool()
    rows_t = targets[keep]
    if layout == "padded":
        hidden = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        ).last_hidden_state
        # The state at position p predicts token p+1: completion token j is predicted at Tp−1+j.
        rows_h = hidden[:, -tc - 1 : -1][keep]      # [M, H], M = number of real completion tokens
    elif layout in ("packed", "shared_prefix"):
        packed = build_layout(input_ids, attention_mask, tc, group_id, share_prefix=layout == "shared_prefix")
        hidden = packed_hidden_states(decoder, packed)
        rows_h = hidden.index_select(0, packed.predictor_index[keep])
    else:
        raise ValueError(f"completion_logprobs: unknown layout {layout!r} (padded, packed, shared_prefix)")
    pieces, ent_pieces = [], []
    for start in range(0, rows_t.shape[0], chunk_rows):
        logits = head(rows_h[start : start + chunk_rows]).float()
        if temperature != 1.0:
            logits = logits / temperature
        tgt = rows_t[start : start + chunk_rows]
        pieces.append(logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1))
        if with_entropy:
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                ent_pieces.append(entropy_from_logits(logits))
    logp = torch.zeros(n, tc, dtype=torch.float32, device=rows_h.device)
    if pieces:
        logp = logp.masked_scatter(keep, torch.cat(pieces))
    entropy = None
    if with_entropy:
        entropy = torch.zeros(n, tc, dtype=torch.float32, device=rows_h.device)
        if ent_pieces:
            entropy = entropy.masked_scatter(keep, torch.cat(ent_pieces))
    return logp, entropy
