"""TensorRT's rules for explicitly quantized (Q/DQ) ONNX files, as code: what its ONNX parser imports and
what its Q/DQ layers accept, checked on a graph before any TensorRT sees it.

Sources, TensorRT 10.x:
- NVIDIA, "Working with Quantized Types" (TensorRT developer guide): quantization is symmetric; activations
  are quantized per tensor; weights per tensor or per channel along the output-channel axis of Convolution,
  Deconvolution, fully connected layers and MatMul with a constant second input; Q/DQ placement: quantize
  all inputs of weighted operations, leave biases in high precision.
- onnx-tensorrt ``docs/operators.md`` (TensorRT 10.15): opsets 9..24; DequantizeLinear on INT8, FP8, FP4
  and INT4 only, ``x_zero_point`` zero; QuantizeLinear ``y_zero_point`` 0; QLinearConv, ConvInteger,
  MatMulInteger, DynamicQuantizeLinear and the other "N" rows are not imported.
- onnx-tensorrt ``QuantDequantLinearHelper`` (the importer): scale coefficients all positive, zero-point
  volume equal to the scale's, per-channel scale count equal to the channel dimension, UINT8 refused as a
  quantized type. An INT32 bias DequantizeLinear fails with "only activation types allowed as input to this
  layer" (NVIDIA/TensorRT#4542, onnx/onnx-tensorrt#850).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

# One line per rule: the id a violation names, and the rule as TensorRT states it.
RULES = {
    "parser-op": "every node is a default-domain ONNX op that TensorRT's ONNX parser imports",
    "opset": "the default-domain opset lies in the parser's range 9..24 (13+ once a Q/DQ node has an axis)",
    "dq-input-type": "DequantizeLinear reads INT8, FP8 E4M3, INT4 or FP4 E2M1 only (no INT32 bias, no UINT8)",
    "q-output-type": "QuantizeLinear writes INT8, FP8 E4M3, INT4 or FP4 E2M1 (its zero-point sets the type)",
    "zero-point": "zero-points are all 0: TensorRT's quantization is symmetric",
    "scale": "scales are constant float32/float16/bfloat16 tensors, finite and > 0",
    "zero-point-shape": "a zero-point has as many elements as its scale",
    "per-channel-weights": "per-channel scales on constant weights only; activations are per tensor",
    "per-channel-axis": (
        "per-channel weights are those of Conv (axis 0), ConvTranspose (axis 1), Gemm (axis 0 with transB, "
        "else 1) or MatMul (axis 1 of a 2-D B), with one scale per output channel"
    ),
    "q-dq-pair": "every QuantizeLinear output feeds DequantizeLinear nodes only",
    "weighted-op-inputs": (
        "a weighted op whose weight is dequantized also reads a dequantized activation and a float bias"
    ),
}

OPSET_RANGE = (9, 24)
QUANTIZED_TYPES = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4, TensorProto.FLOAT4E2M1}
SCALE_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}

# The "N" rows of onnx-tensorrt's operator support matrix (TensorRT 10.15).
UNSUPPORTED_OPS = frozenset(
    {
        "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor",
        "CenterCropPad", "Col2Im", "Compress", "ConcatFromSequence", "ConvInteger", "DFT",
        "Det", "DynamicQuantizeLinear", "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool",
        "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement",
        "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch", "SequenceAt",
        "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength",
        "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat", "StringNormalizer",
        "StringSplit", "TfIdfVectorizer", "Unique",
    }
)  # fmt: skip

# Weighted ops: the index of their weight input and the axis of its output channels.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def weighted_layers(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The weighted ops of ``model`` whose weight is a constant, in graph order: the layers INT8 quantizes."""
    inits = {i.name for i in model.graph.initializer}
    return [
        n for n in model.graph.node if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in inits
    ]


def output_channel_axis(node: onnx.NodeProto, rank: int) -> int | None:
    """The axis of the output channels of ``node``'s weight (input 1), or None if it has none TensorRT
    quantizes per channel: Conv weights are (K, C/g, R, S), ConvTranspose (C, K/g, R, S), Gemm B is (N, K)
    with transB=1 else (K, N), MatMul B is (K, N) when 2-D."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if _attr(node, "transB", 0) else 1
    if node.op_type == "MatMul" and rank == 2:
        return 1
    return None


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule} at {self.node}: {self.detail}"


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


class _Graph:
    """Constants, types and consumers of one graph, for the rules below."""

    def __init__(self, model: onnx.ModelProto):
        try:
            graph = onnx.shape_inference.infer_shapes(model).graph
        except onnx.shape_inference.InferenceError:  # an op ONNX cannot infer: rely on the types given
            graph = model.graph
        self.nodes = list(graph.node)
        self.constants: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.types: dict[str, int] = {i.name: i.data_type for i in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                tensor = node.attribute[0].t
                self.constants[node.output[0]] = numpy_helper.to_array(tensor)
                self.types[node.output[0]] = tensor.data_type
        for value in [*graph.input, *graph.value_info, *graph.output]:
            if value.type.HasField("tensor_type"):
                self.types.setdefault(value.name, value.type.tensor_type.elem_type)
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)

    def input(self, node: onnx.NodeProto, i: int) -> str | None:
        return node.input[i] if len(node.input) > i and node.input[i] else None


def _name(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}->{node.output[0]}"


def _type_name(dtype: int | None) -> str:
    return "unknown" if dtype is None else TensorProto.DataType.Name(dtype)


def _quantized_type(g: _Graph, node: onnx.NodeProto) -> int | None:
    """The quantized type a Q node produces: ``output_dtype`` (opset 21+), else its zero-point's type, else
    ONNX's default UINT8."""
    explicit = _attr(node, "output_dtype", 0)
    if explicit:
        return explicit
    zp = g.input(node, 2)
    return g.types.get(zp) if zp else TensorProto.UINT8


def _check_scale_and_zero_point(g: _Graph, node: onnx.NodeProto) -> list[Violation]:
    out, where = [], _name(node)
    scale_name, zp_name = g.input(node, 1), g.input(node, 2)
    scale = g.constants.get(scale_name) if scale_name else None
    if scale is None:
        out.append(Violation("scale", where, f"scale {scale_name!r} is not a constant"))
    elif g.types.get(scale_name) not in SCALE_TYPES:
        out.append(Violation("scale", where, f"scale type {_type_name(g.types.get(scale_name))}"))
    elif scale.size == 0 or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        out.append(
            Violation("scale", where, f"scale values not all finite and > 0 (min {scale.min(initial=0)})")
        )
    if zp_name is None:
        return out
    zp = g.constants.get(zp_name)
    if zp is None:
        out.append(Violation("zero-point", where, f"zero-point {zp_name!r} is not a constant"))
        return out
    if np.any(zp.astype(np.float64) != 0):
        out.append(Violation("zero-point", where, f"non-zero zero-point (max |zp| {np.abs(zp).max()})"))
    if scale is not None and zp.size != scale.size:
        out.append(Violation("zero-point-shape", where, f"{zp.size} zero-points for {scale.size} scales"))
    return out


def _check_per_channel(g: _Graph, node: onnx.NodeProto) -> list[Violation]:
    """A scale with more than one element: only a constant weight of a weighted op, on its output axis."""
    scale = g.constants.get(g.input(node, 1) or "")
    if scale is None or scale.size <= 1:
        return []
    where = _name(node)
    data = node.input[0]
    if node.op_type == "QuantizeLinear" or data not in g.constants:
        return [Violation("per-channel-weights", where, f"{scale.size} scales on activation {data!r}")]
    weight = g.constants[data]
    axis = _attr(node, "axis", 1)
    axis = axis + weight.ndim if axis < 0 else axis
    users = g.consumers.get(node.output[0], [])
    if not users:
        return []
    out = []
    for user in users:
        slot = list(user.input).index(node.output[0])
        expected = output_channel_axis(user, weight.ndim) if slot == 1 else None
        if expected is None:
            out.append(
                Violation(
                    "per-channel-axis",
                    where,
                    f"per-channel {data!r} is input {slot} of {user.op_type} {_name(user)!r}; TensorRT takes "
                    "per-channel scales only on the weight of Conv, ConvTranspose, Gemm and MatMul",
                )
            )
        elif axis != expected or weight.shape[axis] != scale.size:
            out.append(
                Violation(
                    "per-channel-axis",
                    where,
                    f"{user.op_type} weight {data!r} {list(weight.shape)} is quantized on axis {axis} with "
                    f"{scale.size} scales; its output channels: axis {expected} ({weight.shape[expected]})",
                )
            )
    return out


def _check_weighted_op(g: _Graph, node: onnx.NodeProto) -> list[Violation]:
    weight = g.input(node, 1)
    producer = g.producer.get(weight or "")
    if producer is None or producer.op_type != "DequantizeLinear":
        return []
    out, where = [], _name(node)
    activation = g.producer.get(node.input[0])
    if activation is None or activation.op_type != "DequantizeLinear":
        out.append(
            Violation(
                "weighted-op-inputs",
                where,
                f"{node.op_type} has a dequantized weight but its input {node.input[0]!r} is not dequantized",
            )
        )
    bias = g.input(node, 2)
    bias_producer = g.producer.get(bias or "")
    if bias_producer is not None and bias_producer.op_type == "DequantizeLinear":
        out.append(Violation("weighted-op-inputs", where, f"{node.op_type} bias {bias!r} is quantized"))
    return out


def check_tensorrt_qdq(model: onnx.ModelProto) -> list[Violation]:
    """Every violation of :data:`RULES` in ``model``; an empty list means TensorRT's parser and Q/DQ layers
    accept the quantization as written. Runs on any ONNX file (a float file has nothing to check beyond the
    parser and opset rules)."""
    g = _Graph(model)
    out: list[Violation] = []
    has_axis = any(
        n.op_type in ("QuantizeLinear", "DequantizeLinear") and any(a.name == "axis" for a in n.attribute)
        for n in g.nodes
    )
    low = 13 if has_axis else OPSET_RANGE[0]
    if g.opset is None or not low <= g.opset <= OPSET_RANGE[1]:
        out.append(
            Violation("opset", "model", f"default-domain opset {g.opset}, needs {low}..{OPSET_RANGE[1]}")
        )
    for node in g.nodes:
        where = _name(node)
        if node.domain not in ("", "ai.onnx") or node.op_type in UNSUPPORTED_OPS:
            op = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
            out.append(Violation("parser-op", where, f"{op} is not imported by TensorRT's ONNX parser"))
            continue
        if node.op_type == "DequantizeLinear":
            dtype = g.types.get(node.input[0])
            if dtype not in QUANTIZED_TYPES:
                out.append(
                    Violation("dq-input-type", where, f"dequantizes {_type_name(dtype)} {node.input[0]!r}")
                )
            out += _check_scale_and_zero_point(g, node) + _check_per_channel(g, node)
        elif node.op_type == "QuantizeLinear":
            dtype = _quantized_type(g, node)
            if dtype not in QUANTIZED_TYPES:
                out.append(Violation("q-output-type", where, f"quantizes to {_type_name(dtype)}"))
            out += _check_scale_and_zero_point(g, node) + _check_per_channel(g, node)
            others = [u for u in g.consumers.get(node.output[0], []) if u.op_type != "DequantizeLinear"]
            if others:
                out.append(
                    Violation("q-dq-pair", where, f"output feeds {others[0].op_type} {_name(others[0])!r}")
                )
        elif node.op_type in WEIGHTED_OPS:
            out += _check_weighted_op(g, node)
    return out
