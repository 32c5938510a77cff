"""fp32 ONNX -> INT8 Q/DQ ONNX: calibrate once (MinMax, entropy or percentile), then write the file for any
set of layers kept in float, in one of two layouts.

- :data:`TENSORRT` (``student.int8.onnx``): what TensorRT's explicit quantization accepts and fuses
  (:mod:`export.qdq_rules`): symmetric int8 activations and per-channel int8 weights, zero-points 0, Q/DQ on
  the inputs of weighted ops only (Conv, ConvTranspose, Gemm, MatMul with a constant B), their outputs and
  biases left in float (NVIDIA's Q/DQ placement recommendations: "quantize all inputs of weighted
  operations", "do not quantize the outputs of weighted operations" by default; TensorRT quantizes biases
  itself), nothing per channel on normalization weights.
- :data:`ORT_CPU` (``student.int8-ort.onnx``): U8S8 for ONNX Runtime on x86 CPUs (uint8 asymmetric
  activations so ReLU folds away and every DQ -> Conv -> Q fuses into QLinearConv, int32 biases, 7-bit
  weights so that the fast U8S8 kernels are exact on every x86 CPU); not loadable by TensorRT.

OpenVINO runs both (the TensorRT file's weights put on a 7-bit grid where its int8 kernels would saturate,
:func:`export.openvino_backend.narrow_weights`); which one it runs faster depends on the network, so the
command times both there.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    create_calibrator,
    quantize_static,
    save_tensors_data,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from tqdm import tqdm

from export.onnx_export import INPUT_NAME, finish, read_metadata
from export.qdq_rules import WEIGHTED_OPS, weighted_layers

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
# Histogram settings per method. Entropy follows TensorRT's calibrator (Migacz, "8-bit Inference with
# TensorRT", GTC 2017): 2048 bins, thresholds searched over 128 quantized levels; ONNX Runtime's default of
# 128 bins for 128 levels leaves one candidate threshold, the full range, i.e. MinMax again.
_CALIBRATION_OPTIONS = {
    "minmax": {},
    "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048, "percentile": 99.999},
}

# x86 ONNX Runtime runs QLinearConv in NHWC with the channels in the vector lanes; below this many input
# channels (an RGB stem, a 16-channel depthwise conv) the lanes are mostly idle and the fp32 NCHWc kernels
# win: on an AVX512-VNNI Xeon at batch 8 the edge_cnn stem took 0.63 ms in int8 against 0.18 ms in fp32
# (on an AVX2 EPYC, edge_cnn all-INT8 ran at 0.94x fp32, with these two convs float at 1.20x).
MIN_INT8_CONV_CHANNELS = 24
# ... except a thin conv that a MaxPool reads (through its activation): left float, the MaxPool runs in
# float NCHW after a layout reorder instead of ORT's uint8 NHWC kernel (resnet18 at batch 8 on an AVX2 EPYC:
# 1.30 ms against 0.02 ms, 15% of the INT8 forward; the stem in int8 took it from 1.28x to 1.85x fp32).
_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "HardSwish", "Sigmoid"}

# ONNX Runtime has no integer kernels for these, and a per-channel scale on their 1-D weights is what made
# the quantizer print "Axis 1 is out-of-range" for every LayerNorm of a ViT.
_NORMALIZATION_OPS = {
    "LayerNormalization",
    "BatchNormalization",
    "InstanceNormalization",
    "GroupNormalization",
}


@dataclass(frozen=True)
class Scheme:
    """One INT8 layout: which ops get Q/DQ and how activations are quantized."""

    name: str
    activation_type: QuantType
    op_types: tuple[str, ...] | None  # None: every op type ONNX Runtime's QDQ quantizer knows but norms
    extra_options: dict = field(default_factory=dict)
    min_conv_channels: int = 0
    # 7-bit weights (-64..64): on x86 without VNNI ONNX Runtime's U8S8 kernels sum pairs of products in
    # int16, exact only when |x * w| * 2 <= 32767 (255 * 64 * 2 = 32640), and ``session.x64quantprecision``
    # then leaves such weights alone, so the fast kernels run and are exact on every x86 CPU.
    reduce_range: bool = False
    # Only the weighted ops read the dequantized activation; its other readers (a residual Add) the float.
    weighted_inputs_only: bool = False


TENSORRT = Scheme(
    name="int8",
    activation_type=QuantType.QInt8,
    op_types=WEIGHTED_OPS,
    extra_options={
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "MatMulConstBOnly": True,
        "OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS),
    },
    weighted_inputs_only=True,
)
ORT_CPU = Scheme(
    name="int8-ort",
    activation_type=QuantType.QUInt8,
    op_types=None,
    extra_options={"WeightSymmetric": True},
    min_conv_channels=MIN_INT8_CONV_CHANNELS,
    reduce_range=True,
)
SCHEMES = {s.name: s for s in (TENSORRT, ORT_CPU)}


class _Batches(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch: int, bar: tqdm):
        self._chunks: Iterator[np.ndarray] = iter(np.array_split(images, max(1, -(-len(images) // batch))))
        self._bar = bar

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = next(self._chunks, None)
        if chunk is None:
            return None
        self._bar.update(len(chunk))
        return {INPUT_NAME: np.ascontiguousarray(chunk, dtype=np.float32)}


def _conv_input_channels(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> int:
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return inits[node.input[1]].dims[1] * group


def _feeds_max_pool(node: onnx.NodeProto, readers: dict[str, list[onnx.NodeProto]]) -> bool:
    """Whether a MaxPool reads ``node``'s output, directly or through one elementwise activation."""
    for reader in readers.get(node.output[0], []):
        after = readers.get(reader.output[0], []) if reader.op_type in _ACTIVATIONS else []
        if reader.op_type == "MaxPool" or any(r.op_type == "MaxPool" for r in after):
            return True
    return False


def _registered_op_types() -> list[str]:
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - _NORMALIZATION_OPS)


class Int8Quantizer:
    """ONNX Runtime's static quantization of one fp32 file, calibrated once.

    The fp32 file first goes through ORT's quantization pre-processing (symbolic shape inference, then
    graph optimization that folds BatchNorm into the convolutions), as ORT's documentation asks; every
    tensor's range is collected once with ``method`` on ``calibration`` images (N, C, H, W) and cached in
    ``workdir``, so :meth:`quantize` can be called again with other layers kept in float without
    recalibrating. Ranges stay asymmetric here; the TensorRT scheme symmetrizes them when it quantizes.
    """

    def __init__(self, fp32: Path, calibration: np.ndarray, *, method: str, batch: int, workdir: Path):
        self.method = CALIBRATION_METHODS[method]
        options = {"symmetric": False, **_CALIBRATION_OPTIONS[method]}
        self.workdir = workdir
        self.float_path = workdir / "preprocessed.onnx"
        quant_pre_process(str(fp32), str(self.float_path), skip_symbolic_shape=False)
        self.float_model = onnx.load(self.float_path)
        self._cache = workdir / "calibration.json"
        calibrator = create_calibrator(
            self.float_path,
            None,
            augmented_model_path=str(workdir / "augmented.onnx"),
            calibrate_method=self.method,
            extra_options=options,
        )
        # The histogram calibrators print their progress to stdout; the bar says it instead.
        bar = tqdm(total=len(calibration), desc=f"INT8 calibration ({method})", unit="img", leave=False)
        with bar, contextlib.redirect_stdout(io.StringIO()):
            calibrator.collect_data(_Batches(calibration, batch, bar))
            ranges = calibrator.compute_data()
        save_tensors_data(ranges, self._cache)

    def candidates(self, scheme: Scheme) -> list[str]:
        """Names of the weighted ops ``scheme`` quantizes, in graph order: what accuracy control may keep in
        float."""
        always_float = self._always_float(scheme)
        return [n.name for n in weighted_layers(self.float_model) if n.name not in always_float]

    def _always_float(self, scheme: Scheme) -> set[str]:
        """Nodes ``scheme`` never quantizes: thin convs that no MaxPool reads (the ORT CPU layout) and, where
        the scheme quantizes
        only weighted ops, every Conv/Gemm/MatMul whose second input is not a constant. ONNX Runtime's QDQ
        quantizer ignores ``MatMulConstBOnly`` and would put Q/DQ on both inputs of attention's
        ``q @ k^T`` and ``softmax @ v``, activations the TensorRT layout leaves float (and that the QAD
        simulation, :mod:`kdfast.quant`, does not quantize)."""
        inits = {i.name: i for i in self.float_model.graph.initializer}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.float_model.graph.node:
            for name in n.input:
                readers.setdefault(name, []).append(n)
        thin = {
            n.name
            for n in self.float_model.graph.node
            if n.op_type == "Conv"
            and n.input[1] in inits
            and _conv_input_channels(n, inits) < scheme.min_conv_channels
            and not _feeds_max_pool(n, readers)
        }
        if scheme.op_types != WEIGHTED_OPS:
            return thin
        weighted = {n.name for n in weighted_layers(self.float_model)}
        nodes = self.float_model.graph.node
        activations_only = {n.name for n in nodes if n.op_type in WEIGHTED_OPS and n.name not in weighted}
        return thin | activations_only

    def quantize(self, scheme: Scheme, keep_float: Sequence[str] = ()) -> onnx.ModelProto:
        """The Q/DQ model in ``scheme`` with the nodes named in ``keep_float`` left in float."""
        out = self.workdir / f"{scheme.name}.candidate.onnx"
        quantize_static(
            str(self.float_path),
            str(out),
            None,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(scheme.op_types or _registered_op_types()),
            per_channel=True,
            reduce_range=scheme.reduce_range,
            activation_type=scheme.activation_type,
            weight_type=QuantType.QInt8,
            calibrate_method=self.method,
            nodes_to_exclude=sorted(set(keep_float) | self._always_float(scheme)),
            extra_options=scheme.extra_options,
            calibration_cache_path=str(self._cache),
        )
        model = onnx.load(out)
        if scheme.weighted_inputs_only:
            float_skips(model)
        return model


def float_skips(model: onnx.ModelProto) -> int:
    """Feed every reader of a quantized activation that is not a weighted op (a residual Add, a pooling)
    the float tensor again; returns how many inputs were rewired.

    ONNX Runtime's quantizer rewires *every* reader of a tensor it quantizes to the dequantized copy (its
    ``DedicatedQDQPair`` option splits pairs only between several quantized readers), so a skip connection
    whose tensor also feeds a conv carried int8 noise into the sum: on mobilenetv3_small_100 that moved 17%
    of the next conv's input by a quantization step. TensorRT's layout here quantizes the inputs of weighted
    ops only, as the QAD simulation (:mod:`kdfast.quant`) does."""
    producers = {o: n for n in model.graph.node for o in n.output}
    float_of = {}
    for dq in (n for n in model.graph.node if n.op_type == "DequantizeLinear"):
        q = producers.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            float_of[dq.output[0]] = q.input[0]
    rewired = 0
    for node in model.graph.node:
        if node.op_type in WEIGHTED_OPS or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k, name in enumerate(node.input):
            if name in float_of:
                node.input[k] = float_of[name]
                rewired += 1
    return rewired


def quantize_file(
    fp32: Path, dst: Path, calibration: np.ndarray, *, scheme: Scheme = TENSORRT, batch: int = 8
) -> Path:
    """Every layer ``scheme`` quantizes in INT8 (MinMax calibration on ``calibration``, no accuracy
    control), written to ``dst`` clean and with ``fp32``'s metadata: an INT8 file for a runtime to consume
    without the command's gates (the runtime tests and benchmarks)."""
    with tempfile.TemporaryDirectory() as work:
        quantizer = Int8Quantizer(fp32, calibration, method="minmax", batch=batch, workdir=Path(work))
        proto = quantizer.quantize(scheme)
    return finish(proto, dst, read_metadata(fp32))
