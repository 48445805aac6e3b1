"""Any estimator × ratio level × compatible surrogate × aggregation takes a training step.

One step = advantages (with their context) → loss mask → log-probs of a tiny random Llama →
the composed objective → backward → an optimizer step. Incompatible pairs are refused by the
config with a reason.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from groupwise.algorithms import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, RATIO_LEVELS, ObjectiveParts, StepCounts, compute_advantages, policy_objective
from groupwise.algorithms.advantages import AdvantageContext
from groupwise.algorithms.compat import incompatibility
from groupwise.config import ConfigError, load_config
from groupwise.model.logprobs import completion_logprobs

# Options a part requires (no default) or needs for this tiny batch.
ESTIMATOR_OPTIONS = {"stratified": {"key": "level"}}
LOSS_OPTIONS = {"two_sided": {"delta": 2.0}}

COMBOS = list(itertools.product(ADVANTAGES.names(), RATIO_LEVELS.names(), POLICY_LOSSES.names(), AGGREGATIONS.names()))
COMPATIBLE = [c for c in COMBOS if incompatibility(advantage=c[0], ratio_level=c[1], loss=c[2], aggregation=c[3]) is None]
INCOMPATIBLE = [c for c in COMBOS if c not in COMPATIBLE]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    n, tp, tc = 10, 3, 4                       # two groups of five (odd, for MC-GRPO's median pivot)
    prompt = torch.randint(3, 32, (n, tp))
    completion = torch.randint(3, 32, (n, tc))
    cmask = torch.ones(n, tc)
    cmask[1, 3:] = 0
    cmask[6, 2:] = 0                           # ragged lengths
    batch = {
        "input_ids": torch.cat([prompt, completion], 1),
        "attention_mask": torch.cat([torch.ones(n, tp, dtype=torch.long), cmask.long()], 1),
        "completion_mask": cmask,
        "rewards": torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.0, 0.0, 0.0]),
        "group_id": torch.tensor([0] * 5 + [1] * 5),
        "level": ["a", "b", "a", "b", "a", "a", "b", "a", "b", "a"],
    }
    return model, batch


@pytest.mark.parametrize("advantage,ratio_level,loss,aggregation", COMPATIBLE)
def test_every_compatible_combination_takes_a_step(setup, advantage, ratio_level, loss, aggregation):
    model, b = setup
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        ctx = AdvantageContext(lengths=b["completion_mask"].sum(-1), columns={"level": b["level"], "prompt_index": b["group_id"].tolist()}, state={})
        adv = compute_advantages(advantage, b["rewards"], b["group_id"], ctx, **ESTIMATOR_OPTIONS.get(advantage, {}))
        assert adv.shape[0] == 10 and torch.isfinite(adv).all()
        mask = b["completion_mask"] if ctx.loss_mask is None else b["completion_mask"] * ctx.loss_mask.float().unsqueeze(-1)
        logp, entropy = completion_logprobs(model, b["input_ids"], b["attention_mask"], mask, with_entropy=True)
        old = logp.detach() - 0.05 * torch.linspace(-1, 1, logp.numel()).view_as(logp) * mask   # a moved policy
        parts = ObjectiveParts(ratio_level=RATIO_LEVELS.get(ratio_level), surrogate=POLICY_LOSSES.get(loss),
                               aggregation=AGGREGATIONS.get(aggregation), surrogate_options=LOSS_OPTIONS.get(loss, {}))
        out = policy_objective(parts, logp, old, adv, mask, StepCounts.of(mask, 4), entropy=entropy, group_id=b["group_id"])
        assert torch.isfinite(out.loss)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.zero_grad()
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
    finally:
        model.load_state_dict(state)


@pytest.mark.parametrize("advantage,ratio_level,loss,aggregation", INCOMPATIBLE[:40])
def test_incompatible_combinations_are_refused_with_the_reason(advantage, ratio_level, loss, aggregation):
    sets = [f"algorithm.advantage={advantage}", f"algorithm.ratio_level={ratio_level}", f"algorithm.loss={loss}", f"algorithm.aggregation={aggregation}"]
    with pytest.raises(ConfigError, match=f"algorithm.loss '{loss}' needs algorithm.ratio_level 'token'"):
        load_config(None, sets)


def test_the_incompatible_set_is_what_compat_says():
    assert INCOMPATIBLE, "gmpo/reinforce/gpg with a non-token ratio level must be refused"
    assert {c[2] for c in INCOMPATIBLE} == {"gmpo", "reinforce", "gpg"}
    assert {c[1] for c in INCOMPATIBLE} == {"sequence", "geometric"}


def test_unknown_part_lists_the_known_ones():
    with pytest.raises(ConfigError, match="algorithm.loss 'ppo' is unknown; known: cispo, clip_cov"):
        load_config(None, ["algorithm.loss=ppo"])
