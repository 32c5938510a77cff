"""ONNX Runtime sessions with explicit providers and fixed thread counts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort


def make_session(
    model: Path | bytes, *, threads: int, providers: list[str] | None = None
) -> ort.InferenceSession:
    """A session for an ONNX file (or its bytes) on ``providers`` (default CPU) with ``threads`` intra-op
    threads and one inter-op thread, all graph optimizations on.

    Thread counts are fixed so latency numbers are reproducible and comparable with PyTorch's.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=providers or ["CPUExecutionProvider"])


def runner(session: ort.InferenceSession) -> Callable[[np.ndarray], np.ndarray]:
    """``x (N, C, H, W) float32 -> logits float32`` through ``session``."""
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: x})[0]

    return run
