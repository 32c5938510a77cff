"""python -m export.trt exit codes: 1 on a failed gate (artifacts kept), 2 on bad input (one line), 3 when
TensorRT is requested where it cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_checkpoint import CLASSES, write_student
from test_export_pipeline import FAST_LATENCY

from export.tensorrt_backend import unavailable_reason
from export.trt import main
from kdfast.checkpoint import STUDENT_FORMAT, TEACHER_FORMAT

FAST = ["--baselines", "--max-batch", "2", "--calib-samples", "8", "--threads", "1", *FAST_LATENCY]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return write_student(tmp_path_factory.mktemp("cli") / "student.pt")[0]


def _one_line_exit_2(argv, capsys, match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert match in err, err


def test_failed_gate_exits_1_keeps_artifacts_and_names_the_gate(student, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "--model",
            str(student),
            "--out",
            str(out),
            "--precision",
            "fp32",
            "--backends",
            "ort",
            "--fp32-atol",
            "0",
            "--fp32-rtol",
            "0",
            *FAST,
        ]
    )
    assert code == 1
    assert (out / "student.fp32.onnx").stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    (row,) = [r for r in report["rows"] if r["backend"] == "onnxruntime"]
    failed = [g for g in row["gates"] if g["passed"] is False]
    assert failed and failed[0]["gate"].startswith("elements within atol=0") and failed[0]["miss"] > 0
    assert "FAILED" in report["status"] and "atol=0" in (out / "report.md").read_text()
    assert "atol=0" in capsys.readouterr().err


def test_tensorrt_requested_where_it_cannot_run_exits_3_after_onnx(student, tmp_path, capsys):
    """Also the flagged last resort: random inputs, so parity only and no accuracy."""
    reason = unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present here; the GPU test covers the engine path")
    out = tmp_path / "out"
    flags = ["--precision", "fp32", "--backends", "ort", "trt", "--random-inputs", "--verify-samples", "5"]
    code = main(["--model", str(student), "--out", str(out), *flags, *FAST])
    assert code == 3
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == f"export.trt: {reason} (ONNX files verified, report written)"
    )
    report = json.loads((out / "report.json").read_text())
    assert reason in report["notes"] and report["exit_code"] == 3
    (row,) = [r for r in report["rows"] if r["backend"] == "onnxruntime"]
    assert row["gates"][0]["passed"] is True and row["accuracy"] is None
    assert any(n.startswith("random inputs: parity only") for n in report["notes"])


def test_missing_file(tmp_path, capsys):
    _one_line_exit_2(["--model", str(tmp_path / "none.pt"), "--out", str(tmp_path)], capsys, "does not exist")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_code_running_pickle_is_refused_and_not_executed(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    torch.save({"format": STUDENT_FORMAT, "x": _RunsCode(marker)}, tmp_path / "evil.pt")
    _one_line_exit_2(["--model", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "o")], capsys, "refused")
    assert not marker.exists()


def test_wrong_format_unknown_arch_and_mismatched_weights(student, tmp_path, capsys):
    ckpt = torch.load(student, weights_only=True)
    key = next(iter(ckpt["state_dict"]))
    cases = {
        "teacher.pt": ({**ckpt, "format": TEACHER_FORMAT}, "expected 'kdfast.student/1'"),
        "arch.pt": ({**ckpt, "arch": {"source": "timm", "name": "no_such_net", "kwargs": {}}}, "no_such_net"),
        "weights.pt": (
            {**ckpt, "state_dict": {**ckpt["state_dict"], key: torch.zeros(2)}},
            f"weight '{key}'",
        ),
    }
    for name, (bad, match) in cases.items():
        torch.save(bad, tmp_path / name)
        _one_line_exit_2(["--model", str(tmp_path / name), "--out", str(tmp_path / "o")], capsys, match)


def test_unwritable_out_dir_and_bad_flags(student, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_line_exit_2(["--model", str(student), "--out", str(blocker / "sub")], capsys, "not writable")
    _one_line_exit_2(["--model", str(student), "--precision", "fp64"], capsys, "invalid choice: 'fp64'")
    _one_line_exit_2(["--model", str(student), "--max-batch", "1"], capsys, "--max-batch must be >= 2")
    _one_line_exit_2(["--model", str(student), "--fp32-atol", "-1"], capsys, "--fp32-atol must be >= 0")


def test_module_entry_point_exit_code(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "export.trt", "--model", str(tmp_path / "x.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "does not exist" in done.stderr


def test_verify_data_folder_replaces_the_checkpoints_data(student, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 2), ("val", 1)):
        for c in CLASSES:
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "imgs" / split / c / f"{i}.png")
    out = tmp_path / "out"
    flags = ["--precision", "fp32", "--backends", "ort", "--verify-data", str(tmp_path / "imgs")]
    assert main(["--model", str(student), "--out", str(out), *flags, *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["notes"][0] == f"verification data: imagefolder {tmp_path / 'imgs'}, {len(CLASSES)} images"
    (row,) = [r for r in report["rows"] if r["backend"] == "onnxruntime"]
    assert row["accuracy"] is not None and row["parity"]["elements"] == len(CLASSES) ** 2


def test_missing_verify_data_folder(student, tmp_path, capsys):
    argv = ["--model", str(student), "--out", str(tmp_path / "o"), "--verify-data", str(tmp_path / "none")]
    _one_line_exit_2(argv, capsys, "not found")
