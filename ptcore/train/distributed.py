"""Scale-out: the same loop runs in one process or under ``torchrun`` (DDP or FSDP2).

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK; :func:`context` then joins the process group
(nccl on GPUs, gloo on CPUs) and :func:`wrap` wraps the model. The loss of each rank is normalized
by the GLOBAL count of the optimizer step (all ranks), and both DDP and FSDP2 average gradients
over ranks, so the loop multiplies each rank's loss by the world size: the step then equals the
single-process step on the same global batch.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process initialized the group (and destroys it at the end)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of a float64 CPU tensor (moved to the process group's device)."""
        if not self.enabled:
            return values
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        buf = values.to(dev)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.cpu()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def context() -> DistContext:
    """The process group of this run: joined from torchrun's environment when WORLD_SIZE > 1."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), local, owns_group=True)


def wrap(model: torch.nn.Module, ctx: DistContext, strategy: str) -> torch.nn.Module:
    """DDP or FSDP2 (``fully_shard`` on each decoder layer, then the whole model)."""
    if not ctx.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [ctx.local_rank] if next(model.parameters()).is_cuda else None
        return DDP(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard
    layers = getattr(getattr(model, "model", None), "layers", None)
    for layer in layers or []:
        fully_shard(layer)
    fully_shard(model)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DDP wrapper (FSDP2 shards in place: the model is itself)."""
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model


def no_sync(model: torch.nn.Module, skip: bool):
    """Context that skips the gradient all-reduce for a micro-batch that is not the step's last."""
    if not skip:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return contextlib.nullcontext()
