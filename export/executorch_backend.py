"""The ExecuTorch seam: the only module that imports ``executorch`` (ExecuTorch 1.x: ``torch.export`` ->
``to_edge_transform_and_lower`` with the XNNPACK partitioner -> ``.pte``, run by ``executorch.runtime``).

One ``.pte`` serves every batch from 1 to max_batch: the batch is a symbolic dimension of the exported
program and XNNPACK reshapes its runtime per call. int8 is PT2E static quantization with XNNPACK's own
quantizer (symmetric int8, per-channel weights, activations calibrated on real images); the delegate runs
the quantized ops as int8 kernels with float input and output.

ExecuTorch's Python runtime links libtorch: a wheel runs only beside the torch it was built for.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.runner import Runner, check_precision, import_failure, quiet_torch_notices
from kdfast.atomic import atomic_write

NAME = "executorch"
PRECISIONS = ("fp32", "int8")
DYNAMIC_BATCH = True


@functools.cache
def unavailable_reason() -> str | None:
    """Why no ``.pte`` can be built or run here (one line), or None when the exporter and the runtime (with
    its native library) import."""
    try:
        with quiet_torch_notices():
            import executorch.exir  # noqa: F401
            import executorch.runtime  # noqa: F401
    except ImportError as e:
        return import_failure("ExecuTorch", "executorch", "executorch", e)
    return None


def artifacts(path: Path) -> list[Path]:
    """The one ``.pte`` (every batch size)."""
    return [path]


def _quantizer() -> object:
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))


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
    """Export ``model`` with batch 1..``max_batch`` (``example`` must have batch >= 2 so it stays symbolic),
    quantize it for int8 (calibrated on ``calibration`` (N, C, H, W)), lower to XNNPACK and write
    ``out/<onnx stem>.pte`` (``student.fp32.onnx`` -> ``student.fp32.pte``). Returns that path."""
    check_precision("ExecuTorch", precision, PRECISIONS)
    if example.shape[0] < 2:
        raise ValueError(f"the example batch must be >= 2 to keep the batch dynamic, got {example.shape[0]}")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    module = model.eval()
    if precision == "int8":
        from export.pt2e import quantize_static

        module = quantize_static(model, example, calibration, _quantizer(), max_batch=max_batch)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    path = out / onnx_path.with_suffix(".pte").name
    atomic_write(path, lowered.to_executorch().buffer)
    return path


def load(path: Path, *, threads: int) -> Runner:
    """The ``forward`` method of the ``.pte`` at ``path`` in ExecuTorch's runtime. ``threads`` sizes
    ExecuTorch's thread pool, which is one per process: the last load sets it for every loaded program."""
    from executorch.extension.pybindings.portable_lib import (
        _threadpool_get_thread_count,
        _unsafe_reset_threadpool,
    )
    from executorch.runtime import Runtime
    from executorch.version import __version__

    _unsafe_reset_threadpool(threads)
    method = Runtime.get().load_program(path).load_method("forward")

    def run(x: np.ndarray) -> np.ndarray:
        (logits,) = method.execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])
        # The output may live in the method's planned memory, reused by the next call.
        return logits.numpy().copy()

    info = {
        "runtime": f"executorch {__version__}",
        "threads": _threadpool_get_thread_count(),
        "batch": f"dynamic, 1..{method.metadata.input_tensor_meta(0).sizes()[0]}",
    }
    return Runner(run, info)
