"""Atomic checkpoints and exact resume.

A checkpoint is a directory `RUN_DIR/checkpoints/step_000050/` holding the model (or LoRA
adapter) as safetensors, the optimizer and scheduler states, RNG states and `trainer_state.json`
(step, sampler position, …). It is written to `step_000050.tmp-<pid>` and renamed into place, so
a crash at any moment leaves either the previous checkpoints or the complete new one — never a
half-written one. Resume picks the newest complete `step_*` directory.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary directories of interrupted saves are ignored)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_model(model: torch.nn.Module, directory: Path) -> None:
    # peft models save only the adapter; plain transformers models save full weights.
    model.save_pretrained(str(directory / "model"), safe_serialization=True)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write a complete checkpoint atomically; prune old ones beyond `keep_last`.

    `tensors`: named groups of tensors too large for JSON (e.g. per-prompt statistics), each
    written as `<name>.safetensors`; read back with `load_tensors`."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_model(model, tmp)
    tokenizer.save_pretrained(str(tmp / "model"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    if tensors:
        from safetensors.torch import save_file

        for name, group in tensors.items():
            if group:
                save_file({k: v.contiguous() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (e.g. the final save after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last is not None:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_model_weights(model: torch.nn.Module, directory: Path) -> None:
    """Load a checkpoint's model (full weights or LoRA adapter) into `model` in place."""
    from safetensors.torch import load_file

    model_dir = directory / "model"
    adapter = model_dir / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (lm_head = embeddings) are saved once; anything else missing is an error.
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint '{directory}' does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_checkpoint(
    directory: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG in place; return the trainer state."""
    load_model_weights(model, directory)
    device = next(model.parameters()).device
    optim = torch.load(directory / "optim.pt", map_location=device, weights_only=False)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    set_rng_state(torch.load(directory / "rng.pt", weights_only=False))
    return json.loads((directory / "trainer_state.json").read_text())


def load_tensors(directory: Path, name: str) -> dict[str, torch.Tensor] | None:
    """A tensor group written by `save_checkpoint(tensors={name: ...})`; None if the checkpoint has none."""
    path = directory / f"{name}.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def split_tensors(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A flat state dict as `{"json": plain values, "tensors": tensor values}` (tensors go to safetensors)."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {"json": {k: v for k, v in state.items() if k not in tensors}, "tensors": tensors}
