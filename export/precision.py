"""fp32 ONNX -> fp16 ONNX (fp32 inputs/outputs kept) and INT8 QDQ ONNX (zero-points all 0, for TensorRT)."""

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


def to_fp16(src: Path, dst: Path) -> Path:
    """Convert weights and compute to fp16, keeping fp32 graph inputs/outputs (Casts at the edges).

    ONNX Runtime's converter keeps ops without fp16 kernels in fp32 (its default block list) and clamps
    initializers to the fp16 range, so out-of-range weights saturate instead of becoming inf.
    """
    proto = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    _sort_topologically(proto.graph)
    onnx.checker.check_model(proto)
    onnx.save(proto, dst)
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
    """Static INT8 quantization in QDQ format, calibrated (min/max) on ``calibration`` images (N, C, H, W).

    Weights are per-channel and symmetric, activations symmetric int8, so every zero-point is 0 as
    TensorRT's explicit quantization requires; ONNX Runtime's quantization pre-processing (symbolic shape
    inference + graph optimization) runs first, as its documentation asks.
    """
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "preprocessed.onnx"
        quant_pre_process(str(src), str(prepped), skip_symbolic_shape=False)
        quantize_static(
            str(prepped),
            str(dst),
            _Batches(calibration, batch),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    onnx.checker.check_model(str(dst))
    return dst


def copy_metadata(src: Path, dst: Path) -> None:
    """Carry ``metadata_props`` over from ``src`` (the converters drop or keep them inconsistently)."""
    props = onnx.load(src, load_external_data=False).metadata_props
    proto = onnx.load(dst)
    del proto.metadata_props[:]
    proto.metadata_props.extend(props)
    onnx.save(proto, dst)
