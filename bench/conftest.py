"""Shared benchmark fixture: each case is timed with pytest-benchmark, and on CUDA also profiled (device
launches per direction, kernel-only time) and measured for the memory it adds.

With ``KDFAST_BENCH_JSONL=FILE`` every finished case is appended to FILE as one JSON line at once, so a run
cut short (``bench/gpu.sh`` runs each step under a timeout) keeps every case that finished;
``bench/render_results.py`` reads those lines as it reads pytest-benchmark's JSON.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable

import pytest
import shapes
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# The kernel benchmarks run on the GPU; a dry run (KDFAST_BENCH_DRY=1) without one runs them on CPU, with the
# Triton code in the interpreter (set before any kernels module defines its kernels) and torch.compile's
# graph capture without Inductor's code generation, which only the timing would need.
if torch.cuda.is_available():
    BENCH_DEVICE, COMPILE_BACKEND = torch.device("cuda"), "inductor"
elif shapes.DRY_RUN:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    BENCH_DEVICE, COMPILE_BACKEND = torch.device("cpu"), "aot_eager"
else:
    BENCH_DEVICE, COMPILE_BACKEND = None, "inductor"
requires_bench_device = pytest.mark.skipif(
    BENCH_DEVICE is None, reason="needs a CUDA GPU (or KDFAST_BENCH_DRY=1 for a CPU dry run)"
)
MIB = 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages (a view and its base count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def peak_memory(fn: Callable[[], object], grads_of: list[torch.Tensor], device: torch.device) -> dict:
    """The memory one call adds at its peak beyond its inputs (allocated before it), its outputs and the
    gradients it returns (``grads_of``'s ``.grad``), in MiB; and the same with those gradients counted."""
    for t in grads_of:
        t.grad = None
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base - _nbytes(_tensors(out))
    grads = _nbytes(t.grad for t in grads_of if t.grad is not None)
    return {
        "peak_extra_mib": round((peak - grads) / MIB, 2),
        "peak_extra_with_grads_mib": round(peak / MIB, 2),
    }


def device_work(fn: Callable[[], object], device: torch.device, iterations: int = 5) -> tuple[float, float]:
    """(device operations per call, device-busy milliseconds per call) from ``torch.profiler``: kernels,
    memsets and copies all count as launches; their summed durations are the kernel-only time."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iterations):
            fn()
        _sync(device)
    on_device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.time_range.elapsed_us() for e in on_device)
    return len(on_device) / iterations, busy_us / 1e3 / iterations


def _append_jsonl(benchmark, info: dict) -> None:
    path = os.environ.get("KDFAST_BENCH_JSONL")
    if not path:
        return
    stats = benchmark.stats.stats
    record = {
        "group": benchmark.group,
        "name": benchmark.name,
        "fullname": benchmark.fullname,
        "params": {k: str(v) for k, v in (benchmark.params or {}).items()},
        "stats": {k: getattr(stats, k) for k in ("min", "max", "mean", "median", "stddev", "rounds")},
        "extra_info": info,
    }
    with open(path, "a") as f:  # one line per case, flushed as it finishes; append-only, never rewritten
        f.write(json.dumps(record) + "\n")


@pytest.fixture
def bench_op(benchmark):
    """``bench_op(fn, device, forward=None, grads_of=(), images=None, group=..., **info)``.

    Warms ``fn`` up (the first call's wall time, compilation included, kept as ``first_call_s``); on CUDA
    records what one call adds to memory (:func:`peak_memory`) and, with the profiler, device launches and
    kernel-only time per call (``forward``, the forward alone with grad enabled, splits the launches of a
    forward+backward ``fn`` into the two directions); then times ``fn`` with a synchronize after every call
    so GPU time is counted. ``grads_of`` have their ``.grad`` cleared before each call. ``images`` (per call)
    adds images/s from the median."""

    def run(
        fn: Callable[[], object],
        device,
        *,
        forward: Callable[[], object] | None = None,
        grads_of: Iterable[torch.Tensor] = (),
        images: int | None = None,
        rounds: int = 30,
        warmup: int = 5,
        **info,
    ):
        device = torch.device(device)
        grads_of = list(grads_of)
        if shapes.DRY_RUN:  # the dry run proves the code runs; its timings mean nothing
            rounds, warmup = 1, 1

        def call():
            for t in grads_of:
                t.grad = None
            return fn()

        # The first call compiles (Triton JIT and autotuning, Inductor): its wall time is a figure of its own.
        start = time.perf_counter()
        call()
        _sync(device)
        info["first_call_s"] = round(time.perf_counter() - start, 3)
        for _ in range(warmup - 1):
            call()
        _sync(device)
        if device.type == "cuda":
            info.update(peak_memory(fn, grads_of, device))
            launches, info["kernel_ms"] = device_work(call, device)
            if forward is None:
                info["launches_fwd"] = launches
            else:
                info["launches_fwd"] = device_work(forward, device)[0]
                info["launches_bwd"] = launches - info["launches_fwd"]
            info["device_name"] = torch.cuda.get_device_name(device)
        info["torch"] = torch.__version__
        if "group" in info:
            benchmark.group = info["group"]

        def timed():
            call()
            _sync(device)

        result = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=int(not shapes.DRY_RUN))
        if images is not None:
            info["images_per_s"] = round(images / benchmark.stats.stats.median, 1)
        benchmark.extra_info.update(info)
        _append_jsonl(benchmark, dict(benchmark.extra_info))
        return result

    return run
