"""python -m export.trt exit codes and output-folder safety: 1 on a failed or unmeasured gate (artifacts
kept), 2 on bad input (one line, nothing written, an earlier export untouched), 3 when a backend asked for
cannot run here; a run that stops midway leaves no trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from support.exports import FAST, LOOSE_INT8
from support.students import CLASSES

from export import trt
from export.backends import BACKENDS
from export.tensorrt_backend import unavailable_reason
from export.trt import main
from kdfast.checkpoint import STUDENT_FORMAT, TEACHER_FORMAT


@pytest.fixture(scope="module")
def student(trained_student):
    return trained_student[0]


def _run(argv: list[str]) -> int:
    return main([*argv, *FAST, *LOOSE_INT8])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _earlier_export(folder: Path) -> dict[str, bytes]:
    """A folder holding an earlier export's files (and a file of the user's)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text('{"status": "passed"}')
    (folder / "student.fp32.onnx").write_bytes(os.urandom(64))
    (folder / "notes.txt").write_text("mine")
    return _snapshot(folder)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _bad_models(root: Path, student: Path) -> dict[str, tuple[Path, str]]:
    """Files given as --model, each with the words its one-line message must contain."""
    ckpt = torch.load(student, weights_only=True)
    key = next(iter(ckpt["state_dict"]))
    files: dict[str, tuple[object, str]] = {
        "random.pt": (os.urandom(4096), "is not a torch checkpoint"),
        "text.pt": (b"name: edge_cnn\nweights: here\n", "is not a torch checkpoint"),
        "empty.pt": (b"", "is not a torch checkpoint"),
        "truncated.pt": (student.read_bytes()[: student.stat().st_size // 2], "is not a torch checkpoint"),
        "teacher.pt": ({**ckpt, "format": TEACHER_FORMAT}, "expected 'kdfast.student/1'"),
        "arch.pt": ({**ckpt, "arch": {"source": "timm", "name": "no_such_net", "kwargs": {}}}, "no_such_net"),
        "weights.pt": (
            {**ckpt, "state_dict": {**ckpt["state_dict"], key: torch.zeros(2)}},
            f"weight '{key}'",
        ),
        "evil.pt": ({"format": STUDENT_FORMAT, "x": _RunsCode(root / "code-ran")}, "was refused"),
        "nofields.pt": ({"format": STUDENT_FORMAT}, "lacks the field"),
    }
    paths = {}
    for name, (content, words) in files.items():
        path = root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        paths[name] = (path, words)
    with zipfile.ZipFile(root / "notorch.pt", "w") as z:  # a zip, but not one torch.save wrote
        z.writestr("readme.txt", "hello")
    paths["notorch.pt"] = (root / "notorch.pt", "is not a readable torch checkpoint")
    return paths


BAD_FLAGS = {
    "precision": (["--precision", "fp64"], "invalid choice: 'fp64'"),
    "backends": (["--backends", "tflite9"], "invalid choice: 'tflite9'"),
    "calibration": (["--calibration", "kl"], "invalid choice: 'kl'"),
    "max-batch": (["--max-batch", "1"], "--max-batch must be >= 2"),
    "atol": (["--fp32-atol", "-1"], "--fp32-atol must be >= 0"),
    "agreement": (["--int8-min-agreement", "1.5"], "--int8-min-agreement is a fraction"),
    "opset": (["--opset", "12"], "--opset must lie in 18..24"),
    "iters": (["--iters", "0"], "--iters must be >= 1"),
    "cap": (["--max-time-s", "0"], "--max-time-s must be > 0"),
    "not-a-number": (["--threads", "two"], "argument --threads: invalid int value: 'two'"),
    "verify-data": (["--verify-data", "/no/such/folder"], "not found"),
}


def _one_line_exit_2(argv: list[str], capsys, match: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("export.trt: ") and not err.startswith("export.trt: export.trt"), err
    assert match in err, err
    return err


def test_bad_models_one_line_exit_2_and_nothing_touched(student, tmp_path, capsys):
    out = tmp_path / "out"
    before = _earlier_export(out)
    for name, (path, words) in _bad_models(tmp_path, student).items():
        err = _one_line_exit_2(["--model", str(path), "--out", str(out)], capsys, words)
        assert str(path) in err, (name, err)
        assert _snapshot(out) == before, name
        # with no --out, the default <model folder>/export must not appear either
        _one_line_exit_2(["--model", str(path)], capsys, words)
        assert not (path.parent / "export").exists(), name
    assert not (tmp_path / "code-ran").exists()


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_one_line_exit_2_and_nothing_touched(student, tmp_path, capsys, case):
    flags, words = BAD_FLAGS[case]
    out = tmp_path / "out"
    before = _earlier_export(out)
    err = _one_line_exit_2(["--model", str(student), "--out", str(out), *flags], capsys, words)
    assert flags[0] in err or case == "verify-data"
    assert _snapshot(out) == before
    _one_line_exit_2(["--model", str(student), "--out", str(tmp_path / "new"), *flags], capsys, words)
    assert not (tmp_path / "new").exists()


def test_missing_model_creates_nothing(tmp_path, capsys):
    _one_line_exit_2(["--model", str(tmp_path / "none.pt")], capsys, "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out(student, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_line_exit_2(["--model", str(student), "--out", str(blocker / "sub")], capsys, "not writable")
    assert blocker.read_text() == ""


def test_module_entry_point_exit_code(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "export.trt", "--model", str(tmp_path / "x.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "does not exist" in done.stderr


def test_a_run_stopped_midway_leaves_no_trace(student, tmp_path, monkeypatch):
    """Ctrl-C (or any crash) after the output folder was prepared: a folder this run created is removed,
    an existing one keeps exactly its earlier files."""

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(trt, "_onnx", interrupted)
    fresh = tmp_path / "fresh" / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(["--model", str(student), "--out", str(fresh), "--backends", "ort"])
    assert not (tmp_path / "fresh").exists()
    earlier = tmp_path / "earlier"
    before = _earlier_export(earlier)
    with pytest.raises(KeyboardInterrupt):
        _run(["--model", str(student), "--out", str(earlier), "--backends", "ort"])
    assert _snapshot(earlier) == before


def test_failed_gate_exits_1_keeps_artifacts_and_replaces_only_its_own_files(student, tmp_path, capsys):
    out = tmp_path / "out"
    before = _earlier_export(out)
    flags = ["--precision", "fp32", "--backends", "ort", "--fp32-atol", "0", "--fp32-rtol", "0"]
    assert _run(["--model", str(student), "--out", str(out), *flags]) == 1
    assert (out / "student.fp32.onnx").read_bytes() != before["student.fp32.onnx"]
    assert (out / "notes.txt").read_text() == "mine"
    report = json.loads((out / "report.json").read_text())
    (row,) = [r for r in report["rows"] if r["backend"] == "onnxruntime"]
    failed = [g for g in row["gates"] if g["passed"] is False]
    assert failed and failed[0]["gate"].startswith("elements within atol=0") and failed[0]["miss"] > 0
    assert report["status"].startswith("FAILED") and "atol=0" in (out / "report.md").read_text()
    assert "atol=0" in capsys.readouterr().err.strip().splitlines()[-1]


def test_random_inputs_cannot_pass(student, tmp_path, capsys):
    out = tmp_path / "out"
    flags = ["--precision", "fp32", "int8", "--backends", "ort", "--random-inputs", "--verify-samples", "5"]
    assert _run(["--model", str(student), "--out", str(out), *flags]) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["status"].startswith("NOT VERIFIED") and report["exit_code"] == 1
    assert any("cannot pass" in w for w in report["warnings"])
    for row in (r for r in report["rows"] if r["backend"] == "onnxruntime"):
        gates = {g["gate"]: g for g in row["gates"]}
        assert gates["top-1 agreement"]["passed"] is None and row["accuracy"] is None
        assert "accuracy drop (points)" not in gates or gates["accuracy drop (points)"]["passed"] is None
    assert report["int8"]["int8"]["control"] is None
    assert "NOT VERIFIED" in capsys.readouterr().err


def test_tensorrt_asked_for_where_it_cannot_run_exits_3_after_the_rest(student, tmp_path, capsys):
    reason = unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present here; the GPU test covers the engine path")
    out = tmp_path / "out"
    code = _run(
        ["--model", str(student), "--out", str(out), "--precision", "fp32", "--backends", "ort", "trt"]
    )
    assert code == 3
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"export.trt: {reason} (everything else done, report written)"
    )
    report = json.loads((out / "report.json").read_text())
    assert report["unavailable"] == {"trt": reason} and report["exit_code"] == 3
    (row,) = [r for r in report["rows"] if r["backend"] == "onnxruntime"]
    assert all(g["passed"] for g in row["gates"])


def test_default_backends_are_those_available(student, tmp_path, monkeypatch):
    """Without --backends every table entry that can run here runs; one that cannot is a row saying why, not
    an error (the other runtimes have their own tests: test_report.py, AOTInductor's minute-long
    compile in test_verify.py)."""
    for key in [k for k in BACKENDS if k not in ("ort", "trt")]:
        monkeypatch.delitem(BACKENDS, key)
    out = tmp_path / "out"
    assert _run(["--model", str(student), "--out", str(out), "--precision", "fp32"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {r["backend"] for r in report["rows"]} == {"pytorch-eager", "onnxruntime", "tensorrt"}
    (trt_row,) = [r for r in report["rows"] if r["backend"] == "tensorrt"]
    assert trt_row["unavailable"] == unavailable_reason()
    assert set(report["unavailable"]) == ({"trt"} if unavailable_reason() else set())


def test_verify_data_folder_replaces_the_checkpoints_data(student, tmp_path):
    import numpy as np
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
    assert _run(["--model", str(student), "--out", str(out), *flags]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["notes"][0] == f"verification data: imagefolder {tmp_path / 'imgs'}, {len(CLASSES)} images"
    flags[1:2] = ["fp32", "int8"]
    assert _run(["--model", str(student), "--out", str(tmp_path / "out8"), *flags]) in (0, 1)
    notes = json.loads((tmp_path / "out8" / "report.json").read_text())["notes"]
    half = len(CLASSES) // 2
    assert notes[0].endswith(f", {half} images ({half} more held out for INT8 control)")
    (row,) = [r for r in report["rows"] if r["backend"] == "onnxruntime"]
    assert row["accuracy"] is not None and row["parity"]["elements"] == len(CLASSES) ** 2
