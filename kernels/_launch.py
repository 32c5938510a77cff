"""Launching Triton kernels with as little host work per call as the design allows.

Per call, Triton's ``Autotuner.run`` builds a key from every argument (a dict over all of them, ``str`` of
each tensor's dtype) before it reaches the kernel: tens of microseconds on a 2-core CPU, paid on every step of
a training run whose shapes never change. :class:`Pinned` pays it once per signature: the first launch goes
through the autotuner (which benchmarks its configs on a GPU, or takes its only one), every later launch with
the same signature goes straight to the ``JITFunction`` with the config it chose.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable


class Pinned:
    """An autotuned kernel (``triton.autotune`` over a ``triton.jit`` function) whose choice of config is
    kept per signature; ``signature`` must determine the autotuner's key (its ``key`` arguments and the
    argument dtypes)."""

    def __init__(self, autotuned) -> None:
        self.autotuned = autotuned
        self.choices: dict[Hashable, dict] = {}

    def __call__(self, signature: Hashable, grid: Callable, *args, **kwargs) -> None:
        config = self.choices.get(signature)
        if config is not None:
            self.autotuned.fn[grid](*args, **kwargs, **config)
            return
        self.autotuned[grid](*args, **kwargs)
        # Unset only where Autotuner.run is replaced (bench/compile_targets.py records every config instead).
        best = getattr(self.autotuned, "best_config", None)
        if best is not None:
            self.choices[signature] = best.all_kwargs()
