"""Choosing between the Triton kernel and the eager reference of an op."""

from __future__ import annotations

import os

import torch

IMPLS = ("auto", "triton", "reference")


def triton_available() -> bool:
    """Whether the ``triton`` package imports (it does not on macOS or Windows)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(impl: str, *tensors: torch.Tensor) -> bool:
    """Resolve ``impl`` for these inputs: True runs the Triton kernel, False the reference.

    ``auto`` picks Triton when every input is a CUDA tensor and Triton imports. ``triton`` insists on it
    and raises a ValueError naming what is missing (a CUDA tensor, or ``TRITON_INTERPRET=1`` for CPU).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if impl == "auto":
        return on_cuda and triton_available()
    if not triton_available():
        raise ValueError("impl='triton' needs the triton package; install it or use impl='reference'")
    if not on_cuda and not interpreting():
        raise ValueError(
            "impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before kernels is imported"
        )
    return True
