"""Shared benchmark fixtures: each case is timed with pytest-benchmark and records its peak memory."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture
def bench_op(benchmark):
    """``bench_op(fn, device, group=..., **info)``: warm up, record the extra peak memory of one call
    (CUDA only: ``torch.cuda.max_memory_allocated`` above what was allocated before), then time ``fn``
    with a synchronize after every call so GPU time is counted."""

    def run(fn: Callable[[], object], device: torch.device, *, rounds: int = 30, warmup: int = 5, **info):
        device = torch.device(device)
        for _ in range(warmup):
            fn()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            _sync(device)
            info["peak_extra_mib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 2)
            info["device_name"] = torch.cuda.get_device_name(device)
        info["torch"] = torch.__version__
        if "group" in info:
            benchmark.group = info["group"]
        benchmark.extra_info.update(info)

        def timed():
            fn()
            _sync(device)

        return benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)

    return run
