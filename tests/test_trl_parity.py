"""Loss parity with TRL's GRPOTrainer (issue 8, item 2).

For identical inputs (per-token log-probs, old log-probs, advantages, completion mask) the scalar
loss of `groupwise.algorithms.objective.policy_objective` equals the loss TRL's
`GRPOTrainer._compute_loss` returns, within 1e-6, and so do the gradients w.r.t. the log-probs.
TRL's own code path is called (not a re-derivation): `self` is a SimpleNamespace holding only what
`_compute_loss` reads, and `_get_per_token_logps_and_entropies` returns our log-probs, so the test
follows TRL if its formula changes. Checked against TRL 1.16.0.

Setting: one process, one micro-batch = the whole optimizer step (gradient_accumulation_steps = 1,
steps_per_generation = 1), beta = 0, no vLLM, no entropy mask / bonus, no `delta`, float64.

| TRL loss_type | groupwise `algorithm.aggregation` | TRL divisor (this setting)               |
|---------------|-----------------------------------|------------------------------------------|
| grpo          | seq_mean_token_mean               | per-row token count, then batch rows     |
| dr_grpo       | constant                          | B · max_completion_length                |
| dapo          | token_mean                        | num_items_in_batch (global token count)  |
| bnpo          | token_mean                        | mask.sum() of the micro-batch            |

| TRL importance_sampling_level | groupwise `algorithm.ratio_level` |
|-------------------------------|-----------------------------------|
| token                         | token                             |
| sequence                      | sequence (GSPO)                   |

TRL `epsilon` / `epsilon_high` ↔ `algorithm.eps_low` / `algorithm.eps_high`; loss ↔ `ppo_clip`.
Every row keeps at least one token: TRL's `grpo` averages over all B rows, ours over rows with a
trainable token (see docs/coming_from_trl.md for this and the other deliberate differences).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402

from groupwise.algorithms.losses import StepCounts  # noqa: E402
from groupwise.algorithms.objective import ObjectiveParts, policy_objective  # noqa: E402
from groupwise.config import load_config  # noqa: E402

AGGREGATION = {"grpo": "seq_mean_token_mean", "dr_grpo": "constant", "dapo": "token_mean", "bnpo": "token_mean"}
EPS_LOW, EPS_HIGH = 0.2, 0.28
MAX_COMPLETION_LENGTH = 12


class _Accelerator:
    num_processes = 1

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(loss_type: str, level: str, logp, old_logp, advantages, mask) -> torch.Tensor:
    """TRL's `GRPOTrainer._compute_loss`, run on a stub `self` whose model forward returns `logp`."""
    n, t = logp.shape
    stub = SimpleNamespace(
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
        beta=0.0,
        max_completion_length=MAX_COMPLETION_LENGTH,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        aux_loss_enabled=False,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        _entropy_bonus_enabled=False,
        use_adaptive_entropy=False,
        current_gradient_accumulation_steps=1,
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        args=SimpleNamespace(delta=None, steps_per_generation=1, use_bias_correction_kl=False),
        _metrics={"train": _Metrics(), "eval": _Metrics()},
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
    )
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long),
        "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logp,
        "num_items_in_batch": mask.sum(),  # one process, one step per generation: the global token count
    }
    return GRPOTrainer._compute_loss(stub, None, inputs)


class _Metrics(dict):
    def __missing__(self, key):
        self[key] = []
        return self[key]


def _groupwise_loss(loss_type: str, level: str, logp, old_logp, advantages, mask) -> torch.Tensor:
    cfg = load_config(None, [
        "algorithm.loss=ppo_clip",
        f"algorithm.aggregation={AGGREGATION[loss_type]}",
        f"algorithm.ratio_level={level}",
        f"algorithm.eps_low={EPS_LOW}",
        f"algorithm.eps_high={EPS_HIGH}",
    ])
    parts = ObjectiveParts.from_config(cfg.algorithm)
    counts = StepCounts.of(mask, MAX_COMPLETION_LENGTH)
    return policy_objective(parts, logp, old_logp, advantages, mask, counts).loss


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    n, t = 8, MAX_COMPLETION_LENGTH
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[0] = 1                      # rows with a single trainable token
    lengths[1] = 1
    lengths[2] = t                      # a row at the length limit
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.float64)
    old_logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3.0
    # log-ratios of ±0.5 put many tokens beyond both clip ranges (and GSPO sequence ratios near them)
    logp = old_logp + (torch.rand(n, t, generator=g, dtype=torch.float64) - 0.5)
    advantages = torch.randn(n, generator=g, dtype=torch.float64)
    return logp, old_logp, advantages, mask


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_trl(loss_type: str, level: str, seed: int) -> None:
    logp, old_logp, advantages, mask = _inputs(seed)
    logp_trl = logp.clone().requires_grad_(True)
    logp_ours = logp.clone().requires_grad_(True)

    trl_loss = _trl_loss(loss_type, level, logp_trl, old_logp, advantages, mask)
    ours = _groupwise_loss(loss_type, level, logp_ours, old_logp, advantages, mask)

    assert trl_loss.dtype == ours.dtype == torch.float64
    a, b = trl_loss.item(), ours.item()
    assert abs(a - b) <= 1e-6, (a, b)
    assert a != 0.0

    (g_trl,) = torch.autograd.grad(trl_loss, logp_trl)
    (g_ours,) = torch.autograd.grad(ours, logp_ours)
    torch.testing.assert_close(g_ours * mask, g_trl * mask, atol=1e-6, rtol=0.0)
