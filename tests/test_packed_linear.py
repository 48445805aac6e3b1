"""Decoding through oneDNN-prepacked weights: F.linear's outputs (to float32 rounding), restored afterwards."""
from __future__ import annotations

import pytest
import torch

from groupwise.rollout.packed_linear import packed_linears, packed_matmul_available


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 16, bias=False))


needs_onednn = pytest.mark.skipif(not packed_matmul_available(_model()), reason="this torch build has no oneDNN prepacked linear")


@needs_onednn
def test_packed_rows_equal_f_linear_for_any_row_count():
    model = _model()
    x = torch.randn(8, 24)
    plain_full = model(x).detach()
    with torch.no_grad(), packed_linears(model, rows=8) as n:
        assert n == 2
        assert "forward" in model[0].__dict__
        full = model(x)                    # the row count the weights were packed for
        part = model(x[:5])                # fewer rows: no padding needed
        three_d = model(x.view(2, 4, 24))
        one = model(x[:1])
        large = model(torch.cat([x, x]))   # more rows than the hint
    torch.testing.assert_close(full, plain_full, rtol=1e-5, atol=1e-5)
    assert part.shape == (5, 16) and three_d.shape == (2, 4, 16) and large.shape == (16, 16)
    torch.testing.assert_close(part, full[:5], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(three_d.view(8, 16), full, rtol=0, atol=0)
    torch.testing.assert_close(one, plain_full[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(large, torch.cat([plain_full, plain_full]), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packed_forward_records_gradients_through_the_plain_path():
    model = _model()
    x = torch.randn(4, 24)
    with packed_linears(model, rows=4):
        model(x).sum().backward()    # the packed op has no backward: grad mode takes F.linear
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for got, want in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_onednn
def test_layers_are_restored_even_after_an_error():
    model = _model()
    with pytest.raises(RuntimeError, match="inside"):
        with packed_linears(model, rows=4):
            raise RuntimeError("inside")
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_unavailable_models_are_left_alone():
    model = _model().double()   # not float32: nothing is packed
    with packed_linears(model, rows=4) as n:
        assert n == 0
        assert all("forward" not in m.__dict__ for m in model.modules())
    with packed_linears(_model(), rows=0) as n:
        assert n == 0


@needs_onednn
def test_engine_generates_the_same_completions_with_packed_weights():
    from groupwise.config import load_config
    from groupwise.data.sources import load_train_prompts
    from groupwise.model.loading import load_policy, load_tokenizer
    from groupwise.rollout import HFRolloutEngine, SamplingParams

    cfg = load_config(None, [])
    model, tokenizer = load_policy(cfg.model, torch.device("cpu")).eval(), load_tokenizer(cfg.model)
    prompts = load_train_prompts(cfg.data, 0)[:3]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0)
    runs = [HFRolloutEngine(model, tokenizer, packed_matmul=packed).generate(prompts, [p.text for p in prompts], 4, params, seed=5)
            for packed in (False, True)]
    assert torch.equal(runs[0].completion_ids, runs[1].completion_ids)
    torch.testing.assert_close(runs[0].sampling_logprobs, runs[1].sampling_logprobs, rtol=1e-4, atol=1e-4)
