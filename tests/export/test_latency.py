"""The latency protocol: every step warmed up outside the timed rounds, then rounds in which every step runs
once, the order rotated each round; per-round sample and time minimums, an optional cap that marks what it
cuts; percentiles, paired per-round ratios; and the machine facts a latency figure carries."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

from export.latency import (
    Protocol,
    Samples,
    batch_sizes,
    interleave,
    paired_ratio,
    rotation,
    round_ratios,
    summarize,
    wall_clock,
)
from export.machine import BUSY_SHARE, PeakMemory, busy_warning, machine_info, usable_cpus


class _Log:
    """Steps that record, in one shared log, which step ran when; each call sleeps ``ms`` (sleep overshoots
    on a busy machine, so the tests compare with the measured times, not with ``ms``)."""

    def __init__(self):
        self.calls: list[tuple[str, float]] = []

    def step(self, name: str, ms: float = 0.0):
        def call() -> float:
            start = time.perf_counter()
            self.calls.append((name, start))
            if ms:
                time.sleep(ms / 1e3)
            return (time.perf_counter() - start) * 1e3

        return call

    def blocks(self) -> list[tuple[str, int]]:
        """The log as runs of consecutive calls of one step: (name, calls)."""
        runs: list[tuple[str, int]] = []
        for name, _ in self.calls:
            if runs and runs[-1][0] == name:
                runs[-1] = (name, runs[-1][1] + 1)
            else:
                runs.append((name, 1))
        return runs


NO_TIME = {"warmup_s": 0.0, "min_s": 0.0}


def test_rotation_starts_each_round_one_step_later():
    names = ["a", "b", "c"]
    assert [rotation(names, r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]
    ]  # fmt: skip
    assert rotation([], 3) == []


def test_round_structure_warm_up_first_then_every_step_once_per_round_rotated():
    log = _Log()
    steps = {name: log.step(name) for name in ("a", "b", "c", "d")}
    protocol = Protocol(warmup_iters=3, iters=8, rounds=4, **NO_TIME)  # 2 calls per step and round
    samples, failed = interleave(steps, protocol)
    assert failed == {}
    blocks = log.blocks()
    # The warm-up: each step's 3 calls, one step after the other, before any timed call.
    assert blocks[:4] == [("a", 3), ("b", 3), ("c", 3), ("d", 3)]
    # Then 4 rounds of 4 blocks of 2 calls, round r in the order rotated by r.
    timed = blocks[4:]
    assert len(timed) == 16 and all(calls == 2 for _, calls in timed)
    expected = [["a", "b", "c", "d"], ["b", "c", "d", "a"], ["c", "d", "a", "b"], ["d", "a", "b", "c"]]
    assert [[name for name, _ in timed[4 * r : 4 * r + 4]] for r in range(4)] == expected
    for name in steps:
        assert len(samples[name].rounds) == 4 and [r.size for r in samples[name].rounds] == [2, 2, 2, 2]
        assert samples[name].ms.size == 8 and not samples[name].capped


def test_each_round_takes_its_share_of_calls_and_of_time():
    log = _Log()
    # 5 calls asked over 3 rounds: ceil(5 / 3) = 2 per round; 0.06 s asked: 0.02 s per round, which 2 calls
    # of 2 ms cannot fill, so a round goes on until both hold.
    protocol = Protocol(warmup_iters=0, warmup_s=0.0, iters=5, min_s=0.06, rounds=3)
    samples, _ = interleave({"a": log.step("a", ms=2.0)}, protocol)
    starts = [t for _, t in log.calls]
    assert len(samples["a"].rounds) == 3
    first = 0
    for times in samples["a"].rounds:
        assert times.size > math.ceil(5 / 3)
        last = first + times.size - 1
        assert starts[last] - starts[first] + times[-1] / 1e3 >= 0.02  # the round's time was reached
        assert starts[last - 1] - starts[first] < 0.02  # and it stopped once both held
        first = last + 1
    # No time asked: the calls count on their own.
    samples, _ = interleave({"a": _Log().step("a")}, Protocol(warmup_iters=0, iters=7, rounds=2, **NO_TIME))
    assert [r.size for r in samples["a"].rounds] == [4, 4]


def test_warm_up_needs_both_its_iterations_and_its_time():
    log = _Log()
    interleave(
        {"a": log.step("a", ms=10)}, Protocol(warmup_iters=3, warmup_s=0.1, iters=1, min_s=0.0, rounds=1)
    )
    warm = len(log.calls) - 1
    starts = [t for _, t in log.calls]
    assert warm > 3 and starts[warm] - starts[0] >= 0.1
    assert starts[warm - 1] - starts[0] < 0.1


def test_a_cap_stops_each_round_and_the_summary_says_how_many_samples():
    protocol = Protocol(warmup_iters=0, warmup_s=0, iters=1000, min_s=0.0, max_s=0.1, rounds=2)
    samples, _ = interleave({"a": _Log().step("a", ms=10)}, protocol)
    series = samples["a"]
    assert series.capped and all(2 <= r.size < 500 for r in series.rounds)
    summary = summarize(series, 1, protocol)
    assert summary["under_sampled"] and summary["samples"] == series.ms.size


def test_no_cap_by_default():
    assert Protocol().max_s is None


def test_a_step_that_raises_is_dropped_and_the_others_are_timed():
    log = _Log()
    calls = {"n": 0}

    def breaks_in_round_two() -> float:
        calls["n"] += 1
        if calls["n"] > 3:  # 1 warm-up call, then a round of 2
            raise RuntimeError("device lost")
        return 1.0

    protocol = Protocol(warmup_iters=1, iters=6, rounds=3, **NO_TIME)
    samples, failed = interleave({"a": log.step("a"), "b": breaks_in_round_two}, protocol)
    assert set(samples) == {"a"} and len(samples["a"].rounds) == 3
    assert isinstance(failed["b"], RuntimeError) and str(failed["b"]) == "device lost"


def test_paired_ratio_against_a_hand_computed_case():
    # Per-round medians of eager and of a backend: ratios 2/1, 4/1, 6/2, 8/2 = 2, 4, 3, 4; sorted 2, 3, 4, 4:
    # median (3 + 4) / 2 = 3.5; linear-interpolated quartiles at positions 0.75 and 2.25: 2.75 and 4.
    assert round_ratios([2, 4, 6, 8], [1, 1, 2, 2]).tolist() == [2.0, 4.0, 3.0, 4.0]
    assert paired_ratio([2, 4, 6, 8], [1, 1, 2, 2]) == {"median": 3.5, "q25": 2.75, "q75": 4.0, "rounds": 4}
    with pytest.raises(ValueError, match="paired rounds"):
        paired_ratio([1, 2, 3], [1, 2])


def test_pairing_cancels_a_load_swing_that_moves_both_rows():
    """Three rounds in which the machine gets 1x, 3x and 10x slower: each row's own p50 swings with the load,
    the per-round ratio of the two does not."""
    slow = Samples(tuple(np.full(5, 2.0 * k) for k in (1, 3, 10)), capped=False)
    fast = Samples(tuple(np.full(5, 0.5 * k) for k in (1, 3, 10)), capped=False)
    ratio = paired_ratio(slow.round_medians(), fast.round_medians())
    assert ratio == {"median": 4.0, "q25": 4.0, "q75": 4.0, "rounds": 3}


def test_a_planted_slow_step_is_slower_in_every_round():
    log = _Log()
    steps = {"a": log.step("a", ms=0.5), "slow": log.step("slow", ms=4.0), "b": log.step("b", ms=0.5)}
    samples, _ = interleave(steps, Protocol(warmup_iters=1, iters=6, rounds=3, **NO_TIME))
    for other in ("a", "b"):
        ratios = round_ratios(samples["slow"].round_medians(), samples[other].round_medians())
        assert (ratios > 1.5).all(), ratios


def test_summary_percentiles_over_every_call_and_medians_per_round():
    ms = np.arange(1, 201, dtype=float)
    summary = summarize(Samples((ms[:50], ms[50:]), capped=False), 8, Protocol(iters=100))
    for q in (50, 90, 95, 99):
        assert summary[f"p{q}_ms"] == pytest.approx(np.percentile(ms, q))
    assert summary["throughput_ips"] == pytest.approx(8 / (100.5 / 1e3))
    assert summary["samples"] == 200 and not summary["under_sampled"]
    assert summary["round_p50_ms"] == [25.5, 125.5]


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


def test_busy_warning_subtracts_the_commands_own_threads_during_and_after():
    cpus = usable_cpus()
    quiet = BUSY_SHARE * cpus
    assert busy_warning(0.0, 2.0 + quiet, 2.0 + quiet, threads=2) is None  # the load is this command's own
    warning = busy_warning(0.0, 2.5 + quiet, 0.0, threads=2)  # others ran during the timing
    assert warning and "busy" in warning and f"{cpus} usable CPU" in warning
    assert f"{2.5 + quiet} during" in warning
    assert (
        busy_warning(quiet + 1.0, None, None, threads=1) and busy_warning(None, None, None, threads=1) is None
    )


def test_busy_warning_says_how_many_threads_the_idle_cpus_allow():
    cpus = usable_cpus()
    load = cpus - 0.5  # others leave half a CPU idle
    warning = busy_warning(load, None, None, threads=2)
    assert "--threads 1 measures what this machine can give" in warning
    assert "--threads 1 measures" not in busy_warning(load, None, None, threads=1)


def test_peak_memory_sees_native_allocations():
    with PeakMemory() as memory:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB written, so resident
        time.sleep(0.05)
        del block
    assert memory.peak_bytes >= 48 * 2**20
