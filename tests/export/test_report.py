"""The backend table of ``python -m export.trt``: the on-device runtimes (OpenVINO, LiteRT, ExecuTorch) are
verified with the same gates and timed with the same protocol as ONNX Runtime; one that is not installed is
one row saying what to install (exit 0 by default, 3 when asked for by name), never a crash."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from support.exports import FAST, LOOSE_INT8

from export import executorch_backend, litert_backend, openvino_backend
from export.backends import BACKENDS
from export.trt import main

RUNTIMES = {"openvino": openvino_backend, "litert": litert_backend, "executorch": executorch_backend}


def _export(student, out, backends: list[str], precisions=("fp32", "int8")) -> tuple[int, dict]:
    argv = ["--model", str(student), "--out", str(out), "--precision", *precisions]
    argv += ["--backends", *backends] if backends else []
    code = main([*argv, *FAST, *LOOSE_INT8, "--baselines", "eager"])
    return code, json.loads((out / "report.json").read_text())


def test_a_runtime_that_is_not_installed_is_one_row(trained_student, tmp_path, monkeypatch, capsys):
    """OpenVINO made unimportable (``None`` in ``sys.modules`` is how Python marks a module that must not
    import): by default its row says what to install and the run passes; asked for by name, exit 3."""
    for key in [k for k in BACKENDS if k not in ("ort", "openvino")]:
        monkeypatch.delitem(BACKENDS, key)
    monkeypatch.setitem(sys.modules, "openvino", None)
    openvino_backend.unavailable_reason.cache_clear()
    try:
        code, report = _export(trained_student[0], tmp_path / "default", [], precisions=("fp32",))
        assert code == 0, report["status"]
        (row,) = [r for r in report["rows"] if r["backend"] == "openvino"]
        line = "OpenVINO is not installed (pip install 'kdfast[openvino]' adds it)"
        assert row["unavailable"] == line and row["latency"] is None and row["gates"] == []
        assert f"not run: {line}" in (tmp_path / "default" / "report.md").read_text()
        assert report["unavailable"] == {"openvino": line}
        capsys.readouterr()
        code, report = _export(trained_student[0], tmp_path / "named", ["ort", "openvino"], ("fp32",))
        assert code == 3 and report["exit_code"] == 3
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"export.trt: {line} (everything else done, report written)"
    finally:
        openvino_backend.unavailable_reason.cache_clear()


def _check_like_onnxruntime(report: dict, out, key: str) -> None:
    """Every precision ``key`` builds of those asked for has a row with the gates, images and batch sizes
    of ONNX Runtime's row of that precision, its files in ``--out`` and their size."""
    rows = {(r["backend"], r["precision"]): r for r in report["rows"]}
    built = [p for p in RUNTIMES[key].PRECISIONS if p in ("fp32", "int8")]
    assert built
    for precision in built:
        row, ort = rows[(key, precision)], rows[("onnxruntime", precision)]
        assert row["error"] is None, row.get("traceback")
        assert [g["gate"] for g in row["gates"]] == [g["gate"] for g in ort["gates"]]
        assert [g["threshold"] for g in row["gates"]] == [g["threshold"] for g in ort["gates"]]
        assert all(g["passed"] for g in row["gates"]), row["gates"]
        assert row["parity"]["elements"] == ort["parity"]["elements"] > 0
        timed = [
            (s["batch"], s["samples"] >= report["protocol"]["iters"]) for s in row["latency"]["end_to_end"]
        ]
        assert timed == [(b, True) for b in report["protocol"]["batch_sizes"]]
        assert row["latency"]["compute_only"] is None and row["load_s"] >= 0 and row["peak_rss_mb"] >= 0
        files = RUNTIMES[key].artifacts(out / Path(row["file"]).name)
        assert all(f.parent == out and f.is_file() for f in files)
        assert row["size_bytes"] == sum(f.stat().st_size for f in files)
        assert row["runtime"]["threads"] == 1
    if key == "openvino":
        assert rows[("openvino", "fp32")]["runtime"]["inference_precision"] == "f32"
        assert set(rows[("openvino", "int8")]["runtime"]["compute_ops"]) & {"u8", "i8"}


def _stdout_is_the_table(capsys) -> None:
    """What the converters print (litert-torch's stage log) goes to stderr: stdout is the table only."""
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("| ") or line.startswith("|---") for line in lines[:-1]), lines[:5]
    assert lines[-1].startswith("report: ")


def _installed(keys: list[str]) -> list[str]:
    present = [k for k in keys if RUNTIMES[k].unavailable_reason() is None]
    if not present:
        pytest.skip(f"none of {', '.join(keys)} is installed here")
    return present


def test_openvino_is_verified_and_timed_like_onnxruntime(trained_student, tmp_path, capsys):
    keys = _installed(["openvino"])
    code, report = _export(trained_student[0], tmp_path / "out", ["ort", *keys])
    assert code == 0, report["status"]
    _stdout_is_the_table(capsys)
    _check_like_onnxruntime(report, tmp_path / "out", "openvino")


@pytest.mark.slow
def test_litert_and_executorch_are_verified_and_timed_like_onnxruntime(trained_student, tmp_path, capsys):
    """Both convert the PyTorch student themselves (int8: PT2E, calibrated on the command's images)."""
    keys = _installed(["litert", "executorch"])
    code, report = _export(trained_student[0], tmp_path / "out", ["ort", *keys])
    assert code == 0, report["status"]
    _stdout_is_the_table(capsys)
    for key in keys:
        _check_like_onnxruntime(report, tmp_path / "out", key)
