"""The update's objective: compose ratio level, surrogate, KL and entropy terms, and aggregation.

    ℓ_t = surrogate(w_t, A) + β · KL_t − c_H · H_t
    L   = aggregate(ℓ, mask, step counts)

Pure: tensors in, a scalar loss and detached metric sums out. Called once per micro-batch; the
micro-batch losses of one optimizer step add up to the step's loss (see `losses.StepCounts`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from groupwise.algorithms.off_policy import luffy_shaped_surrogate
from groupwise.algorithms.losses import AGGREGATIONS, POLICY_LOSSES, RATIO_LEVELS, StepCounts
from groupwise.algorithms.options import takes_group_id
from groupwise.algorithms.regularizers import KL_ESTIMATORS
from groupwise.types import ROW_EXPLANATION, ROW_TEACHER


@functools.lru_cache(maxsize=None)
def _takes_group_id(fn: Callable[..., Any]) -> bool:
    return takes_group_id(fn)


@dataclass
class ObjectiveParts:
    """The selected parts and their numbers, resolved once from the config."""

    ratio_level: Callable[..., torch.Tensor]
    surrogate: Callable[..., Any]
    aggregation: Callable[..., torch.Tensor]
    surrogate_options: dict[str, Any] = field(default_factory=dict)
    kl_coef: float = 0.0
    kl_estimator: Callable[..., torch.Tensor] | None = None
    entropy_coef: float = 0.0
    teacher_gamma: float = 0.1          # LUFFY shaping of teacher rows
    explanation_coef: float = 0.0       # ExPO's β on self-explanation rows

    @classmethod
    def from_config(cls, alg: Any) -> "ObjectiveParts":
        return cls(
            ratio_level=RATIO_LEVELS.get(alg.ratio_level),
            surrogate=POLICY_LOSSES.get(alg.loss),
            aggregation=AGGREGATIONS.get(alg.aggregation),
            surrogate_options=alg.loss_kwargs(),
            kl_coef=alg.kl.coef if alg.kl.placement == "loss" else 0.0,
            kl_estimator=KL_ESTIMATORS.get(alg.kl.estimator) if alg.kl.coef > 0 and alg.kl.placement == "loss" else None,
            entropy_coef=alg.entropy_coef,
        )

    def with_guidance(self, guidance: Any) -> "ObjectiveParts":
        self.teacher_gamma = guidance.teacher.gamma
        self.explanation_coef = guidance.self_explanation.coef
        return self


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor                 # scalar, differentiable
    sums: dict[str, float]             # detached metric sums over this micro-batch's tokens


def policy_objective(
    parts: ObjectiveParts,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    counts: StepCounts,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    group_id: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> ObjectiveOutput:
    """One micro-batch's share of the optimizer step's loss.

    `advantages` is `[N]` (broadcast over tokens) or `[N, T]`; `mask` is the float completion mask
    (0 for padding and for tokens excluded by filters); `entropy` is the per-token entropy, needed
    only when `parts.entropy_coef > 0` (otherwise it is only reported).

    `source` ([N] ROW_* kinds) changes the surrogate of two kinds of row: a teacher row (LUFFY /
    AMPO) takes the shaped, unclipped −f(π_θ)·A with f(p) = p/(p+γ), its behaviour probability being
    unknown; a self-explanation row (ExPO) takes −β·log π_θ (a positive sample under the plain
    prompt, no advantage). Replayed rows need nothing here: their `old_logp` is the stored one.

    `is_weights` ([N, T], detached): the sampler–trainer importance weights of
    `algorithms.rollout_correction` (TIS / MIS); they multiply the surrogate's per-token loss before
    the KL and entropy terms are added, as TRL's `vllm_importance_sampling_correction` does.
    """
    adv = advantages.unsqueeze(-1).expand_as(logp) if advantages.dim() == 1 else advantages
    adv = adv.to(logp.dtype)
    log_ratio = parts.ratio_level(logp, old_logp, mask)
    runtime = {"old_logp": old_logp, "mask": mask}
    if _takes_group_id(parts.surrogate):  # group-aware surrogates (DisCO) see which rows form a question
        runtime["group_id"] = group_id
    out = parts.surrogate(log_ratio, adv, logp, **runtime, **parts.surrogate_options)
    per_token = out.loss
    if source is not None:
        teacher = (source == ROW_TEACHER).unsqueeze(-1)
        if bool(teacher.any()):
            per_token = torch.where(teacher, luffy_shaped_surrogate(logp, adv, mask, gamma=parts.teacher_gamma), per_token)
        explanation = (source == ROW_EXPLANATION).unsqueeze(-1)
        if bool(explanation.any()):
            per_token = torch.where(explanation, -parts.explanation_coef * logp, per_token)
    if is_weights is not None:
        per_token = per_token * is_weights.to(per_token.dtype)
    surrogate_loss = per_token
    kl = None
    if parts.kl_estimator is not None:
        if ref_logp is None:
            raise ValueError("policy_objective: a KL coefficient is set but no reference log-probs were given")
        kl = parts.kl_estimator(logp, ref_logp)
        per_token = per_token + parts.kl_coef * kl
    if parts.entropy_coef > 0:
        if entropy is None:
            raise ValueError("policy_objective: entropy_coef > 0 needs the per-token entropy")
        per_token = per_token - parts.entropy_coef * entropy
    loss = parts.aggregation(per_token, mask, counts)

    with torch.no_grad():
        m = mask.to(logp.dtype)
        sums = {
            "tokens": float(m.sum()),
            "policy_loss": float(parts.aggregation(surrogate_loss.detach(), mask, counts)),
            "clip_low": float((out.clipped_low.to(m.dtype) * m).sum()),
            "clip_high": float((out.clipped_high.to(m.dtype) * m).sum()),
            "log_ratio_abs": float((log_ratio.detach().abs() * m).sum()),
        }
        if kl is not None:
            sums["kl"] = float((kl.detach() * m).sum())
        if entropy is not None:
            sums["entropy"] = float((entropy.detach() * m).sum())
    return ObjectiveOutput(loss=loss, sums=sums)
