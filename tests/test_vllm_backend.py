"""The vLLM rollout backend (`rollout.backend: vllm`) on the built-in model.

Needs vLLM (`pip install 'groupwise[vllm]'`; `.ci/vllm` builds a separate environment and runs
this file): the engine tests are skipped where it is not installed. The weight-merging and
missing-vLLM tests run everywhere.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from groupwise.config import load_config
from groupwise.data.sources import load_train_prompts
from groupwise.model.loading import load_policy, load_tokenizer
from groupwise.model.logprobs import completion_logprobs
from groupwise.rollout import HFRolloutEngine, SamplingParams, rollout_engine
from groupwise.rollout.vllm import hf_named_weights, request_seed

HAS_VLLM = importlib.util.find_spec("vllm") is not None
MAX_NEW = 8      # src/groupwise/configs/builtin.yaml


@pytest.fixture(scope="module")
def setup():
    pytest.importorskip("vllm")
    cfg = load_config(None, ["rollout.backend=vllm"])
    tok = load_tokenizer(cfg.model)
    model = load_policy(cfg.model, torch.device("cpu")).eval()
    engine = rollout_engine(model, tok, cfg)
    prompts = load_train_prompts(cfg.data, 0)[:6]
    return engine, model, tok, prompts, [p.text for p in prompts]


def trainer_logprobs(model, batch, temperature):
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, ids, mask, batch.completion_mask.float(), temperature=temperature)
    return logp


def as_vllm_names(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A Llama's HF weights under vLLM's names (fused qkv and gate_up projections; lm_head tied)."""
    out = {"model.embed_tokens.weight": state["model.embed_tokens.weight"], "model.norm.weight": state["model.norm.weight"]}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.qkv_proj.weight"] = torch.cat([state[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[p + "self_attn.o_proj.weight"] = state[p + "self_attn.o_proj.weight"]
        out[p + "mlp.gate_up_proj.weight"] = torch.cat([state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]])
        out[p + "mlp.down_proj.weight"] = state[p + "mlp.down_proj.weight"]
        out[p + "input_layernorm.weight"] = state[p + "input_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = state[p + "post_attention_layernorm.weight"]
    return out


def test_generate_follows_the_rollout_contract(setup):
    engine, model, tok, prompts, texts = setup
    for max_new in (MAX_NEW, 2):          # 2: most completions are cut at max_new_tokens
        out = engine.generate(prompts, texts, 4, SamplingParams(max_new_tokens=max_new), seed=3)
        n = 24
        assert out.group_id.tolist() == [g for g in range(6) for _ in range(4)]
        assert out.prompts == prompts and len(out.completions_text) == n
        assert out.completion_ids.shape == out.completion_mask.shape == out.sampling_logprobs.shape
        assert out.completion_ids.shape[0] == n and out.completion_ids.shape[1] <= max_new
        lengths = out.completion_lengths
        width = out.completion_ids.shape[1]
        assert torch.equal(out.completion_mask, (torch.arange(width) < lengths[:, None]).long()), "right-padded"
        assert bool((out.completion_ids[out.completion_mask == 0] == engine.pad_id).all())
        assert bool((out.sampling_logprobs[out.completion_mask == 0] == 0).all())
        assert bool((out.sampling_logprobs[out.completion_mask == 1] <= 0).all())
        last = out.completion_ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
        assert torch.equal(out.finished, torch.isin(last, torch.tensor(engine.eos_ids))), "finished ⇔ ends in EOS"
        assert bool((lengths[~out.finished] == max_new).all()), "unfinished ⇔ cut at max_new_tokens"
        for i in range(n):
            ids = tok(texts[i // 4])["input_ids"]
            assert out.prompt_ids[i, -len(ids):].tolist() == ids and int(out.prompt_mask[i].sum()) == len(ids), "left-padded prompt"
            assert out.completions_text[i] == tok.decode(out.completion_ids[i, : lengths[i]].tolist(), skip_special_tokens=True)
        if max_new == MAX_NEW:
            assert bool(out.finished.any()) and len(set(out.completions_text)) > 4
        else:
            assert bool((~out.finished).any())
    assert engine.last_stats["requests"] == 24.0 and engine.last_stats["generated_tokens"] == float(out.completion_lengths.sum())


def test_prompts_are_left_truncated_to_max_prompt_length(setup):
    engine, _, tok, prompts, texts = setup
    engine.max_prompt_length = 3
    try:
        out = engine.generate(prompts, texts, 1, SamplingParams(max_new_tokens=2), seed=0)
    finally:
        engine.max_prompt_length = None
    assert out.prompt_ids.shape[1] == 3 and bool(out.prompt_mask.all())
    assert [r.tolist() for r in out.prompt_ids] == [tok(t)["input_ids"][-3:] for t in texts]


def test_same_seed_same_completions_and_rows_do_not_depend_on_the_split(setup):
    engine, _, _, prompts, texts = setup
    params = SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0)
    a = engine.generate(prompts, texts, 4, params, seed=11)
    b = engine.generate(prompts, texts, 4, params, seed=11)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.sampling_logprobs, b.sampling_logprobs)
    c = engine.generate(prompts, texts, 4, params, seed=12)
    assert not torch.equal(c.completion_ids[:, : a.completion_ids.shape[1]], a.completion_ids[:, : c.completion_ids.shape[1]])
    # as two ranks would: prompts 0–2 (rows 0–11) and prompts 3–5 (rows 12–23, row_offset 12)
    first = engine.generate(prompts[:3], texts[:3], 4, params, seed=11)
    second = engine.generate(prompts[3:], texts[3:], 4, params, seed=11, row_offset=12)
    assert first.completions_text + second.completions_text == a.completions_text
    assert request_seed(11, 12) != request_seed(11, 13) != request_seed(12, 12)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_agree_with_the_trainer(setup, temperature):
    engine, model, _, prompts, texts = setup
    out = engine.generate(prompts, texts, 4, SamplingParams(max_new_tokens=MAX_NEW, temperature=temperature), seed=5)
    diff = (trainer_logprobs(model, out, temperature) - out.sampling_logprobs).abs().max().item()
    print(json.dumps({"max_abs_logp_diff": diff, "temperature": temperature}))
    assert diff < 1e-4, diff


def test_sync_weights_after_updates_matches_the_trainer(setup):
    engine, model, tok, prompts, texts = setup
    greedy = SamplingParams(max_new_tokens=MAX_NEW, greedy=True)
    before = engine.generate(prompts, texts, 1, greedy, seed=0)
    assert before.completions_text == HFRolloutEngine(model, tok).generate(prompts, texts, 1, greedy, seed=0).completions_text
    trained = copy.deepcopy(model).train()
    opt = torch.optim.Adam(trained.parameters(), lr=3e-2)
    ids = torch.cat([before.prompt_ids, before.completion_ids], 1)
    mask = torch.cat([before.prompt_mask, before.completion_mask], 1)
    for _ in range(3):            # push the greedy completions' likelihood down: the greedy output must change
        logp, _ = completion_logprobs(trained, ids, mask, before.completion_mask.float())
        opt.zero_grad()
        logp.sum().backward()
        opt.step()
    trained.eval()
    try:
        engine.sync_weights(trained)
        ours = engine.vllm_weights()
        expected = as_vllm_names(trained.state_dict(), trained.config.num_hidden_layers)
        assert set(ours) == set(expected)
        for name, w in expected.items():
            # vLLM pads the vocabulary dimension (98 → 128 rows here); the padding rows stay zero
            assert torch.equal(ours[name][: w.shape[0]], w) and not ours[name][w.shape[0]:].any(), name
        after = engine.generate(prompts, texts, 1, greedy, seed=0)
        hf = HFRolloutEngine(trained, tok).generate(prompts, texts, 1, greedy, seed=0)
        assert after.completions_text == hf.completions_text
        assert after.completions_text != before.completions_text, "the updates changed the greedy output"
        torch.testing.assert_close(after.sampling_logprobs, hf.sampling_logprobs, atol=1e-4, rtol=0)
    finally:
        engine.sync_weights(model)
    assert engine.generate(prompts, texts, 1, greedy, seed=0).completions_text == before.completions_text


def test_sleep_and_wake_up_are_no_ops_on_the_cpu(setup):
    engine, _, _, prompts, texts = setup
    params = SamplingParams(max_new_tokens=MAX_NEW)
    ref = engine.generate(prompts, texts, 2, params, seed=1)
    engine.sleep()
    engine.wake_up()
    assert torch.equal(engine.generate(prompts, texts, 2, params, seed=1).completion_ids, ref.completion_ids)


def test_a_too_long_prompt_names_max_model_len(setup):
    engine, _, _, prompts, _ = setup
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate(prompts[:1], ["1 + 1 = " * 40], 1, SamplingParams(max_new_tokens=MAX_NEW), seed=0)


def test_merged_lora_weights_carry_the_base_names():
    from peft import LoraConfig, get_peft_model

    cfg = load_config(None, [])
    base = load_policy(cfg.model, torch.device("cpu"))
    names = set(base.state_dict())
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)                 # B = 0 at init would make the merge trivial
    ours = dict(hf_named_weights(peft_model))
    assert set(ours) == names
    reference = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    changed = 0
    for n, w in ours.items():
        torch.testing.assert_close(w, reference[n], atol=1e-6, rtol=0)
        changed += not torch.equal(w, base.state_dict()[n])
    assert changed == 2 * base.config.num_hidden_layers, "the q and v projections of every layer carry ΔW"
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(hf_named_weights(base), base.state_dict().items()))


@pytest.mark.skipif(HAS_VLLM, reason="checks the message shown when vLLM is missing")
def test_missing_vllm_names_the_setting():
    cfg = load_config(None, ["rollout.backend=vllm"])
    with pytest.raises(ImportError, match="rollout.backend"):
        rollout_engine(None, None, cfg)


TWO_RANKS = """
import json, sys, torch, torch.distributed as dist
if __name__ == "__main__":
    dist.init_process_group("gloo")
    from groupwise.config import load_config
    from groupwise.data.sources import load_train_prompts
    from groupwise.model.loading import load_policy, load_tokenizer
    from groupwise.rollout import SamplingParams, rollout_engine
    cfg = load_config(None, ["rollout.backend=vllm"])
    model = load_policy(cfg.model, torch.device("cpu")).eval()
    engine = rollout_engine(model, load_tokenizer(cfg.model), cfg)
    rank, prompts = dist.get_rank(), load_train_prompts(cfg.data, 0)[:6]
    mine = prompts[3 * rank : 3 * rank + 3]
    out = engine.generate(mine, [p.text for p in mine], 4, SamplingParams(max_new_tokens=8), seed=11, row_offset=12 * rank)
    engine.sync_weights(model)
    texts = [None, None]
    dist.all_gather_object(texts, out.completions_text)
    if rank == 0:
        print("TEXTS " + json.dumps(texts[0] + texts[1]))
"""


@pytest.mark.slow
def test_two_ranks_under_torchrun_generate_what_one_process_does(setup, tmp_path):
    """Each rank runs its own engine inside torchrun's process group (vLLM's external_launcher)."""
    engine, _, _, prompts, texts = setup
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
                         capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stdout.splitlines() if line.startswith("TEXTS ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    one = engine.generate(prompts, texts, 4, SamplingParams(max_new_tokens=8), seed=11)
    assert json.loads(lines[0][6:]) == one.completions_text


@pytest.mark.slow
def test_reward_rises_with_the_vllm_backend(tmp_path):
    """The built-in recipe as in test_trainer.test_reward_rises_on_the_builtin_task, generating with vLLM."""
    pytest.importorskip("vllm")
    from groupwise.rollout.vllm import VLLMRolloutEngine
    from groupwise.trainer import Trainer

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "rollout.backend=vllm", "schedule.steps=60", "rollout.prompts_per_step=16",
                             "eval.before_and_after=false", "logging.progress=none", "checkpoint.save_final=false"])
    trainer = Trainer(cfg)
    assert isinstance(trainer.engine, VLLMRolloutEngine)
    trainer.train()
    synced = as_vllm_names(trainer.model.state_dict(), trainer.model.config.num_hidden_layers)
    ours = trainer.engine.vllm_weights()
    assert all(torch.equal(ours[n][: w.shape[0]], w) for n, w in synced.items()), "the trainer pushes its weights after every update"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["rollout_correction/logp_diff_max"] < 1e-3, "the IS correction (level auto → sequence) is on and its ratios ≈ 1"
    rewards = [r["reward/mean"] for r in rows]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-30:]) / 30
    assert last > first + 0.04, (first, last)
