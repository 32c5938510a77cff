"""The two INT8 ONNX files: the ORT-CPU-tuned one (U8S8) must become fused QLinear ops under ONNX Runtime's
own optimizer and track the PyTorch student; the CLI must write, verify and label both files."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from test_checkpoint import write_student

from export.onnx_export import export_onnx, read_metadata
from export.precision import MIN_INT8_CONV_CHANNELS, to_int8_ort
from export.trt import main
from kdfast.models import build_model

EDGE_CNN = {"source": "kdfast", "name": "edge_cnn", "kwargs": {"num_classes": 10}}
FAST_LATENCY = ["--warmup-iters", "2", "--warmup-s", "0.01", "--iters", "3", "--min-time-s", "0.01"]


@pytest.fixture(scope="module")
def ort_int8(tmp_path_factory):
    """(fp32 ONNX, ORT-tuned INT8 ONNX, PyTorch model) for the default student, edge_cnn."""
    root = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    model = build_model(EDGE_CNN).eval()
    fp32 = export_onnx(model, torch.randn(2, 3, 32, 32), root / "fp32.onnx", max_batch=4, metadata={})
    calib = np.random.default_rng(0).standard_normal((32, 3, 32, 32)).astype(np.float32)
    return fp32, to_int8_ort(fp32, root / "int8-ort.onnx", calib, batch=8), model


def _session(path, level: ort.GraphOptimizationLevel, dump=None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    if dump is not None:
        options.optimized_model_filepath = str(dump)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _conv_channels(path) -> list[int]:
    """Input channels of each Conv in the fp32 graph, read from the weight shapes and groups."""
    graph = onnx.load(path).graph
    weights = {i.name: i.dims for i in graph.initializer}
    return [
        weights[n.input[1]][1] * next((a.i for a in n.attribute if a.name == "group"), 1)
        for n in graph.node
        if n.op_type == "Conv"
    ]


def test_ort_optimizer_fuses_every_wide_conv_into_qlinearconv(ort_int8, tmp_path):
    fp32, int8, _ = ort_int8
    channels = _conv_channels(fp32)
    wide = sum(c >= MIN_INT8_CONV_CHANNELS for c in channels)
    assert 0 < wide < len(channels), channels  # edge_cnn has both kinds: the test sees both paths
    adds = sum(n.op_type == "Add" for n in onnx.load(fp32).graph.node)

    _session(int8, ort.GraphOptimizationLevel.ORT_ENABLE_ALL, dump=tmp_path / "optimized.onnx")
    optimized = onnx.load(tmp_path / "optimized.onnx").graph.node
    ops = Counter(n.op_type for n in optimized)
    assert ops["QLinearConv"] == wide
    assert ops["Conv"] + ops["FusedConv"] == len(channels) - wide
    assert ops["QLinearAdd"] == adds
    assert ops["Relu"] == 0, "a ReLU left between Q/DQ pairs blocks the QLinearConv fusion"
    consumers_of_dq = {i for n in optimized if n.op_type in ("Conv", "FusedConv") for i in n.input}
    assert not {n.output[0] for n in optimized if n.op_type == "DequantizeLinear"} & consumers_of_dq


def test_ort_int8_is_u8_activations_and_symmetric_per_channel_s8_weights(ort_int8):
    fp32, int8, _ = ort_int8
    proto = onnx.load(int8)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    activation_zps = [inits[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert activation_zps and all(zp.dtype == np.uint8 for zp in activation_zps)
    weight_dq = {n.output[0]: n for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    quantized = [weight_dq[n.input[1]] for n in convs if n.input[1] in weight_dq]
    assert len(quantized) == sum(c >= MIN_INT8_CONV_CHANNELS for c in _conv_channels(fp32))
    for dq in quantized:
        weight, scale, zp = (inits[i] for i in dq.input)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        assert weight.dtype == np.int8 and not zp.any()
        assert axis == 0 and scale.shape == (weight.shape[0],)
    narrow = [n for n in convs if n.input[1] not in weight_dq]
    assert narrow and all(inits[n.input[1]].dtype == np.float32 for n in narrow)


@pytest.mark.parametrize("batch", [1, 3])
def test_ort_int8_tracks_pytorch_and_its_own_unfused_graph(ort_int8, batch):
    _, int8, model = ort_int8
    x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    (fused,) = _session(int8, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(None, {"input": x})
    # With optimizations off ORT runs the Q/DQ graph literally in fp32: the same quantization, no int8
    # kernels, so it checks the fused kernels independently of the quantization error.
    (plain,) = _session(int8, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, {"input": x})
    assert fused.shape == ref.shape == (batch, 10)
    cos = (fused * ref).sum(1) / (np.linalg.norm(fused, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.98, cos
    np.testing.assert_allclose(fused, plain, atol=0.05 * np.abs(plain).max())


def test_cli_writes_verifies_and_labels_both_int8_files(tmp_path):
    torch.manual_seed(0)
    path, _ = write_student(tmp_path / "student.pt", model=build_model(EDGE_CNN).eval(), arch=EDGE_CNN)
    out = tmp_path / "out"
    flags = ["--precision", "int8", "--backends", "ort", "--baselines", "--max-batch", "4", "--threads", "1"]
    code = main(["--model", str(path), "--out", str(out), *flags, "--calib-samples", "32", *FAST_LATENCY])
    report = json.loads((out / "report.json").read_text())
    assert code == 0, report["status"]
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in report["rows"] if r["backend"] == "onnxruntime"}
    assert set(rows) == {"student.int8.onnx", "student.int8-ort.onnx"}
    assert rows["student.int8.onnx"]["variant"] is None
    assert rows["student.int8-ort.onnx"]["variant"] == "u8s8 for ORT CPU"
    for row in rows.values():
        assert row["precision"] == "int8" and row["latency"]["throughput_ips"] > 0
        gates = {g["gate"]: g for g in row["gates"]}
        assert gates["accuracy drop (points)"]["passed"] is True
    md = (out / "report.md").read_text()
    assert "| onnxruntime | int8 |" in md and "| onnxruntime | int8 (u8s8 for ORT CPU) |" in md
    assert any("student.int8-ort.onnx" in n and "TensorRT" in n for n in report["notes"])
    assert json.loads(read_metadata(out / "student.int8-ort.onnx")["classes"]) == [str(i) for i in range(10)]
