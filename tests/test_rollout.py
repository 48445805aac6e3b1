"""The transformers rollout engine: sampling, greedy decoding, log-probs, finished/truncated."""
from __future__ import annotations

import pytest
import torch

from groupwise.config import load_config
from groupwise.data.sources import load_train_prompts
from groupwise.model.loading import load_policy, load_tokenizer
from groupwise.model.logprobs import completion_logprobs
from groupwise.rollout import HFRolloutEngine, SamplingParams
from groupwise.rollout.hf import sample_categorical


def test_exponential_race_samples_the_categorical_distribution():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).expand(100_000, 4).contiguous()
    counts = torch.bincount(sample_categorical(p, torch.Generator().manual_seed(1)), minlength=4).float()
    freq = counts / counts.sum()
    # binomial std at n = 1e5 is ≤ 0.0016: 5σ tolerance
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.008, rtol=0)
    assert counts[3] == 0, "a zero-probability token is never drawn"


def test_sampling_is_reproducible_from_the_generator():
    p = torch.softmax(torch.randn(8, 50), -1)
    a = sample_categorical(p, torch.Generator().manual_seed(7))
    b = sample_categorical(p, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


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
