"""A run's results: ``results.json`` and ``results.md`` for one run and for a run repeated over seeds.

Each trained model records two top-1 accuracies on the validation split: the **last** epoch's (the weights
that ``student.pt`` holds, and the number the tables show first) and the **best** epoch's with that epoch
(what mdistiller and RepDistiller report: the maximum over epochs, picked on the same split it is measured
on, so it reads higher than the last epoch's). ``results.json`` says which one its tables show in
``top1_shown``. Beside them: the stage's wall time (training and validation, summed over epochs, also
across ``--resume``) and its training throughput (the mean of the epochs' images per second; the first
epoch of a compiled run includes compilation).

A data set with an official test split (Fashion-MNIST) adds, apart from the validation numbers,
``test_top1`` and ``test_top5``: the saved (last-epoch) weights measured once on the test images after
training, which no choice was made on. ``results.json`` then says so in ``test``.

A run over several seeds (``--seeds``) writes one run folder per seed and, above them, the mean and sample
standard deviation (n - 1) of every number over the seeds.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdfast.atomic import atomic_write
from kdfast.errors import UsageError

RESULTS_FORMAT = "kdfast.results/1"
TOP1_SHOWN = "last"
TIMING_KEYS = ("wall_s", "images_per_s")
# the numbers a seeds summary averages, per model
AVERAGED = ("top1", "best_top1", "top5", "test_top1", "test_top5", *TIMING_KEYS)
TEST_SHOWN = "the official test split, the saved (last-epoch) weights, measured once after training"


def stage_metrics(
    previous: Mapping[str, Any],
    validation: Mapping[str, float],
    *,
    epoch: int,
    train_loss: float,
    images_per_s: float,
    seconds: float,
) -> dict[str, Any]:
    """A training stage's metrics after ``epoch`` (1-based): this epoch's validation numbers (the last
    epoch's), the best top-1 so far and its epoch, the mean images/s over the epochs and the summed wall
    time; ``previous`` holds those of the epochs before (empty before the first, or a resumed state's)."""
    best = previous.get("best_top1")
    improved = best is None or validation["top1"] > best
    done = epoch - 1  # epochs already in the running mean
    return {
        **validation,
        "train_loss": train_loss,
        "epochs": epoch,
        "best_top1": validation["top1"] if improved else best,
        "best_epoch": epoch if improved else previous["best_epoch"],
        "images_per_s": (previous.get("images_per_s", 0.0) * done + images_per_s) / epoch,
        "wall_s": previous.get("wall_s", 0.0) + seconds,
    }


def run_results(models: Mapping[str, Mapping[str, Any]], *, data: str, methods: Sequence[str]) -> dict:
    """The ``results.json`` of one run: ``models`` maps teacher / baseline / student to a row (``arch``,
    ``params`` and its metrics; a model not trained in this run has no best epoch or timing)."""
    results = {
        "format": RESULTS_FORMAT,
        "data": data,
        "method": list(methods),
        "top1_shown": TOP1_SHOWN,
        "models": {role: dict(row) for role, row in models.items()},
    }
    if any("test_top1" in row for row in models.values()):
        results["test"] = TEST_SHOWN
    return results


def _mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    known = [v for v in values if v is not None]
    if len(known) != len(values):
        return {"mean": None, "std": None, "values": list(values)}
    std = statistics.stdev(known) if len(known) > 1 else None
    return {"mean": statistics.fmean(known), "std": std, "values": list(known)}


def seeds_results(runs: Mapping[int, Mapping[str, Any]]) -> dict:
    """The ``results.json`` above the seed folders: per model, the mean and sample standard deviation over
    seeds of each number in ``AVERAGED`` (with the values, seed order); ``runs`` maps seed -> that seed's
    ``results.json``."""
    first = next(iter(runs.values()))
    models = {}
    for role, row in first["models"].items():
        summary = {"arch": row["arch"], "params": row["params"]}
        for key in AVERAGED:
            if key.startswith("test_") and key not in row:
                continue
            summary[key] = _mean_std([run["models"][role].get(key) for run in runs.values()])
        models[role] = summary
    results = {
        "format": RESULTS_FORMAT,
        "data": first["data"],
        "method": first["method"],
        "top1_shown": TOP1_SHOWN,
        "seeds": list(runs),
        "runs": [f"seed{seed}" for seed in runs],
        "models": models,
    }
    if "test" in first:
        results["test"] = first["test"]
    return results


def fmt(value: Any, spec: str = ".2f") -> str:
    """One number, or "mean ± std" of a seeds summary ("-" where unknown)."""
    if isinstance(value, Mapping):
        if value["mean"] is None:
            return "-"
        mean = format(value["mean"], spec)
        return mean if value["std"] is None else f"{mean} ± {format(value['std'], spec)}"
    return "-" if value is None else format(value, spec)


def _row_label(role: str, methods: Sequence[str]) -> str:
    return {
        "teacher": "teacher",
        "baseline": "baseline student (CE only)",
        "student": f"distilled student ({' + '.join(m.upper() for m in methods)})",
    }[role]


def results_table(results: Mapping[str, Any]) -> str:
    """The Markdown table of ``results.md`` and the final printout: one row per model, last-epoch top-1
    first, then the best epoch's (with the epoch, for one run), then top-5, all on the validation split;
    where the data set has a test split, the test top-1 after them."""
    test = "test" in results
    val = "val " if test else ""  # named only where another split stands beside it
    lines = [
        f"| model | arch | params | {val}top-1 last (%) | {val}top-1 best (%) | {val}top-5 (%) |"
        + (" test top-1 (%) |" if test else ""),
        "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: |" if test else ""),
    ]
    for role, row in results["models"].items():
        best = fmt(row.get("best_top1"))
        if row.get("best_epoch") is not None:
            best += f" (epoch {row['best_epoch']})"
        label = _row_label(role, results["method"])
        cells = [label, row["arch"], f"{row['params']:,}", fmt(row["top1"]), best, fmt(row["top5"])]
        if test:
            cells.append(fmt(row.get("test_top1")))
        lines.append("| " + " | ".join(cells) + " |")
    if "seeds" in results:
        seeds = ", ".join(str(s) for s in results["seeds"])
        lines.append(f"\nmean ± sample std over seeds {seeds}; top-1 last: the final epoch's weights.")
    if test:
        lines.append(f"\ntest top-1: {results['test']}; val: the validation split carved from training.")
    return "\n".join(lines)


def write_results(out: Path, results: Mapping[str, Any], notes: str = "") -> str:
    """Write ``results.json`` and ``results.md`` in ``out`` (atomically), ``notes`` (Markdown) below the
    table in ``results.md``; returns the table."""
    table = results_table(results)
    extra = f"\n\n{notes}" if notes else ""
    atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write(out / "results.md", f"# kdfast results ({results['data']})\n\n{table}{extra}\n")
    return table


def read_results(folder: Path) -> dict:
    """The ``results.json`` of a finished run folder (one run, or a run over seeds); a folder that is no run,
    or a run that has not finished, is a UsageError saying which."""
    path = folder / "results.json"
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder: give the output folder of a kdfast.train run")
    if not path.is_file():
        if (folder / "config.yaml").is_file():
            raise UsageError(
                f"{folder} is an unfinished run (no results.json yet): finish it with --resume {folder}"
            )
        raise UsageError(f"{folder} is not a kdfast.train run folder (no results.json or config.yaml)")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UsageError(f"{path} is not JSON: it was not written by kdfast.train") from None
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise UsageError(f"{path} is not a {RESULTS_FORMAT} file: rerun the run with this kdfast version")
    if "student" not in results.get("models", {}):
        raise UsageError(f"{path} has no distilled student row")
    return results
