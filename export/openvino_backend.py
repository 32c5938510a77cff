"""The OpenVINO seam: the only module that imports ``openvino`` (OpenVINO 2024-2026 Python API, CPU plugin).

OpenVINO reads the ONNX files the command already wrote (fp32, fp16, and both Q/DQ INT8 files, whose
quantized ops its low-precision transformations run in int8), bounds the batch to 1..max_batch, and saves
the IR (``.xml`` + ``.bin``) beside them. Which INT8 layout it runs faster depends on the network, so both
are built, verified and timed, and the report names the faster. Compilation sets the inference precision
explicitly: the CPU plugin's default is bf16 on every CPU with AVX512-BF16 or AMX ("CPU Device", Supported
Model Precision), so an fp32 row compiled with defaults would be a bf16 row on such a machine.

On x86 CPUs without VNNI the CPU plugin's int8 convolutions multiply uint8 activations by int8 weights with
``vpmaddubsw``, which sums each pair of products into int16 and clips (255 * 127 * 2 > 32767): the Q/DQ
file's 8-bit weights then lose whole logits (edge_cnn on digits, AVX2 EPYC: 91% top-1 agreement with
PyTorch, max |error| 47% of the largest logit, against 99.7% for the same file's own Q/DQ semantics). There
the IR gets the weights on a 7-bit grid (+-63: 255 * 63 * 2 < 32767), as NNCF's overflow fix does, which
agreed 99.7% with an error of 0.07 against the file's semantics; ``info["weight_bits"]`` says which ran.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from export.machine import u8s8_saturates
from export.runner import Runner, check_precision, import_failure
from kdfast.atomic import atomic_write

NAME = "openvino"
PRECISIONS = ("fp32", "fp16", "int8", "int8-ort")
DYNAMIC_BATCH = True
# The kdfast precision is stored in the IR's rt_info, so load() compiles the file the way it was meant.
_RT_KEY = ["kdfast", "precision"]
_BITS_KEY = ["kdfast", "weight_bits"]
# The widest symmetric weight grid whose u8 x s8 pair sums fit int16: 255 * 63 * 2 = 32130 <= 32767.
_NARROW_WEIGHT_MAX = 63
# Ops whose runtime precision tells whether the int8 path was taken.
_COMPUTE_OPS = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")


@functools.cache
def unavailable_reason() -> str | None:
    """Why no OpenVINO model can be built here (one line), or None when ``openvino`` imports."""
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        return import_failure("OpenVINO", "openvino", "openvino", e)
    return None


def inference_precision(precision: str, capabilities: list[str]) -> str:
    """The CPU plugin's ``INFERENCE_PRECISION_HINT`` for a ``precision`` file: f32 for fp32 and both int8
    files (the quantized ops run in int8 whatever the hint; the rest must stay f32, not drift to bf16), f16
    for fp16 where the CPU lists FP16 among its ``OPTIMIZATION_CAPABILITIES``, else f32 (fp16 weights, f32
    math)."""
    check_precision("OpenVINO", precision, PRECISIONS)
    return "f16" if precision == "fp16" and "FP16" in capabilities else "f32"


def narrow_weights(proto: onnx.ModelProto, qmax: int = _NARROW_WEIGHT_MAX) -> int:
    """Requantize, in place, every int8 weight a DequantizeLinear reads from an initializer onto the grid
    -qmax..qmax per channel of its scale (the channel's largest code maps to qmax, its scale grows by the same
    factor, zero-points stay 0). Returns how many weight tensors changed."""
    inits = {t.name: t for t in proto.graph.initializer}
    changed = 0
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or node.input[1] not in inits:
            continue
        weight, scale = inits[node.input[0]], inits[node.input[1]]
        if weight.data_type != onnx.TensorProto.INT8:
            continue
        q = numpy_helper.to_array(weight).astype(np.int32)
        s = numpy_helper.to_array(scale).astype(np.float32)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % max(q.ndim, 1)
        shape = [-1 if d == axis else 1 for d in range(q.ndim)] if s.ndim else [1] * q.ndim
        others = tuple(d for d in range(q.ndim) if d != axis) if s.ndim else None
        peak = np.maximum(np.abs(q).max(axis=others, keepdims=s.ndim > 0), 1).reshape(shape)
        if peak.max() <= qmax:
            continue
        factor = np.maximum(peak / qmax, 1.0)
        narrowed = np.clip(np.rint(q / factor), -qmax, qmax).astype(np.int8)
        weight.CopyFrom(numpy_helper.from_array(narrowed, weight.name))
        scale.CopyFrom(numpy_helper.from_array((s * factor.reshape(s.shape)).astype(np.float32), scale.name))
        changed += 1
    return changed


def convert(
    model: nn.Module,
    onnx_path: Path,
    example: torch.Tensor,
    out: Path,
    *,
    precision: str,
    max_batch: int,
    calibration: np.ndarray | None = None,
) -> Path:
    """Read ``onnx_path`` (the ONNX file written for ``precision``), bound its batch to 1..``max_batch``, save
    the IR as ``out/<onnx stem>.xml`` + ``.bin`` with the weights as they are (no fp16 compression of an
    fp32 file). ``model`` and ``calibration`` are unused: the ONNX file already holds the weights and the Q/DQ
    ranges. An int8 file's weights go onto a 7-bit grid where u8 x s8 products saturate (see the module
    docstring). Returns the ``.xml`` path."""
    check_precision("OpenVINO", precision, PRECISIONS)
    import openvino as ov

    xml = out / onnx_path.with_suffix(".xml").name
    staging = out / f".{xml.stem}.staging"
    staging.mkdir(exist_ok=True)
    try:
        source, bits = onnx_path, 8
        if precision == "int8" and u8s8_saturates():
            proto = onnx.load(str(onnx_path))
            if narrow_weights(proto):
                source, bits = staging / onnx_path.name, 7
                onnx.save(proto, str(source))
        ov_model = ov.Core().read_model(str(source))
        ov_model.reshape({0: ov.PartialShape([ov.Dimension(1, max_batch), *example.shape[1:]])})
        ov_model.set_rt_info(precision, _RT_KEY)
        if precision == "int8-ort":
            bits = 7  # the file's own weights (export.quantize.ORT_CPU: -64..64, 255 * 64 * 2 < 32767)
        if precision in ("int8", "int8-ort"):
            ov_model.set_rt_info(bits, _BITS_KEY)
        ov.save_model(ov_model, str(staging / xml.name), compress_to_fp16=False)
        # The .bin first, the .xml (which finds its weights by stem) last: a new .xml is never seen before
        # its .bin is complete.
        for suffix in (".bin", ".xml"):
            staged = staging / xml.with_suffix(suffix).name
            atomic_write(xml.with_suffix(suffix), staged.read_bytes())
            staged.unlink()
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
    return xml


def artifacts(path: Path) -> list[Path]:
    """The IR ``path`` (``.xml``) and the weights it reads (``.bin`` of the same stem)."""
    return [path, path.with_suffix(".bin")]


def runtime_precisions(compiled: object) -> dict[str, int]:
    """How many compute ops (convolutions, fully connected, matmuls) of a compiled model run in each
    precision, from the executable graph's ``runtimePrecision`` (e.g. ``{"u8": 16, "i8": 1}``)."""
    counts = Counter(
        str(op.get_rt_info()["runtimePrecision"].astype(str))
        for op in compiled.get_runtime_model().get_ordered_ops()
        if str(op.get_rt_info()["layerType"].astype(str)) in _COMPUTE_OPS
    )
    return dict(counts)


def load(path: Path, *, threads: int) -> Runner:
    """Compile the IR at ``path`` for the CPU with ``threads`` inference threads, one stream, the latency
    hint and the inference precision of :func:`inference_precision`; ``info`` records the precision the
    compiled model reports back and the precision of each compute op."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    core = ov.Core()
    ov_model = core.read_model(str(path))
    precision = str(ov_model.get_rt_info(_RT_KEY).astype(str)) if ov_model.has_rt_info(_RT_KEY) else "fp32"
    hint = inference_precision(precision, core.get_property("CPU", props.device.capabilities))
    compiled = core.compile_model(
        ov_model,
        "CPU",
        {
            hints.inference_precision: getattr(ov.Type, hint),
            props.inference_num_threads: threads,
            props.num_streams: 1,
            hints.performance_mode: hints.PerformanceMode.LATENCY,
        },
    )
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        # The output tensor is the request's own buffer, overwritten by the next call.
        return request.get_output_tensor(0).data.copy()

    info = {
        "runtime": f"openvino {ov.__version__.split('-')[0]}",
        "precision": precision,
        "inference_precision": compiled.get_property(hints.inference_precision).to_string(),
        "threads": int(compiled.get_property(props.inference_num_threads)),
        "batch": str(ov_model.inputs[0].partial_shape[0]),
        "compute_ops": runtime_precisions(compiled),
    }
    if ov_model.has_rt_info(_BITS_KEY):
        info["weight_bits"] = int(ov_model.get_rt_info(_BITS_KEY).astype(str))
    return Runner(run, info)
