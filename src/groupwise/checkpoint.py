"""Atomic checkpoints and exact resume.

A checkpoint is a directory `RUN_DIR/checkpoints/step_000050/` holding the model (or LoRA
adapter) as safetensors (whole, loadable by transformers), the optimizer state as a
torch.distributed.checkpoint directory (`optimizer/`: one shard file per rank, keyed by parameter
name, so it loads on any number of processes), the scheduler and RNG states and
`trainer_state.json` (step, sampler position, …). It is written to `step_000050.tmp-<pid>` and
renamed into place, so a crash at any moment leaves either the previous checkpoints or the
complete new one — never a half-written one. Resume picks the newest complete `step_*` directory.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from groupwise.distributed import SINGLE, DistContext, barrier, broadcast_object

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


def _save_model(model: torch.nn.Module, directory: Path, ctx: DistContext) -> None:
    # peft models save only the adapter; plain transformers models save full weights.
    if not ctx.enabled:
        model.save_pretrained(str(directory / "model"), safe_serialization=True)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Sharded (FSDP2) parameters are gathered whole onto rank 0's CPU, one tensor at a time.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.is_main:
        # Tied weights (lm_head = embeddings) come back as two entries; save them once, as transformers does.
        own = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        full = {k: v for k, v in full.items() if k in own}
        model.save_pretrained(str(directory / "model"), state_dict=full, safe_serialization=True)


def _save_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """The optimizer state with torch.distributed.checkpoint: every rank writes its own shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    with _single_process_quiet():
        dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(directory / "optimizer"))


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns that it 'assumes a single process' when no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Read `optimizer/` into `optimizer`, resharding to this run's world size."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    # DCP loads into the tensors it is given, and AdamW creates its state on the first step: take
    # one step with zero gradients and lr 0 (the loaded state and learning rates replace it all).
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not optimizer.state:
        lrs = [g["lr"] for g in optimizer.param_groups]
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        optimizer.step()
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(directory / "optimizer"))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


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
    ctx: DistContext = SINGLE,
) -> Path:
    """Write a complete checkpoint atomically; prune old ones beyond `keep_last`.

    `tensors`: named groups of tensors too large for JSON (e.g. per-prompt statistics), each
    written as `<name>.safetensors`; read back with `load_tensors`. Under torchrun every rank
    calls this (the model gather and the optimizer shards are collective); rank 0 writes the rest."""
    root = checkpoints_dir(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"{final.name}.tmp-{broadcast_object(os.getpid(), ctx)}"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(ctx)
    _save_model(model, tmp, ctx)
    _save_optimizer(model, optimizer, tmp)
    barrier(ctx)
    if not ctx.is_main:
        barrier(ctx)   # rank 0 finishes and renames the directory
        return final
    tokenizer.save_pretrained(str(tmp / "model"))
    torch.save({"scheduler": scheduler.state_dict()}, tmp / "scheduler.pt")
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
    barrier(ctx)
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
    """Restore optimizer, scheduler and RNG in place and return the trainer state. The model's
    weights are loaded apart, with `load_model_weights`, before the model is sharded."""
    _load_optimizer(model, optimizer, directory)
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False)["scheduler"])
    set_rng_state(torch.load(directory / "rng.pt", weights_only=False))
    return read_trainer_state(directory)


def read_trainer_state(directory: Path) -> dict[str, Any]:
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
