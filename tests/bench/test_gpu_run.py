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
    "gpu tests",
    "kernel benchmarks",
    "train step eager",
    "train step compiled",
    "export",
    "qad",
]


def _gpu_sh(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)  # the driver sets what its steps need
    command = ["bash", str(ROOT / "bench" / "gpu.sh"), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_every_result(tmp_path):
    out = tmp_path / "run"
    done = _gpu_sh("--dry-run", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
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
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert {r["extra_info"]["piece"] for r in train} == {"teacher_forward", "ce_step", "distill_step"}
    assert all(r["extra_info"]["images_per_s"] > 0 for r in train)
    report = json.loads((out / "export" / "report.json").read_text())
    assert any(row["backend"] == "onnxruntime" for row in report["rows"])
    qad = json.loads((out / "qad" / "qad.json").read_text())
    assert len(qad["epochs"]) == 1 and {"ptq_int8", "qad_int8"} <= set(qad)
    results = (out / "RESULTS.md").read_text()
    for step in STEPS:
        assert f"| {step} |" in results, step
    assert "## ssim_cosine fwd+bwd" in results and "## Summary against the targets" in results
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The summary table comes last on stdout.
    assert done.stdout.rstrip().splitlines()[-1].startswith("results: ")
    assert "| measured | value | target |" in done.stdout.split("=== summary ===")[-1]


def test_refuses_a_folder_that_holds_results(tmp_path):
    (tmp_path / "RESULTS.md").write_text("an earlier run")
    done = _gpu_sh("--dry-run", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path} already exists and is not an empty folder; pick a new one"
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]
    assert (tmp_path / "RESULTS.md").read_text() == "an earlier run"
