"""ONNX Runtime sessions with explicit providers and fixed thread counts, and what a session actually runs."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from export.machine import u8s8_saturates

# ONNX Runtime's session option for U8U8 integer kernels on x86 (kOrtSessionOptionsAvx2PrecisionMode).
EXACT_INT8_KERNELS = "session.x64quantprecision"

# Ops whose weights decide which kernel runs, by the index of their weight input (ONNX and ORT contrib ops,
# as the optimized graph names them: an fp32 Conv becomes com.microsoft.nchwc Conv, a fused DQ -> Conv -> Q
# a QLinearConv).
_WEIGHT_INPUT = {
    "Conv": 1, "FusedConv": 1, "ConvTranspose": 1, "Gemm": 1, "FusedGemm": 1, "MatMul": 1, "FusedMatMul": 1,
    "ConvInteger": 1, "MatMulInteger": 1, "MatMulIntegerToFloat": 1, "DynamicQuantizeMatMul": 1,
    "QLinearConv": 3, "QLinearMatMul": 3, "QGemm": 3,
}  # fmt: skip
# A weight that a DequantizeLinear node produces: the op computes in float on weights dequantized per call
# (the Q/DQ pair was not fused into an integer kernel).
DEQUANTIZED = "float32 (dequantized each call)"


def make_session(
    model: Path | bytes,
    *,
    threads: int,
    providers: list[str] | None = None,
    optimized_path: Path | None = None,
) -> ort.InferenceSession:
    """A session for an ONNX file (or its bytes) on ``providers`` (default CPU) with ``threads`` intra-op
    threads and one inter-op thread, all graph optimizations on; ``optimized_path``: where the session
    writes the graph it optimized to (what it executes).

    Thread counts are fixed so latency numbers are reproducible and comparable with PyTorch's. On an x86
    CPU without VNNI the session takes ONNX Runtime's exact U8U8 integer kernels
    (``session.x64quantprecision``) instead of its default U8S8 ones, which saturate there
    (:func:`export.machine.u8s8_saturates`): its integer products are then exact on every x86 CPU,
    so its gates do not depend on the machine. ONNX Runtime applies the option only to a weight with a
    value outside -64..63, so a file with 7-bit weights (:data:`export.quantize.ORT_CPU`) keeps the fast
    U8S8 kernels, exact there. A deployment on such a CPU should set the same option; on a VNNI CPU the
    default kernels are exact and about twice as fast as U8U8 (measured on a Sapphire Rapids core), so it is
    left alone there.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if u8s8_saturates():
        options.add_session_config_entry(EXACT_INT8_KERNELS, "1")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        # Saving a graph with NCHWc kernels logs a warning that it is for this machine only: it is read
        # here, on this machine, and deleted.
        options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=providers or ["CPUExecutionProvider"])


def weight_types(graph: onnx.GraphProto) -> dict[str, int]:
    """How many compute ops of ``graph`` (convolutions, GEMMs, matmuls with a constant weight, float or
    integer) read a weight of each element type, e.g. ``{"float32": 16}`` or ``{"int8": 19, "float32": 1}``;
    a weight made by a DequantizeLinear node counts as :data:`DEQUANTIZED`."""
    inits = {i.name: i.data_type for i in graph.initializer}
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts: Counter[str] = Counter()
    for node in graph.node:
        k = _WEIGHT_INPUT.get(node.op_type)
        if k is None or len(node.input) <= k:
            continue
        weight = node.input[k]
        if weight in inits:
            counts[onnx.helper.tensor_dtype_to_np_dtype(inits[weight]).name] += 1
        elif weight in dequantized:
            counts[DEQUANTIZED] += 1
    return dict(counts)


def load(path: Path, *, threads: int) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, object]]:
    """The runner of :func:`make_session` for ``path`` and what it runs: version, threads, the integer
    kernel choice, and per weight type the compute ops of the optimized graph (an fp16 file on a CPU
    without fp16 kernels shows float32 weights only: ONNX Runtime converted them back at load)."""
    with tempfile.TemporaryDirectory(prefix="kdfast-ort-") as work:
        optimized = Path(work) / "optimized.onnx"
        session = make_session(path, threads=threads, optimized_path=optimized)
        executed = weight_types(onnx.load(optimized).graph)
    info = {
        "runtime": f"onnxruntime {ort.__version__}",
        "threads": threads,
        "int8 kernels": (
            "U8U8 for weights beyond -64..64 (session.x64quantprecision: U8S8 saturates on this CPU)"
            if u8s8_saturates()
            else "default (U8S8, exact on this CPU)"
        ),
        "compute_ops": executed,
    }
    return runner(session), info


def runner(session: ort.InferenceSession) -> Callable[[np.ndarray], np.ndarray]:
    """``x (N, C, H, W) float32 -> logits float32`` through ``session``."""
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: x})[0]

    return run
