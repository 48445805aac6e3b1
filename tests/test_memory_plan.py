"""Memory planner: exact parameter counts from a meta-device model, the terms' formulas, advice, CLI, Trainer refusal."""
from __future__ import annotations

import pytest
import torch

from groupwise.config import ConfigError, load_config
from groupwise.memory_plan import DEVICE_MEMORY_ENV, format_plan, meta_model, plan_memory
from groupwise.model.loading import load_policy, trainable_parameters
from groupwise.rollout.scheduling import kv_bytes_per_token

BIG = 2**40


def test_parameter_count_is_exact_and_optimizer_is_two_fp32_moments():
    cfg = load_config(None)
    model = load_policy(cfg.model, torch.device("cpu"))
    plan = plan_memory(cfg, device_bytes=BIG)
    n = sum(p.numel() for p in model.parameters())
    assert plan.num_parameters == n
    assert plan.trainable_parameters == n
    assert plan.parameters == n * 4 and plan.gradients == n * 4
    assert plan.optimizer == 2 * plan.trainable_parameters * 4
    assert plan.reference == 0
    assert plan_memory(load_config(None, ["algorithm.kl.coef=0.01"]), device_bytes=BIG).reference == n * 4
    half = plan_memory(load_config(None, ["model.dtype=bfloat16"]), device_bytes=BIG)
    assert half.parameters == n * 2



def test_world_size_shards_under_fsdp2_and_replicates_under_ddp():
    cfg = load_config(None, ["algorithm.kl.coef=0.01"])
    one = plan_memory(cfg, device_bytes=BIG)
    n = one.num_parameters
    fsdp = plan_memory(cfg, device_bytes=BIG, world_size=2)
    assert fsdp.parameters == n * 2 and fsdp.gradients == n * 2 and fsdp.optimizer == n * 4   # halves of n·4, n·4, n·8
    assert fsdp.reference == n * 2                          # the reference is sharded too
    assert fsdp.gathered_parameters == n * 2                # generation holds the whole weights again
    assert fsdp.rows_per_micro_batch == one.rows_per_micro_batch // 2   # each rank trains its share
    assert fsdp.concurrent_sequences == one.concurrent_sequences // 2
    assert fsdp.total == fsdp.parameters + fsdp.reference + fsdp.gradients + fsdp.optimizer + max(
        fsdp.activations + fsdp.logits, fsdp.kv_cache + fsdp.gathered_parameters)
    assert "gathered" in format_plan(fsdp) and "gathered" not in format_plan(one)
    ddp = plan_memory(load_config(None, ["algorithm.kl.coef=0.01", "distributed.strategy=ddp"]), device_bytes=BIG, world_size=2)
    assert ddp.parameters == one.parameters and ddp.optimizer == one.optimizer and ddp.gathered_parameters == 0
    assert ddp.reference == one.reference == n * 4
    assert ddp.rows_per_micro_batch == fsdp.rows_per_micro_batch


def test_kv_cache_term():
    cfg = load_config(None, ["rollout.max_concurrent_sequences=5", "rollout.max_new_tokens=10", "data.max_prompt_length=20"])
    plan = plan_memory(cfg, device_bytes=BIG)
    per_token = kv_bytes_per_token(meta_model(cfg).config, torch.float32)
    assert plan.concurrent_sequences == 5 and plan.tokens_per_sequence == 30
    assert plan.prompt_length_source == "data.max_prompt_length"
    assert plan.kv_cache == 5 * 30 * per_token
    budget = load_config(None, ["rollout.kv_cache_budget_mb=1.0", "rollout.max_new_tokens=10", "data.max_prompt_length=20"])
    slots = int(2**20 // (per_token * 30))
    assert 1 < slots < 256
    assert plan_memory(budget, device_bytes=BIG).kv_cache == slots * 30 * per_token


def test_packed_weights_join_the_generation_phase_on_the_cpu():
    cfg = load_config(None, ["device=cpu"])
    plan = plan_memory(cfg, device_bytes=BIG)
    assert plan.packed_weights == plan.num_parameters * 4            # one float32 copy of the weights
    persistent = plan.parameters + plan.reference + plan.gradients + plan.optimizer
    assert plan.total == persistent + max(plan.activations + plan.logits, plan.kv_cache + plan.packed_weights)
    on = plan_memory(load_config(None, ["device=cpu", "rollout.packed_matmul=false"]), device_bytes=BIG).packed_weights
    assert on == plan.packed_weights                                  # rollout.fast_decode packs its own copies
    for off in (["rollout.packed_matmul=false", "rollout.fast_decode=false"], ["model.dtype=bfloat16"]):
        assert plan_memory(load_config(None, ["device=cpu", *off]), device_bytes=BIG).packed_weights == 0


def test_lora_trainable_matches_peft():
    cfg = load_config(None, ["model.lora.enabled=true", "model.lora.r=8", "algorithm.kl.coef=0.05"])
    plan = plan_memory(cfg, device_bytes=BIG)
    model = load_policy(cfg.model, torch.device("cpu"))
    real = sum(p.numel() for p in trainable_parameters(model))
    assert abs(plan.trainable_parameters - real) <= 0.01 * real
    assert plan.optimizer == 2 * plan.trainable_parameters * 4
    assert plan.reference == 0                              # LoRA: the reference is the base model
    full = plan_memory(load_config(None), device_bytes=BIG)
    assert plan.trainable_parameters < full.trainable_parameters / 5


def test_checkpointing_and_micro_batch_shrink_activations():
    base = plan_memory(load_config(None), device_bytes=BIG)
    ckpt = plan_memory(load_config(None, ["model.gradient_checkpointing=true"]), device_bytes=BIG)
    micro = plan_memory(load_config(None, ["optimizer.micro_batch_size=32"]), device_bytes=BIG)
    assert ckpt.activations < base.activations and micro.activations < base.activations
    assert micro.rows_per_micro_batch == 32


def test_too_small_device_names_the_largest_term():
    cfg = load_config(None)
    plan = plan_memory(cfg, device_bytes=1000)
    assert not plan.fits
    advice = plan.advice()
    assert plan.largest_term() == "activations"
    assert "activations" in advice and "optimizer.micro_batch_size" in advice and "gradient_checkpointing" in advice
    assert advice.count(". ") == 0 and "\n" not in advice
    kv = plan_memory(load_config(None, ["optimizer.micro_batch_size=8", "model.gradient_checkpointing=true",
                                        "rollout.max_new_tokens=40"]), device_bytes=1000)
    assert kv.largest_term() == "kv_cache" and "rollout.max_concurrent_sequences" in kv.advice()
    assert plan_memory(cfg, device_bytes=BIG).fits
    assert "parameters" in format_plan(plan) and "kv_cache" in format_plan(plan)


def test_cli_plan(capsys, monkeypatch):
    from groupwise.cli import main

    monkeypatch.delenv(DEVICE_MEMORY_ENV, raising=False)
    assert main(["plan"]) == 0
    out = capsys.readouterr().out
    for term in ("parameters", "gradients", "optimizer", "activations", "kv_cache", "peak", "device"):
        assert term in out
    monkeypatch.setenv(DEVICE_MEMORY_ENV, "1000000")
    assert main(["plan", "--set", "optimizer.micro_batch_size=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optimizer.micro_batch_size (now 64)" in err
    monkeypatch.delenv(DEVICE_MEMORY_ENV)
    assert main(["plan", "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert "world_size 2" in out and "gathered" in out
    assert main(["plan", "--nproc", "0"]) == 2


def test_trainer_refuses_before_loading(small_config, monkeypatch, tmp_path):
    from groupwise import trainer as trainer_mod

    monkeypatch.setenv(DEVICE_MEMORY_ENV, "1000")
    monkeypatch.setattr(trainer_mod, "load_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match="model.check_memory"):
        trainer_mod.Trainer(small_config(tmp_path / "a"))
    monkeypatch.undo()
    monkeypatch.setenv(DEVICE_MEMORY_ENV, "1000")
    trainer_mod.Trainer(small_config(tmp_path / "b", **{"model.check_memory": "false"}))   # skipped: loads fine


def test_vllm_backend_memory(monkeypatch):
    """vLLM holds its own weights + KV cache: on the CPU they stay through the update (engine term);
    on CUDA with sleep mode they take gpu_memory_utilization × the device, in the generation phase only."""
    cfg = load_config(None, ["rollout.backend=vllm", "rollout.vllm.kv_cache_gb=0.5"])
    plan = plan_memory(cfg, device_bytes=BIG)
    assert plan.engine == plan.num_parameters * 4 + 2**29 and plan.kv_cache == 0
    assert plan.total == plan.parameters + plan.gradients + plan.optimizer + plan.engine + plan.activations + plan.logits
    assert "engine" in format_plan(plan) and "engine" not in format_plan(plan_memory(load_config(None), device_bytes=BIG))
    from groupwise import memory_plan

    monkeypatch.setattr(memory_plan, "resolve_device", lambda _: torch.device("cuda"))
    gpu = plan_memory(load_config(None, ["rollout.backend=vllm", "rollout.vllm.gpu_memory_utilization=0.25"]), device_bytes=2**34)
    assert gpu.engine == 0 and gpu.kv_cache == 2**32                 # a quarter of 16 GiB, freed for the update
    awake = plan_memory(load_config(None, ["rollout.backend=vllm", "rollout.vllm.gpu_memory_utilization=0.25",
                                           "rollout.vllm.sleep_mode=false"]), device_bytes=2**34)
    assert awake.engine == 2**32 and awake.kv_cache == 0
