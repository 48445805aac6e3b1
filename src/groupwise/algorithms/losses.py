"""Policy-loss parts: importance-ratio levels, surrogates, and loss aggregation.

Three independent registries, composed by `objective.policy_objective`:

- ratio level   `fn(logp[N,T], old_logp[N,T], mask[N,T]) -> log_ratio[N,T]`
- surrogate     `fn(log_ratio[N,T], advantages[N,T], logp[N,T], *, old_logp, mask, <its options>) -> SurrogateOutput`
                (options are keyword-only parameters; `algorithm.loss_options` is checked against them)
- aggregation   `fn(per_token[N,T], mask[N,T], counts: StepCounts) -> scalar`

Aggregations divide by counts of the whole optimizer step (all micro-batches, all ranks), so
summing micro-batch losses gives exactly the step's loss: no gradient-accumulation rescaling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from groupwise.registry import Registry

RATIO_LEVELS: Registry = Registry("ratio level")
POLICY_LOSSES: Registry = Registry("policy loss")
AGGREGATIONS: Registry = Registry("loss aggregation")

# exp() of a log-ratio beyond ±20 overflows fp32 usefulness; verl clamps the same way.
_LOG_RATIO_LIMIT = 20.0


# ---------------------------------------------------------------------------------------------
# Ratio levels
# ---------------------------------------------------------------------------------------------

@RATIO_LEVELS.register("token")
def token_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token importance log-ratio (PPO; Schulman et al., arXiv 1707.06347).

        log w_t = log π_θ(o_t) − log π_old(o_t)
    """
    return logp - old_logp


@RATIO_LEVELS.register("sequence")
def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level importance log-ratio of GSPO, broadcast to every token of the sequence.

    Paper: "Group Sequence Policy Optimization" (Zheng et al., arXiv 2507.18071).

        log s_i = (1/|o_i|) Σ_t m_t (log π_θ(o_t) − log π_old(o_t))

    The gradient flows through the mean, so each token of a sequence receives
    s_i · (1/|o_i|) ∇ log π_θ(o_t): GSPO's gradient.
    """
    m = mask.to(logp.dtype)
    length = m.sum(-1, keepdim=True).clamp(min=1)
    seq = ((logp - old_logp) * m).sum(-1, keepdim=True) / length
    return seq.expand_as(logp)


@RATIO_LEVELS.register("geometric")
def geometric_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Geometric mean of the token ratios over the sequence (GMPO's ratio, without its clip), broadcast.

    Paper: "Geometric-Mean Policy Optimization" (Zhao et al., arXiv 2507.20673).

        log w_i = (1/|o_i|) Σ_t m_t (log π_θ(o_t) − log π_old(o_t)),   w_i = (Π_t w_t)^(1/|o_i|)

    This equals GSPO's `sequence` ratio (a geometric mean is exp of a mean log), so the two names
    give identical numbers and gradients; `geometric` exists so GMPO recipes can name it.
    GMPO's defining clip is sign-aware: each token's log-ratio is clipped only on the side the
    advantage pushes it (`min(x, ε_high)` for A > 0, `max(x, −ε_low)` for A < 0). A ratio level does
    not see the advantages, so that clip lives in the surrogate `gmpo` (which takes `eps_low` /
    `eps_high` and does the mean itself): use `ratio_level: token` with `loss: gmpo` for GMPO.
    """
    return sequence_log_ratio(logp, old_logp, mask)


# ---------------------------------------------------------------------------------------------
# Surrogates
# ---------------------------------------------------------------------------------------------

@dataclass
class SurrogateOutput:
    loss: torch.Tensor            # [N, T] per-token loss (to be masked and aggregated)
    clipped_low: torch.Tensor     # [N, T] bool: the low-side clip is active (ratio < 1−ε_low, A < 0)
    clipped_high: torch.Tensor    # [N, T] bool: the high-side clip is active (ratio > 1+ε_high, A > 0)


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    logp: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> SurrogateOutput:
    """PPO clipped surrogate with separate lower and upper clip ranges (DAPO "clip-higher").

    Papers: "Proximal Policy Optimization Algorithms" (Schulman et al., arXiv 1707.06347);
    "DAPO: An Open-Source LLM Reinforcement Learning System at Scale" (Yu et al., arXiv 2503.14476).

        ℓ_t = −min(w_t A, clip(w_t, 1 − ε_low, 1 + ε_high) A),   w_t = exp(log w_t)

    ε_high > ε_low lets low-probability tokens grow (DAPO uses 0.2 / 0.28).
    """
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT))
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        clipped_low = (ratio < 1.0 - eps_low) & (advantages < 0)
        clipped_high = (ratio > 1.0 + eps_high) & (advantages > 0)
    return SurrogateOutput(loss, clipped_low, clipped_high)


# ---------------------------------------------------------------------------------------------
# Aggregation over the optimizer step
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepCounts:
    """Counts over the whole optimizer step (every micro-batch and rank): the loss divisors."""

    num_tokens: float              # Σ of the completion mask
    num_sequences: int             # rows with at least one trainable token
    num_rows: int                  # all rows, trainable or not
    max_completion_length: int     # the configured limit (Dr. GRPO's constant)

    @staticmethod
    def of(mask: torch.Tensor, max_completion_length: int) -> "StepCounts":
        per_row = mask.sum(-1)
        return StepCounts(
            num_tokens=float(per_row.sum()),
            num_sequences=int((per_row > 0).sum()),
            num_rows=int(mask.shape[0]),
            max_completion_length=max_completion_length,
        )


def _masked(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return loss * mask.to(loss.dtype)


@AGGREGATIONS.register("token_mean")
def token_mean(loss: torch.Tensor, mask: torch.Tensor, counts: StepCounts) -> torch.Tensor:
    """Token-level mean over the optimizer step (DAPO, arXiv 2503.14476; TRL `dapo`, verl `token-mean`).

        L = Σ_i Σ_t m_it ℓ_it / Σ_step m
    """
    return _masked(loss, mask).sum() / max(counts.num_tokens, 1.0)


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(loss: torch.Tensor, mask: torch.Tensor, counts: StepCounts) -> torch.Tensor:
    """Mean over tokens of each sequence, then over the step's sequences (original GRPO, arXiv 2402.03300).

        L = (1/#seq_step) Σ_i (1/|o_i|) Σ_t m_it ℓ_it
    """
    per_seq = _masked(loss, mask).sum(-1) / mask.sum(-1).clamp(min=1).to(loss.dtype)
    return per_seq.sum() / max(counts.num_sequences, 1)


@AGGREGATIONS.register("seq_mean_token_sum")
def seq_mean_token_sum(loss: torch.Tensor, mask: torch.Tensor, counts: StepCounts) -> torch.Tensor:
    """Sum over tokens of each sequence, mean over the step's sequences (verl `seq-mean-token-sum`).

        L = (1/#seq_step) Σ_i Σ_t m_it ℓ_it
    """
    return _masked(loss, mask).sum() / max(counts.num_sequences, 1)


@AGGREGATIONS.register("constant")
def constant_normalized(loss: torch.Tensor, mask: torch.Tensor, counts: StepCounts) -> torch.Tensor:
    """Dr. GRPO: divide the token sum by a constant, removing the length bias (arXiv 2503.20783).

        L = Σ_i Σ_t m_it ℓ_it / (#rows_step · max_completion_length)
    """
    return _masked(loss, mask).sum() / max(counts.num_rows * counts.max_completion_length, 1)


# The other surrogates (dual_clip, two_sided, cispo, sapo, gmpo, dcpo, reinforce/gpg, clip_cov,
# kl_cov, disco) live in `surrogates.py` and register into POLICY_LOSSES on import.
from groupwise.algorithms import surrogates as _surrogates  # noqa: E402,F401  (registration side effect)
