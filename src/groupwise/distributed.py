"""torch.distributed for the trainer: the process group, FSDP2 / DDP wrapping, gathers.

Under torchrun (WORLD_SIZE > 1) every rank holds the same sampler, prompt statistics and
guidance state and sees the same gathered batch, so every decision that reads the batch
(advantages, filters, samplers, curricula) is computed identically everywhere without a
coordinator. Only three things are split: generation + scoring (each rank its contiguous share
of whole groups, then an all-gather), the old / reference log-prob passes (each rank its share,
then an all-gather), and the update's micro-batches (each rank its share of every mini-batch;
the loss divisors are those of the whole mini-batch, so the gradient summed over ranks is the
gradient of one process holding the whole batch).

FSDP2 (`fully_shard`: one unit per decoder layer, one for the embeddings + final norm + LM head,
then the root) shards
parameters, gradients and optimizer state. Generation and the no-grad passes run inside
`gathered_parameters`: the parameters are all-gathered once and stay whole until the block ends,
so ranks may run different numbers of forwards (their completions differ in length) without
waiting on each other. DDP replicates the parameters and all-reduces the accumulated gradients
once per optimizer step (`reduce_gradients`). torch's DistributedDataParallel wrapper is not used:
its reducer is armed by a forward through the wrapper, and our log-prob pass calls the decoder
and the chunked LM head directly.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, and how the policy is wrapped."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"     # none (one process), fsdp2, ddp

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def init_distributed(cfg: Any, device: torch.device) -> tuple[DistContext, torch.device]:
    """Join torchrun's process group (gloo on CPU, NCCL on CUDA unless `distributed.backend` says
    otherwise); on CUDA each rank takes `cuda:LOCAL_RANK`. One process: `SINGLE`, device unchanged."""
    world = launched_world_size()
    if world <= 1:
        return SINGLE, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("distributed.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
    if not dist.is_initialized():
        dist.init_process_group(
            backend, timeout=datetime.timedelta(seconds=cfg.timeout_s), device_id=device if device.type == "cuda" else None,
        )
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, cfg.strategy), device


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks FSDP2 shards one by one: transformers names their class in `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"distributed.strategy fsdp2: found no decoder layers in {type(base).__name__} "
                         "(its _no_split_modules is empty); use distributed.strategy: ddp")
    return layers


def wrap_policy(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """FSDP2 or DDP (composable) in place; returns the same module object."""
    if not ctx.enabled:
        return model
    if ctx.strategy == "ddp":
        with torch.no_grad():   # replicas start equal (they load the same weights; this makes it certain)
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    # Log-probs call the decoder and the LM head apart (the head runs in chunks), so each needs
    # its own hooks; one unit for both keeps tied embeddings (head = input embeddings) together.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    fully_shard([decoder, head] if head is not None else decoder)
    fully_shard(model)
    # FSDP2 initializes lazily on the first forward through the root; generation calls the
    # layers directly (slot cache), so make that first forward here.
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    return model


def reduce_gradients(params: list[torch.nn.Parameter], ctx: DistContext, bucket_bytes: int = 25 * 2**20) -> None:
    """DDP: average the accumulated gradients over ranks, in flat buckets (one all-reduce per
    bucket per optimizer step, as DDP under `no_sync` accumulation). FSDP2 reduces in its own
    backward hooks, so this does nothing there."""
    if not ctx.enabled or ctx.strategy != "ddp":
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    for p in params:   # a parameter unused on this rank still takes part, with a zero gradient
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for i, p in enumerate(params):
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= bucket_bytes or i == len(params) - 1:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= ctx.world_size
            for g, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(reduced)
            bucket, size = [], 0


def _fsdp_modules(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered_parameters(model: torch.nn.Module, ctx: DistContext) -> Iterator[None]:
    """FSDP2: all-gather every parameter once and keep them whole inside the block (no collective
    per forward, so ranks may run different numbers of forwards); reshard on exit. Gradients must
    not be taken inside. Otherwise a no-op."""
    mods = _fsdp_modules(model) if ctx.enabled and ctx.strategy == "fsdp2" else []
    if not mods:
        yield
        return
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
    for m in mods:
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj` in rank order (tensors should be on the CPU: they are pickled)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_rows(local: torch.Tensor, ctx: DistContext, device: torch.device) -> torch.Tensor:
    """The ranks' row shares (`batching.rank_rows` order) concatenated: the whole batch, on every rank."""
    if not ctx.enabled:
        return local
    return torch.cat([t.to(device) for t in all_gather_objects(local.detach().cpu(), ctx)])


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's `obj` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sums(values: dict[str, float], ctx: DistContext, device: torch.device) -> dict[str, float]:
    """Sum a dict of floats over ranks (a key missing on a rank counts as 0 there)."""
    if not ctx.enabled:
        return dict(values)
    keys = sorted(set().union(*all_gather_objects(sorted(values), ctx)))   # a rank without rows may lack some
    if not keys:
        return {}
    t = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def check_same_on_all_ranks(value: Any, what: str, ctx: DistContext) -> None:
    """Raise on every rank if ranks disagree (e.g. a run_dir or a dataset that differs per node)."""
    if not ctx.enabled:
        return
    values = all_gather_objects(value, ctx)
    if any(v != values[0] for v in values):
        raise RuntimeError(f"distributed: {what} differs between ranks: {values}")
