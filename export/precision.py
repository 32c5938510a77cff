"""fp32 ONNX -> fp16 ONNX (fp32 inputs/outputs kept) and two INT8 QDQ ONNX files: one for TensorRT
(symmetric, zero-points all 0) and one tuned for ONNX Runtime on x86 CPUs (U8S8)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from export.onnx_export import INPUT_NAME
from kdfast.atomic import atomic_write


def to_fp16(src: Path, dst: Path) -> Path:
    """Convert weights and compute to fp16, keeping fp32 graph inputs/outputs (Casts at the edges).

    ONNX Runtime's converter keeps ops without fp16 kernels in fp32 (its default block list) and clamps
    initializers to the fp16 range, so out-of-range weights saturate instead of becoming inf.
    """
    proto = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    _sort_topologically(proto.graph)
    onnx.checker.check_model(proto)
    atomic_write(dst, proto.SerializeToString())
    return dst


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so producers precede consumers: the converter appends its input Casts at the
    end, which ONNX Runtime tolerates but the checker and TensorRT's parser do not."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError(f"the graph has a cycle or a dangling input at node {pending[0].name!r}")
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
        ordered += ready
        available.update(o for n in ready for o in n.output)
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


class _Batches(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch: int):
        self._chunks: Iterator[np.ndarray] = iter(np.array_split(images, max(1, -(-len(images) // batch))))

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = next(self._chunks, None)
        return None if chunk is None else {INPUT_NAME: np.ascontiguousarray(chunk, dtype=np.float32)}


def to_int8_qdq(src: Path, dst: Path, calibration: np.ndarray, *, batch: int = 8) -> Path:
    """Static INT8 quantization in QDQ format for TensorRT, calibrated (min/max) on ``calibration`` images.

    Weights are per-channel and symmetric, activations symmetric int8, so every zero-point is 0 as
    TensorRT's explicit quantization requires (NVIDIA, "Working with Quantized Types": Q/DQ with
    zero-point 0). ONNX Runtime runs this file correctly but slowly on CPU: a symmetric range cannot absorb
    ReLU, so Q/DQ pairs stay around every ReLU and ORT cannot fuse them into QLinearConv; use
    :func:`to_int8_ort` for ORT on CPU.
    """
    return _quantize(
        src,
        dst,
        calibration,
        batch=batch,
        activation_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )


# x86 ONNX Runtime runs QLinearConv in NHWC with the channels in the vector lanes; below this many input
# channels (an RGB stem, a 16-channel depthwise conv) the lanes are mostly idle and the fp32 NCHWc kernels
# win: on an AVX512-VNNI Xeon at batch 8 the edge_cnn stem took 0.63 ms in int8 against 0.18 ms in fp32.
MIN_INT8_CONV_CHANNELS = 24


def to_int8_ort(src: Path, dst: Path, calibration: np.ndarray, *, batch: int = 8) -> Path:
    """Static INT8 quantization in QDQ format tuned for ONNX Runtime on x86 CPUs (not for TensorRT).

    U8S8, the combination ONNX Runtime's quantization guide recommends for x86: activations uint8 with
    asymmetric min/max ranges (a ReLU output's range starts at 0, so the quantizer drops the ReLU and ORT
    fuses every DQ -> Conv -> Q into one QLinearConv), weights int8 per-channel symmetric. Convs reading
    fewer than ``MIN_INT8_CONV_CHANNELS`` input channels stay fp32 (see the constant).
    """
    return _quantize(
        src,
        dst,
        calibration,
        batch=batch,
        activation_type=QuantType.QUInt8,
        extra_options={"WeightSymmetric": True},
        min_conv_channels=MIN_INT8_CONV_CHANNELS,
    )


def _conv_input_channels(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int:
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return inits[node.input[1]].dims[1] * group


def _quantize(
    src: Path,
    dst: Path,
    calibration: np.ndarray,
    *,
    batch: int,
    activation_type: QuantType,
    extra_options: dict[str, object],
    min_conv_channels: int = 0,
) -> Path:
    """ORT static quantization (QDQ, per-channel int8 weights, min/max calibration on ``calibration``
    (N, C, H, W)) after ORT's quantization pre-processing (symbolic shape inference + graph optimization),
    as its documentation asks. Convs with fewer than ``min_conv_channels`` input channels stay fp32."""
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "preprocessed.onnx"
        quant_pre_process(str(src), str(prepped), skip_symbolic_shape=False)
        graph = onnx.load(prepped).graph
        inits = {i.name: i for i in graph.initializer}
        narrow = [
            n.name
            for n in graph.node
            if n.op_type == "Conv"
            and n.input[1] in inits
            and _conv_input_channels(n, inits) < min_conv_channels
        ]
        quantize_static(
            str(prepped),
            str(dst),
            _Batches(calibration, batch),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=activation_type,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=narrow,
            extra_options=extra_options,
        )
    onnx.checker.check_model(str(dst))
    return dst


def copy_metadata(src: Path, dst: Path) -> None:
    """Carry ``metadata_props`` over from ``src`` (the converters drop or keep them inconsistently)."""
    props = onnx.load(src, load_external_data=False).metadata_props
    proto = onnx.load(dst)
    del proto.metadata_props[:]
    proto.metadata_props.extend(props)
    atomic_write(dst, proto.SerializeToString())
