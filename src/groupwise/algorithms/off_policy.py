"""Tensor math for off-policy rows inside a group: teacher traces (LUFFY, AMPO) and replayed rows (RePO).

Pure functions over `[N, T]` tensors, like `losses.py` / `surrogates.py`; nothing here knows about
the trainer. Which rows are off-policy is the caller's business (a bool `is_replay[N]` or a mask).

- `luffy_shaped_surrogate`: policy shaping for tokens whose behaviour probability is unknown
  (a teacher's trace): −f(π_θ)·A with f(p) = p/(p+γ), unclipped.
- `replay_log_ratio`: log π_θ − log π_behaviour for replayed completions (their stored sampling
  log-probs); RePO feeds it to the ordinary PPO clip (`losses.ppo_clip_loss`).
- `repo_advantages`: RePO's two advantage modes for a group of on-policy + replayed rows.
- `repo_objective`: RePO's on / off split of the loss, `L = L_on + c·L_off`.
"""
from __future__ import annotations

import math

import torch

from groupwise.algorithms.losses import _LOG_RATIO_LIMIT


def _check_2d(name: str, x: torch.Tensor, like: torch.Tensor | None = None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a [N, T] tensor, got {getattr(x, 'shape', type(x))}")
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(like.shape)} (as logp)")


def _broadcast_adv(adv: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    if adv.dim() == 1 and adv.shape[0] == logp.shape[0]:
        return adv[:, None].to(logp.dtype)
    if adv.shape == logp.shape:
        return adv.to(logp.dtype)
    raise ValueError(f"adv must be [N] or [N, T] with N, T of logp {tuple(logp.shape)}, got {tuple(adv.shape)}")


def luffy_shaped_surrogate(logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *, gamma: float = 0.1) -> torch.Tensor:
    """Per-token loss of off-policy (teacher) tokens under LUFFY's policy shaping.

    Paper: "Learning to Reason under Off-Policy Guidance" (Yan et al., arXiv 2504.14945), §
    "policy shaping via regularized importance sampling".

        f(p)  = p / (p + γ),   p = π_θ(y_t) = exp(logp_t),   γ = 0.1
        ℓ_t   = −f(p_t) · A            (behaviour probability taken as 1, no clipping)
        ∂ℓ_t/∂logp_t = −A · γ p_t / (p_t + γ)²

    f is computed as sigmoid(logp − ln γ) (the same number, stable for very negative logp), so
    0 ≤ f < 1/(1+γ) < 1, f is increasing in p, and the gradient weight γp/(p+γ)² peaks at p = γ and
    vanishes as p → 0 and shrinks towards γ/(1+γ)² as p → 1: low-probability teacher tokens are
    emphasised instead of being ignored (plain p) or blown up (1/p).

    Verified against the reference code: LUFFY's `compute_token_on_off_policy_loss`
    (`off_policy_reshape="p_div_p_0.1"`: `off_ratio = p/(p+0.1)`, `off_pg_losses = -A*off_ratio`,
    no off-policy clip by default; LUFFY's training script also sets `loss_remove_clip=True`).
    AMPO ("More Than One Teacher: Adaptive Multi-Guidance Policy Optimization", arXiv 2510.02227;
    SII-Enigma/AMPO `ampo/verl/verl/adaptive_mix_src/mix_core_alg.py`, run with
    `off_policy_reshape="p_div_p_0.1"` in `exp_scripts/train_ampo.sh`) uses the identical shaping
    for its teacher rows; its on-policy rows keep PPO + dual clip (c = 10).
    Both compute the advantage jointly over the group (on-policy ∪ off-policy rows); AMPO's script
    uses mean-centring only (`norm_adv_by_std_in_grpo=False`).

    `adv` is [N] (broadcast over tokens) or [N, T]; the loss is 0 where `mask` is 0.
    """
    _check_2d("logp", logp)
    _check_2d("mask", mask, logp)
    if not gamma > 0 or not math.isfinite(gamma):
        raise ValueError(f"luffy_shaped_surrogate: gamma must be a finite number > 0, got {gamma}")
    a = _broadcast_adv(adv, logp)
    shaped = torch.sigmoid(logp - math.log(gamma))
    return -shaped * a * (mask > 0).to(logp.dtype)


def replay_log_ratio(logp: torch.Tensor, behaviour_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token importance log-ratio of a replayed completion against the policy that sampled it.

    Paper: "RePO: Replay-Enhanced Policy Optimization" (Li et al., arXiv 2506.09340).

        log w_t = log π_θ(o_t) − log π_behaviour(o_t)      (0 where mask = 0)

    π_behaviour is the (older) policy that generated the replayed completion: its per-token
    log-probs are stored with it in the replay buffer (RePO stores `old_per_token_logps`, computed
    when the completion was generated) and are never recomputed. Verified against
    SihengLi99/RePO `src/replay_grpo_trainer.py` (`_update_cache`, `_compute_loss`): the replayed
    rows use exactly the PPO surrogate of the on-policy rows, `ratio = exp(logp − old_logp)` clipped
    to [1 − ε_low, 1 + ε_high] (ε = 0.2 in the paper's script), so pass this log-ratio, or
    `old_logp = behaviour_logp`, to `losses.ppo_clip_loss`. The log-ratio is clamped to ±20 (as
    verl and `losses` do) so exp() stays finite after many steps of drift.
    """
    _check_2d("logp", logp)
    _check_2d("behaviour_logp", behaviour_logp, logp)
    _check_2d("mask", mask, logp)
    diff = (logp - behaviour_logp).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    return torch.where(mask > 0, diff, torch.zeros_like(diff))


def _segment_mean_std(values: torch.Tensor, segment: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and unbiased std of its segment (std 0 for a segment of one row)."""
    ones = torch.ones_like(values)
    count = torch.zeros(num, dtype=values.dtype, device=values.device).index_add_(0, segment, ones)
    total = torch.zeros(num, dtype=values.dtype, device=values.device).index_add_(0, segment, values)
    mean = total / count.clamp(min=1)
    dev2 = (values - mean[segment]) ** 2
    ss = torch.zeros(num, dtype=values.dtype, device=values.device).index_add_(0, segment, dev2)
    std = torch.sqrt(ss / (count - 1).clamp(min=1))
    std = torch.where(count > 1, std, torch.zeros_like(std))
    return mean[segment], std[segment]


def repo_advantages(
    rewards: torch.Tensor,
    group_id: torch.Tensor,
    is_replay: torch.Tensor,
    *,
    mode: str = "split",
    scale_std: bool = True,
    eps: float = 1e-4,
) -> torch.Tensor:
    """RePO advantages for groups that hold on-policy rows and replayed rows of the same prompt.

    Paper: "RePO: Replay-Enhanced Policy Optimization" (Li et al., arXiv 2506.09340): "advantage
    estimation is performed separately for on-policy and off-policy updates".

        split (default):  A_i = (r_i − mean(S_i)) / (std(S_i) + ε),  S_i = the rows of i's group
                          with the same `is_replay` flag as i (on-policy and replayed normalised apart)
        mixed:            S_i = all rows of i's group (one joint normalisation)

    std is the unbiased (Bessel) standard deviation and ε = 1e-4, both as in the reference code;
    `scale_std=False` leaves A_i = r_i − mean(S_i) (TRL's `scale_rewards=False`). A set of one row gets
    std 0, so its advantage is 0 (the reference code would produce NaN there).
    Verified against SihengLi99/RePO `src/replay_grpo_trainer.py` (`adv_norm_mode`, default and
    script value "split"). NaN rewards raise ValueError (decide them before calling).
    """
    if rewards.dim() != 1 or group_id.shape != rewards.shape or is_replay.shape != rewards.shape:
        raise ValueError(f"repo_advantages: rewards, group_id and is_replay must be [N] tensors of one length, "
                         f"got {tuple(rewards.shape)}, {tuple(group_id.shape)}, {tuple(is_replay.shape)}")
    if mode not in ("split", "mixed"):
        raise ValueError(f"repo_advantages: mode must be 'split' or 'mixed', got {mode!r}")
    if rewards.numel() == 0:
        return rewards.clone()
    bad = torch.nonzero(~torch.isfinite(rewards))
    if bad.numel():
        raise ValueError(f"repo_advantages: rewards row {int(bad[0])} is not finite")
    if int(group_id.min()) < 0:
        raise ValueError(f"repo_advantages: group_id row {int(torch.nonzero(group_id < 0)[0])} is negative")
    r = rewards.double()
    gid = group_id.long()
    segment = gid * 2 + is_replay.long() if mode == "split" else gid
    mean, std = _segment_mean_std(r, segment, int(segment.max()) + 1)
    adv = r - mean
    if scale_std:
        adv = adv / (std + eps)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def repo_objective(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    is_replay: torch.Tensor,
    *,
    off_policy_coef: float = 1.0,
    aggregation: str = "seq_mean_token_mean",
) -> torch.Tensor:
    """RePO's combination of the on-policy and replayed parts of a batch: L = L_on + c · L_off.

    Paper: "RePO: Replay-Enhanced Policy Optimization" (Li et al., arXiv 2506.09340), J_RePO =
    J_on-policy + J_off-policy. Each part is aggregated over its own rows only:

        seq_mean_token_mean (TRL "grpo"): L_x = (1/N) Σ_{rows i in x} (Σ_t m ℓ / Σ_t m)
        token_mean          (TRL "bnpo"): L_x = Σ_{rows in x} Σ_t m ℓ / Σ_{rows in x} Σ_t m

    N counts all rows given (the reference masks the other part's rows to 0 and then takes the mean
    over the whole batch), so with seq_mean_token_mean L is the plain per-row mean with replayed rows
    weighted by c. c = `off_policy_coef` (1.0 in the paper's script; 0 disables the replayed part).
    A part with no valid token contributes 0. Verified against SihengLi99/RePO
    `src/replay_grpo_trainer.py` (`_compute_loss` / `_aggregate`: `loss = on_loss +
    off_policy_loss_coef * off_loss`; the KL term, when on, is added to the on-policy part only).
    The means run over the rows given (one micro-batch), as in the reference.
    """
    _check_2d("per_token_loss", per_token_loss)
    _check_2d("mask", mask, per_token_loss)
    if is_replay.shape != per_token_loss.shape[:1]:
        raise ValueError(f"repo_objective: is_replay must be [N] = [{per_token_loss.shape[0]}], got {tuple(is_replay.shape)}")
    if aggregation not in ("seq_mean_token_mean", "token_mean"):
        raise ValueError(f"repo_objective: aggregation must be 'seq_mean_token_mean' or 'token_mean', got {aggregation!r}")
    m = (mask > 0).to(per_token_loss.dtype)
    masked = torch.where(mask > 0, per_token_loss, torch.zeros_like(per_token_loss))
    row_sum, row_len = masked.sum(-1), m.sum(-1)
    parts = []
    for rows in (~is_replay.bool(), is_replay.bool()):
        if aggregation == "token_mean":
            parts.append((row_sum * rows).sum() / (row_len * rows).sum().clamp(min=1))
        else:
            per_row = row_sum / row_len.clamp(min=1)
            parts.append((per_row * rows).sum() / max(int(rows.numel()), 1))
    return parts[0] + off_policy_coef * parts[1]
