"""Everything that needs a GPU, in one command that writes each result as soon as it exists (bench/gpu.sh).

    bash bench/gpu.sh OUTDIR             # one H100/H200: an 8-minute plan, Triton and Inductor compiles in
    bash bench/gpu.sh --dry-run OUTDIR   # the same plan on CPU: tiny shapes, the Triton interpreter (CI)

The plan (``PLAN``) is printed first: each step's cap, its estimated compile share and whether it fits the
8-minute budget. What needs no compilation runs first, so the figures of a cut-short call are the cheap ones
and the late steps are the ones that compile; the caps add up to no more than the budget, so each step that
starts gets its whole cap (the last one whatever is left). A step that fails or runs out of time is recorded
and the run goes on with the next:

1. environment: GPU, driver, torch, triton, CUDA, python, date -> ``env.json``
2. one epoch of ``python -m kdfast.train --qad`` on the export's student (eager), then
   ``python -m export.qad`` (ONNX Runtime) -> ``qad/``
3. ``python -m export.trt`` of a student (edge_cnn, built untrained and saved as kdfast.train would) on CUDA,
   eager baseline only (no torch.compile) -> ``export/`` (exit 3, no TensorRT here, counts as done)
4. the headline kernel benchmarks (``bench/shapes.py``) -> ``kernels.jsonl``
5. ``pytest -m gpu`` (in three shards run side by side, so Triton compiles on three cores) -> ``pytest_gpu_*``
   (each test's seed in the log's summary)
6. the AGKD paper-pair training step (VGG19 + ViT-B/16 -> EfficientNet-B0, 224x224, batch 128, bf16), eager,
   then compiled at batch 32 (Inductor's compile of the pair is most of that step) -> ``train.jsonl``

Compile time is a figure of its own: every benchmark case records its first call (Triton JIT and autotuning,
or Inductor) as ``first_call_s``, and each step's row adds them up. pytorch-msssim, the hybrid loss's
baseline, travels as a wheel (``bench/wheels/``), unpacked by bench/gpu.sh into a temporary folder.

After every step ``RESULTS.md`` and ``results.png`` in OUTDIR are rendered again from what exists (a real run
also writes ``bench/RESULTS.md`` and ``bench/results_gpu.png``); the summary against the targets and the step
table are printed last. Exit 0: every step passed; 1: a step failed or timed out; 2: bad usage (OUTDIR must be
new or empty: nothing of an earlier run is touched).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from render_results import render, summary_table  # noqa: E402

from kdfast.atomic import atomic_write  # noqa: E402

BUDGET_S = 480  # the whole run on a GPU: 8 minutes, inside the call's 10 with the machine's start
DRY_FACTOR = 3  # a dry run on 2 shared CPU cores: the same plan, each cap tripled (the ceiling, not the time)


@dataclass(frozen=True)
class Planned:
    """A step of the plan: its cap on a GPU (seconds; a dry run multiplies it by DRY_FACTOR) and the part of
    it estimated to go to compilation (Triton JIT and autotuning, Inductor, AOTInductor)."""

    name: str
    cap_s: int
    compile_s: int
    why: str


# In this order. Compile estimates: about 1-3 s per Triton specialization on an H100 host (the headline
# benchmarks make ~40, the gpu tests ~120, on three cores), Inductor 40-90 s for the paper pair's compiled
# step at batch 32, AOTInductor ~20 s for the edge student.
PLAN = [
    Planned("environment", 5, 0, "no compilation"),
    Planned("qad", 45, 0, "eager fake quantization and ONNX Runtime: no compilation, a guaranteed slot"),
    Planned("export", 60, 20, "AOTInductor of a small student; the eager baseline only"),
    Planned("kernel benchmarks", 100, 45, "headline shapes: Triton JIT and autotuning of ~40 launches"),
    Planned("gpu tests", 120, 80, "three shards side by side: ~120 specializations"),
    Planned("train step eager", 45, 15, "the paper pair's kernels at 14x14 maps"),
    Planned("train step compiled", 105, 75, "Inductor on the paper pair at batch 32"),
]
COMPILED_STEP_BATCH = 32
DRY_SKIP = "not run in a dry run"
TEST_SHARDS = {"ssim": "ssim", "attention_kl": "attention_kl", "rest": "not ssim and not attention_kl"}


@dataclass
class Step:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    logs: list[str] = field(default_factory=list)
    detail: str = ""


class Run:
    """The output folder, the time budget, and how each step went."""

    def __init__(self, out: Path, dry_run: bool) -> None:
        self.out = out
        self.dry_run = dry_run
        self.budget = BUDGET_S * (DRY_FACTOR if dry_run else 1)
        self.deadline = time.monotonic() + self.budget
        self.steps: list[Step] = []
        self.python = sys.executable
        # ROOT first, then what bench/gpu.sh put on PYTHONPATH (the unpacked pytorch-msssim wheel).
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
        if dry_run:
            self.env.update(KDFAST_BENCH_DRY="1", TRITON_INTERPRET="1")
        self.env["KDFAST_BENCH_HEADLINE"] = "1"

    def timeout(self, name: str) -> float:
        """The step's cap, or what is left of the budget when less; the last step gets all that is left."""
        left = self.deadline - time.monotonic()
        if name == PLAN[-1].name:
            return max(0.0, left)
        (planned,) = [p for p in PLAN if p.name == name]
        return max(0.0, min(planned.cap_s * (DRY_FACTOR if self.dry_run else 1), left))

    def start(self, command: list[str], log: Path, env: dict | None = None, echo: bool = True):
        """A process in its own session (a timeout ends all of it), its output into ``log`` and echoed."""
        handle = open(log, "w")  # closed by finish()
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

        def pump() -> None:
            for line in proc.stdout:
                handle.write(line)
                handle.flush()
                if echo:
                    print(line, end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        return proc, reader, handle

    @staticmethod
    def finish(proc, reader, handle, deadline: float) -> int | None:
        """The exit code, or None after killing the process group at ``deadline``."""
        try:
            code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        reader.join(timeout=5)
        handle.close()
        return code

    def run_step(self, name: str, commands: list[tuple[list[str], str, dict | None]], ok=(0,)) -> Step:
        """Run ``commands`` side by side ((argv, log name, extra env) each) as one step under one timeout."""
        step = Step(name)
        self.steps.append(step)
        limit = self.timeout(name)
        print(f"\n=== {name} (at most {limit:.0f} s) ===", flush=True)
        if limit <= 0:
            step.status = "skipped: the time budget is spent"
            return step
        start = time.monotonic()
        echo = len(commands) == 1
        running = [self.start(argv, self.out / log, env, echo) + (log,) for argv, log, env in commands]
        codes = [self.finish(*r[:3], start + limit) for r in running]
        step.seconds = time.monotonic() - start
        step.logs = [r[3] for r in running]
        if not echo:
            for (_, _, _, log), code in zip(running, codes, strict=True):
                tail = (self.out / log).read_text().strip().splitlines()[-1:] or [""]
                print(f"[{log}] exit {code}: {tail[0]}", flush=True)
        if any(code is None for code in codes):
            step.status = f"timed out after {limit:.0f} s"
        elif all(code in ok for code in codes):
            step.status = "passed"
        else:
            step.status = f"failed (exit {', '.join(str(c) for c in codes)})"
        return step

    def render(self) -> list:
        """RESULTS.md and results.png in OUTDIR (and bench/ on a real run) from every result so far."""
        env = json.loads((self.out / "env.json").read_text()) if (self.out / "env.json").exists() else {}
        title = "GPU run (bench/gpu.sh)" if not self.dry_run else "Dry run of bench/gpu.sh (CPU, tiny shapes)"
        notes = ["## Steps", "", *step_table(self.steps), ""]
        results = [self.out / "kernels.jsonl", self.out / "train.jsonl"]
        targets = [(self.out / "RESULTS.md", self.out / "results.png")]
        if not self.dry_run:
            targets.append((ROOT / "bench" / "RESULTS.md", ROOT / "bench" / "results_gpu.png"))
        items = []
        for md, png in targets:
            items = render(results, md, png, env=env, title=title, notes=notes)
        return items


def plan_lines(budget: float, factor: int) -> list[str]:
    """The plan as printed first: each step's cap, its compile estimate, and whether it fits the budget."""
    total = sum(p.cap_s for p in PLAN) * factor
    compiling = sum(p.compile_s for p in PLAN) * factor
    lines = [
        f"plan: {len(PLAN)} steps, caps {total} s of a {budget:.0f} s budget, compilation estimated at"
        f" {compiling} s of them ({100 * compiling / total:.0f}%)",
    ]
    used = 0
    for i, p in enumerate(PLAN, 1):
        used += p.cap_s * factor
        fits = "runs" if used <= budget else "may be cut short: past the budget"
        lines.append(
            f"  {i}. {p.name}: at most {p.cap_s * factor} s, ~{p.compile_s * factor} s compiling ({p.why});"
            f" {fits} (ends by {used} s)"
        )
    return lines


def first_calls(path: Path, skip: int) -> tuple[int, float]:
    """(cases, seconds) of the first calls recorded in a JSON-lines file after its first ``skip`` lines."""
    if not path.exists():
        return 0, 0.0
    lines = path.read_text().splitlines()[skip:]
    seconds = [json.loads(line)["extra_info"].get("first_call_s", 0.0) for line in lines]
    return len(seconds), sum(seconds)


def step_table(steps: list[Step]) -> list[str]:
    lines = ["| step | status | seconds | detail | logs |", "| --- | --- | ---: | --- | --- |"]
    for s in steps:
        lines.append(
            f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.detail or '-'} | {', '.join(s.logs) or '-'} |"
        )
    return lines


def environment(run: Run, name: str) -> Step:
    """GPU, driver, library versions and date into env.json (no subprocess but nvidia-smi)."""
    import torch
    import triton

    step = Step(name)
    run.steps.append(step)
    start = time.monotonic()
    env = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dry_run": run.dry_run,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability(0))
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"]
            driver, memory = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.split(
                ","
            )[:2]
            env.update(driver=driver.strip(), memory=memory.strip())
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            env["driver"] = f"unknown ({type(exc).__name__})"
    else:
        env["gpu"] = "none (CPU dry run)" if run.dry_run else "none"
    atomic_write(run.out / "env.json", json.dumps(env, indent=1))
    print(json.dumps(env, indent=1), flush=True)
    step.status, step.seconds, step.logs = "passed", time.monotonic() - start, ["env.json"]
    step.detail = f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}"
    return step


def junit_counts(paths: list[Path]) -> str:
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for path in paths:
        if path.exists():
            for suite in ET.parse(path).getroot().iter("testsuite"):
                for key in totals:
                    totals[key] += int(suite.get(key, 0))
    passed = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    failed, errors, skipped = totals["failures"], totals["errors"], totals["skipped"]
    return f"{passed} passed, {failed} failed, {errors} errors, {skipped} skipped"


def gpu_test_files() -> list[str]:
    """The test files that hold a ``gpu``-marked test: collecting only these skips importing the rest."""
    tests = (ROOT / "tests").rglob("test_*.py")
    return sorted(str(p.relative_to(ROOT)) for p in tests if "mark.gpu" in p.read_text())


def gpu_tests(run: Run, name: str) -> Step:
    commands = []
    files = gpu_test_files()
    for shard, expression in TEST_SHARDS.items():
        xml = run.out / f"pytest_gpu_{shard}.xml"
        argv = [
            run.python,
            "-m",
            "pytest",
            *files,
            "-m",
            "gpu",
            "-k",
            expression,
            "-q",
            "-p",
            "no:cacheprovider",
        ]
        argv += ["--continue-on-collection-errors", f"--junitxml={xml}"]
        commands.append((argv, f"pytest_gpu_{shard}.log", None))
    # pytest exits 5 when a shard selects no test at all (skipped tests count as selected).
    step = run.run_step(name, commands, ok=(0, 5))
    step.detail = junit_counts([run.out / f"pytest_gpu_{s}.xml" for s in TEST_SHARDS])
    return step


def benchmarks(
    run: Run,
    name: str,
    files: list[str],
    jsonl: str,
    log: str,
    select: str | None = None,
    env: dict | None = None,
) -> Step:
    """pytest-benchmark cases appending each result to ``jsonl`` as it finishes (bench/conftest.py)."""
    argv = [run.python, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "--benchmark-disable-gc"]
    argv += ["-k", select] if select else []
    results = run.out / jsonl
    before = len(results.read_text().splitlines()) if results.exists() else 0
    step = run.run_step(name, [(argv, log, {"KDFAST_BENCH_JSONL": str(results), **(env or {})})])
    cases, seconds = first_calls(results, before)
    step.detail = f"{cases} cases; first calls (compile, autotune, warm-up) {seconds:.1f} s"
    return step


def write_student(path: Path) -> bool:
    """An untrained edge_cnn student saved as kdfast.train saves one. Returns whether its digits data can be
    rebuilt (scikit-learn present); if not, the export verifies on random inputs."""
    import torch

    from kdfast.checkpoint import save_checkpoint
    from kdfast.config import CONFIG_DIR, load_config
    from kdfast.models import build_model

    arch = {"source": "kdfast", "name": "edge_cnn", "kwargs": {"num_classes": 10}}
    torch.manual_seed(0)
    model = build_model(arch).eval()
    cfg = load_config(CONFIG_DIR / "default.yaml", ["data.max_val_samples=64", "data.max_train_samples=64"])
    try:
        from kdfast.data import build_datasets

        info = build_datasets(cfg.data, seed=0)[2]
        mean, std, classes, record, has_data = info.mean, info.std, info.classes, info.record, True
    except ImportError:
        mean, std, classes, record, has_data = [0.5] * 3, [0.25] * 3, [str(i) for i in range(10)], {}, False
    save_checkpoint(
        path,
        model,
        arch=arch,
        input={"size": [3, 32, 32], "mean": list(mean), "std": list(std)},
        classes=list(classes),
        data=record,
        metrics={},
        config=cfg.to_dict(),
    )
    return has_data


def export(run: Run, name: str) -> Step:
    """``python -m export.trt`` with its existing CLI; a dry run keeps to ONNX Runtime fp32 and the TensorRT
    seam (AOTInductor, INT8 calibration and the compiled baseline take minutes on a CPU)."""
    folder = run.out / "export"
    folder.mkdir()
    has_data = write_student(folder / "student.pt")
    argv = [run.python, "-m", "export.trt", "--model", str(folder / "student.pt"), "--out", str(folder)]
    argv += ["--max-batch", "8", "--calib-samples", "32", "--min-time-s", "0.05"]
    if run.dry_run:
        argv += ["--backends", "ort", "trt", "--precision", "fp32", "--baselines", "eager"]
        argv += ["--verify-samples", "16", "--iters", "5"]
    else:
        argv += ["--backends", "ort", "aoti", "trt", "--verify-samples", "64", "--iters", "20"]
        # torch.compile of the student as a baseline would be one more Inductor compile in the budget.
        argv += ["--baselines", "eager"]
        # The student is untrained: its INT8 top-1 agreement and drop say nothing about quantization (its
        # near-uniform logits flip classes under any rounding), so those two gates are opened here; fp32 and
        # fp16 parity keep their gates. This step checks the CUDA export path, not INT8 accuracy.
        argv += ["--int8-min-agreement", "0", "--int8-max-drop", "100"]
    if not has_data:
        argv.append("--random-inputs")
    step = run.run_step(name, [(argv, "export.log", None)], ok=(0, 3))
    report = folder / "report.json"
    if report.exists():
        step.detail = str(json.loads(report.read_text()).get("status", "report written"))[:200]
    return step


def qad(run: Run, name: str) -> Step:
    """``python -m kdfast.train --qad`` for one epoch on the export step's student: the fake quantization
    and its straight-through backward on CUDA, then PTQ and QAD INT8 measured with ONNX Runtime by
    ``python -m export.qad`` (the
    student is untrained: the figures say nothing about QAD, the step checks that it runs)."""
    student = run.out / "export" / "student.pt"
    if not student.exists():
        (run.out / "qad-source").mkdir()
        student = run.out / "qad-source" / "student.pt"
        if not write_student(student):
            step = Step(name, status="skipped: scikit-learn's digits are not installed (QAD trains on data)")
            run.steps.append(step)
            return step
    train = [run.python, "-m", "kdfast.train", "--qad", str(student), "--out", str(run.out / "qad")]
    train += ["--set", "qad.epochs=1", "--set", "qad.calibration_images=32", "--set", "qad.batch_size=32"]
    measure = [run.python, "-m", "export.qad", "--model", str(run.out / "qad" / "student.pt")]
    # one after the other in one step: the export measures the student the QAD run wrote
    argv = ["sh", "-c", f"{shlex.join(train)} && {shlex.join(measure)}"]
    step = run.run_step(name, [(argv, "qad.log", None)])
    summary, comparison = run.out / "qad" / "qad.json", run.out / "qad" / "ptq_vs_qad.json"
    if summary.exists() and comparison.exists():
        data, drops = json.loads(summary.read_text()), json.loads(comparison.read_text())
        step.detail = (
            f"PTQ drop {drops['ptq_int8']['drop']:+.2f}, QAD drop {drops['qad_int8']['drop']:+.2f} points "
            f"(untrained student), QAD {data['seconds']:.0f} s"
        )
    return step


KERNEL_BENCHMARKS = [
    "bench/test_kernels_ssim.py",
    "bench/test_kernels_attention_kl.py",
    "bench/test_kernels_attention_map.py",
]
TRAIN = ["bench/test_train_step.py"]


def train_compiled(run: Run, name: str) -> Step:
    """Compiled step, teacher forward and CE step (Inductor) at a batch of COMPILED_STEP_BATCH; a dry run
    records it as skipped: compiling the paper pair on a CPU takes far longer than the dry run's budget."""
    if run.dry_run:
        step = Step(name, status=DRY_SKIP, detail="Inductor on CPU takes minutes")
        run.steps.append(step)
        return step
    env = {"KDFAST_BENCH_PAPER_BATCH": str(COMPILED_STEP_BATCH)}
    return benchmarks(run, name, TRAIN, "train.jsonl", "train_compiled.log", "paper_pair and compiled", env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a new (or empty) folder for the results")
    parser.add_argument("--dry-run", action="store_true", help="on CPU, tiny shapes, the Triton interpreter")
    args = parser.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        print(f"error: {args.out} already exists and is not an empty folder; pick a new one", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out.resolve(), args.dry_run)
    print("\n".join(plan_lines(run.budget, DRY_FACTOR if args.dry_run else 1)), flush=True)
    steps = {
        "environment": environment,
        "qad": qad,
        "export": export,
        "kernel benchmarks": lambda r, n: benchmarks(r, n, KERNEL_BENCHMARKS, "kernels.jsonl", "kernels.log"),
        "gpu tests": gpu_tests,
        "train step eager": lambda r, n: benchmarks(
            r, n, TRAIN, "train.jsonl", "train_eager.log", "paper_pair and eager"
        ),
        "train step compiled": train_compiled,
    }
    items = []
    for name, do in ((p.name, steps[p.name]) for p in PLAN):
        # A step, or the rendering, that the driver itself fails on is recorded; the next step still runs.
        try:
            do(run, name)
        except Exception as exc:
            if not run.steps or run.steps[-1].name != name:
                run.steps.append(Step(name))
            run.steps[-1].status = f"driver error: {type(exc).__name__}: {exc}"[:300]
        try:
            items = run.render()
        except Exception as exc:
            print(f"error: rendering the results failed ({type(exc).__name__}: {exc})", flush=True)
    print("\n=== summary ===")
    print("\n".join(step_table(run.steps)))
    print()
    print("\n".join(summary_table(items)) if items else "(no benchmark figures)")
    print(f"\nresults: {run.out / 'RESULTS.md'}")
    return 0 if all(s.status in ("passed", DRY_SKIP) for s in run.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
