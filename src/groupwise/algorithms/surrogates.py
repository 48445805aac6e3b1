"""The GRPO family's other policy surrogates, registered into `losses.POLICY_LOSSES`.

Same contract as `losses.ppo_clip_loss`:

    fn(log_ratio[N,T], advantages[N,T], logp[N,T], *, old_logp, mask, <options>) -> SurrogateOutput

`log_ratio` comes from the selected ratio level (token, sequence, geometric); `advantages` is
already broadcast to tokens; `mask` (float, 0 = padding or filtered) is given so a surrogate that
needs statistics over the valid tokens (clip_cov, kl_cov, gmpo, disco) can ignore the rest. The
returned per-token loss is then masked and aggregated by `objective.policy_objective`, so values at
masked positions only have to be finite. Statistics that a surrogate computes over "the batch"
are over the tokens it is given: one micro-batch (as verl does for clip_cov / kl_cov).

Note on `eps_low` / `eps_high`: these names are also flat config fields (`algorithm.eps_low`,
`algorithm.eps_high`). A flat field reaches a surrogate only when the user sets it (see
`options.py`), so each surrogate's defaults below are its paper's; `algorithm.loss_options`
overrides the flat fields and is the only way to give cispo `eps_low ≥ 1` (the flat field must
stay below 1).
"""
from __future__ import annotations

import torch

from groupwise.algorithms.losses import _LOG_RATIO_LIMIT, POLICY_LOSSES, SurrogateOutput


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_ratio.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT))


def _valid(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(like, dtype=torch.bool) if mask is None else mask > 0


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of x over the valid tokens (scalar; 0 when none). Invalid entries may be anything finite or not."""
    total = torch.where(valid, x, torch.zeros_like(x)).sum()
    return total / valid.sum().clamp(min=1).to(x.dtype)


def _require_old(old_logp: torch.Tensor | None, name: str) -> torch.Tensor:
    if old_logp is None:
        raise ValueError(f"policy loss '{name}' needs old_logp (the behaviour policy's log-probs)")
    return old_logp


def _no_flags(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.zeros_like(like, dtype=torch.bool)
    return z, z.clone()


def _ppo_max(ratio: torch.Tensor, advantages: torch.Tensor, low, high) -> torch.Tensor:
    """max(−A·w, −A·clip(w, low, high)) = −min(w A, clip(w) A); low/high may be tensors."""
    return torch.maximum(-advantages * ratio, -advantages * torch.clamp(ratio, low, high))


def _covariance(advantages: torch.Tensor, logp: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-token centred product (A − Ā)(log π − mean log π), means over the valid tokens (detached)."""
    adv = advantages.detach()
    lp = logp.detach()
    return (adv - _masked_mean(adv, valid)) * (lp - _masked_mean(lp, valid))


# ---------------------------------------------------------------------------------------------
# Hard-clip variants
# ---------------------------------------------------------------------------------------------

@POLICY_LOSSES.register("dual_clip")
def dual_clip_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    logp: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_ratio_c: float = 3.0,
) -> SurrogateOutput:
    """Dual-clip PPO: the PPO clip plus a cap of the loss of negative-advantage tokens.

    Paper: "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning" (Ye et al.,
    arXiv 1912.09729); as verl's `vanilla` policy loss with `clip_ratio_c`.

        ℓ_ppo = max(−A w, −A clip(w, 1 − ε_low, 1 + ε_high))
        ℓ_t   = min(ℓ_ppo, −c A)   if A < 0,   ℓ_ppo otherwise,      c = clip_ratio_c > 1

    For A < 0 a ratio w > c no longer grows the loss (zero gradient), so one very off-policy token
    cannot dominate the update. `clip_ratio_c ≤ 1` raises ValueError (verl asserts the same).
    Flags: `clipped_low` = the PPO lower clip is active (A < 0, w < 1 − ε_low); `clipped_high` =
    the ratio is above its upper cap: PPO's (A > 0, w > 1 + ε_high) or the dual clip (A < 0, w > c).
    """
    if not clip_ratio_c > 1.0:
        raise ValueError(f"dual_clip: clip_ratio_c must be > 1 (got {clip_ratio_c})")
    ratio = _ratio(log_ratio)
    ppo = _ppo_max(ratio, advantages, 1.0 - eps_low, 1.0 + eps_high)
    loss = torch.where(advantages < 0, torch.minimum(ppo, -advantages * clip_ratio_c), ppo)
    with torch.no_grad():
        clipped_low = (ratio < 1.0 - eps_low) & (advantages < 0)
        clipped_high = ((ratio > 1.0 + eps_high) & (advantages > 0)) | ((ratio > clip_ratio_c) & (advantages < 0))
    return SurrogateOutput(loss, clipped_low, clipped_high)


@POLICY_LOSSES.register("two_sided")
def two_sided_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    logp: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    delta: float,
) -> SurrogateOutput:
    """Two-sided clipping: PPO clip with the unclipped ratio additionally capped at δ.

    Paper: "INTELLECT-2: A Reasoning Model Trained Through Globally Decentralized Reinforcement
    Learning" (Prime Intellect, arXiv 2505.07291); TRL's `delta` option (anchors §1.2).

        ℓ_t = −min(min(w, δ) A, clip(w, 1 − ε_low, 1 + ε_high) A),   δ > 1 + ε_high (required)

    For A > 0 this is PPO (clip(w) ≤ 1 + ε_high < δ); for A < 0 the loss stops growing at w = δ
    (zero gradient beyond), the same shape as dual-clip with c = δ. `delta` has no default (TRL
    leaves it off unless set; INTELLECT-2 used 4); δ ≤ 1 + ε_high raises ValueError because then
    the cap would cut into the trust region itself.
    Flags: `clipped_low` = A < 0 and w < 1 − ε_low; `clipped_high` = A > 0 and w > 1 + ε_high,
    or A < 0 and w > δ (the cap is active).
    """
    if not delta > 1.0 + eps_high:
        raise ValueError(f"two_sided: delta must be > 1 + eps_high = {1.0 + eps_high} (got {delta})")
    ratio = _ratio(log_ratio)
    capped = torch.clamp(ratio, max=delta)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.minimum(capped * advantages, clipped * advantages)
    with torch.no_grad():
        clipped_low = (ratio < 1.0 - eps_low) & (advantages < 0)
        clipped_high = ((ratio > 1.0 + eps_high) & (advantages > 0)) | ((ratio > delta) & (advantages < 0))
    return SurrogateOutput(loss, clipped_low, clipped_high)


@POLICY_LOSSES.register("dcpo")
def dcpo_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    logp: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    eps_low: float = 0.16,
    eps_high: float = 0.2,
    clip_ratio_c: float = 10.0,
) -> SurrogateOutput:
    """DCPO dynamic-adaptive clipping: per-token clip bounds from the token's prior probability.

    Paper: "DCPO: Dynamic Clipping Policy Optimization" (Yang et al., arXiv 2509.02333); formula
    from the paper (§ dynamic-adaptive clipping) and its reference code (github.com/lime-RL/DCPO,
    `get_clip_low_high` and `compute_policy_loss_dcpo` with `clip_type=dynamic`).

    With q = π_old(o_t) = exp(old_logp) the token's prior probability, the constraint
    |(w − 1)·w·q| ≤ ε gives

        low_t  = ½ + ½ √max(1 − 4 ε_low / q, 0)
        high_t = min(½ + ½ √(1 + 4 ε_high / q), c)
        ℓ_ppo  = max(−A w, −A clip(w, low_t, high_t))
        ℓ_t    = min(ℓ_ppo, −c A)   if A < 0,   ℓ_ppo otherwise            c = clip_ratio_c > 1

    Rare tokens (small q) get a wider range (a ratio of up to c = 10 for q → 0), confident tokens
    a range close to PPO's. Choices: defaults ε_low = 0.16, ε_high = 0.2 are the paper's (its
    training scripts pass 0.2 / 0.28 through verl's clip_ratio_low / clip_ratio_high);
    c = 10 is the scripts' `clip_ratio_c`. The reference code caps `high` at max(c, 10) and also
    applies verl's dual clip with c to A < 0; we cap at c itself (identical at the default).
    The smooth advantage standardization of the same paper is an advantage estimator (`dcpo_sas`),
    and its "OTM" loss is the aggregation `seq_mean_token_sum`.
    Flags: `clipped_low` = A < 0 and w < low_t; `clipped_high` = A > 0 and w > high_t, or A < 0
    and w > c.
    """
    old_logp = _require_old(old_logp, "dcpo")
    if not clip_ratio_c > 1.0:
        raise ValueError(f"dcpo: clip_ratio_c must be > 1 (got {clip_ratio_c})")
    ratio = _ratio(log_ratio)
    with torch.no_grad():
        tiny = torch.finfo(old_logp.dtype).tiny
        q = torch.exp(old_logp.detach()).clamp(min=tiny)
        low = 0.5 + 0.5 * torch.sqrt(torch.clamp(1.0 - 4.0 * eps_low / q, min=0.0))
        high = torch.clamp(0.5 + 0.5 * torch.sqrt(1.0 + 4.0 * eps_high / q), max=clip_ratio_c)
    ppo = _ppo_max(ratio, advantages, low, high)
    loss = torch.where(advantages < 0, torch.minimum(ppo, -advantages * clip_ratio_c), ppo)
    with torch.no_grad():
        clipped_low = (ratio < low) & (advantages < 0)
        clipped_high = ((ratio > high) & (advantages > 0)) | ((ratio > clip_ratio_c) & (advantages < 0))
    return SurrogateOutput(loss, clipped_low, clipped_high)


# ---------------------------------------------------------------------------------------------
# Weight-clipped and soft-gated surrogates
# ---------------------------------------------------------------------------------------------

@POLICY_LOSSES.register("cispo")
def cispo_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    logp: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    eps_low: float = 1.0,
    eps_high: float = 4.0,
) -> SurrogateOutput:
    """CISPO: clip the importance-sampling weight (stop-gradient), never the token's gradient.

    Paper: "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention" (MiniMax,
    arXiv 2506.13585), §CISPO; as verl's `cispo` policy loss.

        ℓ_t = −sg(clip(w, max(1 − ε_low, 0), 1 + ε_high)) · A · log π_θ(o_t)

    Every token keeps the REINFORCE gradient −A ∇log π, scaled by the clipped (detached) weight,
    so clipped tokens still learn (unlike PPO, which zeroes their gradient). The value is not a
    ratio-times-advantage, so compare the gradient, not the loss, with PPO.
    TRL vs verl: TRL caps from above only, `clamp(w, max=epsilon_high)` with `epsilon_high` the
    absolute cap (recommended 5.0); verl clips two-sided, [1 − clip_low, 1 + clip_high]. We use
    verl's two-sided form, with the lower bound floored at 0: ε_low ≥ 1 disables it, which gives
    TRL's semantics with TRL `epsilon_high` = 1 + ε_high. The paper sets ε_low large (no lower
    clip) and tunes only the upper bound; the defaults here (ε_low = 1, ε_high = 4 ⇒ TRL's
    recommended cap 5.0) follow that. Set them in `loss_options`: the flat `algorithm.eps_low`
    field must stay below 1.
    Flags: where the weight clip is active, whatever the sign of A: `clipped_low` = w below the
    lower bound, `clipped_high` = w above 1 + ε_high.
    """
    if eps_low < 0 or eps_high < 0:
        raise ValueError(f"cispo: eps_low and eps_high must be ≥ 0 (got {eps_low}, {eps_high})")
    ratio = _ratio(log_ratio)
    lower, upper = max(1.0 - eps_low, 0.0), 1.0 + eps_high
    weight = torch.clamp(ratio, lower, upper).detach()
    loss = -weight * advantages * logp
    with torch.no_grad():
        clipped_low = ratio < lower
        clipped_high = ratio > upper
    return SurrogateOutput(loss, clipped_low, clipped_high)


@POLICY_LOSSES.register("sapo")
def sapo_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    logp: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> SurrogateOutput:
    """SAPO: a smooth sigmoid gate on the ratio instead of a hard clip.

    Paper: "Soft Adaptive Policy Optimization" (Qwen team, arXiv 2511.20347); formula as in
    TRL's `sapo` loss and verl's `sapo` policy loss (anchors §1.2, §2.2).

        ℓ_t = −(4/τ) σ(τ (w − 1)) · A,     τ = τ_pos if A > 0 else τ_neg

    Gradient: −A · 4σ(x)(1 − σ(x)) · w ∇log π with x = τ(w − 1); at w = 1, 4σ'(0) = 1, so it equals
    the on-policy policy gradient −A ∇log π, and it decays smoothly as w leaves 1 (faster for
    negative advantages, τ_neg > τ_pos, as the paper recommends). TRL and verl pair it with the
    per-sequence token mean (`seq_mean_token_mean`).
    Flags (there is no hard clip): the gate has attenuated the unclipped importance-weighted
    gradient −A w ∇log π by more than half, 4σ(x)(1 − σ(x)) < ½; `clipped_high` where w > 1,
    `clipped_low` where w < 1 (with τ ≈ 1 the low side never reaches ½).
    """
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"sapo: tau_pos and tau_neg must be > 0 (got {tau_pos}, {tau_neg})")
    ratio = _ratio(log_ratio)
    tau = torch.where(advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    loss = -gate * advantages
    with torch.no_grad():
        s = torch.sigmoid(tau * (ratio - 1.0))
        attenuated = 4.0 * s * (1.0 - s) < 0.5
        clipped_low = attenuated & (ratio < 1.0)
        clipped_high = attenuated & (ratio > 1.0)
    return SurrogateOutput(loss, clipped_low, clipped_high)


@POLICY_LOSSES.register("gmpo")
def gmpo_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    logp: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    eps_low: float = 0.4,
    eps_high: float = 0.4,
) -> SurrogateOutput:
    """GMPO: maximize the geometric mean of the token ratios, each clipped in log space by the sign of A.

    Paper: "Geometric-Mean Policy Optimization" (Zhao et al., arXiv 2507.20673); formula as verl's
    `geo_mean` policy loss (anchors §2.2) and TRL's experimental GMPO (ε = 0.4 both sides).

        x_t   = log_ratio_t                                 (per token: use `ratio_level: token`)
        x̃_t   = min(x_t, ε_high) if A_t > 0;  max(x_t, −ε_low) if A_t < 0;  clip(x_t, −ε_low, ε_high) if A_t = 0
        r_i   = exp( Σ_t m_t x̃_t / Σ_t m_t )                 (geometric mean over the valid tokens)
        ℓ_t   = −A_t · r_i                                   (r_i broadcast to every token of row i)

    With `seq_mean_token_mean` aggregation this is exactly verl's mean_i(−Ā_i r_i); other
    aggregations weight rows differently. Design: GMPO's clip needs the sign of A, which a ratio
    level never sees, so the clip and the geometric mean both live here and this surrogate reads
    per-token log-ratios from `log_ratio`. (With `ratio_level: sequence` or `geometric` every x_t is
    already the row's mean, and this becomes the sign-aware log-space clip of the GSPO ratio.)
    The gradient of token t is −A_i r_i (1/|o_i|) ∇log π(o_t) unless its log-ratio was clipped (0).
    A = 0 tokens (verl multiplies their log-ratio by sign(A) = 0, shrinking the mean) are clipped on
    both sides instead; their own loss is 0 either way.
    Flags: `clipped_high` = A > 0 and x_t > ε_high; `clipped_low` = A < 0 and x_t < −ε_low.
    """
    x = log_ratio.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    m = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    clipped_x = torch.where(
        advantages > 0,
        x.clamp(max=eps_high),
        torch.where(advantages < 0, x.clamp(min=-eps_low), x.clamp(-eps_low, eps_high)),
    )
    length = m.sum(-1, keepdim=True).clamp(min=1)
    seq_log = (clipped_x * m).sum(-1, keepdim=True) / length
    loss = -advantages * torch.exp(seq_log).expand_as(x)
    with torch.no_grad():
        clipped_low = (x < -eps_low) & (advantages < 0)
        clipped_high = (x > eps_high) & (advantages > 0)
    return SurrogateOutput(loss, clipped_low, clipped_high)


# ---------------------------------------------------------------------------------------------
# Ratio-free policy gradient
# ---------------------------------------------------------------------------------------------

@POLICY_LOSSES.register("reinforce")
@POLICY_LOSSES.register("gpg")
def reinforce_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    logp: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> SurrogateOutput:
    """REINFORCE / GPG: the plain policy-gradient loss, no ratio and no clip.

    Papers: Williams, "Simple statistical gradient-following algorithms for connectionist
    reinforcement learning" (1992); "GPG: A Simple and Strong Reinforcement Learning Baseline for
    Model Reasoning" (Chu et al., arXiv 2504.02546); verl's `gpg` policy loss.

        ℓ_t = −A · log π_θ(o_t)

    `log_ratio` is ignored, so this is the on-policy gradient: with `num_iterations > 1` the later
    passes are not importance-corrected. GPG's advantage scaling is its own estimator (`gpg`).
    Registered under both names (same function). Flags: always False (nothing is clipped).
    """
    loss = -advantages * logp
    return SurrogateOutput(loss, *_no_flags(loss))


# ---------------------------------------------------------------------------------------------
# Covariance-based entropy control (The Entropy Mechanism of RL for Reasoning LMs)
# ---------------------------------------------------------------------------------------------

def _selection_generator(seed: int, logp: torch.Tensor, valid: torch.Tensor) -> torch.Generator:
    """A CPU generator seeded by `seed` and a digest of the valid log-probs: reproducible for the
    same inputs, yet a different draw at every step (a fixed seed alone would pick the same
    positions of the candidate list whenever the candidate count repeats)."""
    digest = float(torch.where(valid, logp.detach(), torch.zeros_like(logp)).double().sum())
    mixed = (int(seed) * 1_000_003 + int(abs(digest) * 1e6)) % (2**62)
    return torch.Generator(device="cpu").manual_seed(mixed)


@POLICY_LOSSES.register("clip_cov")
def clip_cov_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    logp: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    seed: int = 0,
) -> SurrogateOutput:
    """Clip-Cov: PPO clip, plus no gradient for a few random tokens of high covariance.

    Paper: "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models" (Cui et
    al., arXiv 2505.22617); formula as verl's `clip_cov` policy loss (anchors §2.2), defaults as verl.

        cov_t = (A_t − Ā)(log π_t − mean log π)            (means over the valid tokens, detached)
        C     = {valid t : not PPO-clipped, clip_cov_lb < cov_t < clip_cov_ub}
        S     = max(⌊clip_cov_ratio · #valid⌋, 1) tokens drawn uniformly from C (all of C if fewer)
        ℓ_t   = 0 if t ∈ S,   max(−A w, −A clip(w, 1 − ε_low, 1 + ε_high)) otherwise

    The paper's reasoning: entropy falls in proportion to the covariance between log-probability
    and advantage, so cutting the gradient of the few highest-covariance tokens slows the collapse.
    Determinism (verl draws with the global torch RNG): the draw uses a private CPU generator
    seeded by the option `seed` mixed with a digest of the valid log-probs, so the same inputs and
    seed always select the same tokens, and no global RNG state is touched. Statistics and the
    count are over the tokens this call sees (one micro-batch), as in verl.
    Flags: tokens whose gradient is cut, by the ratio clip (as `ppo_clip`) or by the selection S
    (`clipped_low` if A < 0, `clipped_high` if A > 0).
    """
    if not 0.0 <= clip_cov_ratio <= 1.0:
        raise ValueError(f"clip_cov: clip_cov_ratio must be in [0, 1] (got {clip_cov_ratio})")
    ratio = _ratio(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    ppo = torch.maximum(pg_unclipped, pg_clipped)
    valid = _valid(mask, ratio)
    with torch.no_grad():
        by_ratio = (pg_clipped > pg_unclipped) & valid
        cov = _covariance(advantages, logp, valid)
        candidates = valid & ~by_ratio & (cov > clip_cov_lb) & (cov < clip_cov_ub)
        selected = torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)
        idx = torch.nonzero(candidates.reshape(-1), as_tuple=False).squeeze(-1)
        if clip_cov_ratio > 0 and idx.numel() > 0:
            k = max(int(clip_cov_ratio * int(valid.sum())), 1)
            perm = torch.randperm(idx.numel(), generator=_selection_generator(seed, logp, valid))
            selected.view(-1)[idx[perm[:k].to(idx.device)]] = True
    loss = torch.where(selected, torch.zeros_like(ppo), ppo)
    with torch.no_grad():
        clipped_low = ((ratio < 1.0 - eps_low) & (advantages < 0)) | (selected & (advantages < 0))
        clipped_high = ((ratio > 1.0 + eps_high) & (advantages > 0)) | (selected & (advantages > 0))
    return SurrogateOutput(loss, clipped_low, clipped_high)


@POLICY_LOSSES.register("kl_cov")
def kl_cov_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    logp: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    kl_cov_ratio: float = 2e-4,
    ppo_kl_coef: float = 1.0,
) -> SurrogateOutput:
    """KL-Cov: unclipped surrogate, plus a |log-ratio| penalty on the top tokens by covariance.

    Paper: "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models" (Cui et
    al., arXiv 2505.22617); formula as verl's `kl_cov` policy loss (anchors §2.2), defaults as verl.

        cov_t = (A_t − Ā)(log π_t − mean log π)            (means over the valid tokens, detached)
        S     = the max(⌊kl_cov_ratio · #valid⌋, 1) valid tokens of largest cov_t
        ℓ_t   = −A w + [t ∈ S] · ppo_kl_coef · |log w|

    With `ratio_level: token`, |log w| = |log π_θ − log π_old| as in verl. The selection is
    deterministic: top-k by covariance, ties to the earlier token (row-major order); verl's
    `torch.topk` leaves ties unspecified. Statistics and the count are over the
    tokens this call sees (one micro-batch), as in verl. No ratio clip at all: the KL term is the
    only trust region, and only on the selected tokens.
    Flags: the penalized tokens S, `clipped_low` if A < 0, `clipped_high` if A > 0.
    """
    if not 0.0 <= kl_cov_ratio <= 1.0:
        raise ValueError(f"kl_cov: kl_cov_ratio must be in [0, 1] (got {kl_cov_ratio})")
    x = log_ratio.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = torch.exp(x)
    valid = _valid(mask, ratio)
    with torch.no_grad():
        selected = torch.zeros(valid.shape, dtype=torch.bool, device=valid.device)
        n_valid = int(valid.sum())
        if kl_cov_ratio > 0 and n_valid > 0:
            cov = _covariance(advantages, logp, valid)
            idx = torch.nonzero(valid.reshape(-1), as_tuple=False).squeeze(-1)
            k = max(int(n_valid * kl_cov_ratio), 1)
            # stable descending sort: ties (e.g. one advantage for every token → cov ≡ 0) go to
            # the earlier position, so the selection is fully specified, not left to topk
            top = torch.sort(cov.reshape(-1)[idx], descending=True, stable=True).indices[:k]
            selected.view(-1)[idx[top]] = True
    loss = -advantages * ratio + torch.where(selected, ppo_kl_coef * x.abs(), torch.zeros_like(x))
    with torch.no_grad():
        clipped_low = selected & (advantages < 0)
        clipped_high = selected & (advantages > 0)
    return SurrogateOutput(loss, clipped_low, clipped_high)


# ---------------------------------------------------------------------------------------------
# DisCO
# ---------------------------------------------------------------------------------------------

def _disco_question_weights(
    advantages: torch.Tensor, valid: torch.Tensor, group_id: torch.Tensor, score: torch.Tensor, tau: float | None
) -> torch.Tensor:
    """Per-row weight c_i of DisCO's per-question objective (vectorized over questions).

    Positives (A > 0) get |q|/n⁺_q, negatives (A < 0) get −|q|/n⁻_q, or with τ the negatives get
    −|q|·softmax_{o⁻∈q}(s(o⁻)/τ), the gradient of τ log E exp(s(o⁻)/τ). |q| = the question's trainable
    rows, so that a sequence-mean aggregation over N = Σ|q| rows gives the mean over questions.
    """
    gid = group_id.long()
    ng = int(gid.max()) + 1
    row_valid = valid.any(-1)
    a_row = (advantages * valid).sum(-1) / valid.sum(-1).clamp(min=1)
    pos, neg = row_valid & (a_row > 0), row_valid & (a_row < 0)
    count = lambda m: torch.zeros(ng, dtype=score.dtype, device=score.device).index_add_(0, gid, m.to(score.dtype))  # noqa: E731
    size, n_pos, n_neg = count(row_valid), count(pos), count(neg)
    w_pos = size[gid] / n_pos[gid].clamp(min=1)
    if tau is None:
        w_neg = size[gid] / n_neg[gid].clamp(min=1)
    else:
        z = torch.where(neg, score / tau, torch.full_like(score, -torch.inf))
        zmax = torch.full((ng,), -torch.inf, dtype=score.dtype, device=score.device).scatter_reduce(0, gid, z, reduce="amax")
        e = torch.where(neg, torch.exp(z - zmax[gid]), torch.zeros_like(score))
        w_neg = size[gid] * e / count(e)[gid].clamp(min=1e-30)
    return torch.where(pos, w_pos, torch.zeros_like(w_pos)) - torch.where(neg, w_neg, torch.zeros_like(w_neg))


@POLICY_LOSSES.register("disco")
def disco_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    logp: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    group_id: torch.Tensor | None = None,
    score: str = "logL",
    weighting: str = "question",
    tau: float | None = None,
    delta: float = 1e-4,
    beta: float = 1e3,
) -> SurrogateOutput:
    """DisCO: raise positives' scores and lower negatives', per question, with a squared-hinge KL
    trust region instead of clipping.

    Paper: "DisCO: Reinforcing Large Reasoning Models with Discriminative Constrained Optimization"
    (Li et al., arXiv 2505.12366); reference code github.com/Optimization-AI/DisCO and verl's DisCO
    recipe (`score_func` logL | Lratio, delta 1e-4, beta 1e3).

        s(o)    = (1/|o|) Σ_t f_t,   f_t = log π_θ(o_t) ("logL")  or  w_t ("Lratio")
        J_q     = mean_{o⁺∈q} s(o⁺) − mean_{o⁻∈q} s(o⁻)                          (DisCO-b, tau null)
        J_q     = mean_{o⁺∈q} s(o⁺) − τ log mean_{o⁻∈q} exp(s(o⁻)/τ)             (DisCO, tau set)
        kl_t    = w_t − 1 − log w_t,   w_t = π_θ(o_t)/π_old(o_t)   (k3 of KL(π_old ‖ π_θ))
        ℓ_t     = −c_i f_t + sg(β · max(KL̄ − δ, 0)) · kl_t
        c_i     = |q|/n⁺_q (o_i positive),  −|q|/n⁻_q or −|q|·softmax_{o⁻∈q}(sg s/τ) (o_i negative)

    Positives are rows with A > 0, negatives A < 0 (with binary rewards: correct / wrong in a mixed
    question; all-correct and all-wrong questions have A = 0 and drop out, as in the paper). With
    `seq_mean_token_mean` aggregation, −mean_i c_i s(o_i) = −mean_q J_q: the paper's objective.
    `weighting: question` (default) needs the rows' group ids, which the trainer passes; the config
    then requires micro- and mini-batches that hold whole groups. `sign` (c_i = sign A_i) and
    `advantage` (c_i = A_i) need no groups and are kept for comparison.
    With τ the negative weights are the softmax's stop-gradient, so the gradient is exact and the
    reported loss value is its linearization. The KL term: with `token_mean` and the whole step in
    one micro-batch it is the reference code's sg(β·[KL̄ − δ]₊)·KL̄, whose gradient is that of
    (β/2)[KL̄ − δ]₊² (the paper's squared hinge up to the factor ½ the code drops); KL̄ is computed per
    micro-batch. `kl_t` uses log π_θ − log π_old whatever the ratio level; "Lratio" uses the ratio
    level's w.
    Flags: the KL constraint is active (KL̄ > δ), broadcast: `clipped_low` on A < 0 tokens,
    `clipped_high` on A > 0 tokens.
    """
    old_logp = _require_old(old_logp, "disco")
    if score not in ("logL", "Lratio"):
        raise ValueError(f"disco: score must be 'logL' or 'Lratio' (got {score!r})")
    if weighting not in ("question", "sign", "advantage"):
        raise ValueError(f"disco: weighting must be 'question', 'sign' or 'advantage' (got {weighting!r})")
    if delta < 0 or beta < 0:
        raise ValueError(f"disco: delta and beta must be ≥ 0 (got {delta}, {beta})")
    if tau is not None and (tau <= 0 or weighting != "question"):
        raise ValueError(f"disco: tau must be > 0 and needs weighting 'question' (got tau={tau}, weighting={weighting!r})")
    f = logp if score == "logL" else _ratio(log_ratio)
    valid = _valid(mask, f)
    if weighting == "question":
        if group_id is None:
            raise ValueError("disco: weighting 'question' needs the rows' group ids (group_id)")
        seq_score = (f.detach() * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        c = _disco_question_weights(advantages, valid, group_id, seq_score, tau).unsqueeze(-1)
    else:
        c = torch.sign(advantages) if weighting == "sign" else advantages
    discriminative = -c * f
    x = (logp - old_logp).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    kl = torch.exp(x) - 1.0 - x
    kl_mean = _masked_mean(kl.detach(), valid)
    coef = torch.clamp(beta * (kl_mean - delta), min=0.0)
    loss = discriminative + coef * kl
    with torch.no_grad():
        active = bool(kl_mean > delta)
        clipped_low = (advantages < 0) & active
        clipped_high = (advantages > 0) & active
    return SurrogateOutput(loss, clipped_low, clipped_high)
