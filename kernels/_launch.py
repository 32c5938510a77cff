"""Launching Triton kernels with as little host work per call as the design allows.

Per call, Triton's ``Autotuner.run`` builds a key from every argument (a dict over all of them, ``str`` of
each tensor's dtype) before it reaches the kernel: tens of microseconds on a 2-core CPU, paid on every step of
a training run whose shapes never change. :class:`Pinned` pays it once per signature: the first launch goes
through the autotuner (which benchmarks its configs on a GPU, or takes its only one), every later launch with
the same signature goes straight to ``JITFunction.run`` with the config it chose and the grid that config
gives, both kept. :func:`launch` is the same direct call for a kernel that is not autotuned (``kernel[grid]``
builds a closure per call only to forward to ``run``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` without the per-call closure."""
    kernel.run(*args, grid=grid, warmup=False, **kwargs)


class Pinned:
    """An autotuned kernel (``triton.autotune`` over a ``triton.jit`` function) whose choice of config, and
    the grid it gives, are kept per signature; ``signature`` must determine the autotuner's key (its ``key``
    arguments and the argument dtypes) and everything ``grid`` reads besides the config."""

    def __init__(self, autotuned) -> None:
        self.autotuned = autotuned
        self.choices: dict[Hashable, dict] = {}  # signature -> every keyword of JITFunction.run but dynamic's

    def __call__(
        self, signature: Hashable, grid: Callable[[dict], tuple[int, ...]], static: dict, *args, **dynamic
    ) -> None:
        """Launch with ``args`` and keyword arguments ``static`` (the same for every call of this signature:
        merged with the config once) and ``dynamic`` (per call)."""
        kwargs = self.choices.get(signature)
        if kwargs is not None:
            self.autotuned.fn.run(*args, **kwargs, **dynamic)
            return
        self.autotuned[grid](*args, **static, **dynamic)
        # Unset only where Autotuner.run is replaced (bench/compile_targets.py records every config instead).
        best = getattr(self.autotuned, "best_config", None)
        if best is not None:
            config = best.all_kwargs()
            self.choices[signature] = {"grid": tuple(grid(config)), "warmup": False, **static, **config}


# CUDA's grid limits (CUDA C++ Programming Guide, technical specifications per compute capability):
# 2^31 - 1 blocks along x, 65,535 along y and z. A launch past them fails on the GPU with an opaque error.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def check_grid(grid: tuple[int, ...], what: str, fix: str) -> None:
    """Raise a ValueError naming the axis and ``fix`` when ``grid`` exceeds CUDA's grid limits."""
    for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS, strict=False)):
        if size > limit:
            raise ValueError(
                f"{what} needs {size} programs along grid axis {'xyz'[axis]}, more than CUDA's {limit}; {fix}"
            )
