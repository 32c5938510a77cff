"""The table of runtimes ``python -m export.trt`` verifies and times. Each entry says why it cannot run here
(or None), how it turns the student or its ONNX files into its artifact, and how it loads that artifact as
a runner; the command verifies every runner with the same gates and times it with the same protocol.

Adding a runtime is one :class:`Backend` entry here and one module that is the only importer of that
runtime (as ``export/tensorrt_backend.py`` is for TensorRT). The on-device runtimes (OpenVINO, LiteRT,
ExecuTorch) share one module interface (``export/runner.py``) and enter the table through
:func:`runtime_backend`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from export import (
    executorch_backend,
    litert_backend,
    openvino_backend,
    ort_backend,
    tensorrt_backend,
)

Runner = Callable[[np.ndarray], np.ndarray]  # NCHW float32 images -> float32 logits, host to host

# What every CPU runner's timing covers; TensorRT adds a device-only figure (tensorrt_backend.EngineRunner).
HOST_BOUNDARY = "host numpy array in -> host numpy array out"


@dataclass(frozen=True)
class Sources:
    """What a converter may read and where it writes."""

    model: nn.Module  # the PyTorch student, eval mode, on CPU
    onnx: dict[str, Path]  # ONNX file per precision ("fp32", "fp16", "int8", "int8-ort")
    example: torch.Tensor  # an input with batch 2 (keeps the batch dimension dynamic)
    calibration: np.ndarray  # (N, C, H, W) float32 training images for converters that quantize themselves
    out: Path  # the folder to write artifacts in
    earlier: Path  # the output folder of earlier runs (TensorRT reuses their timing caches)
    chw: tuple[int, int, int]
    max_batch: int
    workspace_mb: int


@dataclass
class Loaded:
    run: Runner  # end to end, host to host
    compute_step: Callable[[np.ndarray], Callable[[], float]] | None = None  # x -> one device-only timing
    info: dict[str, object] = field(default_factory=dict)  # what actually runs (version, precision, threads)


@dataclass(frozen=True)
class Backend:
    key: str  # the name --backends takes
    label: str  # the name rows carry
    precisions: tuple[str, ...]  # the ONNX precisions it runs (a subset of what was exported)
    unavailable_reason: Callable[[], str | None]
    convert: Callable[[Sources, str], Path]
    load: Callable[[Path, int], Loaded]  # (artifact, threads)
    device: str = "cpu"  # where its reference logits are computed
    needs_onnx: bool = True  # converts an ONNX file of each precision (else the PyTorch student)
    artifacts: Callable[[Path], list[Path]] = lambda path: [path]  # every file load(path) reads


def batched(fn: Runner, images: np.ndarray, batch: int) -> np.ndarray:
    """``fn`` over ``images`` in chunks of ``batch``, outputs concatenated."""
    return np.concatenate([fn(images[i : i + batch]) for i in range(0, len(images), batch)])


def torch_runner(model: Callable[[torch.Tensor], torch.Tensor]) -> Runner:
    """A PyTorch callable as a host-to-host runner (CPU tensors, no autograd)."""

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    return run


def _ort_load(path: Path, threads: int) -> Loaded:
    run, info = ort_backend.load(path, threads=threads)
    return Loaded(run, info=info)


def _aoti_unavailable() -> str | None:
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        return (
            "AOTInductor compiles C++ and no C++ compiler (g++ or clang++) is on PATH, so no .pt2 was built"
        )
    return None


def _aoti_convert(src: Sources, precision: str) -> Path:
    from export import aoti

    return aoti.compile_package(src.model, src.example, src.out / "student.pt2", max_batch=src.max_batch)


def _aoti_load(path: Path, threads: int) -> Loaded:
    from export import aoti

    return Loaded(torch_runner(aoti.load_package(path)))


def _trt_convert(src: Sources, precision: str) -> Path:
    onnx_path = src.onnx[precision]
    engine = src.out / f"{onnx_path.stem}.engine"
    tensorrt_backend.build_engine(
        onnx_path,
        engine,
        precision=precision,
        chw=src.chw,
        max_batch=src.max_batch,
        workspace_bytes=src.workspace_mb << 20,
        earlier_timing_cache=src.earlier / f"{onnx_path.stem}.timing.cache",
    )
    return engine


def _trt_load(path: Path, threads: int) -> Loaded:
    engine = tensorrt_backend.EngineRunner(path)
    return Loaded(engine, engine.compute_step)


def runtime_backend(module: ModuleType, *, needs_onnx: bool) -> Backend:
    """A table entry for a module of the ``export/runner.py`` interface (``NAME``, ``PRECISIONS``,
    ``unavailable_reason``, ``convert``, ``load``, ``artifacts``). One that converts the PyTorch student
    names its artifacts after the ONNX file of the same precision (``student.<precision>``) whether or not
    that file exists."""

    def convert(src: Sources, precision: str) -> Path:
        onnx_path = src.onnx.get(precision, src.out / f"student.{precision}.onnx")
        return module.convert(
            src.model,
            onnx_path,
            src.example,
            src.out,
            precision=precision,
            max_batch=src.max_batch,
            calibration=src.calibration,
        )

    def load(path: Path, threads: int) -> Loaded:
        runner = module.load(path, threads=threads)
        return Loaded(runner.run, info=runner.info)

    return Backend(
        key=module.NAME,
        label=module.NAME,
        precisions=module.PRECISIONS,
        unavailable_reason=module.unavailable_reason,
        convert=convert,
        load=load,
        needs_onnx=needs_onnx,
        artifacts=module.artifacts,
    )


BACKENDS: dict[str, Backend] = {
    b.key: b
    for b in (
        Backend(
            key="ort",
            label="onnxruntime",
            precisions=("fp32", "fp16", "int8", "int8-ort"),
            unavailable_reason=lambda: None,
            convert=lambda src, precision: src.onnx[precision],
            load=_ort_load,
        ),
        Backend(
            key="aoti",
            label="aotinductor",
            precisions=("fp32",),
            unavailable_reason=_aoti_unavailable,
            convert=_aoti_convert,
            load=_aoti_load,
            needs_onnx=False,
        ),
        Backend(
            key="trt",
            label="tensorrt",
            precisions=("fp32", "fp16", "int8"),
            unavailable_reason=tensorrt_backend.unavailable_reason,
            convert=_trt_convert,
            load=_trt_load,
            device="cuda",
        ),
        runtime_backend(openvino_backend, needs_onnx=True),
        runtime_backend(litert_backend, needs_onnx=False),
        runtime_backend(executorch_backend, needs_onnx=False),
    )
}
