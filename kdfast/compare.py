"""``python -m kdfast.compare RUN_DIR... [--out DIR]``: one table of finished ``kdfast.train`` runs, printed
and written as Markdown with a bar chart beside it.

One row per run folder (a single run, or a run over ``--seeds``): the method(s), teacher and student, the
distilled student's top-1 at the last epoch and at its best epoch (mean ± sample std over seeds where the
run has several), and the distillation stage's training throughput and wall time. Runs on a data set with a
test split (Fashion-MNIST) add the student's test top-1 and its gain over the run's CE-only student. The
chart draws the two validation top-1 numbers of every run as bars with the standard deviation as error bars,
or, with a test split, the test top-1 alone. Exit 0 when written; 2 with one line when a folder is no run or
an unfinished one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kdfast.atomic import atomic_path, atomic_write
from kdfast.errors import EXIT_BAD_INPUT, EXIT_OK, UsageError
from kdfast.results import fmt, read_results
from kdfast.train.rundir import check_writable

COLUMNS = (
    "run",
    "method",
    "teacher",
    "student",
    "seeds",
    "top-1 last (%)",
    "top-1 best (%)",
    "images/s",
    "distill wall",
)
TEST_COLUMNS = ("test top-1 (%)", "gain over CE-only (points)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one UsageError line (exit 2) instead of usage text; the
    comparison commands' (this one and ``kdfast.benchmark``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _spread(value: Any) -> tuple[float | None, float]:
    """(mean, std) of one run's number or a seeds summary; std 0 for a single run."""
    if isinstance(value, Mapping):
        return value["mean"], value["std"] or 0.0
    return value, 0.0


def _duration(value: Any) -> str:
    mean, std = _spread(value)
    if mean is None:
        return "-"
    unit, scale = ("h", 3600.0) if mean >= 7200 else ("min", 60.0) if mean >= 120 else ("s", 1.0)
    text = f"{mean / scale:.1f}"
    return (
        f"{text} ± {std / scale:.1f} {unit}"
        if isinstance(value, Mapping) and value["std"]
        else f"{text} {unit}"
    )


def gain(results: Mapping[str, Any], key: str = "test_top1") -> tuple[float, float] | None:
    """The distilled student's ``key`` minus the CE-only student's (means over seeds), and the two sample
    standard deviations summed: the spread a gain has to exceed to count (0 for single runs). None without
    a CE-only row or the number."""
    models = results["models"]
    if "baseline" not in models:
        return None
    (student, student_std), (baseline, baseline_std) = (
        _spread(models[role].get(key)) for role in ("student", "baseline")
    )
    if student is None or baseline is None:
        return None
    return student - baseline, student_std + baseline_std


def _gain_cell(results: Mapping[str, Any]) -> str:
    found = gain(results)
    if found is None:
        return "-"
    value, spread = found
    return f"{value:+.2f} ± {spread:.2f}" if "seeds" in results else f"{value:+.2f}"


def _has_test(runs: Mapping[str, Mapping[str, Any]]) -> bool:
    return any("test" in results for results in runs.values())


def row(name: str, results: Mapping[str, Any], test: bool = False) -> list[str]:
    """The table cells of one run; with ``test``, its test top-1 and gain over the CE-only student after
    them (the sum of the two standard deviations beside a gain over seeds)."""
    models = results["models"]
    student = models["student"]
    cells = [
        name,
        " + ".join(results["method"]),
        models["teacher"]["arch"],
        student["arch"],
        str(len(results.get("seeds", [0]))),
        fmt(student["top1"]),
        fmt(student.get("best_top1")),
        fmt(student.get("images_per_s"), ".0f"),
        _duration(student.get("wall_s")),
    ]
    return [*cells, fmt(student.get("test_top1")), _gain_cell(results)] if test else cells


def table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """The Markdown table of the runs, with the test columns when any run has a test split."""
    test = _has_test(runs)
    columns = [*COLUMNS, *(TEST_COLUMNS if test else ())]
    lines = [
        "| " + " | ".join(columns) + " |",
        "| --- | --- | --- | --- |" + " ---: |" * (len(columns) - 4),
    ]
    lines += ["| " + " | ".join(row(name, results, test)) + " |" for name, results in runs.items()]
    return "\n".join(lines)


def write_chart(runs: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Grouped bars per run: the student's last-epoch and best-epoch top-1, error bars one sample std; the
    run's teacher and CE-only baseline student (last epoch, mean over seeds) as level marks over the group.
    With a test split, one bar per run, the test top-1, and the teacher's and CE-only student's test top-1 as
    the marks."""
    names = list(runs)
    test = _has_test(runs)
    width = 0.38
    series = (
        [(0.0, "test_top1", "student, test")]
        if test
        else [(-width / 2, "top1", "student, last epoch"), (width / 2, "best_top1", "student, best epoch")]
    )
    level_key = "test_top1" if test else "top1"
    fig = Figure(figsize=(max(5.0, 1.8 * len(names) + 2.5), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    levels: list[float] = []  # every drawn value, bar ends included, to place the axis
    for offset, key, label in series:
        spreads = [_spread(runs[n]["models"]["student"].get(key)) for n in names]
        means = [np.nan if m is None else m for m, _ in spreads]
        errors = [s for _, s in spreads]
        bars = ax.bar(x + offset, means, width, yerr=errors, capsize=4, label=label)
        ax.bar_label(
            bars, labels=[fmt(m) if np.isfinite(m) else "" for m in means], padding=2, fontsize="small"
        )
        for mean, error in zip(means, errors, strict=True):
            if np.isfinite(mean):
                levels += [mean - error, mean + error]
    for role, style, label in (("teacher", "k-", "teacher"), ("baseline", "k:", "CE-only student")):
        for i, name in enumerate(names):
            models = runs[name]["models"]
            level = _spread(models[role].get(level_key))[0] if role in models else None
            if level is not None:
                ax.plot([i - width, i + width], [level, level], style, lw=2, label=label)
                label = None  # one legend entry per role
                levels.append(level)
    ax.set_xticks(x, [f"{n}\n{' + '.join(runs[n]['method'])}" for n in names], fontsize="small")
    # the differences between methods are a few points: the axis starts 5-10 points below the lowest value
    floor = max(0.0, np.floor(min(levels, default=0.0) / 5.0) * 5.0 - 5.0)
    top = max(levels, default=100.0)
    ax.set_ylim(floor, top + 0.15 * (top - floor) + 0.5)
    ax.set_ylabel(f"top-1 (%), axis from {floor:g}")
    split = "test" if test else "validation"
    ax.set_title(f"distilled student {split} top-1 per run (error bars: std over seeds)", fontsize="medium")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def _names(folders: Sequence[Path]) -> list[str]:
    """Each run by its folder name, or by its path where two folders share a name."""
    short = [f.name or str(f) for f in folders]
    return [str(f) if short.count(s) > 1 else s for f, s in zip(folders, short, strict=True)]


def compare(folders: Sequence[Path], out: Path) -> str:
    """Read every run, then write ``out/compare.md`` and ``out/compare.png``; returns the table."""
    runs = {name: read_results(folder) for name, folder in zip(_names(folders), folders, strict=True)}
    text = table(runs)
    check_writable(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    listed = "\n".join(f"- {name}: `{folder}`" for name, folder in zip(runs, folders, strict=True))
    atomic_write(out / "compare.md", f"# kdfast comparison\n\n{text}\n\n![top-1](compare.png)\n\n{listed}\n")
    write_chart(runs, out / "compare.png")
    return text


def main(argv: list[str] | None = None) -> int:
    """``python -m kdfast.compare``: exit 0 when the table is written, 2 on a bad folder or argument."""
    parser = ArgumentParser(
        prog="kdfast.compare",
        description="One table (Markdown + PNG bar chart) of finished kdfast.train runs: method, teacher, "
        "student, last- and best-epoch top-1 (mean +- std over seeds), images/s, wall time.",
    )
    parser.add_argument(
        "runs", nargs="+", type=Path, metavar="RUN_DIR", help="output folders of kdfast.train"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="where compare.md/.png go")
    try:
        args = parser.parse_args(argv)
        print(compare(args.runs, args.out))
    except UsageError as exc:
        print(f"kdfast.compare: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # a full disk, a folder that became unwritable
        where = f" {exc.filename}" if exc.filename else ""
        print(
            f"kdfast.compare: error: cannot write{where}: {exc.strerror or exc}; choose another --out",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
