"""ONNX Runtime sessions with explicit providers and fixed thread counts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from export.machine import u8s8_saturates

# ONNX Runtime's session option for U8U8 integer kernels on x86 (kOrtSessionOptionsAvx2PrecisionMode).
EXACT_INT8_KERNELS = "session.x64quantprecision"


def make_session(
    model: Path | bytes, *, threads: int, providers: list[str] | None = None
) -> ort.InferenceSession:
    """A session for an ONNX file (or its bytes) on ``providers`` (default CPU) with ``threads`` intra-op
    threads and one inter-op thread, all graph optimizations on.

    Thread counts are fixed so latency numbers are reproducible and comparable with PyTorch's. On an x86
    CPU without VNNI the session takes ONNX Runtime's exact U8U8 integer kernels
    (``session.x64quantprecision``) instead of its default U8S8 ones, which saturate there
    (:func:`export.machine.u8s8_saturates`): its integer products are then exact on every x86 CPU,
    so its gates do not depend on the machine. A deployment on such a CPU should set the same option; on a
    VNNI CPU the default kernels are exact and about twice as fast as U8U8 (measured on a Sapphire Rapids
    core), so it is left alone there.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if u8s8_saturates():
        options.add_session_config_entry(EXACT_INT8_KERNELS, "1")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=providers or ["CPUExecutionProvider"])


def runner(session: ort.InferenceSession) -> Callable[[np.ndarray], np.ndarray]:
    """``x (N, C, H, W) float32 -> logits float32`` through ``session``."""
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: x})[0]

    return run
