"""``bash bench/gpu.sh --dry-run``: the GPU command's driver, run on CPU at tiny shapes, so it cannot rot
unseen between the rare runs on a GPU. Every step must run and leave its result where the renderer finds
it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = [
    "environment",
    "qad",
    "export",
    "kernel benchmarks",
    "gpu tests",
    "train step eager",
    "train step compiled",
]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_run  # noqa: E402


def _gpu_sh(*args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, **env_vars}
    env.pop("TRITON_INTERPRET", None)  # the driver sets what its steps need
    command = ["bash", str(ROOT / "bench" / "gpu.sh"), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_every_result(tmp_path):
    out = tmp_path / "run"
    done = _gpu_sh("--dry-run", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The plan comes first, the same as a GPU run's with the dry run's factor, every step inside the budget.
    lines = done.stdout.splitlines()
    assert lines[: len(STEPS) + 1] == gpu_run.plan_lines(
        gpu_run.BUDGET_S * gpu_run.DRY_FACTOR, gpu_run.DRY_FACTOR
    )
    # pytorch-msssim came from the wheel bench/gpu.sh unpacked (it is not installed in CI's environment).
    kernels_log = (out / "kernels.log").read_text()
    assert "pytorch_msssim" not in kernels_log or "SKIPPED" not in kernels_log
    env = json.loads((out / "env.json").read_text())
    assert env["dry_run"] is True and env["torch"] and env["triton"]
    # Every gpu test was collected and skipped (no CUDA here), none errored.
    xml = "".join((out / f"pytest_gpu_{s}.xml").read_text() for s in ("ssim", "attention_kl", "rest"))
    assert 'errors="0"' in xml and 'failures="0"' in xml and "test_compiled_agkd_step" in xml
    kernels = [json.loads(line) for line in (out / "kernels.jsonl").read_text().splitlines()]
    groups = {r["group"].split()[0] for r in kernels}
    assert groups == {"ssim_cosine", "attention_kl", "attention_map"}
    for op in groups:
        impls = {r["extra_info"]["impl"] for r in kernels if r["group"].startswith(op)}
        assert {"triton", "reference", "compiled_reference"} <= impls, (op, impls)
    # pytorch-msssim's baseline ran: bench/gpu.sh unpacked its wheel (bench/wheels/) into a temporary folder.
    assert "pytorch_msssim" in {r["extra_info"]["impl"] for r in kernels}
    # Compile time is its own figure: each case's first call, summed in the step's row.
    assert all(r["extra_info"]["first_call_s"] >= 0 for r in kernels)
    assert all(r["extra_info"]["first_call_s"] > 0 for r in kernels if r["extra_info"]["impl"] == "triton")
    total = sum(r["extra_info"]["first_call_s"] for r in kernels)
    assert "| kernel benchmarks | passed |" in (out / "RESULTS.md").read_text()
    assert f"{len(kernels)} cases; first calls (compile, autotune, warm-up) {total:.1f} s" in done.stdout
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert {r["extra_info"]["piece"] for r in train} == {"teacher_forward", "ce_step", "distill_step"}
    assert all(r["extra_info"]["images_per_s"] > 0 for r in train)
    report = json.loads((out / "export" / "report.json").read_text())
    assert any(row["backend"] == "onnxruntime" for row in report["rows"])
    qad = json.loads((out / "qad" / "qad.json").read_text())
    assert len(qad["epochs"]) == 1
    assert {"ptq_int8", "qad_int8"} <= set(json.loads((out / "qad" / "ptq_vs_qad.json").read_text()))
    results = (out / "RESULTS.md").read_text()
    for step in STEPS:
        assert f"| {step} |" in results, step
    assert "## ssim_cosine fwd+bwd" in results and "## Summary against the targets" in results
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The summary table comes last on stdout.
    assert done.stdout.rstrip().splitlines()[-1].startswith("results: ")
    assert "| measured | value | target |" in done.stdout.split("=== summary ===")[-1]


def test_the_plan_fits_8_minutes_with_qad_before_any_compiling_step():
    assert [p.name for p in gpu_run.PLAN] == STEPS
    assert sum(p.cap_s for p in gpu_run.PLAN) <= gpu_run.BUDGET_S == 480
    # Nothing that compiles runs before QAD; the steps that compile most come last.
    assert [p.compile_s for p in gpu_run.PLAN[:2]] == [0, 0]
    lines = gpu_run.plan_lines(gpu_run.BUDGET_S, 1)
    assert lines[0].startswith(
        f"plan: 7 steps, caps {sum(p.cap_s for p in gpu_run.PLAN)} s of a 480 s budget"
    )
    assert all(line.endswith(f"(ends by {end} s)") for line, end in zip(lines[1:], _ends(), strict=True))
    assert not any("past the budget" in line for line in lines)
    # A budget too short for the plan says which steps may be cut.
    short = gpu_run.plan_lines(200, 1)
    assert "past the budget" not in short[2] and "may be cut short: past the budget" in short[-1]


def _ends() -> list[int]:
    ends, used = [], 0
    for p in gpu_run.PLAN:
        used += p.cap_s
        ends.append(used)
    return ends


def test_refuses_a_folder_that_holds_results(tmp_path):
    (tmp_path / "RESULTS.md").write_text("an earlier run")
    done = _gpu_sh("--dry-run", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path} already exists and is not an empty folder; pick a new one"
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]
    assert (tmp_path / "RESULTS.md").read_text() == "an earlier run"
