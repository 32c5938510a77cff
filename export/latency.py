"""Latency protocol: same preallocated inputs, warm-up, enough iterations, percentiles and throughput."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Protocol:
    """Warm up until ``warmup_iters`` iterations or ``warmup_s`` seconds, whichever comes first; then time
    until ``iters`` iterations or ``min_s`` seconds, whichever comes last, so short runs still get samples
    and fast ones still cover enough wall time to see scheduler noise."""

    warmup_iters: int = 50
    warmup_s: float = 0.2
    iters: int = 100
    min_s: float = 3.0
    max_s: float = 30.0


def _warm(fn: Callable[[], object], protocol: Protocol, sync: Callable[[], None]) -> None:
    start = time.perf_counter()
    for _ in range(protocol.warmup_iters):
        fn()
        sync()
        if time.perf_counter() - start >= protocol.warmup_s:
            break


def time_cpu(fn: Callable[[], object], protocol: Protocol) -> np.ndarray:
    """Per-iteration wall times in ms with ``time.perf_counter``."""
    _warm(fn, protocol, lambda: None)
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if (len(times) >= protocol.iters and elapsed >= protocol.min_s) or elapsed >= protocol.max_s:
            break
    return np.asarray(times) * 1e3


def time_cuda(fn: Callable[[], object], protocol: Protocol, stream: object | None = None) -> np.ndarray:
    """Per-iteration times in ms from CUDA events recorded on ``stream`` (default: the current stream)."""
    import torch

    stream = stream or torch.cuda.current_stream()
    _warm(fn, protocol, torch.cuda.synchronize)
    times = []
    start = time.perf_counter()
    while True:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(begin.elapsed_time(end))
        elapsed = time.perf_counter() - start
        if (len(times) >= protocol.iters and elapsed >= protocol.min_s) or elapsed >= protocol.max_s:
            break
    return np.asarray(times)


def summarize(batch1_ms: np.ndarray, batchn_ms: np.ndarray, batch: int) -> dict:
    """p50/p90/p99 at batch 1 (ms) and throughput at batch ``batch`` (images/s from the median batch time)."""
    p50, p90, p99 = np.percentile(batch1_ms, [50, 90, 99])
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "iters_batch1": int(batch1_ms.size),
        "batch": batch,
        "throughput_ips": float(batch / (np.median(batchn_ms) / 1e3)),
        "iters_batchN": int(batchn_ms.size),
    }
