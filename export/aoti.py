"""AOTInductor backend: the student compiled ahead of time into a ``.pt2`` package with a dynamic batch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def compile_package(model: nn.Module, example: torch.Tensor, path: Path, *, max_batch: int) -> Path:
    """``torch.export`` with batch 1..``max_batch`` then ``aoti_compile_and_package`` into ``path``.

    Needs a C++ compiler on CPU (and nvcc-free CUDA toolchain pieces on GPU); compiled for ``example``'s
    device. ``example`` must have batch >= 2 so the batch is not specialized.
    """
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path


def load_package(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The compiled student from ``path`` as ``x -> logits``."""
    compiled = torch._inductor.aoti_load_package(str(path))

    def run(x: torch.Tensor) -> torch.Tensor:
        return compiled(x)

    return run
