"""python -m export.trt end to end on CPU: ONNX fp32/fp16/INT8 through real ONNX Runtime sessions, checked
against the PyTorch student at batch 1 and 3, the graph TensorRT would consume, and the report."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from test_checkpoint import CLASSES, MEAN, STD, write_student

from export.onnx_export import read_metadata
from export.trt import main

FAST_LATENCY = ["--warmup-iters", "2", "--warmup-s", "0.01", "--iters", "3", "--min-time-s", "0.01"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One ORT-only run with every precision; returns (out dir, student model, exit code)."""
    root = tmp_path_factory.mktemp("export")
    path, model = write_student(root / "student.pt")
    out = root / "out"
    code = main(
        [
            "--model",
            str(path),
            "--out",
            str(out),
            "--backends",
            "ort",
            "--baselines",
            "eager",
            "--max-batch",
            "4",
            "--calib-samples",
            "16",
            "--threads",
            "1",
            *FAST_LATENCY,
        ]
    )
    return out, model, code


def _ort(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def test_cpu_run_without_tensorrt_requested_exits_0_and_reports(exported):
    out, _, code = exported
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "passed" and report["exit_code"] == 0
    rows = {(r["backend"], r["precision"]) for r in report["rows"]}
    assert rows == {
        ("pytorch-eager", "fp32"),
        ("onnxruntime", "fp32"),
        ("onnxruntime", "fp16"),
        ("onnxruntime", "int8"),
    }
    for row in report["rows"]:
        assert row["latency"]["p50_ms"] > 0 and row["latency"]["throughput_ips"] > 0
        assert row["accuracy"] is not None
    assert report["machine"]["onnxruntime"] == ort.__version__
    md = (out / "report.md").read_text()
    assert "| onnxruntime | int8 |" in md and "latency_accuracy.png" in md
    assert (out / "latency_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("precision, atol", [("fp32", 1e-4), ("fp16", 2e-2)])
def test_parity_with_pytorch_at_batch_1_and_3(exported, precision, atol):
    out, model, _ = exported
    session = _ort(out / f"student.{precision}.onnx")
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        (got,) = session.run(None, {"input": x})
        assert got.dtype == np.float32 and got.shape == (batch, len(CLASSES))
        np.testing.assert_allclose(got, _torch(model, x), atol=atol, rtol=1e-3)


def test_int8_tracks_pytorch_at_batch_1_and_3(exported):
    out, model, _ = exported
    session = _ort(out / "student.int8.onnx")
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        (got,) = session.run(None, {"input": x})
        ref = _torch(model, x)
        assert got.shape == ref.shape
        cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
        assert cos.min() > 0.9, cos


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_graph_interface_dynamic_batch_and_metadata(exported, precision):
    out, _, _ = exported
    path = out / f"student.{precision}.onnx"
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version >= 18 or any(
        o.domain in ("", "ai.onnx") and o.version >= 18 for o in proto.opset_import
    )
    (inp,), (outp,) = proto.graph.input, proto.graph.output
    assert (inp.name, outp.name) == ("input", "logits")
    assert inp.type.tensor_type.elem_type == outp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch = inp.type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, 32, 32]
    meta = read_metadata(path)
    assert json.loads(meta["classes"]) == CLASSES
    assert json.loads(meta["input_size"]) == [3, 32, 32]
    assert json.loads(meta["mean"]) == MEAN and json.loads(meta["std"]) == STD
    assert meta["kdfast.version"]


def test_fp16_weights_are_half(exported):
    proto = onnx.load(exported[0] / "student.fp16.onnx")
    types = {i.data_type for i in proto.graph.initializer if i.dims and np.prod(i.dims) > 16}
    assert types == {onnx.TensorProto.FLOAT16}


def test_int8_is_qdq_symmetric_per_channel(exported):
    proto = onnx.load(exported[0] / "student.int8.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    ops = [n.op_type for n in proto.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert not {"QLinearConv", "ConvInteger", "MatMulInteger"} & set(ops)
    zero_points = [
        inits[n.input[2]]
        for n in proto.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2
    ]
    assert zero_points and all(zp.dtype == np.int8 and not zp.any() for zp in zero_points)
    conv_weights = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    weight_dq = [
        n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in conv_weights
    ]
    assert weight_dq, "conv weights are not fed by DequantizeLinear"
    for n in weight_dq:
        weight, scale = inits[n.input[0]], inits[n.input[1]]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        assert axis == 0 and scale.shape == (weight.shape[0],)
