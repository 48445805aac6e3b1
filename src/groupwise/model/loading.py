"""Load the policy (any local Hugging Face causal LM), its tokenizer, and the frozen reference.

No network, ever: paths are local directories, or 'builtin' for the tiny model shipped in the
package. LoRA through peft; with LoRA the reference is the base model with the adapter disabled,
so no second copy of the weights is loaded.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

# Refuse any hub access before transformers is imported anywhere in this process; and keep
# transformers' own load/save progress bars out of ours.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded; the message names the path."""


def builtin_model_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "builtin"


def resolve_model_path(path: str, what: str = "model.path") -> Path:
    """'builtin' → the packaged model; otherwise a local directory that must exist."""
    p = builtin_model_dir() if path == "builtin" else Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(
            f"{what} '{path}' does not exist; groupwise never downloads models, so give a local "
            f"Hugging Face model directory (or 'builtin')"
        )
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ModelLoadError(f"{what} '{path}' is not a Hugging Face model directory (no config.json in it)")
    return p


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device '{device}' was asked for but no CUDA device is available")
    return torch.device(device)


def load_tokenizer(model_cfg: Any):
    from transformers import AutoTokenizer

    path = resolve_model_path(model_cfg.tokenizer_path or model_cfg.path, "model.tokenizer_path" if model_cfg.tokenizer_path else "model.path")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise ModelLoadError(f"cannot load a tokenizer from '{path}': {e}") from e
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelLoadError(f"the tokenizer in '{path}' has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def _load_causal_lm(path: Path, model_cfg: Any, device: torch.device):
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    kwargs: dict[str, Any] = {"dtype": _DTYPES[model_cfg.dtype], "local_files_only": True}
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load a causal language model from '{path}': {e}") from e
    return model.to(device)


def load_policy(model_cfg: Any, device: torch.device):
    """The trainable policy: full fine-tuning, or a peft LoRA adapter on a frozen base."""
    path = resolve_model_path(model_cfg.path)
    model = _load_causal_lm(path, model_cfg, device)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if model_cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        lcfg = model_cfg.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lcfg.r,
                lora_alpha=lcfg.alpha,
                lora_dropout=lcfg.dropout,
                target_modules=lcfg.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    # RL needs deterministic log-probs: dropout would make π_θ ≠ π_old for identical weights.
    if model_cfg.lora.enabled and model_cfg.lora.dropout > 0:
        logging.getLogger("groupwise.model").warning(
            "model.lora.dropout %.3g is set to 0: dropout in the policy would make the PPO ratio ≠ 1 for equal weights",
            model_cfg.lora.dropout)
    disable_dropout(model)
    return model


def load_reference(model_cfg: Any, device: torch.device):
    """A frozen copy of the initial policy (only when a KL term is on and LoRA is off)."""
    model = _load_causal_lm(resolve_model_path(model_cfg.path), model_cfg, device)
    model.eval()
    model.requires_grad_(False)
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
