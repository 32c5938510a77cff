"""``python -m kdfast.benchmark``: a suite's whole distillation comparison in one resumable command.

The Fashion-MNIST suite (``configs/benchmarks/fashion_mnist/``): its teachers (a CNN, and a ViT for the
cross-architecture methods) are trained once, on the full training split; then every method's config runs
over the seeds (:func:`kdfast.train.loop.run_seeds`), reading its teacher's file. The CE-only student of
each student architecture is the baseline stage of one reference run per architecture (``kd`` for the CNN
student, ``mtd`` for the ViT, ``titn`` for the TNT): for a seed it starts from the same weights and sees the
data in the same order as that seed's distilled students. What comes out, in ``--out``:

- ``benchmark.md``: per method the test top-1 (mean ± sample std over seeds), its gain over its CE-only
  student with the two standard deviations summed beside it, and whether the gain exceeds them; validation
  top-1, images/s and wall time per run (:func:`kdfast.compare.table`); the teachers and CE-only students;
  the machine, its load at the start and the end, the library versions;
- ``benchmark.png``: test top-1 per method with error bars, the CE-only student and the teacher as marks
  (:func:`kdfast.compare.write_chart`);
- ``benchmark.json``: the same numbers; each run's folder (a ``kdfast.train`` run over seeds) beside them.

Running the same command again continues it: a finished run is read, not redone; an unfinished one resumes
from its last finished epoch; more seeds than before add the new seeds. A folder holding a run of another
config is refused (exit 2), so two comparisons never mix. Two invocations with different ``--methods`` may
share one ``--out`` (one per core): a run the other is training is waited for (a lock per run), then read.
Where this kdfast has the teacher-output cache (``runtime.teacher_cache``), ``--teacher-cache`` switches
it for the students' runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from kdfast.atomic import atomic_write
from kdfast.errors import (
    EXIT_BAD_INPUT,
    EXIT_GATE_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    TrainingDiverged,
    TrainingInterrupted,
    UsageError,
)
from kdfast.schema import closest

TEACHER_CACHE = "teacher_cache"  # the RuntimeConfig field of the teacher-output cache, where kdfast has one
SECONDS = "benchmark_seconds.json"  # per run, the wall seconds of the invocations that trained it


@dataclass(frozen=True)
class Entry:
    """One method's run: its bundled config, the teacher run whose ``teacher.pt`` it reads, and the student
    architecture whose CE-only student it is compared with."""

    name: str
    teacher: str
    student: str

    def config(self, folder: str) -> str:
        return f"{folder}/{self.name}"


@dataclass(frozen=True)
class Suite:
    """A comparison: bundled configs in ``folder``, the teacher runs (name -> config), the methods, and per
    student architecture the entry whose baseline stage trains its CE-only student."""

    folder: str
    teachers: tuple[str, ...]
    entries: tuple[Entry, ...]
    references: dict[str, str]


CNN, VIT = "teacher", "vit_teacher"
SUITES = {
    "fashion_mnist": Suite(
        folder="benchmarks/fashion_mnist",
        teachers=(CNN, VIT),
        entries=(
            *(
                Entry(name, CNN, "cnn")
                for name in (
                    "kd",
                    "kd_ls",
                    "dkd",
                    "dist",
                    "fitnet",
                    "at",
                    "rkd",
                    "crd",
                    "reviewkd",
                    "ofa",
                    "agkd",
                    "sokd",
                )
            ),
            Entry("cakd", VIT, "cnn"),
            Entry("mtd", VIT, "vit"),
            Entry("titn", CNN, "tnt"),
        ),
        references={"cnn": "kd", "vit": "mtd", "tnt": "titn"},
    )
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; ``seeds`` parsed to a list, ``out`` defaulted to ``runs/benchmarks/<suite>``."""
    from kdfast.compare import ArgumentParser  # matplotlib loads with it: only once the command runs

    parser = ArgumentParser(
        prog="python -m kdfast.benchmark",
        description="Train a suite's teachers once, every method over the seeds, and write the comparison "
        "(benchmark.md/.json/.png). Run the same command again to continue it.",
    )
    parser.add_argument("--suite", choices=list(SUITES), default="fashion_mnist")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/benchmarks/<suite>)")
    parser.add_argument(
        "--methods", nargs="+", metavar="NAME", help="only these methods (and their CE-only references)"
    )
    parser.add_argument("--seeds", default="0,1,2", metavar="S,S,...", help="seeds of every method's run")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key in every run, the teachers' included (repeatable)",
    )
    parser.add_argument(
        "--teacher-cache",
        choices=("auto", "on", "off"),
        default="auto",
        help=f"runtime.{TEACHER_CACHE} of the students' runs, where this kdfast has the teacher-output cache",
    )
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(part) for part in args.seeds.split(",")]
    except ValueError:
        raise UsageError(
            f"--seeds takes comma-separated integers such as 0,1,2, got {args.seeds!r}"
        ) from None
    args.out = args.out if args.out is not None else Path("runs/benchmarks") / args.suite
    return args


def select(suite: Suite, methods: Sequence[str] | None) -> tuple[list[str], list[Entry]]:
    """The teacher runs and the entries a selection needs, in suite order: the methods asked for, the
    reference entry of each of their students (its CE-only student), and the teachers these read."""
    names = [entry.name for entry in suite.entries]
    for name in methods or ():
        if name not in names:
            raise UsageError(
                f"--methods: the {suite.folder} suite has no method {name!r}: {closest(name, names)}"
            )
    wanted = set(methods or names)
    wanted |= {suite.references[e.student] for e in suite.entries if e.name in wanted}
    entries = [entry for entry in suite.entries if entry.name in wanted]
    teachers = [name for name in suite.teachers if any(entry.teacher == name for entry in entries)]
    return teachers, entries


def cache_overrides(mode: str) -> list[str]:
    """``runtime.teacher_cache=<mode>`` where this kdfast's run schema has the teacher-output cache; without
    one, "on" cannot be honoured (a UsageError) and "auto" / "off" ask for nothing."""
    from kdfast.config import RuntimeConfig

    if TEACHER_CACHE in {f.name for f in dataclasses.fields(RuntimeConfig)}:
        return [f"runtime.{TEACHER_CACHE}={mode}"]
    if mode == "on":
        raise UsageError(
            f"--teacher-cache on: this kdfast has no teacher-output cache (runtime.{TEACHER_CACHE}): use "
            "--teacher-cache auto or off"
        )
    return []


def _design(raw: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs the same experiment: the config without its folder, seeds and runtime (threads,
    progress and the cache change how fast a run goes, not what it computes)."""
    return {key: value for key, value in raw.items() if key not in ("out", "seeds", "runtime")}


def check_folder(folder: Path, cfg: Any) -> bool:
    """Whether ``folder`` holds an earlier run of this very experiment to continue (False: nothing there
    yet); a run of another config, or files without a run's config.yaml, is a UsageError."""
    from kdfast.config import config_from_dict
    from kdfast.train import rundir

    saved = folder / "config.yaml"
    if not saved.is_file():
        if rundir.run_files(folder):
            raise UsageError(f"{folder} holds run files but no config.yaml: move it away to rerun it")
        return False
    earlier = _design(config_from_dict(yaml.safe_load(saved.read_text())).to_dict())
    now = _design(cfg.to_dict())
    if earlier != now:
        changed = sorted(key for key in set(earlier) | set(now) if earlier.get(key) != now.get(key))
        raise UsageError(
            f"{folder} holds a run of another config (it differs in {', '.join(changed)}): give another "
            "--out, or move that folder away"
        )
    return True


def _finished(folder: Path, seeds: list[int] | None) -> bool:
    path = folder / "results.json"
    if not path.is_file():
        return False
    return seeds is None or json.loads(path.read_text()).get("seeds") == seeds


@dataclass
class Plan:
    """The runs of one invocation, each a validated Config, in the order they run."""

    teachers: dict[str, Any]  # teacher run name -> Config (a single run)
    entries: dict[str, Any]  # method name -> Config (a run over seeds)
    suite: Suite
    out: Path


def plan(args: argparse.Namespace) -> Plan:
    """Every run's config loaded and validated before anything trains, so bad input stops the command
    before it writes. A method's teacher file does not exist yet: its configs are checked without it, and
    ``teacher.weights`` is set to the teacher run's ``teacher.pt`` afterwards."""
    from kdfast.config import load_config

    suite = SUITES[args.suite]
    teacher_names, entries = select(suite, args.methods)
    teachers = {}
    for name in teacher_names:
        cfg = load_config(f"{suite.folder}/{name}", args.set)
        cfg.out = str(args.out / name)
        teachers[name] = cfg
    cache = cache_overrides(args.teacher_cache)
    configs = {}
    for entry in entries:
        baseline = suite.references[entry.student] == entry.name
        overrides = [*args.set, *cache, f"baseline={str(baseline).lower()}", "teacher.weights=null"]
        cfg = load_config(entry.config(suite.folder), overrides)
        cfg.teacher.weights = str(args.out / entry.teacher / "teacher.pt")
        cfg.seeds, cfg.out = list(args.seeds), str(args.out / entry.name)
        configs[entry.name] = cfg
    return Plan(teachers, configs, suite, args.out)


@contextlib.contextmanager
def _run_lock(out: Path, name: str, say: Any) -> Iterator[None]:
    """Hold ``out/.<name>.lock`` while run ``name`` trains: two invocations on one folder (one per core,
    with different ``--methods``) never train the same run at once; the second waits, then reads it."""
    with open(out / f".{name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"benchmark: {name} is being trained by another invocation on {out}: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_all(work: Plan, say: Any) -> dict[str, float]:
    """Train what is not finished yet, in order, with one progress bar over the runs (rate and ETA). Every
    run's folder is checked (:func:`check_folder`) before the first one trains, and each again under its
    run's lock (:func:`_run_lock`) before it is read or trained. The seconds each run took, summed over the
    invocations that trained it, are kept in ``SECONDS`` (read, added to and written after every run under
    a lock of its own, so what other invocations wrote is kept) and returned."""
    from kdfast.train.loop import run_seeds, run_training

    runs = [*work.teachers.items(), *work.entries.items()]
    for _, cfg in runs:  # every folder checked before anything trains
        check_folder(Path(cfg.out), cfg)
    units = len(work.teachers) + sum(len(cfg.seeds) for cfg in work.entries.values())
    path = work.out / SECONDS

    def seconds() -> dict[str, float]:  # read anew each time: another invocation may have added runs
        return json.loads(path.read_text()) if path.is_file() else {}

    spent = seconds()
    with tqdm(total=units, desc="benchmark", unit="run", dynamic_ncols=True) as bar:
        for name, cfg in runs:
            folder = Path(cfg.out)
            seeds = cfg.seeds
            count = 1 if seeds is None else len(seeds)
            with _run_lock(work.out, name, say):
                resume = check_folder(folder, cfg)  # under the lock: another invocation may have run it
                if resume and _finished(folder, seeds):
                    bar.update(count)
                    continue
                bar.set_postfix_str(name)
                say(f"benchmark: {name} ({'resuming' if resume else 'starting'}, {folder})")
                started = time.perf_counter()
                if seeds is None:
                    run_training(cfg, resume=resume)
                else:
                    run_seeds(cfg, resume=resume)
            took = time.perf_counter() - started
            with open(work.out / f".{SECONDS}.lock", "a") as lock:  # read, add and write as one step
                fcntl.flock(lock, fcntl.LOCK_EX)
                spent = seconds()
                spent[name] = spent.get(name, 0.0) + took
                atomic_write(path, json.dumps(spent, indent=2) + "\n")
            bar.update(count)
    return spent


def _entry_results(work: Plan) -> dict[str, dict]:
    """Each method's seeds summary, with its student architecture's CE-only row as ``baseline``."""
    from kdfast.results import read_results

    read = {name: read_results(Path(cfg.out)) for name, cfg in work.entries.items()}
    students = {entry.name: entry.student for entry in work.suite.entries}
    for name, results in read.items():
        reference = read[work.suite.references[students[name]]]
        results["models"]["baseline"] = reference["models"]["baseline"]
    return read


def _model_rows(work: Plan, entries: dict[str, dict]) -> str:
    """The teachers' and CE-only students' table: test and validation top-1, parameters, images/s, wall."""
    from kdfast.results import fmt, read_results

    rows = {
        f"teacher: {name}": read_results(Path(cfg.out))["models"]["teacher"]
        for name, cfg in work.teachers.items()
    }
    for student, reference in work.suite.references.items():
        if reference in entries:
            rows[f"CE-only student: {student}"] = entries[reference]["models"]["baseline"]
    lines = [
        "| model | arch | params | test top-1 (%) | val top-1 (%) | images/s | wall (s) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, row in rows.items():
        cells = [
            label,
            row["arch"],
            f"{row['params']:,}",
            fmt(row.get("test_top1")),
            fmt(row["top1"]),
            fmt(row.get("images_per_s"), ".0f"),
            fmt(row.get("wall_s"), ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(threads: int) -> dict[str, Any]:
    """The machine and the versions a timing depends on (export's record of them)."""
    from export.machine import machine_info
    from kdfast.checkpoint import versions

    return {**machine_info(threads), "versions": versions()}


def gain_verdict(points: float, spread: float) -> str:
    """A gain over the CE-only student beside the summed std: a gain or a loss only where it exceeds it."""
    if abs(points) <= spread:
        side = "within"
    else:
        side = "a gain above" if points > 0 else "a loss beyond"
    return f"{points:+.2f} points, {side} the summed std {spread:.2f}"


def write_report(work: Plan, record: dict[str, Any]) -> str:
    """``benchmark.md``, ``benchmark.png`` and ``benchmark.json`` in the output folder; returns the table."""
    from kdfast.compare import gain, table, write_chart

    entries = _entry_results(work)
    text = table(entries)
    gains = {name: gain(results) for name, results in entries.items()}
    verdict = []
    for name, found in gains.items():
        if found is not None:
            value, spread = found
            verdict.append(f"- {name}: {gain_verdict(value, spread)}")
    load = record["load"]
    notes = [
        f"# kdfast benchmark: {work.suite.folder}",
        "",
        text,
        "",
        "test top-1: the official test split, the last epoch's weights; val: the validation split carved "
        "from the training set (the last epoch; best: its best epoch). gain: the student's mean test top-1 "
        "minus its CE-only student's, beside the two sample standard deviations summed.",
        "",
        "Gain over the CE-only student:",
        *verdict,
        "",
        "![test top-1 per method](benchmark.png)",
        "",
        _model_rows(work, entries),
        "",
        f"Machine: {record['machine']['cpu_model']}, {record['machine']['usable_cpus']} usable CPU(s), "
        f"{record['machine']['threads']} torch thread(s); 1-minute load {load['start']} at the start and "
        f"{load['end']} at the end of this invocation; {record['machine']['platform']}; versions "
        + ", ".join(f"{k} {v}" for k, v in record["machine"]["versions"].items()),
        "",
        "Seconds per run in the invocations that trained it: "
        + ", ".join(f"{k} {v:.0f}" for k, v in record["seconds"].items()),
    ]
    out = work.out
    atomic_write(out / "benchmark.md", "\n".join(notes) + "\n")
    write_chart(entries, out / "benchmark.png")
    summary = {
        "suite": work.suite.folder,
        "runs": {name: str(Path(cfg.out)) for name, cfg in [*work.teachers.items(), *work.entries.items()]},
        "gain": {
            name: None if g is None else {"points": g[0], "summed_std": g[1]} for name, g in gains.items()
        },
        "results": entries,
        **record,
    }
    atomic_write(out / "benchmark.json", json.dumps(summary, indent=2) + "\n")
    return text


def benchmark(args: argparse.Namespace) -> str:
    """Plan, train what is missing, write the report; returns the table."""

    import torch

    from export.machine import load_average
    from kdfast.train.rundir import check_writable

    check_writable(args.out, "--out")
    work = plan(args)
    start = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    spent = run_all(work, tqdm.write)
    record = {
        "machine": machine(torch.get_num_threads()),
        "load": {"start": start, "end": load_average()},
        "seconds": spent,
    }
    return write_report(work, record)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when the comparison is written, 1 when a run diverged, 2 on bad usage or input, 130 when
    interrupted (rerun the same command to continue)."""
    try:
        print(benchmark(parse_args(argv)))
    except UsageError as exc:
        print(f"kdfast.benchmark: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as exc:
        print(f"kdfast.benchmark: {exc}", file=sys.stderr)
        return EXIT_GATE_FAILED
    except (TrainingInterrupted, KeyboardInterrupt):
        print(
            "kdfast.benchmark: interrupted; every finished epoch is kept: run the same command again to "
            "continue",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"kdfast.benchmark: error: cannot use{where}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
