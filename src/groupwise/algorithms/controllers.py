"""Coefficient controllers (KL to the reference, entropy bonus) and the KL-in-reward shaping.

A controller is a small stateful object: `update(measurement, ...)` moves its coefficient and
returns the new value; `state_dict()` / `load_state_dict()` carry it through a checkpoint as a
plain JSON-serializable dict (like PyTorch's LR schedulers, the whole state is restored,
hyper-parameters included). A non-finite measurement (NaN/inf KL or entropy) leaves the
coefficient unchanged, so one bad batch cannot poison every later step.

`kl_in_reward` lives here, not in `filters.py`: it is the consumer of a KL controller's
coefficient (verl's `use_kl_in_reward` pairs it with `kl_ctrl`), it shapes rewards rather than
masking anything, and it reuses the per-token estimators registered in `regularizers.py`.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from groupwise.algorithms.regularizers import KL_ESTIMATORS


def _as_float(x: float | torch.Tensor) -> float:
    return float(x.detach().float().mean()) if isinstance(x, torch.Tensor) else float(x)


def _check_type(state: dict[str, Any], expected: str) -> None:
    if state.get("type") != expected:
        raise ValueError(f"state of a '{state.get('type')}' controller cannot be loaded into a '{expected}' one")


class FixedKLController:
    """A constant KL coefficient β (verl `kl_ctrl.type=fixed`; TRL `beta`)."""

    type_name = "fixed_kl"

    def __init__(self, coef: float):
        if coef < 0:
            raise ValueError(f"KL coefficient must be ≥ 0, got {coef}")
        self.coef = float(coef)

    def update(self, current_kl: float | torch.Tensor | None = None, n_steps: int = 1) -> float:
        """Return β unchanged (the signature matches `AdaptiveKLController.update`)."""
        return self.coef

    def state_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "coef": self.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_type(state, self.type_name)
        self.coef = float(state["coef"])


class AdaptiveKLController:
    """Adaptive KL coefficient: a proportional controller steering the measured KL to a target.

    Paper: "Fine-Tuning Language Models from Human Preferences" (Ziegler et al., arXiv 1909.08593),
    §2.2; the same rule is verl's `AdaptiveKLController` (`kl_ctrl.type=adaptive`):

        e_t = clip(KL_t / KL_target − 1, −0.2, 0.2)
        β_{t+1} = β_t · (1 + e_t · n_steps / horizon)

    KL above the target raises β, below lowers it, and one update changes β by at most a factor
    1 ± 0.2·n_steps/horizon. `n_steps` is the number of samples the measurement covers: Ziegler
    et al. count episodes, and verl passes the batch size (rows). verl measures `current_kl` as
    the batch mean of each sequence's token-mean KL (`sequence_kl(..., reduce="mean").mean()`).
    """

    type_name = "adaptive_kl"
    CLIP = 0.2

    def __init__(self, init_coef: float, target_kl: float, horizon: float):
        if init_coef < 0:
            raise ValueError(f"KL coefficient must be ≥ 0, got {init_coef}")
        if not target_kl > 0:
            raise ValueError(f"target_kl must be > 0, got {target_kl}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.coef = float(init_coef)
        self.target_kl = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int = 1) -> float:
        kl = _as_float(current_kl)
        if math.isfinite(kl):
            error = min(max(kl / self.target_kl - 1.0, -self.CLIP), self.CLIP)
            self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef

    def state_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "coef": self.coef, "target_kl": self.target_kl, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_type(state, self.type_name)
        self.coef = float(state["coef"])
        self.target_kl = float(state["target_kl"])
        self.horizon = float(state["horizon"])


class AdaptiveEntropyController:
    """Adaptive entropy bonus: raise the coefficient while entropy is at or below a target.

    Paper: "Skywork Open Reasoner 1 Technical Report" (He et al., arXiv 2505.22312), adaptive
    entropy control; implemented as TRL's `use_adaptive_entropy` (defaults below are TRL's):

        α_{k+1} = clip(α_k + δ, α_min, α_max)   if H_k ≤ H_target
        α_{k+1} = clip(α_k − δ, α_min, α_max)   otherwise
        bonus applied with coefficient α_k · 1[H ≤ H_target]           (`active`, `applied_coef`)

    H is the mean per-token entropy of the step (TRL: summed and counted over the whole
    accumulation window and all ranks). TRL gates with the entropy measured at the end of the
    previous optimizer step and updates after the step; the caller picks which entropy to pass.
    """

    type_name = "adaptive_entropy"

    def __init__(self, coef: float = 0.0, target: float = 0.2, delta: float = 0.005,
                 coef_min: float = 0.0, coef_max: float = 1.0):
        if not coef_min <= coef_max:
            raise ValueError(f"need coef_min ≤ coef_max, got {coef_min} > {coef_max}")
        if not coef_min <= coef <= coef_max:
            raise ValueError(f"coef {coef} is outside [coef_min, coef_max] = [{coef_min}, {coef_max}]")
        if delta < 0:
            raise ValueError(f"delta must be ≥ 0, got {delta}")
        self.coef = float(coef)
        self.target = float(target)
        self.delta = float(delta)
        self.coef_min = float(coef_min)
        self.coef_max = float(coef_max)

    def active(self, entropy: float | torch.Tensor) -> bool:
        """Whether the entropy bonus applies at this entropy: only while H ≤ H_target."""
        return _as_float(entropy) <= self.target

    def applied_coef(self, entropy: float | torch.Tensor) -> float:
        """The coefficient to multiply the entropy bonus by: α if `active(entropy)` else 0."""
        return self.coef if self.active(entropy) else 0.0

    def update(self, entropy: float | torch.Tensor) -> float:
        h = _as_float(entropy)
        if math.isfinite(h):
            step = self.delta if h <= self.target else -self.delta
            self.coef = min(max(self.coef + step, self.coef_min), self.coef_max)
        return self.coef

    def state_dict(self) -> dict[str, Any]:
        return {"type": self.type_name, "coef": self.coef, "target": self.target, "delta": self.delta,
                "coef_min": self.coef_min, "coef_max": self.coef_max}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_type(state, self.type_name)
        for key in ("coef", "target", "delta", "coef_min", "coef_max"):
            setattr(self, key, float(state[key]))


# =============================================================================================
# KL in the reward
# =============================================================================================

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sequence_kl(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
    estimator: str | KLEstimator = "k1", reduce: str = "sum",
) -> torch.Tensor:
    """Per-sequence KL to the reference, `[N]`: Σ_t m_t·kl_t ("sum") or that over Σ_t m_t ("mean").

    `estimator` is a name in `KL_ESTIMATORS` (k1 = logp − ref, k2, k3, or a registered/imported
    one) or a callable `(logp, ref_logp) -> kl`. Computed without gradient (a reward, a metric).
    """
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got '{reduce}'")
    fn = KL_ESTIMATORS.get(estimator) if isinstance(estimator, str) else estimator
    with torch.no_grad():
        m = mask.to(logp.dtype)
        total = (fn(logp.detach(), ref_logp.detach()) * m).sum(-1)
        return total if reduce == "sum" else total / m.sum(-1).clamp(min=1)


def token_mean_kl(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, estimator: str | KLEstimator = "k3",
) -> float:
    """The batch's token-mean KL to the reference, the quantity an adaptive β controller tracks
    (Ziegler et al., arXiv 1909.08593; verl's `AdaptiveKLController` is fed the same mean):

        KL̄ = Σ_{i,t} m_{i,t} · kl_{i,t} / max(Σ_{i,t} m_{i,t}, 1)

    `estimator` as in `sequence_kl`. Without gradient; 0 for an all-masked batch.
    """
    kl = sequence_kl(logp, ref_logp, mask, estimator, reduce="sum").sum()
    return float(kl / mask.to(logp.dtype).sum().clamp(min=1))


def kl_in_reward(
    rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
    coef: float, estimator: str | KLEstimator = "k1",
) -> torch.Tensor:
    """KL penalty placed in the reward instead of the loss.

    verl `algorithm.use_kl_in_reward` (token rewards r_t − β·kl_t, whose sum is the sequence score
    for outcome-reward estimators) and TRL's RLOOTrainer (`rewards − β · kl.sum(1)`); the rule goes
    back to Ziegler et al., "Fine-Tuning Language Models from Human Preferences" (arXiv 1909.08593),
    R(x, y) = r(x, y) − β log(π(y|x) / π_ref(y|x)):

        r'_i = r_i − β · Σ_t m_{i,t} · kl_{i,t},     kl = k1 = log π − log π_ref by default

    `logp` should be the sampling (behaviour) policy's log-probs, as verl's `old_log_prob`. The
    penalty carries no gradient; a NaN reward ("not applicable") stays NaN. β usually comes from
    a `FixedKLController` / `AdaptiveKLController`.
    """
    penalty = sequence_kl(logp, ref_logp, mask, estimator, reduce="sum")
    return rewards - coef * penalty.to(device=rewards.device, dtype=rewards.dtype)
