"""DDP helpers: one process per device under ``torchrun``, a plain single process otherwise."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` 0 of ``world_size`` 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in RANK / WORLD_SIZE / LOCAL_RANK (nccl on CUDA,
    gloo on CPU); without those variables, or with a world of one, stay a plain single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def shutdown_distributed() -> None:
    """Leave the process group (if joined) so torchrun sees every rank exit cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op in a single process) and return it."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(info: DistInfo) -> None:
    """Wait for every rank, e.g. until rank 0 has written a file the others read."""
    if info.enabled:
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP and/or ``torch.compile`` wrapper."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
    return model


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of ``tensor`` from every rank, concatenated in rank order (``tensor`` itself in a single
    process). Reads the default process group, so code without a :class:`DistInfo` (a loss module) can use it;
    every rank must call it with the same shape, as DDP's equal per-rank batches give."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    rows = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, tensor.contiguous())
    return torch.cat(rows)
