"""The seam every on-device runtime module (``openvino_backend``, ``litert_backend``, ``executorch_backend``)
fills in the same way, so the export command can hold them in one table:

- ``NAME``: the row label; ``PRECISIONS``: what it can build; ``DYNAMIC_BATCH``: one file for every batch
  size, or one file per batch size;
- ``unavailable_reason() -> str | None``: one line saying what to install, or None when the runtime imports;
- ``convert(model, onnx_path, example, out, *, precision, max_batch, calibration=None) -> Path``;
- ``load(path, *, threads) -> Runner``;
- ``artifacts(path) -> list[Path]``: every file ``load(path)`` reads (what ships, and what its size is).

Each module is the only one that imports its runtime, lazily, so importing it never fails.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Runner:
    """``x (N, C, H, W) float32 -> logits (N, classes) float32`` through one runtime, for any N from 1 to the
    converted maximum batch. ``info`` says what actually runs (runtime version, execution precision, threads,
    how batches are served) so a report can show it beside the numbers."""

    run: Callable[[np.ndarray], np.ndarray]
    info: dict[str, object] = field(default_factory=dict)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)


def import_failure(runtime: str, package: str, extra: str, error: ImportError) -> str:
    """The one line a missing or broken runtime is reported with: what failed and what to install.

    ``package`` is the runtime's top-level import name: only its own absence reads "not installed"; any other
    import error (a missing dependency, a library built for another torch) is quoted."""
    install = f"pip install 'kdfast[{extra}]'"
    if isinstance(error, ModuleNotFoundError) and error.name == package:
        return f"{runtime} is not installed ({install} adds it)"
    detail = " ".join(str(error).split())
    return f"{runtime} is installed but does not import ({detail}); reinstall it with {install}"


class _EnumConstantNotice(logging.Filter):
    """Drops ``torch.utils._pytree``'s "<enum ...> is an Enum subclass and is now natively supported by
    torch.compile ..." deprecation notice: torchao (which ExecuTorch and litert-torch import) triggers it at
    import, and it asks nothing of whoever exports a student."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported" not in record.getMessage()


@contextlib.contextmanager
def quiet_torch_notices() -> Iterator[None]:
    """Inside: imports that register Enum pytree constants (torchao) print nothing about it."""
    logger = logging.getLogger("torch.utils._pytree")
    notice = _EnumConstantNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def check_precision(runtime: str, precision: str, supported: tuple[str, ...]) -> None:
    """Raise ValueError naming what ``runtime`` can build when ``precision`` is not one of ``supported``."""
    if precision not in supported:
        raise ValueError(f"{runtime} builds {', '.join(supported)}, not {precision!r}")
