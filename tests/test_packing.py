"""Padding-free and shared-prefix (Prefix Grouper) forward passes equal the per-sequence layout.

The reference is the plain padded forward (itself checked against unpadded single-row forwards
in test_algorithm_properties.py); every parameter's gradient is compared, not only log-probs.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from groupwise.model.logprobs import completion_logprobs
from groupwise.model.packing import build_layout, unsupported_reason, unsupported_reason_for_path

LAYOUTS = ["packed", "shared_prefix"]


def llama(seed=0, vocab=61):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                      intermediate_size=96, max_position_embeddings=128, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def qwen2(seed=0, vocab=61):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=96, max_position_embeddings=128, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg)


def builtin():
    from groupwise.model.loading import builtin_model_dir
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(builtin_model_dir()), attn_implementation="sdpa")


def grouped_batch(seed, vocab, prompt_lens, g, tc, empty_completion=True, common=0):
    """Groups of g rows sharing a left-padded prompt, right-padded completions of varied length.
    The first `common` tokens of every prompt are the same (a system prompt)."""
    gen = torch.Generator().manual_seed(seed)
    tp = max(prompt_lens)
    system = torch.randint(1, vocab, (common,), generator=gen)
    rows, masks = [], []
    for plen in prompt_lens:
        prompt = torch.randint(1, vocab, (plen,), generator=gen)
        prompt[: min(common, plen)] = system[:plen]
        for _ in range(g):
            clen = int(torch.randint(1, tc + 1, (1,), generator=gen))
            comp = torch.randint(1, vocab, (clen,), generator=gen)
            ids = torch.zeros(tp + tc, dtype=torch.long)
            ids[tp - plen : tp] = prompt
            ids[tp : tp + clen] = comp
            m = torch.zeros(tp + tc, dtype=torch.long)
            m[tp - plen : tp + clen] = 1
            rows.append(ids)
            masks.append(m)
    ids, am = torch.stack(rows), torch.stack(masks)
    am[0, tp:] = 1                        # a full-length completion
    ids[0, tp:] = torch.randint(1, vocab, (tc,), generator=gen)
    if len(rows) > 1:
        am[1, tp + 1 :] = 0               # a one-token one
        ids[1, tp + 1 :] = 0
    cmask = am[:, tp:].clone().float()
    if empty_completion and len(rows) > 2:
        cmask[2] = 0.0                    # a row whose tokens are all masked out of the loss (e.g. truncated)
    group_id = torch.arange(len(prompt_lens)).repeat_interleave(g)
    return ids, am, cmask, group_id


def logprobs_and_grads(model, ids, am, cmask, group_id, layout, temperature=0.8):
    model.zero_grad(set_to_none=True)
    lp, ent = completion_logprobs(model, ids, am, cmask, temperature=temperature, with_entropy=True, entropy_grad=True,
                                  layout=layout, group_id=group_id)
    weights = torch.linspace(-1.0, 1.0, lp.numel()).view_as(lp)
    ((lp * weights).sum() + 0.1 * ent.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp.detach(), ent.detach(), grads


@pytest.mark.parametrize("make_model", [llama, qwen2, builtin], ids=["llama", "qwen2", "builtin"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_equals_per_sequence_logprobs_and_every_gradient(make_model, layout):
    model = make_model()
    vocab = model.config.vocab_size
    ids, am, cmask, gid = grouped_batch(3, vocab, prompt_lens=[7, 3, 5], g=4, tc=6)
    ref_lp, ref_ent, ref_grads = logprobs_and_grads(model, ids, am, cmask, gid, "padded")
    lp, ent, grads = logprobs_and_grads(model, ids, am, cmask, gid, layout)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(model.parameters()))
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    # the check can fail: real positions carry non-trivial log-probs, and gradients are not zero
    assert ref_lp[cmask.bool()].std() > 0.01
    assert all(g.abs().max() > 0 for g in ref_grads.values())


def test_split_group_and_reordered_rows_still_match():
    # A micro-batch may hold part of a group, and rows of one group need not be adjacent.
    model = llama(1)
    ids, am, cmask, gid = grouped_batch(5, 61, prompt_lens=[4, 6], g=3, tc=5, empty_completion=False)
    rows = torch.tensor([4, 0, 5, 2])
    ref, _, _ = logprobs_and_grads(model, ids[rows], am[rows], cmask[rows], gid[rows], "padded")
    lp, _, _ = logprobs_and_grads(model, ids[rows], am[rows], cmask[rows], gid[rows], "shared_prefix")
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make_model", [llama, qwen2, builtin], ids=["llama", "qwen2", "builtin"])
@pytest.mark.parametrize("prompt_lens, common, root", [
    ([7, 3, 5], 2, 2),        # a system prompt shorter than every prompt
    ([6, 4, 9], 6, 3),        # the shortest prompt is all system prompt: the root leaves it its last token
], ids=["short-system-prompt", "prompt-within-system-prompt"])
def test_common_root_equals_per_sequence_logprobs_and_every_gradient(make_model, prompt_lens, common, root):
    model = make_model()
    ids, am, cmask, gid = grouped_batch(3, model.config.vocab_size, prompt_lens=prompt_lens, g=3, tc=5, common=common)
    lay = build_layout(ids, am, 5, gid, share_prefix=True)
    assert lay.root_len == root
    assert lay.num_tokens == root + sum(n - root for n in prompt_lens) + int(am[:, -5:].sum())
    ref_lp, ref_ent, ref_grads = logprobs_and_grads(model, ids, am, cmask, gid, "padded")
    lp, ent, grads = logprobs_and_grads(model, ids, am, cmask, gid, "shared_prefix")
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_a_wrong_layout_would_be_caught(monkeypatch):
    # Guard against a vacuous comparison: restarting completion positions one token late, or
    # letting completions see each other, changes the log-probs well beyond the tolerance.
    import groupwise.model.logprobs as logprobs_mod
    from groupwise.model import packing

    model = llama(2)
    ids, am, cmask, gid = grouped_batch(7, 61, prompt_lens=[5, 4], g=3, tc=5)
    with torch.no_grad():
        ref, _ = completion_logprobs(model, ids, am, cmask, layout="padded")

        def shifted(*args, **kwargs):
            lay = packing.build_layout(*args, **kwargs)
            lay.position_ids = lay.position_ids.clone()
            lay.position_ids[0, lay.completion_index[cmask.sum(1) > 0, 0].unique()] += 1
            return lay

        monkeypatch.setattr(logprobs_mod, "build_layout", shifted)
        moved, _ = completion_logprobs(model, ids, am, cmask, layout="shared_prefix", group_id=gid)

        def leaky(*args, **kwargs):
            lay = packing.build_layout(*args, **kwargs)
            lay.completion_mask = torch.ones_like(lay.completion_mask)   # padded/sibling keys visible
            return lay

        monkeypatch.setattr(logprobs_mod, "build_layout", leaky)
        leaked, _ = completion_logprobs(model, ids, am, cmask, layout="shared_prefix", group_id=gid)
        rooted = grouped_batch(7, 61, prompt_lens=[5, 4], g=3, tc=5, common=3)
        rooted_ref, _ = completion_logprobs(model, *rooted[:3], layout="padded")

        def rootless(*args, **kwargs):   # the root hidden from completions
            lay = packing.build_layout(*args, **kwargs)
            assert lay.root_len == 3
            lay.completion_mask = lay.completion_mask.clone()
            lay.completion_mask[..., : lay.root_len] = False
            return lay

        monkeypatch.setattr(logprobs_mod, "build_layout", rootless)
        unrooted, _ = completion_logprobs(model, *rooted[:3], layout="shared_prefix", group_id=rooted[3])
    assert (moved - ref).abs().max() > 1e-4
    assert (leaked - ref).abs().max() > 1e-4
    assert (unrooted - rooted_ref).abs().max() > 1e-4


def common_root_reference(prompts: list[list[int]]) -> int:
    """The leading tokens all (distinct) prompts share, at most the shortest length − 1."""
    if len(prompts) < 2:
        return 0
    r = 0
    while r < min(map(len, prompts)) - 1 and len({p[r] for p in prompts}) == 1:
        r += 1
    return r


def group_prompts(ids, am, gid, tc):
    tp = ids.shape[1] - tc
    firsts = [int((gid == g).nonzero()[0]) for g in gid.unique()]
    return [ids[i, :tp][am[i, :tp].bool()].tolist() for i in firsts]


def test_shared_layout_encodes_each_prompt_once():
    ids, am, cmask, gid = grouped_batch(1, 61, prompt_lens=[7, 3], g=4, tc=6)
    assert common_root_reference(group_prompts(ids, am, gid, 6)) == 0
    tp = ids.shape[1] - 6
    shared = build_layout(ids, am, 6, gid, share_prefix=True)
    packed = build_layout(ids, am, 6, gid, share_prefix=False)
    completion_tokens = int(am[:, tp:].sum())
    assert shared.root_len == 0 and shared.block_mask is None
    assert shared.num_tokens == 7 + 3 + completion_tokens
    assert packed.num_tokens == int(am.sum())          # every real token once, no padding
    assert packed.num_tokens == 4 * (7 + 3) + completion_tokens
    # positions restart after the prompt: each completion's first token sits at its prompt length
    first = shared.completion_index[:, 0]
    assert shared.position_ids[0, first].tolist() == [7] * 4 + [3] * 4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_completion_logprobs_leave_each_rows_last_token_out_of_the_packed_row(monkeypatch, layout):
    """Its hidden state predicts nothing; the equality tests above check that nothing needed it."""
    from groupwise.model import logprobs as logprobs_mod

    ids, am, cmask, gid = grouped_batch(2, 61, prompt_lens=[7, 3], g=4, tc=6)
    tp = ids.shape[1] - 6
    packed_tokens = []
    real = logprobs_mod.packed_hidden_states

    def counting(decoder, lay, **kwargs):
        packed_tokens.append(lay.num_tokens)
        return real(decoder, lay, **kwargs)

    monkeypatch.setattr(logprobs_mod, "packed_hidden_states", counting)
    completion_logprobs(llama(), ids, am, cmask, layout=layout, group_id=gid)
    prompt_tokens = 7 + 3 if layout == "shared_prefix" else int(am[:, :tp].sum())
    assert packed_tokens == [prompt_tokens + int(am[:, tp:].sum()) - ids.shape[0]]


def test_rows_with_one_group_id_and_different_prompts_are_refused():
    ids, am, cmask, gid = grouped_batch(0, 61, prompt_lens=[5, 5], g=2, tc=4)
    gid = torch.zeros_like(gid)
    with pytest.raises(ValueError, match=r"row 2 has the group_id of row 0 but a different prompt"):
        build_layout(ids, am, 4, gid, share_prefix=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_layout_properties(data):
    """Every real token appears once in the packed row (a prefix common to all prompts once; with
    drop_last_token, each row's last completion token not at all), at its own position, and maps
    back to a slot; every completion token's predictor is there."""
    n_groups = data.draw(st.integers(1, 4))
    g = data.draw(st.integers(1, 4))
    prompt_lens = [data.draw(st.integers(1, 6)) for _ in range(n_groups)]
    tc = data.draw(st.integers(1, 5))
    share = data.draw(st.booleans())
    drop_last = data.draw(st.booleans())
    common = data.draw(st.integers(0, 6))
    ids, am, cmask, gid = grouped_batch(data.draw(st.integers(0, 10_000)), 50, prompt_lens, g, tc, empty_completion=False,
                                        common=common)
    tp = ids.shape[1] - tc
    lay = build_layout(ids, am, tc, gid, share_prefix=share, drop_last_token=drop_last)
    root = common_root_reference(group_prompts(ids, am, gid, tc)) if share else 0
    assert lay.root_len == root
    c_len = am[:, tp:].sum(1) - int(drop_last)         # every completion here has at least one token
    expected = root + sum(n - root for n in prompt_lens) + int(c_len.sum()) if share else int(am.sum()) - int(drop_last) * ids.shape[0]
    assert lay.num_tokens == expected
    # the scatter index is injective and lands on valid slots only
    completion_valid = torch.arange(lay.completion_index.shape[1]) < c_len[:, None]
    slots = torch.cat([torch.ones(lay.root_len, dtype=torch.bool), lay.block_valid.flatten(), completion_valid.flatten()])
    assert len(set(lay.scatter_index.tolist())) == lay.num_tokens
    assert bool(slots[lay.scatter_index].all())
    # each completion token's predictor is the token just before it in its own sequence
    for i in range(ids.shape[0]):
        for t in range(int(am[i, tp:].sum())):
            f = int(lay.predictor_index[i, t])
            prev = ids[i, tp + t - 1]
            assert int(lay.input_ids[0, f]) == int(prev)
            assert int(lay.position_ids[0, f]) == int(am[i, :tp].sum()) + t - 1


def test_models_that_cannot_take_the_layout_name_the_reason():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=64, use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert "sliding" in unsupported_reason(Qwen2ForCausalLM, cfg)

    class OldStyleModel(torch.nn.Module):
        _supports_attention_backend = False

    assert "attention interface" in unsupported_reason(OldStyleModel, cfg)
    from groupwise.model.loading import builtin_model_dir

    assert unsupported_reason_for_path(str(builtin_model_dir())) is None


def test_trainer_refuses_a_sliding_window_model_before_loading(tmp_path, small_config):
    from groupwise.config import ConfigError
    from groupwise.model.loading import builtin_model_dir
    from groupwise.trainer import Trainer

    model_dir = tmp_path / "sliding"
    shutil.copytree(builtin_model_dir(), model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=4, max_window_layers=0)
    cfg.pop("layer_types", None)
    (model_dir / "config.json").write_text(json.dumps(cfg))
    config = small_config(**{"model.path": str(model_dir), "model.shared_prefix": True})
    with pytest.raises(ConfigError, match=r"^model\.shared_prefix: Qwen2ForCausalLM .*sliding.*; set model\.shared_prefix: false"):
        Trainer(config)


@pytest.mark.parametrize("layout", [{"model.shared_prefix": True}, {"model.shared_prefix": False, "model.padding_free": True}],
                         ids=["shared_prefix", "padding_free"])
def test_training_with_a_packed_layout_equals_the_padded_run(tmp_path, small_config, layout):
    """Three steps with μ = 2, two mini-batches, micro-batches that split groups and a KL term:
    the same metrics and parameters as the padded layout, up to floating-point rounding."""
    from groupwise.trainer import Trainer

    common = {"algorithm.num_iterations": 2, "algorithm.mini_batches": 2, "optimizer.micro_batch_size": 2,
              "algorithm.kl.coef": 0.05, "logging.samples_every": 0, "checkpoint.save_final": False}
    runs = {}
    padded = {"model.shared_prefix": False, "model.padding_free": False}
    for name, extra in (("padded", padded), ("packed", layout)):
        trainer = Trainer(small_config(run_dir=tmp_path / name, **common, **extra))
        assert trainer.layout == ("padded" if extra is padded else "shared_prefix" if extra["model.shared_prefix"] else "packed")
        metrics = [trainer.train_step() for _ in range(3)]
        runs[name] = (metrics, {n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    (m_pad, p_pad), (m_packed, p_packed) = runs["padded"], runs["packed"]
    for a, b in zip(m_pad, m_packed):
        for key in ("loss", "kl", "entropy", "grad_norm", "reward/mean", "clip_ratio/region"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for n in p_pad:
        torch.testing.assert_close(p_packed[n], p_pad[n], atol=2e-5, rtol=1e-4, msg=n)
