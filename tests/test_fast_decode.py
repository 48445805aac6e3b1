"""The fast Llama decode step: the model's own forward to float32 rounding, and only where it applies."""
from __future__ import annotations

import pytest
import torch

from groupwise.rollout.fast_decode import LlamaFastDecoder, fast_decode_supported
from groupwise.rollout.slot_cache import SlotKVCache, slot_forward


def _random_model(config_class, model_class, **overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
               num_key_value_heads=2, max_position_embeddings=128)
    cfg.update(overrides)
    model = model_class(config_class(**cfg)).eval()
    with torch.no_grad():   # biases start at zero: give them values so that stacking them is checked
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.5)
    return model


def _llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _random_model(LlamaConfig, LlamaForCausalLM, **{"tie_word_embeddings": True, **overrides})


def _qwen2(**overrides):   # Qwen2: Llama with q/k/v biases
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _random_model(Qwen2Config, Qwen2ForCausalLM, **{"tie_word_embeddings": False, **overrides})


def _cache(model, rows: int, seed: int) -> SlotKVCache:
    cfg = model.config
    cache = SlotKVCache(cfg.num_hidden_layers, rows + 2, 32, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                        torch.float32, "cpu")
    g = torch.Generator().manual_seed(seed)
    cache.keys.normal_(generator=g)
    cache.values.normal_(generator=g)
    cache.active = rows
    cache.lens[:rows] = torch.randint(1, 20, (rows,), generator=g)
    cache.begin_decode()
    return cache


needs_support = pytest.mark.skipif(not fast_decode_supported(_llama()), reason="no oneDNN prepacked linear in this torch build")


@needs_support
@pytest.mark.parametrize("make, overrides", [(_llama, {}), (_llama, {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False}),
                                             (_llama, {"num_key_value_heads": 6}), (_qwen2, {}), (_qwen2, {"tie_word_embeddings": True})])
def test_step_equals_the_models_forward(make, overrides):
    model = make(**overrides)
    rows = 5
    tokens = torch.tensor([3, 50, 7, 96, 0])
    expected_cache, cache = _cache(model, rows, 1), _cache(model, rows, 1)
    positions = cache.lens[:rows].clone()
    with torch.inference_mode():
        expected = slot_forward(model, tokens[:, None], positions[:, None], expected_cache, torch.zeros(rows, dtype=torch.long))
        got = LlamaFastDecoder(model, rows).step(tokens, positions, cache)
    assert got.shape == expected.shape == (rows, 97)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.keys, expected_cache.keys, rtol=1e-5, atol=1e-5)    # the step's keys/values written
    torch.testing.assert_close(cache.values, expected_cache.values, rtol=1e-5, atol=1e-5)
    assert not torch.equal(cache.keys, _cache(model, rows, 1).keys)                          # … and something was written


@needs_support
def test_fewer_rows_than_packed_for():
    model = _llama()
    decoder = LlamaFastDecoder(model, 8)
    cache, expected_cache = _cache(model, 3, 2), _cache(model, 3, 2)
    tokens, positions = torch.tensor([1, 2, 3]), cache.lens[:3].clone()
    with torch.inference_mode():
        got = decoder.step(tokens, positions, cache)
        expected = slot_forward(model, tokens[:, None], positions[:, None], expected_cache, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_supported_only_for_plain_float32_llama_and_qwen2():
    from transformers import MistralConfig, MistralForCausalLM

    from groupwise.rollout.packed_linear import onednn_linear_available

    assert fast_decode_supported(_llama()) == onednn_linear_available()
    assert fast_decode_supported(_qwen2()) == onednn_linear_available()
    assert not fast_decode_supported(_llama().double())
    assert not fast_decode_supported(_llama(hidden_act="gelu"))
    assert not fast_decode_supported(_qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=0))
    mistral = MistralForCausalLM(MistralConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                               num_attention_heads=6, num_key_value_heads=2, sliding_window=None))
    assert not fast_decode_supported(mistral)   # Llama-like, but not a family this step was checked against
    lora = _llama()
    lora.model.layers[0].self_attn.q_proj = torch.nn.Sequential(lora.model.layers[0].self_attn.q_proj)   # a wrapped projection
    assert not fast_decode_supported(lora)


@needs_support
@pytest.mark.parametrize("architecture", ["builtin", "qwen2"])
def test_engine_generates_the_same_completions_with_fast_decode(architecture):
    from groupwise.config import load_config
    from groupwise.data.sources import load_train_prompts
    from groupwise.model.loading import load_policy, load_tokenizer
    from groupwise.rollout import HFRolloutEngine, SamplingParams

    cfg = load_config(None, [])
    model, tokenizer = load_policy(cfg.model, torch.device("cpu")).eval(), load_tokenizer(cfg.model)
    if architecture == "qwen2":   # the built-in tokenizer over a random Qwen2 of its vocabulary
        model = _qwen2(vocab_size=model.config.vocab_size, eos_token_id=model.config.eos_token_id)
    assert fast_decode_supported(model)
    prompts = load_train_prompts(cfg.data, 0)[:4]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=0)
    runs = [HFRolloutEngine(model, tokenizer, fast_decode=fast, packed_matmul=False, max_concurrent_sequences=6)
            .generate(prompts, [p.text for p in prompts], 4, params, seed=3) for fast in (False, True)]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    assert torch.equal(runs[0].finished, runs[1].finished)
    torch.testing.assert_close(runs[0].sampling_logprobs, runs[1].sampling_logprobs, rtol=1e-4, atol=1e-4)
