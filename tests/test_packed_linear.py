"""Decoding through MKL-packed weights: the same outputs as F.linear, restored afterwards."""
from __future__ import annotations

import pytest
import torch

from groupwise.rollout.packed_linear import packed_linears, packed_matmul_available


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 16, bias=False))


needs_mkl = pytest.mark.skipif(not packed_matmul_available(_model()), reason="this torch build has no MKL packed sgemm")


@needs_mkl
def test_packed_rows_equal_f_linear_and_padding_drops_nothing():
    model = _model()
    x = torch.randn(8, 24)
    plain_full = model(x)
    with torch.no_grad(), packed_linears(model, rows=8) as n:
        assert n == 2
        assert "forward" in model[0].__dict__
        full = model(x)                  # exactly the packed row count
        part = model(x[:5])              # padded up to 8 rows, the padding's outputs dropped
        three_d = model(x.view(2, 4, 24))
        small = model(x[:1])             # below a quarter of the rows: the plain path
        large = model(torch.cat([x, x]))  # more rows than packed: the plain path
    torch.testing.assert_close(full, plain_full, rtol=1e-5, atol=1e-5)
    assert part.shape == (5, 16) and three_d.shape == (2, 4, 16)
    torch.testing.assert_close(part, full[:5], rtol=0, atol=0)   # a row's result does not depend on the others
    torch.testing.assert_close(three_d.view(8, 16), full, rtol=0, atol=0)
    torch.testing.assert_close(small, model(x[:1]), rtol=0, atol=0)
    torch.testing.assert_close(large, model(torch.cat([x, x])), rtol=0, atol=0)


@needs_mkl
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


@needs_mkl
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
