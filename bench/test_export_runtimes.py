"""Batch-1 CPU latency of the default student (edge_cnn, 3x32x32, fp32 input) in every runtime installed here,
side by side with PyTorch eager in the same run: ONNX Runtime, OpenVINO (fp32 with the f32 hint, int8 from
the Q/DQ file), LiteRT and ExecuTorch (fp32 and int8). The target: OpenVINO fp32 and ONNX Runtime
fp32 p50 <= 0.5x eager.

Weights are random (speed does not depend on them) and int8 is calibrated on random normal images, so only
the times mean anything here; parity is tested in tests/export/test_backends.py. Every case runs with 1 and
with 2 threads (on a shared machine the second thread can cost more than it gives); a runtime that is not
installed is skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export import executorch_backend, litert_backend, openvino_backend, ort_backend
from export.onnx_export import export_onnx
from export.quantize import quantize_file
from kdfast.models import build_model

THREADS = (1, 2)
MAX_BATCH = 8
GROUP = "export: batch-1 latency, edge_cnn 3x32x32, CPU"
BACKENDS = {"openvino": openvino_backend, "litert": litert_backend, "executorch": executorch_backend}
CASES = ["eager", "onnxruntime-fp32"] + [
    f"{name}-{prec}" for name, module in BACKENDS.items() for prec in module.PRECISIONS if prec != "fp16"
]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-runtimes")
    torch.manual_seed(0)
    model = build_model({"source": "kdfast", "name": "edge_cnn", "kwargs": {"num_classes": 10}}).eval()
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    example = torch.from_numpy(calibration[:2].copy())
    fp32 = export_onnx(model, example, out / "student.fp32.onnx", max_batch=MAX_BATCH, metadata={})
    files = {"fp32": fp32}
    files["int8"] = quantize_file(fp32, out / "student.int8.onnx", calibration, batch=MAX_BATCH)
    return {"model": model, "out": out, "example": example, "calibration": calibration, "onnx": files}


@pytest.fixture(scope="module")
def converted(student):
    """``converted(name, precision) -> path``: each runtime's file built once for every thread count."""
    cache: dict[tuple[str, str], object] = {}

    def get(name: str, prec: str) -> object:
        backend = BACKENDS[name]
        if backend.unavailable_reason() is not None:
            pytest.skip(backend.unavailable_reason())
        if (name, prec) not in cache:
            cache[name, prec] = backend.convert(
                student["model"],
                student["onnx"][prec],
                student["example"],
                student["out"],
                precision=prec,
                max_batch=MAX_BATCH,
                calibration=student["calibration"],
            )
        return cache[name, prec]

    return get


def _runner(case: str, threads: int, student, converted) -> object:
    if case == "eager":
        torch.set_num_threads(threads)
        model = student["model"]

        def eager(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()

        return eager
    if case == "onnxruntime-fp32":
        return ort_backend.runner(ort_backend.make_session(student["onnx"]["fp32"], threads=threads))
    name, prec = case.split("-")
    return BACKENDS[name].load(converted(name, prec), threads=threads)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("case", CASES)
def test_batch1_latency(bench_op, student, converted, case, threads):
    run = _runner(case, threads, student, converted)
    x = np.ascontiguousarray(student["calibration"][:1])
    impl, _, prec = case.partition("-")
    bench_op(
        lambda: run(x),
        "cpu",
        rounds=500,
        warmup=100,
        group=GROUP,
        impl="eager" if case == "eager" else case,
        case=f"edge_cnn b1, {threads} thread(s)",
        precision=prec or "fp32",
        threads=threads,
        runtime=getattr(run, "info", {}).get("runtime", impl),
    )
