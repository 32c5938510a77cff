"""The latency protocol (warm-up by time and iterations, sample minimums, an optional cap that marks what it
cuts, percentiles) and the machine facts a latency figure carries."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from export.latency import Protocol, Samples, batch_sizes, measure, summarize, wall_clock
from export.machine import BUSY_SHARE, PeakMemory, busy_warning, machine_info, usable_cpus


class _Clock:
    """A step that sleeps ``ms`` and records when each call started (sleep overshoots on a busy machine,
    so the tests compare with these times, not with ``ms``)."""

    def __init__(self, ms: float):
        self.ms, self.starts = ms, []

    def __call__(self) -> float:
        self.starts.append(time.perf_counter())
        time.sleep(self.ms / 1e3)
        return (time.perf_counter() - self.starts[-1]) * 1e3


def test_warm_up_needs_both_its_iterations_and_its_time():
    # 3 warm-up calls of 10 ms cannot fill 0.1 s: warm-up goes on until the time is reached too
    clock = _Clock(10)
    samples = measure(clock, Protocol(warmup_iters=3, warmup_s=0.1, iters=5, min_s=0.0))
    assert samples.ms.size == 5 and not samples.capped
    warm = len(clock.starts) - 5
    assert warm > 3 and clock.starts[warm] - clock.starts[0] >= 0.1
    assert clock.starts[warm - 1] - clock.starts[0] < 0.1  # and stops once both hold
    # 40 warm-up calls asked and no time: the iterations count on their own
    clock = _Clock(0.1)
    measure(clock, Protocol(warmup_iters=40, warmup_s=0.0, iters=1, min_s=0.0))
    assert len(clock.starts) == 41


def test_timing_needs_both_its_samples_and_its_time():
    clock = _Clock(5)
    samples = measure(clock, Protocol(warmup_iters=0, warmup_s=0, iters=3, min_s=0.1))
    assert samples.ms.size > 3  # 3 calls of 5 ms cannot fill 0.1 s
    assert clock.starts[-1] - clock.starts[0] + samples.ms[-1] / 1e3 >= 0.1
    assert clock.starts[-2] - clock.starts[0] < 0.1
    samples = measure(_Clock(0.1), Protocol(warmup_iters=0, warmup_s=0, iters=50, min_s=0.0))
    assert samples.ms.size == 50


def test_a_cap_stops_timing_and_the_summary_says_how_many_samples():
    protocol = Protocol(warmup_iters=0, warmup_s=0, iters=1000, min_s=0.0, max_s=0.05)
    samples = measure(_Clock(10), protocol)
    assert samples.capped and 3 <= samples.ms.size < 1000
    summary = summarize(samples, 1, protocol)
    assert summary["under_sampled"] and summary["samples"] == samples.ms.size


def test_no_cap_by_default():
    assert Protocol().max_s is None


def test_summary_percentiles_and_throughput_against_numpy():
    ms = np.arange(1, 201, dtype=float)
    summary = summarize(Samples(ms, capped=False), 8, Protocol(iters=100))
    for q in (50, 90, 95, 99):
        assert summary[f"p{q}_ms"] == pytest.approx(np.percentile(ms, q))
    assert summary["throughput_ips"] == pytest.approx(8 / (100.5 / 1e3))
    assert summary["samples"] == 200 and not summary["under_sampled"]


def test_wall_clock_measures_the_call():
    step = wall_clock(lambda: time.sleep(0.02))
    assert 19 <= step() < 200


def test_batch_sizes_double_up_to_the_largest():
    assert batch_sizes(2) == [1, 2]
    assert batch_sizes(8) == [1, 2, 4, 8]
    assert batch_sizes(12) == [1, 2, 4, 8, 12]


def test_machine_facts():
    info = machine_info(threads=3)
    assert info["usable_cpus"] == len(os.sched_getaffinity(0)) == usable_cpus()
    assert info["threads"] == 3 and info["cpu_model"] and isinstance(info["isa"], list)
    assert info["timestamp"].endswith("+00:00")
    with open("/proc/cpuinfo") as f:
        flags = next(
            (line.split(":", 1)[1].split() for line in f if line.startswith(("flags", "Features"))), []
        )
    assert set(info["isa"]) <= set(flags)


def test_busy_warning_subtracts_the_commands_own_threads():
    cpus = usable_cpus()
    quiet = BUSY_SHARE * cpus
    assert busy_warning(0.0, 2.0 + quiet, threads=2) is None  # the end load is this command's own
    warning = busy_warning(quiet + 1.0, 0.0, threads=2)
    assert warning and "busy" in warning and f"{cpus} usable CPU" in warning
    assert busy_warning(None, None, threads=1) is None


def test_peak_memory_sees_native_allocations():
    with PeakMemory() as memory:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB written, so resident
        time.sleep(0.05)
        del block
    assert memory.peak_bytes >= 48 * 2**20
