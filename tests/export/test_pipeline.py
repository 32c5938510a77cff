"""python -m export.trt end to end on CPU with the trained default student: ONNX fp32/fp16/INT8 through real
ONNX Runtime sessions checked against PyTorch at batch 1 and 3, clean files with the preprocessing contract,
and a report that carries the latency protocol and the machine."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from support.exports import FAST_LATENCY, LOOSE_INT8
from support.students import CLASSES, MEAN, STD

from export.onnx_export import read_metadata
from export.ort_backend import make_session
from export.trt import main


@pytest.fixture(scope="module")
def exported(trained_student, tmp_path_factory):
    """One ORT-only run with the default precisions; returns (out dir, student model, exit code)."""
    path, model, _, _ = trained_student
    out = tmp_path_factory.mktemp("export") / "out"
    argv = ["--model", str(path), "--out", str(out), "--backends", "ort", "--baselines", "eager"]
    flags = ["--max-batch", "4", "--calib-samples", "32", "--control-samples", "64", "--threads", "1"]
    return out, model, main([*argv, *flags, *FAST_LATENCY, *LOOSE_INT8])


def _ort(path) -> ort.InferenceSession:
    # the session export.trt verifies with (exact integer kernels on every x86 CPU)
    return make_session(path, threads=1)


def _torch(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _digits(batch: int) -> np.ndarray:
    """Real validation images, as the student sees them."""
    from support.students import digits_record

    from kdfast.data import dataset_from_record

    data = dataset_from_record(digits_record(max_val=8), "val")
    return torch.stack([data[i][0] for i in range(batch)]).numpy()


def test_cpu_run_reports_every_row_with_the_protocol(exported):
    out, _, code = exported
    report = json.loads((out / "report.json").read_text())
    assert code == 0, report["status"]
    assert report["status"] == "passed" and report["exit_code"] == 0
    rows = {(r["backend"], r["precision"]) for r in report["rows"]}
    assert rows == {("pytorch-eager", "fp32"), *(("onnxruntime", p) for p in ("fp32", "fp16", "int8"))}
    for row in report["rows"]:
        series = row["latency"]["end_to_end"]
        assert [s["batch"] for s in series] == [1, 2, 4]
        for s in series:
            assert s["samples"] >= 5 and not s["under_sampled"] and not s["capped"]
            assert 0 < s["p50_ms"] <= s["p90_ms"] <= s["p95_ms"] <= s["p99_ms"]
        assert row["accuracy"] is not None
        if row["backend"] == "onnxruntime":
            assert (
                row["load_s"] > 0
                and row["peak_rss_mb"] is not None
                and row["latency"]["compute_only"] is None
            )
    machine = report["machine"]
    assert machine["usable_cpus"] == len(os.sched_getaffinity(0))
    assert machine["load_average_start"] is not None and machine["timestamp"] and machine["cpu_model"]
    assert machine["versions"]["onnxruntime"] == ort.__version__
    md = (out / "report.md").read_text().splitlines()
    assert md[0].startswith("# Export report") and md[2] == "**passed** (exit code 0)"
    # The verdict (and warnings), then the answer, then every row.
    headings = [line for line in md if line.startswith("## ")]
    assert headings[:2] == ["## What to ship", "## Every row"]
    answer = md[md.index("## What to ship") : md.index("## Every row")]
    assert [line.split(" | ")[1] for line in answer if line.startswith("| onnxruntime |")] == ["1", "2", "4"]
    for png in ("latency_accuracy.png", "latency_batch.png", "int8_layers.png", "speedup_rounds.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".export-staging-*"))


@pytest.mark.parametrize("precision, atol", [("fp32", 1e-4), ("fp16", 2e-2)])
def test_parity_with_pytorch_at_batch_1_and_3(exported, precision, atol):
    out, model, _ = exported
    session = _ort(out / f"student.{precision}.onnx")
    for batch in (1, 3):
        x = _digits(batch)
        (got,) = session.run(None, {"input": x})
        assert got.dtype == np.float32 and got.shape == (batch, len(CLASSES))
        np.testing.assert_allclose(got, _torch(model, x), atol=atol, rtol=1e-3)


def test_int8_agrees_with_pytorch_on_real_images(exported):
    out, model, _ = exported
    session = _ort(out / "student.int8.onnx")
    for batch in (1, 3):
        x = _digits(batch)
        (got,) = session.run(None, {"input": x})
        assert got.argmax(1).tolist() == _torch(model, x).argmax(1).tolist()
    report = json.loads((out / "report.json").read_text())
    tensorrt = [f for f in report["files"].values() if f["for_tensorrt"]]
    assert len(tensorrt) == 3 and all(f["tensorrt_violations"] == [] for f in tensorrt)
    assert set(report["files"]) == {"fp32", "fp16", "int8", "int8-ort"}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_clean_files_with_dynamic_batch_and_preprocessing_contract(exported, precision):
    out, _, _ = exported
    path = out / f"student.{precision}.onnx"
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 20)]
    assert not any(n.metadata_props or n.doc_string for n in proto.graph.node)
    raw = path.read_bytes()
    for local in (str(Path.cwd()), str(Path(torch.__file__).parent.parent), "stack_trace"):
        assert local.encode() not in raw, local
    (inp,), (outp,) = proto.graph.input, proto.graph.output
    assert (inp.name, outp.name) == ("input", "logits")
    assert inp.type.tensor_type.elem_type == outp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch = inp.type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, 32, 32]
    meta = read_metadata(path)
    assert json.loads(meta["classes"]) == CLASSES
    assert json.loads(meta["mean"]) == MEAN and json.loads(meta["std"]) == STD
    contract = json.loads(meta["preprocessing"])
    assert contract["resize"] == {"to": [32, 32]} and contract["channel_order"] == "RGB"
    assert (
        contract["layout"] == "NCHW" and contract["mean"] == MEAN and "bilinear" in contract["interpolation"]
    )
    assert meta["kdfast.version"] and json.loads(meta["opset"]) == 20


def test_fp16_weights_are_half(exported):
    proto = onnx.load(exported[0] / "student.fp16.onnx")
    types = {i.data_type for i in proto.graph.initializer if i.dims and np.prod(i.dims) > 16}
    assert types == {onnx.TensorProto.FLOAT16}
