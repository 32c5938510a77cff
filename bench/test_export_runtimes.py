"""CPU latency of the default student (edge_cnn, 3x32x32, fp32 input) at batch 1 and 8 in every runtime
installed here, side by side with PyTorch eager in the same run: ONNX Runtime (fp32 and its U8S8 INT8 file),
OpenVINO (fp32 with the f32 hint, int8 from each Q/DQ file), LiteRT and ExecuTorch (fp32 and int8). The
targets: OpenVINO fp32 and ONNX Runtime fp32 p50 <= 0.5x eager; each runtime's INT8 file no slower than its
fp32 one at batch 8.

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
from export.quantize import ORT_CPU, TENSORRT, quantize_file
from kdfast.models import build_model

THREADS = (1, 2)
MAX_BATCH = 8
BATCHES = (1, MAX_BATCH)
BACKENDS = {"openvino": openvino_backend, "litert": litert_backend, "executorch": executorch_backend}
CASES = ["eager", "onnxruntime-fp32", "onnxruntime-int8-ort"] + [
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
    for scheme in (TENSORRT, ORT_CPU):
        files[scheme.name] = quantize_file(
            fp32, out / f"student.{scheme.name}.onnx", calibration, scheme=scheme, batch=MAX_BATCH
        )
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
    if case.startswith("onnxruntime-"):
        prec = case.partition("-")[2]
        return ort_backend.runner(ort_backend.make_session(student["onnx"][prec], threads=threads))
    name, prec = case.split("-", 1)
    return BACKENDS[name].load(converted(name, prec), threads=threads)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("case", CASES)
def test_latency(bench_op, student, converted, case, threads, batch):
    run = _runner(case, threads, student, converted)
    x = np.ascontiguousarray(student["calibration"][:batch])
    impl, _, prec = case.partition("-")
    bench_op(
        lambda: run(x),
        "cpu",
        rounds=500,
        warmup=100,
        group=f"export: batch-{batch} latency, edge_cnn 3x32x32, CPU",
        impl="eager" if case == "eager" else case,
        case=f"edge_cnn b{batch}, {threads} thread(s)",
        precision=prec or "fp32",
        threads=threads,
        runtime=getattr(run, "info", {}).get("runtime", impl),
    )
