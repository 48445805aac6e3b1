"""Model-based rewards: self-certainty (Intuitor) and a local sequence-classification reward model.

References are direct computations: full-logits forwards of single unpadded rows for
self-certainty, unbatched forwards of the same texts for the reward model, and hand-computed
KL(U ‖ p) values on models whose head is set by hand.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from groupwise.model.loading import builtin_model_dir
from groupwise.rewards import model_based  # noqa: F401  (registers the rewards)
from groupwise.rewards.contract import REWARDS, RewardContext, RewardError, RewardRunner, load_reward_function
from groupwise.rewards.model_based import self_certainty_from_logits

VOCAB = 61
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def tiny_llama(seed=0, vocab=VOCAB, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=tie, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def constant_head(model, bias):
    """Logits = `bias` at every position: a zero-weight head with a bias (the hidden state no longer matters)."""
    head = torch.nn.Linear(model.config.hidden_size, len(bias), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    model.lm_head = head
    return model


def sc_reward(model, tokenizer=None, **kwargs):
    fn = REWARDS.get("self_certainty")(**kwargs)
    ctx = RewardContext(model=model, tokenizer=tokenizer)

    def call(prompt_ids, completion_ids, prompts=None):
        n = len(completion_ids)
        return fn(prompts=prompts if prompts is not None else ["p"] * n, completions=["c"] * n,
                  completion_ids=completion_ids, trainer_state=None, prompt_ids=prompt_ids, reward_context=ctx)

    return call


def direct_self_certainty(model, prompt, completion, temperature=1.0):
    """Full logits of one unpadded row, KL(U ‖ p) = −log V − mean_j log p_j in float64, averaged."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].double() / temperature
    logp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + len(completion) - 1], dim=-1)
    v = logits.shape[-1]
    return float((-math.log(v) - logp.mean(-1)).mean())


def random_rows(seed, n, vocab=VOCAB, max_p=7, max_c=9):
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for _ in range(n):
        lp, lc = int(torch.randint(1, max_p + 1, (1,), generator=g)), int(torch.randint(1, max_c + 1, (1,), generator=g))
        prompts.append(torch.randint(1, vocab, (lp,), generator=g).tolist())
        completions.append(torch.randint(1, vocab, (lc,), generator=g).tolist())
    return prompts, completions


# ----------------------------------------------------------------------------- self-certainty: formula


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(-30, 30), min_size=5, max_size=5), min_size=1, max_size=4))
def test_self_certainty_from_logits_is_kl_from_uniform(rows):
    z = torch.tensor(rows, dtype=torch.float64)
    got = self_certainty_from_logits(z)
    reference = -math.log(5) - torch.log_softmax(z, -1).mean(-1)     # KL(U ‖ p), the textbook form
    assert torch.allclose(got, reference, atol=1e-9)
    assert (got >= 0).all()
    spread = z.max(-1).values - z.min(-1).values
    assert (got[spread == 0] < 1e-12).all()           # zero for a uniform distribution (up to rounding) ...
    assert (got[spread > 1e-3] > 0).all()             # ... and only then
    # float32 (what the reward uses) agrees, and the logits' shift invariance holds
    assert torch.allclose(self_certainty_from_logits(z.float() + 7.0).double(), reference, atol=2e-5)


def test_self_certainty_from_logits_hand_values():
    # p = [1/2, 1/6, 1/6, 1/6]: (1/4)[log(1/4 / 1/2) + 3 log(1/4 / 1/6)] = log(0.5 · 1.5³) / 4
    z = torch.tensor([[math.log(3), 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    assert self_certainty_from_logits(z).tolist() == pytest.approx([math.log(1.6875) / 4, 0.0], abs=1e-6)


# ----------------------------------------------------------------------------- self-certainty: on a model


def test_self_certainty_hand_computed_head():
    model = constant_head(tiny_llama(vocab=4), [math.log(3), 0.0, 0.0, 0.0])
    prompts, completions = [[1, 2], [3], [1, 1, 1]], [[2, 3, 1], [0], []]
    # every position has p = [1/2, 1/6, 1/6, 1/6]; an empty completion is not applicable
    assert sc_reward(model)(prompts, completions) == pytest.approx([math.log(1.6875) / 4] * 2 + [None], abs=1e-6)
    # temperature 1/2 doubles the logits: p = [3/4, 1/12, 1/12, 1/12] → (1/4)[log(1/3) + 3 log 3] = log(3)/2
    assert sc_reward(model, temperature=0.5)(prompts[:2], completions[:2]) == pytest.approx([math.log(3) / 2] * 2, abs=1e-6)
    uniform = constant_head(tiny_llama(vocab=4), [0.7] * 4)
    assert sc_reward(uniform)(prompts[:2], completions[:2]) == [0.0, 0.0]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bias=st.one_of(st.lists(st.floats(-8, 8), min_size=6, max_size=6), st.floats(-8, 8).map(lambda b: [b] * 6)),
       temperature=st.sampled_from([0.5, 1.0, 1.7]))
def test_self_certainty_property_constant_head(bias, temperature):
    """Through the whole reward: ≥ 0, equal to KL(U ‖ softmax(b / T)), and 0 iff the head is uniform."""
    model = constant_head(tiny_llama(vocab=6), bias)
    got = sc_reward(model, temperature=temperature)([[1, 2, 3]], [[4, 5]])[0]
    b = torch.tensor(bias, dtype=torch.float64) / temperature
    expected = float(-math.log(6) - torch.log_softmax(b, -1).mean())
    assert got >= 0
    assert got == pytest.approx(expected, abs=1e-5)
    spread = max(bias) - min(bias)
    if spread == 0:
        assert got < 1e-6                               # uniform: 0 up to float32 rounding ...
    elif spread > 0.05:
        assert got > 1e-6                               # ... and clearly positive otherwise


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_self_certainty_matches_full_logits(temperature):
    model = tiny_llama(seed=1)
    prompts, completions = random_rows(seed=2, n=7)
    completions[3] = []
    got = sc_reward(model, temperature=temperature, chunk_rows=5)(prompts, completions)  # chunks smaller than a batch's tokens
    assert got[3] is None
    for i in range(7):
        if i != 3:
            assert got[i] == pytest.approx(direct_self_certainty(model, prompts[i], completions[i], temperature), abs=1e-5)


def test_self_certainty_absolute_positions_survive_left_padding():
    """GPT-2 has absolute positions (Llama's RoPE is blind to a uniform shift): left-padded prompts must restart at 0."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(7)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=1, eos_token_id=2)).eval()
    prompts, completions = random_rows(seed=8, n=6, max_p=10)
    got = sc_reward(model, batch_size=6)(prompts, completions)
    assert got == pytest.approx([direct_self_certainty(model, p, c) for p, c in zip(prompts, completions)], abs=1e-5)


def test_self_certainty_invariant_to_batching_and_chunking():
    model = tiny_llama(seed=3)
    prompts, completions = random_rows(seed=4, n=11, max_p=12, max_c=15)
    one = sc_reward(model, batch_size=1)(prompts, completions)
    for kwargs in ({"batch_size": 8}, {"batch_size": 3, "chunk_rows": 1}, {"batch_size": 11, "chunk_rows": 4096}):
        assert sc_reward(model, **kwargs)(prompts, completions) == pytest.approx(one, abs=1e-5)
    # a row's value does not depend on its neighbours (padding): scored alone, it is the same
    assert sc_reward(model)([prompts[5]], [completions[5]]) == pytest.approx([one[5]], abs=1e-5)
    # different rows get different values, so a broadcast or row-order bug would show
    assert len({round(v, 6) for v in one}) == len(one)


@pytest.mark.parametrize("training", [True, False])
def test_self_certainty_leaves_model_mode_and_grads(training):
    model = tiny_llama(seed=5)
    model.train(training)
    model.model.layers[0].train(not training)   # a mixed state must survive too
    modes = [m.training for m in model.modules()]
    marker = torch.full_like(model.lm_head.weight, 0.25)
    model.lm_head.weight.grad = marker.clone()
    model.model.embed_tokens.requires_grad_(False)
    requires = [p.requires_grad for p in model.parameters()]
    prompts, completions = random_rows(seed=6, n=4)
    assert torch.is_grad_enabled()
    values = sc_reward(model)(prompts, completions)
    assert all(v is not None and v > 0 for v in values)
    assert torch.is_grad_enabled()
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == requires
    assert torch.equal(model.lm_head.weight.grad, marker)
    assert all(p.grad is None for name, p in model.named_parameters() if name != "lm_head.weight")


def builtin_tokenizer(chat_template=None, padding_side=None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(builtin_model_dir()), local_files_only=True)
    if chat_template is not None:
        tok.chat_template = chat_template
    if padding_side is not None:
        tok.padding_side = padding_side
    return tok


@pytest.fixture(scope="module")
def builtin_lm():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(builtin_model_dir()), local_files_only=True)


def test_self_certainty_builtin_model_tokenizes_prompts_like_the_rollout(builtin_lm):
    tok = builtin_tokenizer(chat_template=CHAT_TEMPLATE)
    prompts = ["12+34=", "7-5=", [{"role": "user", "content": "3+4="}]]
    completions = ["46", "2", "7"]
    completion_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in completions]
    rendered = ["12+34=", "7-5=", "<bos><user>3+4=<eos><assistant>"]
    prompt_ids = [tok(t, add_special_tokens=True)["input_ids"] for t in rendered]
    assert prompt_ids[0] == [1, 20, 21, 14, 22, 23, 32]
    fn = REWARDS.get("self_certainty")()
    ctx = RewardContext(model=builtin_lm, tokenizer=tok)
    from_text = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, prompt_ids=None, reward_context=ctx)
    from_ids = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, prompt_ids=prompt_ids, reward_context=ctx)
    assert from_text == pytest.approx(from_ids, abs=1e-6)
    for i in range(3):
        assert from_ids[i] == pytest.approx(direct_self_certainty(builtin_lm, prompt_ids[i], completion_ids[i]), abs=1e-5)
    # without completion_ids, the completion text is tokenized without special tokens
    no_ids = fn(prompts=prompts, completions=completions, completion_ids=None, prompt_ids=prompt_ids, reward_context=ctx)
    assert no_ids == pytest.approx(from_ids, abs=1e-6)


def test_self_certainty_through_the_runner_and_model_path(builtin_lm):
    tok = builtin_tokenizer()
    runner = RewardRunner.from_callables([("self_certainty", REWARDS.get("self_certainty")(), 1.0)])
    prompts, completions = ["12+34=", "9+9="], ["46", "18"]
    completion_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in completions]
    with pytest.raises(RewardError, match="needs the trainer's policy"):
        runner.score(prompts, completions, completion_ids)
    runner.bind(device="cpu", model=builtin_lm, tokenizer=tok)
    values = runner.score(prompts, completions, completion_ids).values[:, 0].tolist()
    expected = [direct_self_certainty(builtin_lm, tok(p)["input_ids"], c) for p, c in zip(prompts, completion_ids)]
    assert values == pytest.approx(expected, abs=1e-5)
    # a fixed local model instead of the policy: the same weights give the same numbers
    fixed = load_reward_function("self_certainty", {"model_path": str(builtin_model_dir())})
    got = fixed(prompts=prompts, completions=completions, completion_ids=completion_ids, reward_context=RewardContext())
    assert got == pytest.approx(expected, abs=1e-5)


def test_self_certainty_errors(tmp_path):
    model = tiny_llama(vocab=8)
    for kwargs, word in (({"batch_size": 0}, "batch_size"), ({"chunk_rows": 2.5}, "chunk_rows"),
                         ({"temperature": 0.0}, "temperature"), ({"temperature": float("nan")}, "temperature")):
        with pytest.raises(RewardError, match=word):
            REWARDS.get("self_certainty")(**kwargs)
    with pytest.raises(RewardError, match="sample 1 has an empty prompt"):
        sc_reward(model)([[1], []], [[2], [3]])
    with pytest.raises(RewardError, match="outside the model's vocabulary of 8"):
        sc_reward(model)([[1]], [[2, 9]])
    with pytest.raises(RewardError, match="no prompt_ids and no tokenizer"):
        sc_reward(model)(None, [[2]])
    with pytest.raises(RewardError, match="chat conversation but the tokenizer has no chat template"):
        sc_reward(model, builtin_tokenizer())(None, [[2]], prompts=[[{"role": "user", "content": "hi"}]])
    fn = REWARDS.get("self_certainty")(model_path=str(tmp_path / "nowhere"))
    with pytest.raises(RewardError, match="nowhere' does not exist"):
        fn(prompts=["a"], completions=["b"], completion_ids=[[2]], prompt_ids=[[1]], reward_context=RewardContext())


# ----------------------------------------------------------------------------- reward model


def save_classifier(directory, num_labels, seed=0, tokenizer=None):
    """A tiny random LlamaForSequenceClassification over the built-in (character) tokenizer."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=98, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64, num_labels=num_labels, pad_token_id=0,
                      attn_implementation="sdpa")
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():  # a head of a useful scale (the random init is ~0.02)
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(directory)
    (tokenizer or builtin_tokenizer()).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_models")
    return SimpleNamespace(
        one=save_classifier(root / "one", 1),                                  # builtin tokenizer: pads on the left
        right=save_classifier(root / "right", 1, tokenizer=builtin_tokenizer(padding_side="right")),
        three=save_classifier(root / "three", 3, seed=1),
        chat=save_classifier(root / "chat", 1, seed=2, tokenizer=builtin_tokenizer(chat_template=CHAT_TEMPLATE)),
    )


def direct_logits(directory, texts, add_special_tokens=True, max_length=None):
    """Unbatched forwards: one text at a time, no padding at all."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(directory), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, add_special_tokens=add_special_tokens)["input_ids"]
            if max_length is not None and len(ids) > max_length:
                ids = ids[:1] + ids[len(ids) - max_length + 1 :]      # bos kept, the start of the text cut
            out.append(model(input_ids=torch.tensor([ids])).logits[0].double())
    return torch.stack(out)


def rm_call(fn, prompts, completions, device="cpu"):
    return fn(prompts=prompts, completions=completions, completion_ids=[[0]] * len(completions), trainer_state=None,
              reward_context=RewardContext(device=torch.device(device)))


PROMPTS = ["What is 12+34? ", "Say hi. ", "Q: 7*8=", "", "Name a colour: "]
COMPLETIONS = ["It is 46.", "hi", "56, because 7*8 is 56 and that is a long answer.", "x", "blue"]


@pytest.mark.parametrize("which", ["one", "right"])
def test_reward_model_matches_unbatched_forward(rm_dirs, which):
    directory = getattr(rm_dirs, which)
    expected = direct_logits(directory, [p + c for p, c in zip(PROMPTS, COMPLETIONS)])[:, 0]
    for batch_size in (1, 2, 16):  # different lengths in one batch: padding must not change a score
        fn = load_reward_function("reward_model", {"path": str(directory), "batch_size": batch_size})
        got = rm_call(fn, PROMPTS, COMPLETIONS)
        assert got == pytest.approx(expected.tolist(), abs=1e-5)
    assert len({round(v, 4) for v in got}) == len(got)        # distinct texts, distinct scores: no broadcasting
    assert fn.state["tokenizer"].padding_side == ("left" if which == "one" else "right")


def test_reward_model_left_padding_with_absolute_positions(tmp_path):
    """Llama's RoPE is blind to a uniform shift, so left padding only shows with absolute positions (GPT-2)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(4)
    cfg = GPT2Config(vocab_size=98, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=1, pad_token_id=0)
    model = GPT2ForSequenceClassification(cfg).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    model.save_pretrained(tmp_path)
    builtin_tokenizer().save_pretrained(tmp_path)          # pads on the left
    fn = load_reward_function("reward_model", {"path": str(tmp_path), "batch_size": 8})
    assert rm_call(fn, PROMPTS, COMPLETIONS) == pytest.approx(
        direct_logits(tmp_path, [p + c for p, c in zip(PROMPTS, COMPLETIONS)])[:, 0].tolist(), abs=1e-5)
    # the check has teeth: left padding without positions restarting at 0 changes the score
    ids = torch.tensor([[0, 0, 0, 1, 43, 72], [1, 43, 72, 79, 79, 82]])
    with torch.no_grad():
        naive = model(input_ids=ids, attention_mask=(ids != 0).long()).logits[0, 0]
        alone = model(input_ids=ids[:1, 3:]).logits[0, 0]
    assert abs(float(naive - alone)) > 1e-3


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(texts=st.lists(st.text(alphabet="abc 12+=?", min_size=0, max_size=20), min_size=1, max_size=7),
       batch_size=st.integers(1, 8))
def test_reward_model_batch_size_invariance_property(rm_dirs, texts, batch_size):
    one = load_reward_function("reward_model", {"path": str(rm_dirs.one), "batch_size": 1})
    many = load_reward_function("reward_model", {"path": str(rm_dirs.one), "batch_size": batch_size})
    prompts = ["P:"] * len(texts)
    assert rm_call(many, prompts, texts) == pytest.approx(rm_call(one, prompts, texts), abs=1e-5)


def test_reward_model_labels_and_probability(rm_dirs):
    texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    logits = direct_logits(rm_dirs.three, texts)                      # [5, 3]
    with pytest.raises(RewardError, match="3 labels; give label_index"):
        load_reward_function("reward_model", {"path": str(rm_dirs.three)})
    with pytest.raises(RewardError, match="label_index must be an integer in 0..2"):
        load_reward_function("reward_model", {"path": str(rm_dirs.three), "label_index": 3})
    got = rm_call(load_reward_function("reward_model", {"path": str(rm_dirs.three), "label_index": 2, "batch_size": 2}),
                  PROMPTS, COMPLETIONS)
    assert got == pytest.approx(logits[:, 2].tolist(), abs=1e-5)
    prob = rm_call(load_reward_function("reward_model", {"path": str(rm_dirs.three), "label_index": 1, "score": "probability"}),
                   PROMPTS, COMPLETIONS)
    assert prob == pytest.approx(torch.softmax(logits, -1)[:, 1].tolist(), abs=1e-6)
    # hand check of the softmax on the first text
    row = logits[0].tolist()
    assert prob[0] == pytest.approx(math.exp(row[1]) / sum(math.exp(x) for x in row), abs=1e-6)
    # one label: the probability is σ(logit)
    single = direct_logits(rm_dirs.one, texts)[:, 0]
    sig = rm_call(load_reward_function("reward_model", {"path": str(rm_dirs.one), "score": "probability"}), PROMPTS, COMPLETIONS)
    assert sig == pytest.approx([1 / (1 + math.exp(-x)) for x in single.tolist()], abs=1e-6)


def test_reward_model_truncates_from_the_left(rm_dirs):
    fn = load_reward_function("reward_model", {"path": str(rm_dirs.one), "max_length": 8})
    long_a, long_b = "A" * 20 + " the end.", "zzz" * 9 + " the end."
    got = rm_call(fn, ["", ""], [long_a, long_b])
    # only the last 7 characters (and bos) are seen: the different starts no longer matter
    assert got[0] == pytest.approx(got[1], abs=1e-6)
    assert got[0] == pytest.approx(float(direct_logits(rm_dirs.one, [long_a], max_length=8)[0, 0]), abs=1e-5)
    different_end = rm_call(fn, [""], ["A" * 20 + " the END."])[0]
    assert abs(different_end - got[0]) > 1e-4
    # default: the model's 64 positions
    default = load_reward_function("reward_model", {"path": str(rm_dirs.one)})
    text = "0123456789" * 10
    assert rm_call(default, ["q"], [text]) == pytest.approx(
        direct_logits(rm_dirs.one, ["q" + text], max_length=64)[:, 0].tolist(), abs=1e-5)


def test_reward_model_conversational(rm_dirs):
    prompts = [[{"role": "user", "content": "12+34?"}], [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]]
    completions = ["46", [{"role": "assistant", "content": "hello"}]]
    fn = load_reward_function("reward_model", {"path": str(rm_dirs.chat)})
    rendered = ["<bos><user>12+34?<eos><assistant>46<eos>", "<bos><system>Be brief.<eos><user>hi<eos><assistant>hello<eos>"]
    expected = direct_logits(rm_dirs.chat, rendered, add_special_tokens=False)[:, 0]
    assert rm_call(fn, prompts, completions) == pytest.approx(expected.tolist(), abs=1e-5)
    # no chat template: the messages' contents, one per line, with the tokenizer's special tokens
    plain = load_reward_function("reward_model", {"path": str(rm_dirs.one)})
    expected = direct_logits(rm_dirs.one, ["12+34?\n46", "Be brief.\nhi\nhello"])[:, 0]
    assert rm_call(plain, prompts, completions) == pytest.approx(expected.tolist(), abs=1e-5)


def test_reward_model_loads_lazily_once_on_the_device_and_dtype(rm_dirs):
    fn = load_reward_function("reward_model", {"path": str(rm_dirs.one), "dtype": "bfloat16"})
    assert fn.state == {}                                  # nothing loaded before the first call
    first = rm_call(fn, PROMPTS, COMPLETIONS)
    model = fn.state["model"]
    assert model.dtype == torch.bfloat16 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert rm_call(fn, PROMPTS, COMPLETIONS) == first and fn.state["model"] is model
    exact = direct_logits(rm_dirs.one, [p + c for p, c in zip(PROMPTS, COMPLETIONS)])[:, 0]
    assert first == pytest.approx(exact.tolist(), abs=0.1)  # bfloat16 rounding
    # the runner's bound device is the default
    runner = RewardRunner.from_callables([("rm", load_reward_function("reward_model", {"path": str(rm_dirs.one)}), 1.0)])
    runner.bind(device="cpu")
    scores = runner.score(PROMPTS, COMPLETIONS, [[1]] * len(PROMPTS))
    assert scores.values[:, 0].tolist() == pytest.approx(exact.tolist(), abs=1e-5)


def test_reward_model_pad_token_from_eos(tmp_path):
    tok = builtin_tokenizer()
    tok.pad_token = None
    directory = save_classifier(tmp_path / "nopad", 1, seed=3, tokenizer=tok)
    fn = load_reward_function("reward_model", {"path": str(directory), "batch_size": 4})
    got = rm_call(fn, PROMPTS, COMPLETIONS)
    assert fn.state["tokenizer"].pad_token == "<eos>" and fn.state["model"].config.pad_token_id == 2
    expected = direct_logits(directory, [p + c for p, c in zip(PROMPTS, COMPLETIONS)])[:, 0]
    assert got == pytest.approx(expected.tolist(), abs=1e-5)


def test_reward_model_errors(tmp_path, rm_dirs):
    with pytest.raises(RewardError, match="reward_model needs path"):
        load_reward_function("reward_model", {})
    with pytest.raises(RewardError, match="reward_model path '.*missing' does not exist"):
        load_reward_function("reward_model", {"path": str(tmp_path / "missing")})
    with pytest.raises(RewardError, match=r"path '.*builtin' is not a sequence-classification model"):
        load_reward_function("reward_model", {"path": str(builtin_model_dir())})
    for kwargs, word in (({"score": "softmax"}, "score"), ({"batch_size": -1}, "batch_size"),
                         ({"max_length": 0}, "max_length"), ({"dtype": "float64"}, "dtype")):
        with pytest.raises(RewardError, match=word):
            load_reward_function("reward_model", {"path": str(rm_dirs.one), **kwargs})
