"""Rewards computed by running a model: self-certainty (label-free) and a reward-model directory.

- `self_certainty`: the policy's own confidence in its completion (Intuitor), from the logits of
  the model the trainer is training (`reward_context.model`), no labels needed;
- `reward_model`: a local `*ForSequenceClassification` checkpoint scores prompt + completion, as
  TRL does with a reward-model path among its `reward_funcs`.

Both run batched on the training device under no_grad/inference_mode. Neither ever reaches the
network: paths are local directories.
"""
from __future__ import annotations

import json
import math
import numbers
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from groupwise.model.loading import ModelLoadError, resolve_model_path
from groupwise.model.logprobs import decoder_and_head, position_ids_from_mask
from groupwise.rewards.text import completion_text
from groupwise.rewards.contract import RewardContext, RewardError, RewardFn, register_reward

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- helpers


def _positive_int(reward: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise RewardError(f"{reward}: {name} must be a positive integer, not {value!r}")
    return int(value)


def _dtype(reward: str, value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in _DTYPES.values():
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise RewardError(f"{reward}: dtype must be one of {', '.join(_DTYPES)}, not {value!r}")


def _is_messages(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and all(isinstance(m, dict) for m in x)


def _messages_text(messages: Sequence[dict[str, Any]]) -> str:
    """Plain concatenation of the messages' contents (for a tokenizer without a chat template)."""
    return "\n".join(completion_text([m]) for m in messages)


def _render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return rendered if isinstance(rendered, str) else rendered[0]  # some versions return a batch of one


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- self-certainty


def self_certainty_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """KL(U ‖ softmax(z)) over the last axis: logsumexp(z) − mean_j z_j − log V, ≥ 0.

    Equal to −log V − (1/V) Σ_j log p_j, without a log-softmax over the vocabulary. Computed in
    float32 at least; rounding can leave −1e-7 for a uniform row, so it is clamped at 0 (the KL is
    ≥ 0 by Gibbs' inequality).
    """
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    v = z.shape[-1]
    return (torch.logsumexp(z, dim=-1) - z.mean(dim=-1) - math.log(v)).clamp(min=0.0)


@torch.no_grad()
def self_certainty_scores(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    *,
    temperature: float = 1.0,
    batch_size: int = 8,
    chunk_rows: int = 512,
    pad_id: int = 0,
) -> list[float | None]:
    """Mean per-token self-certainty of each completion given its prompt (None for an empty one).

    Rows are sorted by length before batching (less padding); each batch is `[prompt left-padded
    | completion right-padded]` with positions restarting after the left padding, so a row's
    value does not depend on what it is batched with. The decoder runs once per batch; the head
    is applied only at the hidden states that predict real completion tokens, `chunk_rows` at a
    time, so the largest vocabulary-wide tensor is `[chunk_rows, V]`.
    """
    n = len(completion_ids)
    out: list[float | None] = [None] * n
    todo = [i for i in range(n) if len(completion_ids[i]) > 0]
    for i in todo:
        if len(prompt_ids[i]) == 0:
            raise RewardError(f"self_certainty: sample {i} has an empty prompt, so its first completion token has no "
                              f"prediction to score; give prompts of at least one token (e.g. a bos token)")
    if not todo:
        return out
    decoder, head = decoder_and_head(model)
    device = _model_device(model)
    vocab_rows = decoder.get_input_embeddings().weight.shape[0]
    todo.sort(key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]))
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        tp = max(len(prompt_ids[i]) for i in rows)
        tc = max(len(completion_ids[i]) for i in rows)
        ids = torch.full((len(rows), tp + tc), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), tp + tc, dtype=torch.long)
        for r, i in enumerate(rows):  # one copy per row, not per token
            p, c = prompt_ids[i], completion_ids[i]
            ids[r, tp - len(p) : tp] = torch.as_tensor(list(p), dtype=torch.long)
            ids[r, tp : tp + len(c)] = torch.as_tensor(list(c), dtype=torch.long)
            mask[r, tp - len(p) : tp + len(c)] = 1
        real = ids[mask.bool()]
        if real.min() < 0 or real.max() >= vocab_rows:
            raise RewardError(f"self_certainty: a token id outside the model's vocabulary of {vocab_rows} "
                              f"(range {int(real.min())}..{int(real.max())}); are the ids from another tokenizer?")
        ids, mask = ids.to(device), mask.to(device)
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                         use_cache=False).last_hidden_state
        # The state at position p predicts token p+1: completion token j is predicted at Tp−1+j.
        keep = mask[:, tp:].bool()
        rows_h = hidden[:, tp - 1 : tp + tc - 1][keep]          # [M, H], M real completion tokens
        row_of = keep.nonzero()[:, 0]                           # [M] row index of each
        per_token = []
        for c0 in range(0, rows_h.shape[0], chunk_rows):
            z = head(rows_h[c0 : c0 + chunk_rows]).float()
            if temperature != 1.0:
                z = z / temperature                              # the distribution the sampler drew from
            per_token.append(self_certainty_from_logits(z))
        sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_of, torch.cat(per_token).double())
        means = (sums / keep.sum(1).double()).tolist()
        for r, i in enumerate(rows):
            out[i] = float(means[r])
    return out


def _tokenize_prompts(tokenizer: Any, prompts: Sequence[Any]) -> list[list[int]]:
    """Prompt ids as the rollout makes them: chat messages rendered with the generation prompt,
    then the text tokenized with the tokenizer's special tokens (groupwise.rollout.hf)."""
    texts = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            texts.append(prompt)
        elif _is_messages(prompt):
            if not _has_chat_template(tokenizer):
                raise RewardError(f"self_certainty: prompt {i} is a chat conversation but the tokenizer has no chat "
                                  f"template to render it; pass prompt_ids or use a tokenizer with a chat template")
            texts.append(_render(tokenizer, list(prompt), add_generation_prompt=True))
        else:
            raise RewardError(f"self_certainty: prompt {i} is a {type(prompt).__name__}; expected text or a list of messages")
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]] if texts else []


@register_reward("self_certainty")
def self_certainty(batch_size: int = 8, chunk_rows: int = 512, temperature: float = 1.0,
                   model_path: str | None = None) -> RewardFn:
    r"""Self-certainty of the policy in its own completion (label-free): mean KL from uniform.

    Intuitor — Zhao et al., "Learning to Reason without External Rewards" (arXiv 2505.19590),
    after Kang et al., "Scalable Best-of-N Selection for LLMs via Self-Certainty" (arXiv 2502.18581):

        self-certainty(o | q) = (1/|o|) Σ_t KL(U ‖ p_θ(· | q, o_<t))
                              = (1/|o|) Σ_t [ −log V − (1/V) Σ_j log p_θ(j | q, o_<t) ]
                              = (1/|o|) Σ_t [ logsumexp(z_t) − (1/V) Σ_j z_tj − log V ]

    with z_t the logits at step t divided by `temperature` (as the sampler did), V the vocabulary
    size and U the uniform distribution. It is ≥ 0, and 0 exactly when every step is uniform.

    Scored by the policy being trained (`reward_context.model`), or by a fixed local causal LM
    at `model_path`, which must share the policy's tokenizer (the ids are used as given), e.g.
    the initial checkpoint. The sequence is `[prompt_ids | completion_ids]`; without `prompt_ids`
    the prompt text is tokenized as the rollout does (chat messages through the chat template
    with the generation prompt). The policy's train/eval mode and gradients are left untouched
    (no_grad; dropout is off in groupwise's policy). `batch_size` rows per decoder pass; the LM
    head is applied only at completion positions, `chunk_rows` positions at a time.
    An empty completion scores None.
    """
    batch_size = _positive_int("self_certainty", "batch_size", batch_size)
    chunk_rows = _positive_int("self_certainty", "chunk_rows", chunk_rows)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (math.isfinite(temperature) and temperature > 0):
        raise RewardError(f"self_certainty: temperature must be a positive finite number, not {temperature!r}")
    temperature = float(temperature)
    fixed: dict[str, Any] = {}
    lock = threading.Lock()

    def load_fixed(device: torch.device) -> tuple[Any, Any]:
        with lock:
            if "model" not in fixed:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                path = _existing_dir("self_certainty", "model_path", model_path)
                try:
                    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
                    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
                except Exception as e:  # noqa: BLE001 - transformers raises many kinds
                    raise RewardError(f"self_certainty: cannot load a causal language model from model_path '{path}': {e}") from e
                model.eval().requires_grad_(False)
                fixed["model"], fixed["tokenizer"] = model, tokenizer
            if _model_device(fixed["model"]) != device:
                fixed["model"].to(device)
            return fixed["model"], fixed["tokenizer"]

    def reward(prompts: Any = None, completions: Sequence[Any] = (), completion_ids: Any = None,
               prompt_ids: Any = None, reward_context: RewardContext | None = None, **columns: Any) -> list[float | None]:
        context = reward_context or RewardContext()
        tokenizer = context.tokenizer
        if model_path is not None:
            model, own_tokenizer = load_fixed(context.device)
            tokenizer = tokenizer or own_tokenizer
        elif context.model is not None:
            model = context.model
        else:
            raise RewardError("self_certainty needs the trainer's policy (reward_context.model), which this call did "
                              "not get; use it inside a trainer (RewardRunner.bind(model=...)) or give model_path")
        n = len(completions)
        if completion_ids is None:  # ids are what was scored; text is only a fallback
            if tokenizer is None:
                raise RewardError("self_certainty got no completion_ids and no tokenizer to make them")
            completion_ids = tokenizer([completion_text(c) for c in completions], add_special_tokens=False)["input_ids"]
        if prompt_ids is None or any(p is None for p in prompt_ids):
            if tokenizer is None:
                raise RewardError("self_certainty got no prompt_ids and no tokenizer (reward_context.tokenizer) to make them")
            if prompts is None or len(prompts) != n:
                raise RewardError(f"self_certainty got no prompt_ids and {0 if prompts is None else len(prompts)} prompts for {n} completions")
            made = _tokenize_prompts(tokenizer, prompts)
            prompt_ids = made if prompt_ids is None else [m if p is None else p for p, m in zip(prompt_ids, made)]
        pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        return self_certainty_scores(model, prompt_ids, completion_ids, temperature=temperature,
                                     batch_size=batch_size, chunk_rows=chunk_rows, pad_id=int(pad_id or 0))

    reward.__name__ = "self_certainty"
    return reward


# ----------------------------------------------------------------------------- reward model


def _existing_dir(reward: str, kwarg: str, path: Any) -> Path:
    if not isinstance(path, (str, Path)) or not str(path):
        raise RewardError(f"{reward} needs {kwarg}: a local model directory (got {path!r})")
    try:
        return resolve_model_path(str(path), f"{reward} {kwarg}")
    except ModelLoadError as e:
        raise RewardError(str(e)) from None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise RewardError(f"reward_model: cannot read the config.json of path '{path}': {e}") from None


def _num_labels(config: dict[str, Any]) -> int:
    if isinstance(config.get("id2label"), dict) and config["id2label"]:
        return len(config["id2label"])
    return int(config.get("num_labels", 2))  # transformers' default


@register_reward("reward_model")
def reward_model(path: str | None = None, batch_size: int = 16, max_length: int | None = None,
                 label_index: int | None = None, score: str = "logit", device: str | None = None,
                 dtype: str = "float32") -> RewardFn:
    r"""A local sequence-classification model as the reward: r_i = head(RM(prompt_i ⊕ completion_i)).

    As TRL's `GRPOTrainer` does with a model path among `reward_funcs` (Ouyang et al., InstructGPT,
    arXiv 2203.02155, for reward models trained on preferences):

        r_i = s_{label_index}(x_i)                          score="logit" (num_labels = 1: the logit)
        r_i = softmax(s(x_i))_{label_index}                 score="probability", num_labels > 1
        r_i = σ(s(x_i))                                     score="probability", num_labels = 1

    where s(x) are the classification logits of text x = prompt + completion. For chat
    prompts/completions, x is the reward tokenizer's chat template over the prompt's messages
    plus an assistant message with the completion (tokenized without extra special tokens, the
    template has them); without a template, the messages' contents joined by newlines. Plain text
    is concatenated and tokenized with the tokenizer's special tokens.

    `path` (required): a local `*ForSequenceClassification` directory; model and tokenizer load
    on the first call, once, onto `device` (default: the training device, `reward_context.device`)
    in `dtype`, in eval mode. Texts longer than `max_length` tokens (default: the model's maximum
    positions) are truncated from the LEFT, so the end of the completion, which the model pools
    for its score, is kept. Batches of `batch_size`, padded on the tokenizer's `padding_side`
    (positions restart after left padding); a missing pad token becomes the eos token.
    """
    path_ = _existing_dir("reward_model", "path", path)
    config = _read_config(path_)
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise RewardError(f"reward_model: path '{path_}' is not a sequence-classification model (its config lists "
                          f"architectures {architectures or 'none'}); give a *ForSequenceClassification checkpoint")
    num_labels = _num_labels(config)
    batch_size = _positive_int("reward_model", "batch_size", batch_size)
    if max_length is not None:
        max_length = _positive_int("reward_model", "max_length", max_length)
    if score not in ("logit", "probability"):
        raise RewardError(f"reward_model: score must be 'logit' or 'probability', not {score!r}")
    if num_labels > 1:
        if label_index is None:
            raise RewardError(f"reward_model: the model at '{path_}' has {num_labels} labels; give label_index "
                              f"(0..{num_labels - 1}) to say which one is the reward")
    elif label_index is None:
        label_index = 0
    if isinstance(label_index, bool) or not isinstance(label_index, numbers.Integral) or not 0 <= label_index < num_labels:
        raise RewardError(f"reward_model: label_index must be an integer in 0..{num_labels - 1} for the model at "
                          f"'{path_}', not {label_index!r}")
    label_index = int(label_index)
    torch_dtype = _dtype("reward_model", dtype)
    fixed_device = torch.device(device) if device is not None else None
    state: dict[str, Any] = {}
    lock = threading.Lock()

    def load(target: torch.device) -> tuple[Any, Any, int | None]:
        with lock:
            if "model" not in state:
                state.update(_load_reward_model(path_, torch_dtype, max_length))
            if _model_device(state["model"]) != target:
                state["model"].to(target)
            return state["model"], state["tokenizer"], state["max_length"]

    def texts_of(tokenizer: Any, prompts: Sequence[Any], completions: Sequence[Any]) -> list[tuple[str, bool]]:
        """(text, add_special_tokens) per sample."""
        out = []
        for prompt, completion in zip(prompts, completions):
            prompt = "" if prompt is None else prompt
            if _is_messages(prompt) or _is_messages(completion):
                p = list(prompt) if _is_messages(prompt) else [{"role": "user", "content": prompt}]
                c = list(completion) if _is_messages(completion) else [{"role": "assistant", "content": completion}]
                if _has_chat_template(tokenizer):
                    out.append((_render(tokenizer, p + c, add_generation_prompt=False), False))
                else:
                    out.append((_messages_text(p + c), True))
            else:
                out.append((str(prompt) + completion_text(completion), True))
        return out

    def reward(prompts: Any = None, completions: Sequence[Any] = (), completion_ids: Any = None,
               reward_context: RewardContext | None = None, **columns: Any) -> list[float | None]:
        target = fixed_device or (reward_context.device if reward_context is not None else torch.device("cpu"))
        model, tokenizer, limit = load(target)
        n = len(completions)
        prompts = list(prompts) if prompts is not None else [""] * n
        samples = texts_of(tokenizer, prompts, completions)
        ids: list[list[int]] = [[] for _ in range(n)]
        for special in (True, False):  # one tokenizer call per kind of text
            idx = [i for i, (_, s) in enumerate(samples) if s == special]
            if idx:
                enc = tokenizer([samples[i][0] for i in idx], add_special_tokens=special,
                                truncation=limit is not None, max_length=limit)["input_ids"]
                for i, row in zip(idx, enc):
                    ids[i] = list(row)
        return _score_batches(model, tokenizer, ids, batch_size, label_index, score, _model_device(model))

    reward.__name__ = "reward_model"
    reward.state = state  # type: ignore[attr-defined]  # the lazily loaded model and tokenizer (for inspection)
    return reward


def _load_reward_model(path: Path, dtype: torch.dtype, max_length: int | None) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path), local_files_only=True, dtype=dtype, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise RewardError(f"reward_model: cannot load a sequence-classification model and tokenizer from path '{path}': {e}") from e
    # A head missing from the checkpoint would be silently random: refuse it.
    prefix = getattr(model, "base_model_prefix", "") + "."
    head_missing = [k for k in info.get("missing_keys", []) if not k.startswith(prefix)]
    if head_missing:
        raise RewardError(f"reward_model: the checkpoint at path '{path}' has no weights for the classification head "
                          f"({', '.join(sorted(head_missing)[:3])}); it is not a trained reward model")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise RewardError(f"reward_model: the tokenizer at path '{path}' has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    # The model pools its score at the last non-pad token, found by the config's pad id: it must be ours.
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.truncation_side = "left"  # keep the completion's end, where the score is read
    if max_length is None:
        candidates = [getattr(model.config.get_text_config(), "max_position_embeddings", None),
                      getattr(tokenizer, "model_max_length", None)]
        sane = [int(c) for c in candidates if isinstance(c, int) and 0 < c < 1_000_000]
        max_length = min(sane) if sane else None
    model.eval().requires_grad_(False)
    return {"model": model, "tokenizer": tokenizer, "max_length": max_length}


@torch.inference_mode()
def _score_batches(model: Any, tokenizer: Any, ids: list[list[int]], batch_size: int, label_index: int,
                   score: str, device: torch.device) -> list[float | None]:
    n = len(ids)
    out: list[float | None] = [None] * n
    left = getattr(tokenizer, "padding_side", "right") == "left"
    pad = int(tokenizer.pad_token_id)
    # similar lengths together: less padding; a text that tokenizes to nothing has no score (None)
    order = sorted((i for i in range(n) if ids[i]), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(ids[i]) for i in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            span = slice(width - len(ids[i]), width) if left else slice(0, len(ids[i]))
            x[r, span] = torch.as_tensor(ids[i], dtype=torch.long)
            mask[r, span] = 1
        x, mask = x.to(device), mask.to(device)
        kwargs: dict[str, Any] = {"input_ids": x, "attention_mask": mask}
        if left:  # absolute positions as in an unpadded forward (right padding already has them)
            kwargs["position_ids"] = position_ids_from_mask(mask)
        logits = model(**kwargs).logits.float()  # [B, num_labels]
        if score == "logit":
            values = logits[:, label_index]
        elif logits.shape[-1] == 1:
            values = torch.sigmoid(logits[:, 0])
        else:
            values = torch.softmax(logits, dim=-1)[:, label_index]
        for r, v in zip(rows, values.tolist()):
            out[r] = float(v)
    return out
