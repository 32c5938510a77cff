"""Choosing between the Triton kernel and the eager reference of an op, and checking its inputs."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable

import torch

IMPLS = ("auto", "triton", "reference")


try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:  # macOS / Windows
    TRITON_AVAILABLE = False


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _squeezed_index(self) -> int:
    return int(self.handle.data.squeeze())


def backport_interpreter_index(interpreter) -> bool:
    """Triton 3.3-3.6's interpreter turns a scalar (a loop bound, a grid index) into an int with
    ``int(self.handle.data)`` of a 1-element array, which numpy >= 2.4 refuses ("only 0-dimensional arrays
    can be converted to Python scalars"): every kernel run fails. Triton 3.7 squeezes the array first; this
    applies the same fix to ``interpreter`` (``triton.runtime.interpreter``) of an older Triton, by wrapping
    its ``_patch_lang_tensor``. Returns whether it did (False on Triton >= 3.7 or when already applied)."""
    original = interpreter._patch_lang_tensor
    if getattr(original, "kdfast_backport", False) or "squeeze" in inspect.getsource(original):
        return False

    @functools.wraps(original)
    def patch_lang_tensor(tensor, *scope) -> None:
        original(tensor, *scope)
        # Set after Triton's patch: Triton 3.6 restores the attribute it replaced after each kernel run.
        tensor.__index__ = _squeezed_index

    patch_lang_tensor.kdfast_backport = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


if TRITON_AVAILABLE and interpreting():
    from triton.runtime import interpreter as _interpreter

    backport_interpreter_index(_interpreter)


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
        return on_cuda and TRITON_AVAILABLE
    if not TRITON_AVAILABLE:
        raise ValueError("impl='triton' needs the triton package; install it or use impl='reference'")
    if not on_cuda and not interpreting():
        raise ValueError(
            "impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before kernels is imported"
        )
    return True


def signature_check(check: Callable[..., None]) -> Callable[..., None]:
    """Wrap ``check(*signature)``, which raises a ValueError naming what to change and depends on shapes,
    dtypes and options only, so that a signature that passed once is not checked again (a dict lookup
    instead of the checks). Under ``torch.compile`` tracing, and for unhashable arguments, it runs as is."""
    cached = functools.lru_cache(maxsize=256, typed=True)(check)

    @functools.wraps(check)
    def run(*signature) -> None:
        if torch.compiler.is_compiling():
            check(*signature)
            return
        try:
            cached(*signature)
        except TypeError:  # an unhashable argument: checked (and refused) without the cache
            check(*signature)

    return run
