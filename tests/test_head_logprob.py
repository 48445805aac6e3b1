"""The chunked LM-head log-prob/entropy function against plain autograd on full logits."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from groupwise.model.logprobs import EXP_FLOOR, ChunkedHeadLogprob, floored_log_softmax_


def reference(h, w, b, targets, temperature):
    z = torch.nn.functional.linear(h, w, b).float() / temperature
    logp_all = torch.log_softmax(z, -1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 9), vocab=st.integers(2, 17), chunk=st.integers(1, 10), temperature=st.sampled_from([0.6, 1.0, 1.7]),
       with_bias=st.booleans(), entropy_weight=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 1000), keep=st.booleans())
def test_values_and_gradients_match_autograd(m, vocab, chunk, temperature, with_bias, entropy_weight, seed, keep):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(m, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, 6, generator=gen, dtype=torch.float64) * 2
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if with_bias else None
    targets = torch.randint(0, vocab, (m,), generator=gen)
    g_logp = torch.randn(m, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(m, generator=gen, dtype=torch.float64) * entropy_weight

    leaves = [t.clone().requires_grad_() for t in (h, w) + ((b,) if b is not None else ())]
    lp, ent = reference(leaves[0], leaves[1], leaves[2] if b is not None else None, targets, temperature)
    ((lp * g_logp).sum() + (ent * g_ent).sum()).backward()
    expected = [t.grad for t in leaves]

    ours = [t.clone().requires_grad_() for t in (h, w) + ((b,) if b is not None else ())]
    lp2, ent2 = ChunkedHeadLogprob.apply(ours[0], ours[1], ours[2] if b is not None else None, targets, temperature, chunk, True, keep)
    ((lp2 * g_logp).sum() + (ent2 * g_ent).sum()).backward()
    torch.testing.assert_close(lp2, lp.float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent2, ent.float(), atol=1e-6, rtol=1e-6)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got.grad, want, atol=1e-5, rtol=1e-5)


def test_hand_computed_two_token_vocabulary():
    # h·Wᵀ = [0, ln 3] at T = 1: p = [1/4, 3/4]; log p(1) = ln(3/4); H = −(¼ ln ¼ + ¾ ln ¾)
    h = torch.tensor([[1.0]], requires_grad=True)
    w = torch.tensor([[0.0], [float(torch.log(torch.tensor(3.0)))]], requires_grad=True)
    lp, ent = ChunkedHeadLogprob.apply(h, w, None, torch.tensor([1]), 1.0, 4, True)
    assert lp.item() == pytest.approx(float(torch.log(torch.tensor(0.75))), abs=1e-6)
    assert ent.item() == pytest.approx(-(0.25 * float(torch.log(torch.tensor(0.25))) + 0.75 * float(torch.log(torch.tensor(0.75)))), abs=1e-6)
    lp.sum().backward()
    # ∂ log p_1 / ∂z = onehot(1) − p = [−¼, ¼]; z = h·w ⇒ ∂/∂h = Σ_v (onehot − p)_v w_v = ¼ ln 3
    assert h.grad.item() == pytest.approx(0.25 * float(torch.log(torch.tensor(3.0))), abs=1e-6)
    torch.testing.assert_close(w.grad, torch.tensor([[-0.25], [0.25]]))


def test_no_logits_are_saved_for_backward():
    h = torch.randn(64, 8, requires_grad=True)
    w = torch.randn(1000, 8, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, _ = ChunkedHeadLogprob.apply(h, w, None, torch.randint(0, 1000, (64,)), 1.0, 16, False)
    assert max(saved) == 1000 * 8, "only h and W are kept, never a [rows, vocab] tensor"
    lp.sum().backward()


def test_floored_log_softmax_hand_computed():
    # z = [0, ln 3]: log p = [ln ¼, ln ¾], logsumexp = ln 4; z = [0, −200]: log p₂ floored at −87
    z = torch.tensor([[0.0, float(torch.log(torch.tensor(3.0)))], [0.0, -200.0]])
    logp, lse = floored_log_softmax_(z)
    torch.testing.assert_close(logp[0], torch.log(torch.tensor([0.25, 0.75])))
    torch.testing.assert_close(lse, torch.tensor([float(torch.log(torch.tensor(4.0))), 0.0]))
    assert logp[1].tolist() == [0.0, EXP_FLOOR]
    assert logp.data_ptr() == z.data_ptr(), "computed in place"


def test_logits_wider_than_the_exp_floor_match_float64():
    # A trained LM's logits span > 87 nats: most of the row is floored, and nothing visible changes.
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(20, 8, generator=gen, dtype=torch.float64)
    w = torch.randn(300, 8, generator=gen, dtype=torch.float64) * 30   # logits spread over hundreds of nats
    targets = torch.randint(0, 300, (20,), generator=gen)
    g_logp, g_ent = torch.randn(20, generator=gen, dtype=torch.float64), torch.randn(20, generator=gen, dtype=torch.float64)
    leaves = [h.clone().requires_grad_(), w.clone().requires_grad_()]
    lp, ent = reference(*leaves, None, targets, 1.3)
    assert float(torch.log_softmax(torch.nn.functional.linear(h, w) / 1.3, -1).min()) < -400
    ((lp * g_logp).sum() + (ent * g_ent).sum()).backward()
    ours = [h.float().requires_grad_(), w.float().requires_grad_()]
    lp2, ent2 = ChunkedHeadLogprob.apply(ours[0], ours[1], None, targets, 1.3, 7, True)
    ((lp2 * g_logp.float()).sum() + (ent2 * g_ent.float()).sum()).backward()
    torch.testing.assert_close(lp2, lp.float(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ent2, ent.float(), atol=1e-5, rtol=1e-5)
    for got, want in zip(ours, leaves):
        torch.testing.assert_close(got.grad, want.grad.float(), atol=1e-4, rtol=1e-4)


def test_kept_probabilities_serve_the_first_backward_and_a_second_recomputes():
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (6,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        lp, _ = ChunkedHeadLogprob.apply(h, w, None, targets, 1.0, 4, False, True)
    assert (4, 50) in saved and (2, 50) in saved, "p of each chunk is kept"
    expected = torch.autograd.grad(reference(h, w, None, targets, 1.0)[0].sum(), (h, w))
    lp.sum().backward(retain_graph=True)
    torch.testing.assert_close(h.grad, expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, expected[1], atol=1e-5, rtol=1e-5)
    h.grad, w.grad = None, None
    lp.sum().backward()       # the kept p became the gradient in place: a second backward recomputes it
    torch.testing.assert_close(h.grad, expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, expected[1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        lp3, _ = ChunkedHeadLogprob.apply(h, w, None, targets, 1.0, 4, False, True)
    torch.testing.assert_close(lp3, lp.detach())


def test_completion_logprobs_keeps_the_softmax_only_within_its_budget():
    from types import SimpleNamespace

    from groupwise.model.logprobs import completion_logprobs

    torch.manual_seed(0)
    decoder = torch.nn.Embedding(30, 8)
    head = torch.nn.Linear(8, 30, bias=False)

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder, self.head = decoder, head

        def get_decoder(self):
            return lambda input_ids, **kw: SimpleNamespace(last_hidden_state=self.decoder(input_ids))

        def get_output_embeddings(self):
            return self.head

    ids = torch.randint(0, 30, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    cmask = torch.ones(2, 3, dtype=torch.long)          # M = 6 completion tokens: 6 · 30 · 4 = 720 bytes
    for budget, kept in ((720, True), (719, False), (0, False)):
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            logp, _ = completion_logprobs(TinyLM(), ids, mask, cmask, keep_head_probs_bytes=budget)
        assert ((6, 30) in shapes) is kept, budget
        logp.sum().backward()
