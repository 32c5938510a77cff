"""AOTInductor backend: the student compiled ahead of time into a ``.pt2`` package with a dynamic batch."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from kdfast.atomic import atomic_write


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops ``torch.utils.cpp_extension``'s import-time "No CUDA runtime is found, using CUDA_HOME=..."
    warning: a CUDA build of torch on a machine with a CUDA toolkit but no GPU prints it when AOTInductor's
    C++ builder imports that module, and it says nothing about a CPU package."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def import_cpp_extension_quietly() -> None:
    """Import ``torch.utils.cpp_extension`` (which torch.compile and AOTInductor import on first use) without
    its irrelevant CUDA notice; the check runs once, at import."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    notice = _NoCudaRuntimeNotice()
    logger.addFilter(notice)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.removeFilter(notice)


def compile_package(model: nn.Module, example: torch.Tensor, path: Path, *, max_batch: int) -> Path:
    """``torch.export`` with batch 1..``max_batch`` then ``aoti_compile_and_package`` into ``path``.

    Needs a C++ compiler; compiled for ``example``'s device. ``example`` must have batch >= 2 so the batch is
    not specialized.
    """
    import_cpp_extension_quietly()
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    return atomic_write(path, lambda f: torch._inductor.aoti_compile_and_package(program, package_path=f))


def load_package(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The compiled student from ``path`` as ``x -> logits``."""
    compiled = torch._inductor.aoti_load_package(str(path))

    def run(x: torch.Tensor) -> torch.Tensor:
        return compiled(x)

    return run
