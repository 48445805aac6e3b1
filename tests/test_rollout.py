"""The transformers rollout engine: sampling, greedy decoding, log-probs, finished/truncated."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from groupwise.config import load_config
from groupwise.data.sources import load_train_prompts
from groupwise.model.loading import load_policy, load_tokenizer
from groupwise.model.logprobs import completion_logprobs
from groupwise.rollout import HFRolloutEngine, SamplingParams
from groupwise.rollout.hf import sample_categorical
from groupwise.rollout.scheduling import LengthPredictor, concurrent_sequences, order_sequences, sequence_uniforms


def test_inverse_cdf_samples_the_categorical_distribution():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).expand(100_000, 4).contiguous()
    u = sequence_uniforms(1, torch.arange(100_000), torch.zeros(100_000, dtype=torch.long))
    counts = torch.bincount(sample_categorical(p, u), minlength=4).float()
    freq = counts / counts.sum()
    # binomial std at n = 1e5 is ≤ 0.0016: 5σ tolerance
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.008, rtol=0)
    assert counts[3] == 0, "a zero-probability token is never drawn"


def test_inverse_cdf_hand_computed():
    p = torch.tensor([[0.1, 0.2, 0.7], [0.1, 0.2, 0.7], [0.1, 0.2, 0.7], [0.0, 0.5, 0.5]])
    # CDF 0.1, 0.3, 1.0: u = 0.05 → 0, 0.2 → 1, 0.99 → 2; a zero-mass first token is skipped (u = 0 → 1)
    assert sample_categorical(p, torch.tensor([0.05, 0.2, 0.99, 0.0], dtype=torch.float64)).tolist() == [0, 1, 2, 1]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 9), st.integers(0, 2**31 - 1), st.floats(0.0, 0.3))
def test_two_level_inverse_cdf_equals_one_cumulative_sum(vocab, block, seed, zero_share):
    """Block-then-token inversion draws the token one float64 cumsum over the vocabulary draws.
    Probabilities are multiples of 1/64, so every partial sum is exact and the two must agree."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randint(0, 8, (5, vocab), generator=g).float()
    weights[torch.rand(5, vocab, generator=g) < zero_share] = 0.0
    weights[:, torch.randint(0, vocab, (1,), generator=g)] += 1.0   # every row has mass
    p = weights / 64.0
    u = torch.rand(5, generator=g, dtype=torch.float64)
    cdf = p.double().cumsum(-1)
    reference = torch.searchsorted(cdf, (u * cdf[:, -1]).view(-1, 1), right=True).squeeze(-1)
    drawn = sample_categorical(p, u, block=block)
    assert drawn.tolist() == reference.tolist()
    assert bool((p.gather(-1, drawn.view(-1, 1)) > 0).all())


def test_inverse_cdf_target_at_the_total_draws_the_last_token_with_mass():
    # u = 1 (float rounding can reach it): past the end of the CDF; the padded block and the
    # zero-mass tail must not be drawn
    p = torch.tensor([[0.25, 0.5, 0.25, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    assert sample_categorical(p, torch.ones(2, dtype=torch.float64), block=2).tolist() == [2, 4]


def test_sequence_uniforms_are_a_pure_function_of_seed_sequence_and_step():
    seqs, steps = torch.tensor([0, 1, 2, 3, 1]), torch.tensor([0, 0, 5, 7, 0])
    u = sequence_uniforms(7, seqs, steps)
    assert u[1] == u[4], "same (seed, sequence, step) ⇒ same number, wherever it sits in the batch"
    assert torch.equal(sequence_uniforms(7, seqs.flip(0), steps.flip(0)), u.flip(0))
    assert not torch.equal(sequence_uniforms(8, seqs, steps), u)
    big = sequence_uniforms(3, torch.arange(50_000), torch.arange(50_000) % 17)
    assert 0.0 <= float(big.min()) and float(big.max()) < 1.0
    assert abs(float(big.mean()) - 0.5) < 0.005 and abs(float(big.var()) - 1 / 12) < 0.002
    assert len(set(big.tolist())) == 50_000


@pytest.fixture(scope="module")
def engine():
    cfg = load_config(None, [])
    tok = load_tokenizer(cfg.model)
    model = load_policy(cfg.model, torch.device("cpu")).eval()
    return HFRolloutEngine(model, tok), load_train_prompts(cfg.data, 0)[:6]


def test_greedy_decoding_matches_transformers_generate(engine):
    eng, prompts = engine
    texts = [p.text for p in prompts]
    ours = eng.generate(prompts, texts, 1, SamplingParams(max_new_tokens=6, greedy=True), seed=0)
    for i, text in enumerate(texts):
        ids = eng.tokenizer(text, return_tensors="pt")["input_ids"]
        ref = eng.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=eng.pad_id)[0, ids.shape[1]:]
        n = int(ours.completion_lengths[i])
        assert ours.completion_ids[i, :n].tolist() == ref[:n].tolist()


def test_sampling_logprobs_equal_the_training_logprobs_and_flags_are_consistent(engine):
    eng, prompts = engine
    out = eng.generate(prompts, [p.text for p in prompts], 4, SamplingParams(max_new_tokens=3, temperature=0.7), seed=3)
    assert out.group_id.tolist() == [g for g in range(6) for _ in range(4)]
    ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
    mask = torch.cat([out.prompt_mask, out.completion_mask], 1)
    with torch.no_grad():
        logp, _ = completion_logprobs(eng.model, ids, mask, out.completion_mask.float(), temperature=0.7)
    torch.testing.assert_close(logp, out.sampling_logprobs, atol=1e-4, rtol=0)
    lengths = out.completion_lengths
    ends_in_eos = out.completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1) == eng.eos_ids[0]
    assert torch.equal(out.finished, ends_in_eos), "finished ⇔ the last real token is EOS"
    assert torch.equal(out.truncated, lengths.eq(3) & ~ends_in_eos), "max_new_tokens = 3: truncated ⇔ 3 tokens and no EOS"
    again = eng.generate(prompts, [p.text for p in prompts], 4, SamplingParams(max_new_tokens=3, temperature=0.7), seed=3)
    assert torch.equal(again.completion_ids, out.completion_ids), "same seed, same completions"


SCHEDULES = [
    dict(),                                                              # everything at once
    dict(max_concurrent_sequences=3),                                    # continuous, 3 slots
    dict(max_concurrent_sequences=5, scheduling="micro_group"),
    dict(max_concurrent_sequences=4, length_order="shortest_first"),
    dict(max_concurrent_sequences=4, length_order="longest_then_shortest"),
    dict(max_concurrent_sequences=1),
]


@pytest.mark.parametrize("schedule", SCHEDULES[1:], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_same_seed_same_completions_whatever_the_schedule(engine, schedule):
    eng, prompts = engine
    texts = [p.text for p in prompts]
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    ref = HFRolloutEngine(eng.model, eng.tokenizer).generate(prompts, texts, 4, params, seed=11)
    other = HFRolloutEngine(eng.model, eng.tokenizer, **schedule)
    other.lengths.update([p.index for p in prompts], [6, 1, 3, 2, 5, 4])   # a length history reorders the queue
    out = other.generate(prompts, texts, 4, params, seed=11)
    assert torch.equal(out.completion_ids, ref.completion_ids)
    assert torch.equal(out.completion_mask, ref.completion_mask)
    assert torch.equal(out.finished, ref.finished)
    torch.testing.assert_close(out.sampling_logprobs, ref.sampling_logprobs, atol=1e-5, rtol=0)
    assert out.completions_text == ref.completions_text
    assert other.last_stats["slots"] == schedule["max_concurrent_sequences"]
    # the test can fail: the completions vary (lengths and tokens), and another seed changes them
    assert len(set(ref.completions_text)) > 4 and ref.completion_lengths.unique().numel() > 1
    assert not torch.equal(HFRolloutEngine(eng.model, eng.tokenizer, **schedule).generate(prompts, texts, 4, params, seed=12).completion_ids
                           [:, : ref.completion_ids.shape[1]], ref.completion_ids)


def test_continuous_sampling_refills_slots_and_micro_groups_wait(engine):
    eng, prompts = engine
    texts = [p.text for p in prompts]
    params = SamplingParams(max_new_tokens=12, temperature=2.5)       # hot: widely spread lengths
    cont = HFRolloutEngine(eng.model, eng.tokenizer, max_concurrent_sequences=4)
    micro = HFRolloutEngine(eng.model, eng.tokenizer, max_concurrent_sequences=4, scheduling="micro_group")
    out = cont.generate(prompts, texts, 4, params, seed=5)
    micro.generate(prompts, texts, 4, params, seed=5)
    total = int(out.completion_lengths.sum())
    # every decode step samples one token per busy slot: busy slot-steps = generated tokens
    for eng_ in (cont, micro):
        s = eng_.last_stats
        assert round(s["slot_utilization"] * s["decode_steps"] * s["slots"]) == total
    assert micro.last_stats["admissions"] == 24 / 4                     # one admission per micro-group
    assert cont.last_stats["admissions"] > micro.last_stats["admissions"]
    assert cont.last_stats["prefill_calls"] <= 6 and micro.last_stats["prefill_calls"] <= 6, "each prompt prefilled once"
    assert cont.last_stats["decode_steps"] < micro.last_stats["decode_steps"]
    assert cont.last_stats["slot_utilization"] > micro.last_stats["slot_utilization"]


def test_concurrent_sequences_under_a_kv_budget():
    # 10 sequences; each needs 1 MiB of KV cache: a 3.5 MiB budget gives 3 slots
    assert concurrent_sequences(10, None, 3.5, 2**20) == 3
    assert concurrent_sequences(10, 2, 3.5, 2**20) == 2
    assert concurrent_sequences(10, None, None, 2**20) == 10
    assert concurrent_sequences(10, None, 0.1, 2**20) == 1, "always at least one slot"


def test_kv_budget_bounds_the_engine(engine):
    from groupwise.rollout.scheduling import kv_bytes_per_token

    eng, prompts = engine
    per_token = kv_bytes_per_token(eng.model.config, torch.float32)
    rows = eng.tokenize_prompts([p.text for p in prompts])
    per_seq = per_token * (max(len(r) for r in rows) + 6)
    budgeted = HFRolloutEngine(eng.model, eng.tokenizer, kv_cache_budget_mb=2.5 * per_seq / 2**20)
    budgeted.generate(prompts, [p.text for p in prompts], 2, SamplingParams(max_new_tokens=6), seed=0)
    assert budgeted.last_stats["slots"] == 2


def test_length_predictor_and_order():
    pred = LengthPredictor(default=7.0, decay=0.5)
    assert pred.predict("a") == 7.0
    pred.update(["a", "a", "b"], [2, 4, 10])
    assert pred.predict("a") == 3.0 and pred.predict("b") == 10.0
    assert pred.predict("new") == pytest.approx(16 / 3), "unseen prompts get the mean over all completions"
    pred.update(["a"], [5])
    assert pred.predict("a") == 0.5 * 3.0 + 0.5 * 5
    assert order_sequences([3.0, 1.0, 3.0, 2.0], "shortest_first") == [1, 3, 0, 2]
    assert order_sequences([3.0, 1.0, 3.0, 2.0], "longest_first") == [0, 2, 3, 1]
    assert order_sequences([3.0, 1.0, 3.0, 2.0], "none") == [0, 1, 2, 3]
    # two-stage: the initial fill (2 slots) takes the longest, refills the shortest remaining
    assert order_sequences([3.0, 1.0, 4.0, 2.0, 5.0], "longest_then_shortest", slots=2) == [4, 2, 1, 3, 0]


@pytest.mark.parametrize("schedule", [dict(), dict(max_concurrent_sequences=3)], ids=["all", "3-slots"])
def test_slot_cache_and_dynamic_cache_paths_agree(engine, schedule):
    # Models whose attention cannot take the slot cache decode with transformers' DynamicCache.
    eng, prompts = engine
    texts = [p.text for p in prompts]
    params = SamplingParams(max_new_tokens=6, temperature=1.2)
    slot = HFRolloutEngine(eng.model, eng.tokenizer, **schedule)
    dynamic = HFRolloutEngine(eng.model, eng.tokenizer, **schedule)
    dynamic._use_slots = False
    a, b = slot.generate(prompts, texts, 4, params, seed=4), dynamic.generate(prompts, texts, 4, params, seed=4)
    assert slot._use_slots is True
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.finished, b.finished)
    torch.testing.assert_close(a.sampling_logprobs, b.sampling_logprobs, atol=1e-5, rtol=0)


def test_prefill_of_prompts_with_a_shared_prefix_equals_each_prompts_own_forward(engine):
    """The packed prefill (a shared system prompt encoded once, no padding) gives each prompt the
    keys/values and next-token logits of running that prompt alone through the model."""
    from transformers import DynamicCache

    from groupwise.rollout.hf import _cache_layers

    eng, prompts = engine
    rows = eng.tokenize_prompts([p.text for p in prompts[:3]])
    system = rows[0][:4] + rows[1][:3]                  # a 7-token "system prompt" before each question
    shared = [system + r for r in rows[:2]] + [system + rows[2][:1]]   # prompt lengths differ
    keys, values, logits = eng._prefill_slots(shared, torch.device("cpu"))
    with torch.no_grad():
        for j, p in enumerate(shared):
            out = eng.model(input_ids=torch.tensor([p]), past_key_values=DynamicCache(config=eng.model.config), use_cache=True)
            torch.testing.assert_close(logits[j], out.logits[0, -1], atol=1e-5, rtol=1e-5)
            for i, layer in enumerate(_cache_layers(out.past_key_values)):
                torch.testing.assert_close(keys[i, j, :, : len(p)], layer.keys[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(values[i, j, :, : len(p)], layer.values[0], atol=1e-5, rtol=1e-5)
    assert logits.abs().max() > 1 and keys[:, :, :, len(system):].abs().max() > 0.1   # not vacuous


@pytest.mark.parametrize("heads, kv_heads", [(6, 2), (4, 4), (3, 1)], ids=["gqa", "mha", "mqa"])
def test_slot_attention_equals_per_row_softmax_attention(heads, kv_heads):
    """The decode step's attention, row by row by hand: write the new key/value at index lens[r],
    then softmax(q kᵀ · scale) v over that slot's tokens 0 … lens[r], query head i reading kv head
    i // (heads / kv_heads)."""
    from types import SimpleNamespace

    from groupwise.rollout.slot_cache import SlotKVCache, slot_attention

    g = torch.Generator().manual_seed(0)
    rows, d, layer = 4, 8, 1
    cache = SlotKVCache(2, rows + 1, 12, kv_heads, d, torch.float32, "cpu")
    cache.keys.normal_(generator=g)
    cache.values.normal_(generator=g)
    cache.active = rows
    cache.lens[:rows] = torch.tensor([3, 0, 10, 6])
    cache.begin_decode()
    before = cache.keys.clone()
    q = torch.randn(rows, heads, 1, d, generator=g)
    k, v = torch.randn(rows, kv_heads, 1, d, generator=g), torch.randn(rows, kv_heads, 1, d, generator=g)
    out, _ = slot_attention(SimpleNamespace(layer_idx=layer), q, k, v, None, scaling=0.3, slot_cache=cache)
    assert out.shape == (rows, 1, heads, d)
    for r in range(rows):
        n = int(cache.lens[r])
        torch.testing.assert_close(cache.keys[layer, r, :, n], k[r, :, 0])
        torch.testing.assert_close(cache.values[layer, r, :, n], v[r, :, 0])
        for i in range(heads):
            j = i // (heads // kv_heads)
            keys, values = cache.keys[layer, r, j, : n + 1], cache.values[layer, r, j, : n + 1]
            p = torch.softmax(keys @ q[r, i, 0] * 0.3, dim=0)
            torch.testing.assert_close(out[r, 0, i], p @ values, atol=1e-6, rtol=1e-5)
    changed = (cache.keys != before).nonzero()[:, :2].unique(dim=0).tolist()
    assert changed == [[layer, r] for r in range(rows)]      # only this layer's active slots were written
