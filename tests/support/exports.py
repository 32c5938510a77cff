"""What the export tests share: the flags that keep ``python -m export.trt`` short, and the trained student
of a tiny digits run exported by ``python -m export.trt`` (fp32 ONNX through ONNX Runtime) and its report
read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FAST_LATENCY = ["--warmup-iters", "2", "--warmup-s", "0.01", "--iters", "5", "--min-time-s", "0.01"]
# The end-to-end run checks the plumbing; the INT8 gates themselves are tested in test_int8.py.
LOOSE_INT8 = ["--int8-min-agreement", "0.9", "--int8-max-drop", "5"]
FAST = ["--baselines", "--max-batch", "2", "--calib-samples", "8", "--threads", "1", *FAST_LATENCY]


def export_student(run: Path) -> dict:
    """``python -m export.trt --model run/student.pt --backends ort --precision fp32`` (no PyTorch baselines
    timed, short latency loops); asserts exit 0 and an ONNX Runtime row that passed every gate, and returns
    that row of ``run/export/report.json``."""
    result = subprocess.run(
        [sys.executable, "-m", "export.trt", "--model", str(run / "student.pt"), "--backends", "ort"]
        + ["--precision", "fp32", "--baselines", *FAST_LATENCY],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run / "export" / "report.json").read_text())
    (row,) = [r for r in report["rows"] if r["backend"] == "onnxruntime"]
    assert row["gates"] and all(gate["passed"] for gate in row["gates"]), row
    return row
