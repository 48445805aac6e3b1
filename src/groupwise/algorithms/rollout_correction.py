"""Importance-sampling correction for the sampler–trainer mismatch (TIS, MIS, IcePop).

A fast inference engine (vLLM) samples from π_sampler, which differs slightly from the trainer's
π_old for the same weights (other kernels, another precision, another batch order). The per-token
loss is multiplied by a detached weight w = π_old / π_sampler, truncated or masked:

- "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training" (Yao, Liu, et al., 2025;
  a blog post, no arXiv id): truncated importance sampling (TIS), w ← min(w, C).
- IcePop (Ling team, inclusionAI, 2025; a blog post, then the Ring-1T report): tokens whose ratio
  leaves [α, β] are masked out of the gradient (two-sided: clip_min = α, clip_max = β).
- MIS, masked importance sampling (2025 follow-ups to the TIS post): a ratio, token or sequence,
  outside [C_min, C_max] drops the token or the whole sequence instead of clamping it.

Same semantics as TRL's `vllm_importance_sampling_{token,sequence}_{truncate,mask}` (its GRPO
trainer computes `diff = (old_logp − sampling_logp)·mask` and, at sequence level, SUMS it):

    token level:     w_t = exp(log π_old(o_t) − log π_sampler(o_t))
    sequence level:  w_t = exp(Σ_s m_s · (log π_old(o_s) − log π_sampler(o_s)))   for every t of the row
    truncate:        w ← clamp(w, C_min or 0, C_max)
    mask:            w ← w · 1[C_min ≤ w ≤ C_max]           (C_min = 0 when unset)

Plain functions over `[N, T]` tensors; nothing here knows about the trainer.
"""
from __future__ import annotations

import torch

LEVELS = ("token", "sequence")
MODES = ("truncate", "mask")
# exp() of a log-ratio beyond ±80 leaves float32's range; clamping there changes no truncate/mask
# outcome for any sane C_min/C_max, and keeps the weights and the metrics finite.
_LOG_RATIO_LIMIT = 80.0


def resolve_level(level: str, backend: str) -> str:
    """The correction level in force: "auto" is "sequence" for the vllm backend, "none" for hf
    (the hf engine samples with the trainer's own model, so its log-probs are π_old itself)."""
    if level == "auto":
        return "sequence" if backend == "vllm" else "none"
    if level not in ("none", *LEVELS):
        raise ValueError(f"rollout_correction.level must be auto, none, token or sequence, not {level!r}")
    return level


def rollout_importance_weights(
    old_logprobs: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    mask: torch.Tensor,
    level: str,
    mode: str,
    clip_max: float,
    clip_min: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Detached weights `[N, T]` (0 where `mask` is 0) and their metrics; see the module docstring.

    `old_logprobs` are the trainer's log π_old of the sampled tokens, `sampling_logprobs` the
    engine's (same temperature). Metrics, all `rollout_correction/…`:

    - `logp_diff_mean`, `logp_diff_max`: mean / max of |old − sampling| over masked tokens;
    - `ratio_min`, `ratio_mean`, `ratio_max`: of the unclipped ratio, over masked tokens (token
      level) or over rows with at least one masked token (sequence level);
    - `masked_fraction`: fraction of masked tokens whose weight the mode set to 0 (always 0 under
      truncate);
    - `kl`: the k3 estimate of KL(π_sampler ‖ π_old) per token, mean over masked tokens:
      r − 1 − log r with r = π_old / π_sampler (unbiased and ≥ 0 under samples from π_sampler).
    """
    if level not in LEVELS:
        raise ValueError(f"rollout_importance_weights: level must be one of {LEVELS}, not {level!r}")
    if mode not in MODES:
        raise ValueError(f"rollout_importance_weights: mode must be one of {MODES}, not {mode!r}")
    if old_logprobs.shape != sampling_logprobs.shape or old_logprobs.shape != mask.shape or old_logprobs.dim() != 2:
        raise ValueError(f"rollout_importance_weights: old_logprobs, sampling_logprobs and mask must be the same [N, T], got "
                         f"{tuple(old_logprobs.shape)}, {tuple(sampling_logprobs.shape)}, {tuple(mask.shape)}")
    lo = 0.0 if clip_min is None else float(clip_min)
    if not 0.0 <= lo <= clip_max:
        raise ValueError(f"rollout_importance_weights: need 0 ≤ clip_min ≤ clip_max, got clip_min={clip_min}, clip_max={clip_max}")

    with torch.no_grad():
        m = mask.bool()
        diff = (old_logprobs.detach().float() - sampling_logprobs.detach().float()).masked_fill(~m, 0.0)
        if level == "token":
            log_ratio = diff
            units = m                                   # the ratio's support: tokens
        else:
            log_ratio = diff.sum(-1, keepdim=True).expand_as(diff)
            units = m.any(-1)                           # rows with at least one token
        ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT))
        if mode == "truncate":
            weights = ratio.clamp(min=lo, max=clip_max)
        else:
            weights = torch.where((ratio >= lo) & (ratio <= clip_max), ratio, torch.zeros_like(ratio))
        weights = weights.masked_fill(~m, 0.0).to(old_logprobs.dtype)

        unit_ratio = ratio[m] if level == "token" else ratio[:, 0][units]
        n_tok = int(m.sum())
        if n_tok == 0:
            zero = {k: 0.0 for k in ("logp_diff_mean", "logp_diff_max", "ratio_min", "ratio_mean", "ratio_max", "masked_fraction", "kl")}
            return weights, {f"rollout_correction/{k}": v for k, v in zero.items()}
        d = diff[m].clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
        k3 = torch.exp(d) - 1.0 - d
        dropped = (weights[m] == 0).float().mean() if mode == "mask" else torch.tensor(0.0)
        metrics = {
            "logp_diff_mean": float(d.abs().mean()),
            "logp_diff_max": float(d.abs().max()),
            "ratio_min": float(unit_ratio.min()),
            "ratio_mean": float(unit_ratio.mean()),
            "ratio_max": float(unit_ratio.max()),
            "masked_fraction": float(dropped),
            "kl": float(k3.mean()),
        }
    return weights, {f"rollout_correction/{k}": v for k, v in metrics.items()}

