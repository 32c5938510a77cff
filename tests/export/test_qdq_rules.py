"""TensorRT's Q/DQ and ONNX-parser rules as code (export.qdq_rules): each rule on a hand-built graph that
breaks only it, and the checker on real quantized students, trained, with non-zero biases."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn

from export.onnx_export import export_onnx
from export.qdq_rules import RULES, check_tensorrt_qdq
from export.quantize import TENSORRT, Int8Quantizer

RNG = np.random.default_rng(0)
ZERO_INT8, SCALE = np.int8(0), np.float32(0.05)
PER_CHANNEL_ACTIVATION = {
    "activation_scale": np.full(4, 0.05, np.float32),
    "activation_zp": np.zeros(4, np.int8),
}


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _qdq_conv(
    *,
    op: str = "Conv",
    weight_shape=(8, 4, 3, 3),
    weight_axis: int = 0,
    activation_zp: np.ndarray | np.generic = ZERO_INT8,
    weight_zp_value: int = 0,
    activation_scale: np.ndarray | np.generic = SCALE,
    weight_scales: np.ndarray | None = None,
    bias_dq: bool = False,
    quantize_activation: bool = True,
    q_feeds_conv: bool = False,
    opset: int = 20,
    attrs: dict | None = None,
) -> onnx.ModelProto:
    """x -> Q -> DQ -> op(DQ(int8 weight), bias) -> y: symmetric int8 with per-channel weights unless told."""
    channels = weight_shape[weight_axis]
    scales = np.full(channels, 0.01, np.float32) if weight_scales is None else weight_scales
    weight = RNG.integers(-127, 128, weight_shape, dtype=np.int8)
    inits = [
        _const("w_q", weight),
        _const("w_scale", scales),
        _const("w_zp", np.full(channels, weight_zp_value, np.int8)),
        _const("x_scale", np.asarray(activation_scale)),
        _const("x_zp", np.asarray(activation_zp)),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="w_dq", axis=weight_axis)
    ]
    x = "x"
    if quantize_activation:
        nodes.append(helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_q"))
        if q_feeds_conv:
            x = "x_q"
        else:
            nodes.append(
                helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_dq")
            )
            x = "x_dq"
    out_channels = weight_shape[1] if op == "ConvTranspose" else weight_shape[0]
    inputs = [x, "w"]
    if bias_dq:
        # ONNX Runtime's default: the bias quantized to int32 with scale x_scale * w_scale.
        inits += [
            _const("b_q", RNG.integers(-1000, 1000, out_channels, dtype=np.int32)),
            _const("b_scale", scales * 0.05),
            _const("b_zp", np.zeros(out_channels, np.int32)),
        ]
        nodes.append(
            helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["b"], name="b_dq", axis=0)
        )
        inputs.append("b")
    elif op in ("Conv", "ConvTranspose"):
        inits.append(_const("b", RNG.standard_normal(out_channels).astype(np.float32)))
        inputs.append("b")
    nodes.append(helper.make_node(op, inputs, ["y"], name="layer", **(attrs or {})))
    in_shape = [1, weight_shape[0 if op == "ConvTranspose" else 1], 8, 8]
    if op in ("Gemm", "MatMul"):
        in_shape = [2, weight_shape[0 if op == "MatMul" or not (attrs or {}).get("transB") else 1]]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _rules(model: onnx.ModelProto) -> set[str]:
    return {v.rule for v in check_tensorrt_qdq(model)}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"op": "ConvTranspose", "weight_shape": (4, 8, 3, 3), "weight_axis": 1},
        {"op": "Gemm", "weight_shape": (8, 4), "weight_axis": 0, "attrs": {"transB": 1}},
        {"op": "Gemm", "weight_shape": (4, 8), "weight_axis": 1},
        {"op": "MatMul", "weight_shape": (4, 8), "weight_axis": 1},
    ],
)
def test_valid_layouts_pass_and_run(kwargs):
    model = _qdq_conv(**kwargs)
    assert check_tensorrt_qdq(model) == []
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    (y,) = session.run(None, {"x": RNG.standard_normal(shape).astype(np.float32)})
    assert np.isfinite(y).all()


@pytest.mark.parametrize(
    "rule, kwargs",
    [
        ("dq-input-type", {"bias_dq": True}),  # ONNX Runtime's int32 bias: TensorRT#4542, onnx-tensorrt#850
        ("zero-point", {"weight_zp_value": 3}),
        ("zero-point", {"activation_zp": np.int8(5)}),
        ("scale", {"activation_scale": np.float32(-0.05)}),
        ("scale", {"activation_scale": np.float32(np.nan)}),
        ("scale", {"weight_scales": np.r_[np.zeros(1), np.full(7, 0.01)].astype(np.float32)}),
        ("scale", {"activation_scale": np.float64(0.05)}),
        ("per-channel-axis", {"weight_axis": 1, "weight_shape": (8, 8, 3, 3)}),  # Conv weights: (K, C, R, S)
        ("per-channel-axis", {"op": "ConvTranspose", "weight_shape": (4, 4, 3, 3), "weight_axis": 0}),
        ("per-channel-axis", {"op": "Gemm", "weight_shape": (8, 4), "weight_axis": 0}),  # transB=0: (K, N)
        ("per-channel-weights", PER_CHANNEL_ACTIVATION),
        ("q-dq-pair", {"q_feeds_conv": True}),
        ("weighted-op-inputs", {"quantize_activation": False}),
        ("opset", {"opset": 12}),
    ],
)  # fmt: skip
def test_each_rule_is_named_where_it_is_broken(rule, kwargs):
    rules = _rules(_qdq_conv(**kwargs))
    assert rule in rules, rules
    assert rule in RULES


def test_uint8_activations_break_the_type_rules():
    rules = _rules(_qdq_conv(activation_zp=np.uint8(0)))
    assert {"q-output-type", "dq-input-type"} <= rules


def test_zero_point_shape_and_parser_ops():
    model = _qdq_conv()
    zp = next(i for i in model.graph.initializer if i.name == "w_zp")
    zp.CopyFrom(_const("w_zp", np.zeros(3, np.int8)))
    assert "zero-point-shape" in _rules(model)
    model = _qdq_conv()
    model.graph.node.append(
        helper.make_node("FusedConv", ["y", "w"], ["z"], name="ms", domain="com.microsoft")
    )
    model.graph.node.append(helper.make_node("Unique", ["y"], ["u"], name="unique"))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    violations = [v for v in check_tensorrt_qdq(model) if v.rule == "parser-op"]
    assert {v.node for v in violations} == {"ms", "unique"}


def test_per_channel_scale_on_a_layernorm_weight_is_refused():
    """What ONNX Runtime's quantizer attempted on every LayerNorm of deit_tiny (50 warnings)."""
    nodes = [
        helper.make_node("DequantizeLinear", ["g_q", "g_scale", "g_zp"], ["g"], name="g_dq", axis=0),
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="ln", axis=-1),
    ]
    inits = [
        _const("g_q", RNG.integers(-127, 128, 16, dtype=np.int8)),
        _const("g_scale", np.full(16, 0.01, np.float32)),
        _const("g_zp", np.zeros(16, np.int8)),
        _const("b", np.zeros(16, np.float32)),
    ]
    graph = helper.make_graph(
        nodes,
        "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    violations = check_tensorrt_qdq(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    assert [(v.rule, v.node) for v in violations] == [("per-channel-axis", "g_dq")]


class _Reader(CalibrationDataReader):
    def __init__(self, images):
        self._it = iter([{"input": images[i : i + 8]} for i in range(0, len(images), 8)])

    def get_next(self):
        return next(self._it, None)


@pytest.fixture(scope="module")
def trained_fp32(trained_student, tmp_path_factory):
    """The trained default student's fp32 ONNX and real digits images to calibrate on."""
    path, model, images, _ = trained_student
    root = tmp_path_factory.mktemp("rules")
    fp32 = export_onnx(model, torch.from_numpy(images[:2]), root / "fp32.onnx", max_batch=8, metadata={})
    return root, fp32, images


def test_default_onnxruntime_quantization_of_a_trained_student_breaks_tensorrt_rules(trained_fp32):
    """The layout the first INT8 file had: ORT's defaults with symmetric activations. Its trained biases
    become int32 DequantizeLinear nodes, which TensorRT's parser refuses."""
    root, fp32, images = trained_fp32
    quantize_static(
        str(fp32),
        str(root / "ort-default.onnx"),
        _Reader(images[:32]),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    model = onnx.load(root / "ort-default.onnx")
    inits = {i.name: i for i in model.graph.initializer}
    int32_dq = [
        n for n in model.graph.node
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
        and inits[n.input[0]].data_type == TensorProto.INT32
    ]  # fmt: skip
    assert int32_dq, "a trained student has non-zero biases, which ORT quantizes to int32"
    dq_type_violations = {v.node for v in check_tensorrt_qdq(model) if v.rule == "dq-input-type"}
    assert {n.name for n in int32_dq} <= dq_type_violations


def test_tensorrt_scheme_on_the_trained_student_passes(trained_fp32, tmp_path):
    _, fp32, images = trained_fp32
    quantizer = Int8Quantizer(fp32, images[:32], method="minmax", batch=8, workdir=tmp_path)
    model = quantizer.quantize(TENSORRT)
    assert check_tensorrt_qdq(model) == []
    biases = [n.input[2] for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert biases and all(inits[b].dtype == np.float32 for b in biases)
    assert sum(np.abs(inits[b]).sum() > 0 for b in biases) == len(biases), "the fixture's biases are non-zero"


class _TinyViT(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, the block shape of deit_tiny, small enough for a test."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 8, 8)
        self.norm = nn.LayerNorm(16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = tokens + self.fc2(nn.functional.gelu(self.fc1(self.norm(tokens))))
        return self.head(tokens.mean(1))


def test_tensorrt_scheme_leaves_layernorm_alone(tmp_path, caplog):
    torch.manual_seed(0)
    model = _TinyViT().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_(0, 0.1)
    fp32 = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "vit.onnx", max_batch=4, metadata={})
    calib = RNG.standard_normal((16, 3, 32, 32)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        qdq = Int8Quantizer(fp32, calib, method="minmax", batch=8, workdir=tmp_path).quantize(TENSORRT)
    assert not [r for r in caplog.records if "out-of-range" in r.getMessage()]
    assert check_tensorrt_qdq(qdq) == []
    producers = {o: n for n in qdq.graph.node for o in n.output}
    (norm,) = [n for n in qdq.graph.node if n.op_type == "LayerNormalization"]
    assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in norm.input)
    matmuls = [n for n in qdq.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert matmuls and all(producers[n.input[1]].op_type == "DequantizeLinear" for n in matmuls)
