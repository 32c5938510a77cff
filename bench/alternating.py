"""Timing cases side by side on a shared machine: every round runs each case once, so a drift in the machine's
load (other jobs on the 2 shared cores) reaches every case alike, and each case's ratio to the baseline is
taken per round (the two calls of a pair ran seconds apart) before its median over rounds is reported.

``alternate(benchmark, cases, baseline=...)`` warms every case up, then hands pytest-benchmark one round (all
cases, the order rotated each round) to time ``rounds`` times, recording each case's own seconds per round.
``benchmark.extra_info`` gets, per case, the median seconds, images per second and the median / min / max of
its per-round ratio to ``baseline`` (baseline time / case time: above 1 is faster), with the torch thread
count and the 1-minute load average before and after. With ``KDFAST_BENCH_JSONL`` each case is also appended
there as one record in ``bench/conftest.py``'s format (``impl`` the case name), so ``bench/render_results.py``
renders it.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Mapping

import shapes
import torch

CPU_THREADS = 1  # the CPU step benchmarks pin torch to one thread: on the loaded 2-core machine two contend


def pin_threads(threads: int = CPU_THREADS) -> int:
    """Set and return torch's intra-op thread count."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def alternate(
    benchmark,
    cases: Mapping[str, Callable[[], object]],
    *,
    baseline: str | Mapping[str, str],
    images: int,
    rounds: int = 15,
    warmup: int = 2,
    group: str,
    case: str,
    **info,
) -> dict[str, dict]:
    """Time ``cases`` in rotating rounds (above); returns, per case, ``median_s``, ``images_per_s`` and its
    ``ratio`` to its baseline (median over rounds, with ``ratio_min`` / ``ratio_max``): ``baseline`` names one
    case for all, or maps each case to its own."""
    baselines = {name: baseline for name in cases} if isinstance(baseline, str) else dict(baseline)
    if shapes.DRY_RUN:  # the dry run proves the code runs; its timings mean nothing
        rounds, warmup = 1, 1
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    _sync()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    turn = [0]

    def one_round() -> None:
        k = turn[0] % len(names)
        turn[0] += 1
        for name in names[k:] + names[:k]:
            started = time.perf_counter()
            cases[name]()
            _sync()
            seconds[name].append(time.perf_counter() - started)

    load_before = os.getloadavg()[0]
    benchmark.group = group
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    load_after = os.getloadavg()[0]
    results = {}
    for name in names:
        ratios = [b / s for b, s in zip(seconds[baselines[name]], seconds[name], strict=True)]
        median = statistics.median(seconds[name])
        results[name] = {
            "median_s": median,
            "images_per_s": round(images / median, 1),
            "baseline": baselines[name],
            "ratio": round(statistics.median(ratios), 3),
            "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3),
        }
    machine = {
        "threads": torch.get_num_threads(),
        "load_before": load_before,
        "load_after": load_after,
        "rounds": rounds,
        "torch": torch.__version__,
    }
    benchmark.extra_info.update({**info, **machine, "case": case, "cases": results})
    _append_jsonl(benchmark, results, seconds, {**info, **machine, "case": case})
    return results


def _append_jsonl(benchmark, results: dict, seconds: dict, info: dict) -> None:
    path = os.environ.get("KDFAST_BENCH_JSONL")
    if not path:
        return
    with open(path, "a") as f:  # one line per case, appended as the benchmark ends
        for name, result in results.items():
            stats = {
                "median": result["median_s"],
                "min": min(seconds[name]),
                "max": max(seconds[name]),
                "mean": statistics.fmean(seconds[name]),
                "rounds": len(seconds[name]),
            }
            extra = {**info, "impl": name, **result}
            record = {"group": benchmark.group, "name": name, "fullname": benchmark.fullname, "params": {}}
            f.write(json.dumps({**record, "stats": stats, "extra_info": extra}) + "\n")


def table(results: Mapping[str, dict]) -> str:
    """The cases as Markdown rows: median ms, images/s, speed-up over its baseline (baseline time / its time:
    median, min-max over rounds)."""
    lines = ["| case | median (ms) | images/s | vs | speed-up (median, min-max of rounds) |"]
    lines.append("| --- | ---: | ---: | --- | --- |")
    for name, r in results.items():
        ratio = f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
        lines.append(
            f"| {name} | {r['median_s'] * 1e3:.1f} | {r['images_per_s']:.0f} | {r['baseline']} | {ratio} |"
        )
    return "\n".join(lines)
