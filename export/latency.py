"""The latency protocol, the same for every backend (trtexec's and Olive's as the bar).

Per backend and batch size: warm up until both ``warmup_iters`` iterations and ``warmup_s`` seconds have
passed; then time one call per sample until both ``iters`` samples and ``min_s`` seconds are reached, so
fast backends still cover enough wall time to see scheduler noise and slow ones still get ``iters``
samples. There is no hidden cap: ``max_s`` is off unless asked for, and a series it cut short is marked
with its sample count. Summaries give p50/p90/p95/p99 and the throughput of the median call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Protocol:
    warmup_iters: int = 10
    warmup_s: float = 0.2
    iters: int = 100
    min_s: float = 1.0
    max_s: float | None = None


@dataclass(frozen=True)
class Samples:
    ms: np.ndarray  # one entry per timed call
    capped: bool  # max_s stopped the series before ``iters`` samples


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... and ``max_batch`` itself: the points of the latency-vs-batch curve."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, max_batch})


def wall_clock(fn: Callable[[], object]) -> Callable[[], float]:
    """A step that calls ``fn`` once and returns its wall time in ms (``time.perf_counter``)."""

    def step() -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return step


def measure(step: Callable[[], float], protocol: Protocol) -> Samples:
    """Run ``step`` (one timed call, returning its ms) under ``protocol``."""
    start, done = time.perf_counter(), 0
    while done < protocol.warmup_iters or time.perf_counter() - start < protocol.warmup_s:
        step()
        done += 1
    times: list[float] = []
    start = time.perf_counter()
    while True:
        times.append(step())
        elapsed = time.perf_counter() - start
        if len(times) >= protocol.iters and elapsed >= protocol.min_s:
            return Samples(np.asarray(times), capped=False)
        if protocol.max_s is not None and elapsed >= protocol.max_s:
            return Samples(np.asarray(times), capped=len(times) < protocol.iters)


def summarize(samples: Samples, batch: int, protocol: Protocol) -> dict:
    """Percentiles (ms), throughput (images/s from the median call) and the sample count of one series."""
    p50, p90, p95, p99 = np.percentile(samples.ms, [50, 90, 95, 99])
    return {
        "batch": batch,
        "samples": int(samples.ms.size),
        "under_sampled": bool(samples.ms.size < protocol.iters),
        "capped": samples.capped,
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": float(samples.ms.mean()),
        "throughput_ips": float(batch / (p50 / 1e3)),
    }
