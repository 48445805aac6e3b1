"""Per-token log-probabilities of completions under a causal LM, without a [N, T, vocab] tensor.

The decoder runs once over `[prompt | completion]` (or a packed row, `model.packing`); the LM
head is applied only at the hidden states that predict real completion tokens (padding is
skipped), in chunks of rows. With a plain linear head, `ChunkedHeadLogprob` keeps no logits for
the backward pass either: it recomputes each chunk's logits there, so the largest vocabulary-wide
tensor alive at any time is `[chunk, vocab]`, in the forward and in the backward pass.
"""
from __future__ import annotations

import torch

from groupwise.algorithms.regularizers import entropy_from_logits
from groupwise.model.packing import build_layout, packed_hidden_states


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 after left padding: cumsum(mask) − 1, clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


EXP_FLOOR = -87.0   # float32 exp(x) is subnormal below x ≈ −87.3


def floored_log_softmax_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: z ← max(z − logsumexp(z), −87), and returns `(that, logsumexp(z))`.

    ATen's vectorized exp takes a scalar slow path for inputs whose result is subnormal
    (x < −87.3): 10–16× slower on the x86 CPUs we measured, and a trained LM's logits span more
    than 87 nats, so most of a 49k-vocabulary row is there. Flooring the log-probabilities at
    −87 changes each p_v by less than exp(−87) ≈ 1.6e-38 (absolutely); nothing downstream can see it.
    """
    m = z.amax(dim=-1, keepdim=True)
    z.sub_(m).clamp_(min=EXP_FLOOR)             # z − max, floored
    lse = z.exp().sum(-1, keepdim=True).log_()  # log Σ exp(z − max)
    z.sub_(lse).clamp_(min=EXP_FLOOR)
    return z, (lse + m).squeeze(-1)


class ChunkedHeadLogprob(torch.autograd.Function):
    """log p(target) and entropy H of softmax(h Wᵀ / T), chunk by chunk, logits recomputed in backward.

        z = (h Wᵀ + b) / T,   log p_y = z_y − logsumexp(z),   H = logsumexp(z) − Σ_v p_v z_v = −Σ_v p_v log p_v
        ∂ log p_y / ∂z = onehot(y) − p,   ∂H / ∂z = −p ⊙ (log p + H)

    Saves only h `[M, H]` (W, which the model holds anyway) and the per-row logsumexp and
    entropy: memory `O(chunk · vocab)` instead of `O(M · vocab)`, for one extra head matmul in the
    backward pass. With `keep_probs` it saves the softmax p `[M, vocab]` instead and skips that
    matmul (the caller decides whether M · vocab floats fit). The vocabulary-wide work is done in
    place, a few passes per chunk, with the log-probabilities floored at −87
    (`floored_log_softmax_`), so no pass hits exp's slow path.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, chunk: int, with_entropy: bool, keep_probs: bool = False):
        logps, lses, ents, probs = [], [], [], []
        for start in range(0, hidden.shape[0], chunk):
            z = _head_logits(hidden[start : start + chunk], weight, bias, temperature)
            z_target = z.gather(-1, targets[start : start + chunk, None]).squeeze(-1)
            logp_all, lse = floored_log_softmax_(z)   # z is overwritten
            logps.append(z_target - lse)
            lses.append(lse)
            if with_entropy or keep_probs:
                p = logp_all.exp()
                if with_entropy:
                    ents.append(-(p * logp_all).sum(-1))
                if keep_probs:
                    probs.append(p)
        empty = hidden.new_zeros(0, dtype=torch.float32)
        logp = torch.cat(logps) if logps else empty
        lse = torch.cat(lses) if lses else empty
        entropy = torch.cat(ents) if ents else empty
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy, *probs)
        ctx.temperature, ctx.chunk, ctx.with_entropy, ctx.kept = temperature, chunk, with_entropy, bool(probs)
        ctx.set_materialize_grads(False)           # an unused output's gradient arrives as None: skip its work
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy, *probs = ctx.saved_tensors
        t = ctx.temperature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        use_entropy = ctx.with_entropy and grad_entropy is not None
        kept, ctx.kept = ctx.kept, False            # a second backward (retain_graph) recomputes
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for i, start in enumerate(range(0, hidden.shape[0], ctx.chunk)):
            sl = slice(start, start + ctx.chunk)
            h = hidden[sl]
            if kept:   # the forward's p, turned into the gradient in place: only the first backward may use it
                p = probs[i]
                logp_all = p.log() if use_entropy else None
            else:
                logp_all = _head_logits(h, weight, bias, t)
                logp_all.sub_(lse[sl, None]).clamp_(min=EXP_FLOOR)       # log p, floored
                p = logp_all.exp()
            # ∂/∂z of Σ_i g_i log p_{i,y_i} + e_i H_i, then ∂z/∂(logits) = 1/T:
            #   gz = (g ⊙ (onehot(y) − p) − e ⊙ p ⊙ (log p + H)) / T
            g = grad_logp[sl] / t if grad_logp is not None else torch.zeros_like(lse[sl])
            if use_entropy:
                e = grad_entropy[sl, None] / t
                logp_all.add_(entropy[sl, None]).mul_(p).mul_(e)       # e ⊙ p ⊙ (log p + H), in log p's buffer
                gz = p.mul_(-g[:, None]).sub_(logp_all)
            else:
                gz = p.mul_(-g[:, None])
            gz.scatter_add_(-1, targets[sl, None], g[:, None])
            gz_w = gz.to(weight.dtype)
            if grad_h is not None:
                grad_h[sl] = (gz_w @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(gz.t(), h.float())
            if grad_b is not None:
                grad_b += gz.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None, None, None, None)


def _head_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """(h Wᵀ + b) / T as a fresh float32 tensor (callers overwrite it in place)."""
    z = torch.nn.functional.linear(h, weight, bias)
    z = z.float() if z.dtype != torch.float32 else z
    return z.div_(temperature) if temperature != 1.0 else z


def decoder_and_head(model: torch.nn.Module):
    """The decoder stack and the LM head of a transformers causal LM (through a PEFT wrapper)."""
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
    chunk_rows: int = 512,
    layout: str = "padded",
    group_id: torch.Tensor | None = None,
    keep_head_probs_bytes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(o_t | prompt, o_<t) / T-scaled, for every completion position; 0 at padding.

    `input_ids` is `[N, Tp + Tc]` with the completion in the last `Tc` columns, `completion_mask`
    is `[N, Tc]`. Logits are divided by the sampling temperature, as the sampler did, so that the
    ratio π_θ / π_old compares the same distributions (TRL does the same).
    The entropy is detached unless `entropy_grad` (an entropy bonus in the loss needs its gradient).

    `layout` picks how the decoder sees the rows (`groupwise.model.packing`): "padded" (the rows
    as given), "packed" (padding-free: one flat row, no pad tokens), or "shared_prefix" (packed,
    and rows with the same `group_id` encode their common prompt once: Prefix Grouper).
    `keep_head_probs_bytes`: when grad is on and the head's softmax over the M completion tokens
    (M · vocab float32) takes at most this many bytes, it is kept for the backward pass instead of
    recomputed (one head matmul fewer); 0 = always recompute.
    Returns `(logp[N, Tc], entropy[N, Tc] or None)`.
    """
    decoder, head = decoder_and_head(model)
    n, tc = completion_mask.shape
    targets = input_ids[:, -tc:]
    keep = completion_mask.bool()
    rows_t = targets[keep]
    if layout == "padded":
        # The state at position p predicts token p+1: completion token j is predicted at Tp−1+j,
        # so the last column predicts nothing and is not run (attention is causal: no other changes).
        hidden = decoder(
            input_ids=input_ids[:, :-1],
            attention_mask=attention_mask[:, :-1],
            position_ids=position_ids_from_mask(attention_mask)[:, :-1],
            use_cache=False,
        ).last_hidden_state
        rows_h = hidden[:, hidden.shape[1] - tc :][keep]      # [M, H], M = number of real completion tokens
    elif layout in ("packed", "shared_prefix"):
        # Each row's last token predicts nothing: it is left out of the packed row.
        packed = build_layout(input_ids, attention_mask, tc, group_id, share_prefix=layout == "shared_prefix", drop_last_token=True)
        hidden = packed_hidden_states(decoder, packed)
        rows_h = hidden.index_select(0, packed.predictor_index[keep])
    else:
        raise ValueError(f"completion_logprobs: unknown layout {layout!r} (padded, packed, shared_prefix)")
    if type(head) is torch.nn.Linear:
        keep_probs = torch.is_grad_enabled() and 0 < rows_t.numel() * head.out_features * 4 <= keep_head_probs_bytes
        logp_rows, ent_rows = ChunkedHeadLogprob.apply(rows_h, head.weight, head.bias, rows_t, temperature, chunk_rows, with_entropy,
                                                       keep_probs)
        if with_entropy and not (entropy_grad and torch.is_grad_enabled()):
            ent_rows = ent_rows.detach()
        pieces, ent_pieces = [logp_rows], [ent_rows] if with_entropy else []
    else:  # a wrapped head (e.g. a LoRA adapter on lm_head): plain autograd, chunked
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
