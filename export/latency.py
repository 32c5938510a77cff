"""The latency protocol, the same for every backend (trtexec's and Olive's as the bar), interleaved so that
every row of one batch size is measured on the same machine.

On a shared machine the load drifts by the second: timing backend A for a second, then B, then C measures
each under other conditions (a 7x swing between the report and a round-robin re-timing of the same files).
So the steps of one batch size are timed in rounds: every step is warmed up first, outside the timed
rounds, until both ``warmup_iters`` calls and ``warmup_s`` seconds have passed; then ``rounds`` rounds run
every step once each, in an order rotated by one per round (round r starts with step r mod n, so no step
always runs first, right after the same neighbour, or in the same part of a load swing). Within a round a
step makes at least ``ceil(iters / rounds)`` calls over at least ``min_s / rounds`` seconds, so over all
rounds each step has at least ``iters`` samples and ``min_s`` seconds. ``max_s`` (off unless asked for) caps
each step's time per round at ``max_s / rounds``; a series it cut short is marked with its sample count.

A ratio between two steps is taken per round (the two medians of that round, measured seconds apart), and
the report gives the median and the inter-quartile range of those per-round ratios: a load spike that
slows one round slows both sides of its ratio.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Step = Callable[[], float]  # one timed call; returns its wall time in ms


@dataclass(frozen=True)
class Protocol:
    warmup_iters: int = 10
    warmup_s: float = 0.2
    iters: int = 100
    min_s: float = 1.0
    max_s: float | None = None
    rounds: int = 10


@dataclass(frozen=True)
class Samples:
    rounds: tuple[np.ndarray, ...]  # per round, the ms of each timed call
    capped: bool  # max_s stopped a round before its share of ``iters`` samples

    @property
    def ms(self) -> np.ndarray:
        """Every timed call, rounds concatenated."""
        return np.concatenate(self.rounds)

    def round_medians(self) -> np.ndarray:
        return np.array([np.median(r) for r in self.rounds])


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... and ``max_batch`` itself: the points of the latency-vs-batch curve."""
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, max_batch})


def wall_clock(fn: Callable[[], object]) -> Step:
    """A step that calls ``fn`` once and returns its wall time in ms (``time.perf_counter``)."""

    def step() -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return step


def rotation(names: Sequence[str], round_index: int) -> list[str]:
    """The order of round ``round_index``: ``names`` rotated left by ``round_index`` (mod their count)."""
    k = round_index % len(names) if names else 0
    return [*names[k:], *names[:k]]


def warm_up(step: Step, protocol: Protocol) -> None:
    """Call ``step`` until both ``warmup_iters`` calls and ``warmup_s`` seconds have passed."""
    start, done = time.perf_counter(), 0
    while done < protocol.warmup_iters or time.perf_counter() - start < protocol.warmup_s:
        step()
        done += 1


def _one_round(step: Step, protocol: Protocol) -> tuple[np.ndarray, bool]:
    calls = math.ceil(protocol.iters / protocol.rounds)
    min_s = protocol.min_s / protocol.rounds
    max_s = None if protocol.max_s is None else protocol.max_s / protocol.rounds
    times: list[float] = []
    start = time.perf_counter()
    while True:
        times.append(step())
        elapsed = time.perf_counter() - start
        if len(times) >= calls and elapsed >= min_s:
            return np.asarray(times), False
        if max_s is not None and elapsed >= max_s:
            return np.asarray(times), len(times) < calls


def interleave(
    steps: dict[str, Step], protocol: Protocol, *, on_round: Callable[[int], None] | None = None
) -> tuple[dict[str, Samples], dict[str, BaseException]]:
    """Time ``steps`` (name -> step) in ``protocol.rounds`` rotated rounds after warming each up; returns
    (samples per step, the exception of each step that raised, which is dropped from the later rounds and
    from the samples). ``on_round(r)`` is called after each round (progress)."""
    failed: dict[str, BaseException] = {}
    for name, step in steps.items():
        try:
            warm_up(step, protocol)
        except Exception as e:  # noqa: BLE001 - one broken runner must not stop the timing of the others
            failed[name] = e
    names = [n for n in steps if n not in failed]
    rounds: dict[str, list[np.ndarray]] = {n: [] for n in names}
    capped = dict.fromkeys(names, False)
    for r in range(protocol.rounds):
        for name in rotation([n for n in names if n not in failed], r):
            try:
                times, cut = _one_round(steps[name], protocol)
            except Exception as e:  # noqa: BLE001
                failed[name] = e
                continue
            rounds[name].append(times)
            capped[name] |= cut
        if on_round is not None:
            on_round(r)
    samples = {n: Samples(tuple(rounds[n]), capped[n]) for n in names if n not in failed}
    return samples, failed


def round_ratios(baseline_ms: Sequence[float], other_ms: Sequence[float]) -> np.ndarray:
    """``baseline_r / other_r`` per round, for the per-round medians of two steps timed in the same rounds:
    how many times faster ``other`` was than ``baseline`` in each round."""
    base, other = np.asarray(baseline_ms, dtype=float), np.asarray(other_ms, dtype=float)
    if base.shape != other.shape or base.size == 0:
        raise ValueError(f"paired rounds needed, got {base.size} and {other.size}")
    return base / other


def paired_ratio(baseline_ms: Sequence[float], other_ms: Sequence[float]) -> dict:
    """:func:`round_ratios` summarized by their median and their 25th and 75th percentiles (numpy's linear
    interpolation) over rounds."""
    ratios = round_ratios(baseline_ms, other_ms)
    q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
    return {"median": float(q50), "q25": float(q25), "q75": float(q75), "rounds": int(ratios.size)}


def summarize(samples: Samples, batch: int, protocol: Protocol) -> dict:
    """Percentiles over every call (ms), throughput (images/s from the median call), the sample count and the
    per-round medians (what paired ratios are computed from) of one series."""
    ms = samples.ms
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return {
        "batch": batch,
        "samples": int(ms.size),
        "under_sampled": bool(ms.size < protocol.iters),
        "capped": samples.capped,
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p95_ms": float(p95),
        "p99_ms": float(p99),
        "mean_ms": float(ms.mean()),
        "throughput_ips": float(batch / (p50 / 1e3)),
        "round_p50_ms": [float(m) for m in samples.round_medians()],
    }
