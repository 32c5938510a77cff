"""ONNX Runtime's integer kernels compute the integers a Q/DQ file defines on every x86 CPU: on one without
VNNI the default U8S8 kernels clip pairs of products to int16, so the export's sessions take the exact U8U8
ones there (``session.x64quantprecision``); on a VNNI CPU the default is exact and is kept."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import export.machine as machine
import export.ort_backend as ort_backend

CIN, COUT = 8, 2
X_SCALE, W_SCALE, Y_SCALE, Y_ZERO = 1 / 255, 1 / 127, 32 / 255, 128


def _qdq_conv() -> onnx.ModelProto:
    """x -> Q(uint8) -> DQ -> Conv 1x1 (int8 weights via DQ) -> Q(uint8) -> DQ: the pattern ONNX Runtime fuses
    into QLinearConv. Output channel 0 has every weight at +127, channel 1 alternates +127 / -127."""
    weights = np.full((COUT, CIN, 1, 1), 127, np.int8)
    weights[1, 1::2] = -127
    init = [
        numpy_helper.from_array(weights, "w_q"),
        numpy_helper.from_array(np.array(W_SCALE, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zero"),
        numpy_helper.from_array(np.array(X_SCALE, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_zero"),
        numpy_helper.from_array(np.array(Y_SCALE, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(Y_ZERO, np.uint8), "y_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"]),
        helper.make_node("Conv", ["x_dq", "w_dq"], ["conv"], kernel_shape=[1, 1]),
        helper.make_node("QuantizeLinear", ["conv", "y_scale", "y_zero"], ["y_q"]),
        helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zero"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CIN, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, COUT, 4, 4])],
        init,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _exact(x: np.ndarray) -> np.ndarray:
    """The file's integers by hand: uint8 inputs times int8 weights summed in int64, requantized."""
    x_q = np.clip(np.rint(x / X_SCALE), 0, 255).astype(np.int64)
    weights = np.full((COUT, CIN), 127, np.int64)
    weights[1, 1::2] = -127
    acc = np.einsum("oc,nchw->nohw", weights, x_q)
    y_q = np.clip(np.rint(acc * X_SCALE * W_SCALE / Y_SCALE) + Y_ZERO, 0, 255)
    return ((y_q - Y_ZERO) * Y_SCALE).astype(np.float32)


@pytest.mark.parametrize("isa", [["avx2", "fma"], ["avx2", "fma", "avx512f", "avx512_vnni"]])
def test_session_takes_the_exact_kernels_only_where_the_default_saturates(monkeypatch, isa):
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("a CPU", isa))
    session = ort_backend.make_session(_qdq_conv().SerializeToString(), threads=1)
    entry = session.get_session_options().get_session_config_entry
    saturating = "avx512_vnni" not in isa
    assert machine.u8s8_saturates() is saturating
    if saturating:
        assert entry(ort_backend.EXACT_INT8_KERNELS) == "1"
    else:
        with pytest.raises(Exception, match=ort_backend.EXACT_INT8_KERNELS):
            entry(ort_backend.EXACT_INT8_KERNELS)


def test_arm_never_saturates(monkeypatch):
    monkeypatch.setattr(machine.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("a CPU", ["asimd"]))
    assert not machine.u8s8_saturates()


def test_fused_integer_conv_matches_the_integers_by_hand(monkeypatch, tmp_path):
    # Every input at 255 and every weight at +127: each pair of products is 64770, twice int16's maximum,
    # so a saturating kernel returns about half of channel 0. The session the export makes on this CPU
    # (and, forced, the exact kernels) must equal the hand-computed integers.
    x = np.ones((1, CIN, 4, 4), np.float32)
    x[0, :, 0, 0] = np.linspace(0.0, 1.0, CIN)
    model = _qdq_conv().SerializeToString()
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    fused = onnx.load(options.optimized_model_filepath)
    assert "QLinearConv" in {n.op_type for n in fused.graph.node}, "the integer kernel is what this tests"
    expected = _exact(x)
    assert expected[0, 0, 1, 1] == pytest.approx(8.0, abs=Y_SCALE)  # 8 * 255 * 127 in int32 terms
    got = ort_backend.make_session(model, threads=1).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    monkeypatch.setattr(machine, "_cpuinfo", lambda: ("a CPU", ["avx2"]))  # forced: the U8U8 kernels
    got = ort_backend.make_session(model, threads=1).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_weight_types_count_what_each_compute_op_reads():
    """A hand-built graph: an fp16 Conv, a Conv on a weight a DequantizeLinear makes, a QLinearConv (weight at
    input 3) and a MatMul of two activations (no weight: not counted)."""
    f16 = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float16), "w16")
    q = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.int8), "wq")
    nodes = [
        helper.make_node("Conv", ["x", "w16"], ["a"]),
        helper.make_node("DequantizeLinear", ["wq", "s"], ["wdq"]),
        helper.make_node("Conv", ["a", "wdq"], ["b"]),
        helper.make_node(
            "QLinearConv", ["b", "s", "z", "wq", "s", "z", "s", "z"], ["c"], domain="com.microsoft"
        ),
        helper.make_node("MatMul", ["c", "c"], ["d"]),
    ]
    graph = helper.make_graph(nodes, "g", [], [], [f16, q])
    assert ort_backend.weight_types(graph) == {"float16": 1, ort_backend.DEQUANTIZED: 1, "int8": 1}


@pytest.mark.skipif(
    machine.platform.machine() != "x86_64" or "avx512_fp16" in machine.machine_info(1)["isa"],
    reason="the fp16 finding is about x86 CPUs without fp16 arithmetic",
)
def test_fp16_file_runs_on_float32_weights_on_this_cpu(trained_student, tmp_path):
    """What the report says of ONNX Runtime fp16 on such a CPU: the session's optimized graph computes every
    Conv and Gemm of the fp16 file on float32 weights (no fp16 kernels: the fp16 weights are cast back at
    load), so the row is fp32 arithmetic."""
    import torch

    from export.onnx_export import export_onnx
    from export.precision import to_fp16

    _, model, images, _ = trained_student
    fp32 = export_onnx(model, torch.from_numpy(images[:2]), tmp_path / "fp32.onnx", max_batch=4, metadata={})
    fp16 = to_fp16(fp32, tmp_path / "fp16.onnx")
    compute = sum(n.op_type in ("Conv", "Gemm", "MatMul") for n in onnx.load(fp16).graph.node)
    assert ort_backend.weight_types(onnx.load(fp16).graph) == {"float16": compute}  # the file itself: fp16
    _, info = ort_backend.load(fp16, threads=1)
    assert info["compute_ops"] == {"float32": compute}
