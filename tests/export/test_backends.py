"""The on-device runtimes (OpenVINO, LiteRT, ExecuTorch): each converts a trained student and must compute
what PyTorch computes on real digits images, at batch 1, batch 3 and over the whole validation split in
batches of MAX_BATCH; a missing runtime is one line that says what to install.

Each runtime's tests skip where it is not installed (``pytest.importorskip``); the one-line reasons are
tested everywhere.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from support.students import digits_record

from export import executorch_backend, litert_backend, openvino_backend, precision
from export.onnx_export import export_onnx
from export.quantize import ORT_CPU, quantize_file
from export.runner import import_failure
from kdfast.data import dataset_from_record
from kdfast.models import build_model

BACKENDS = {"openvino": openvino_backend, "litert": litert_backend, "executorch": executorch_backend}
# What each backend imports (the first one is what importorskip checks) and its pyproject extra.
PACKAGES = {
    "openvino": ("openvino",),
    "litert": ("litert_torch", "ai_edge_litert"),
    "executorch": ("executorch",),
}
MAX_BATCH = 8
# fp32: the ONNX Runtime fp32 gate. fp16: OpenVINO runs the fp16 file's fp16 weights in f32 math on CPUs
# without FP16 units. int8: a fraction of the largest reference logit, loose enough for 8-bit activations,
# tight enough that a missing dequantization (int8 codes as logits) or a wrong scale fails.
MAX_ABS = {"fp32": 1e-4, "fp16": 5e-2}
INT8_MAX_ABS_FRACTION = 0.25
MIN_AGREEMENT = {"fp32": 1.0, "fp16": 0.99, "int8": 0.97, "int8-ort": 0.97}
CASES = [
    pytest.param(name, prec, id=f"{name}-{prec}", marks=[pytest.mark.slow] if name != "openvino" else [])
    for name, module in BACKENDS.items()
    for prec in module.PRECISIONS
]


def _images(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = dataset_from_record(digits_record(max_val=None, max_train=None), split)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    return torch.stack(images), torch.as_tensor(labels)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """edge_cnn trained one epoch on digits (batch-norm statistics then re-estimated on 512 training images,
    as after a full run), its ONNX files (fp32, fp16, both INT8 layouts), real validation images and
    PyTorch's logits on them."""
    out = tmp_path_factory.mktemp("runtimes")
    train_x, train_y = _images("train")
    val_x, val_y = _images("val")
    torch.manual_seed(0)
    model = build_model({"source": "kdfast", "name": "edge_cnn", "kwargs": {"num_classes": 10}})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for idx in torch.randperm(len(train_x)).split(64):
        loss = torch.nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in batch_norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches below
    with torch.no_grad():
        for chunk in train_x[:512].split(128):
            model(chunk)
    model.eval()
    with torch.no_grad():
        reference = model(val_x).numpy()
    calibration = train_x[:128].numpy()
    example = val_x[:2].clone()
    fp32 = export_onnx(model, example, out / "student.fp32.onnx", max_batch=MAX_BATCH, metadata={})
    onnx_files = {
        "fp32": fp32,
        "fp16": precision.to_fp16(fp32, out / "student.fp16.onnx"),
        "int8": quantize_file(fp32, out / "student.int8.onnx", calibration, batch=MAX_BATCH),
        "int8-ort": quantize_file(
            fp32, out / "student.int8-ort.onnx", calibration, scheme=ORT_CPU, batch=MAX_BATCH
        ),
    }
    return {
        "model": model,
        "out": out,
        "images": val_x.numpy(),
        "labels": val_y.numpy(),
        "reference": reference,
        "calibration": calibration,
        "example": example,
        "onnx": onnx_files,
    }


@pytest.fixture(scope="module")
def built(student):
    """``built(name, precision) -> (path, runner)``: each file converted and loaded once per module."""
    cache: dict[tuple[str, str], tuple] = {}

    def get(name: str, prec: str) -> tuple:
        pytest.importorskip(PACKAGES[name][0])
        if (name, prec) not in cache:
            backend = BACKENDS[name]
            assert backend.unavailable_reason() is None
            path = backend.convert(
                student["model"],
                student["onnx"][prec],
                student["example"],
                student["out"],
                precision=prec,
                max_batch=MAX_BATCH,
                calibration=student["calibration"],
            )
            cache[name, prec] = path, backend.load(path, threads=2)
        return cache[name, prec]

    return get


def test_the_fixture_is_a_trained_student(student):
    accuracy = np.mean(student["reference"].argmax(1) == student["labels"])
    assert accuracy > 0.8, accuracy
    biases = [m.bias for m in student["model"].modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(b.abs().max() > 0 for b in biases)


@pytest.mark.parametrize(("name", "prec"), CASES)
def test_runtime_matches_pytorch_at_batch_1_3_and_max(built, student, name, prec):
    _, runner = built(name, prec)
    images, reference = student["images"], student["reference"]
    logits = np.concatenate([runner(images[i : i + MAX_BATCH]) for i in range(0, len(images), MAX_BATCH)])
    assert logits.shape == reference.shape and logits.dtype == np.float32
    limit = MAX_ABS.get(prec, INT8_MAX_ABS_FRACTION * np.abs(reference).max())
    for batch in (1, 3):
        error = np.abs(runner(images[:batch]) - reference[:batch]).max()
        assert error <= limit, f"{name} {prec} batch {batch}: max abs error {error:.3g} > {limit:.3g}"

    error = np.abs(logits - reference).max()
    agreement = np.mean(logits.argmax(1) == reference.argmax(1))
    assert error <= limit, f"{name} {prec}: max abs error {error:.3g} > {limit:.3g}"
    assert agreement >= MIN_AGREEMENT[prec], f"{name} {prec}: top-1 agreement {agreement:.4f}"


class _Uninstalled(importlib.abc.MetaPathFinder):
    """Answers for ``packages`` as if they were not installed: ``import p.sub`` raises
    ModuleNotFoundError for ``p``, as Python does when ``p`` is absent."""

    def __init__(self, packages: tuple[str, ...]):
        self.packages = packages

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - the finder protocol
        if name.split(".")[0] in self.packages:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def _uninstall(monkeypatch, packages: tuple[str, ...]) -> None:
    for key in [k for k in sys.modules if k.split(".")[0] in packages]:
        monkeypatch.delitem(sys.modules, key)
    monkeypatch.setattr(sys, "meta_path", [_Uninstalled(packages), *sys.meta_path])


@pytest.mark.parametrize("name", BACKENDS)
def test_a_missing_runtime_is_one_line_naming_the_extra(monkeypatch, name):
    backend = BACKENDS[name]
    backend.unavailable_reason.cache_clear()
    _uninstall(monkeypatch, PACKAGES[name])
    try:
        reason = backend.unavailable_reason()
    finally:
        backend.unavailable_reason.cache_clear()
    assert reason is not None and "\n" not in reason
    assert "not installed" in reason and f"pip install 'kdfast[{name}]'" in reason, reason


def test_a_broken_runtime_quotes_its_import_error():
    error = ImportError("libtorch_python.so: undefined symbol: _ZN5torch3jit\n  (built for another torch)")
    line = import_failure("ExecuTorch", "executorch", "executorch", error)
    assert line == (
        "ExecuTorch is installed but does not import (libtorch_python.so: undefined symbol: "
        "_ZN5torch3jit (built for another torch)); reinstall it with pip install 'kdfast[executorch]'"
    )
    missing_dependency = ModuleNotFoundError("No module named 'jax'", name="jax")
    assert "does not import" in import_failure("LiteRT", "litert_torch", "litert", missing_dependency)


@pytest.mark.parametrize("name", BACKENDS)
def test_an_unknown_precision_is_refused_with_the_choices(student, name):
    backend = BACKENDS[name]
    with pytest.raises(ValueError, match=", ".join(backend.PRECISIONS)):
        backend.convert(
            student["model"],
            student["onnx"]["fp32"],
            student["example"],
            student["out"],
            precision="bf16",
            max_batch=MAX_BATCH,
        )


# OpenVINO


@pytest.mark.parametrize(
    ("prec", "capabilities", "hint"),
    [
        ("fp32", ["FP32", "BF16", "INT8"], "f32"),  # an AVX512-BF16 / AMX CPU: never its bf16 default
        ("int8", ["FP32", "BF16", "INT8"], "f32"),
        ("fp16", ["FP32", "FP16", "INT8"], "f16"),
        ("fp16", ["FP32", "BF16", "INT8"], "f32"),  # no FP16 units: fp16 weights, f32 math
    ],
)
def test_openvino_inference_precision_is_explicit(prec, capabilities, hint):
    assert openvino_backend.inference_precision(prec, capabilities) == hint


def test_openvino_fp32_computes_in_f32_and_saves_its_ir_beside_the_onnx(built, student):
    ov = pytest.importorskip("openvino")
    path, runner = built("openvino", "fp32")
    assert path == student["onnx"]["fp32"].with_suffix(".xml") and path.with_suffix(".bin").exists()
    assert runner.info["inference_precision"] == "f32"
    assert set(runner.info["compute_ops"]) == {"f32"}
    reread = ov.Core().read_model(str(path))
    assert str(reread.inputs[0].partial_shape) == f"[1..{MAX_BATCH},3,32,32]"


def test_openvino_default_precision_would_fail_the_fp32_gate_on_a_bf16_cpu(built, student):
    ov = pytest.importorskip("openvino")
    import openvino.properties.hint as hints

    core = ov.Core()
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 units, so OpenVINO's default is already f32")
    path, _ = built("openvino", "fp32")
    compiled = core.compile_model(core.read_model(str(path)), "CPU")
    assert compiled.get_property(hints.inference_precision).to_string() == "bf16"
    logits = compiled(student["images"][:MAX_BATCH])[0]
    assert np.abs(logits - student["reference"][:MAX_BATCH]).max() > MAX_ABS["fp32"]


def test_openvino_runs_every_quantized_op_of_the_qdq_file_in_int8(built, student):
    _, runner = built("openvino", "int8")
    graph = onnx.load(student["onnx"]["int8"]).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    quantized_ops = sum(
        n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in dequantized for n in graph.node
    )
    ops = runner.info["compute_ops"]
    assert quantized_ops > 0
    assert ops.get("u8", 0) + ops.get("i8", 0) == quantized_ops, ops


# LiteRT


@pytest.mark.slow
def test_litert_writes_one_static_file_per_batch_size(built, student):
    interpreter = pytest.importorskip("ai_edge_litert.interpreter")
    path, runner = built("litert", "fp32")
    files = litert_backend.batch_files(path)
    assert files == {
        1: student["out"] / "student.fp32.b1.tflite",
        MAX_BATCH: student["out"] / f"student.fp32.b{MAX_BATCH}.tflite",
    }
    for batch, file in files.items():
        details = interpreter.Interpreter(model_path=str(file)).get_input_details()[0]
        assert list(details["shape_signature"]) == [batch, 3, 32, 32]
    with pytest.raises(ValueError, match="not a <stem>.b<batch>.tflite"):
        litert_backend.batch_files(student["onnx"]["fp32"])


@pytest.mark.slow
def test_litert_int8_is_full_integer(built):
    interpreter_module = pytest.importorskip("ai_edge_litert.interpreter")
    path, runner = built("litert", "int8")
    interpreter = interpreter_module.Interpreter(model_path=str(path))
    assert runner.info["io_dtype"] == "int8"
    weights = Counter(
        np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details() if len(t["shape"]) == 4
    )
    assert weights["int8"] > 0 and weights["float32"] == 0, weights


def test_narrow_weights_requantizes_each_channel_onto_seven_bits_by_hand():
    """Channel 0 peaks at 127 > 63: its codes scale by 63/127 (rounded) and its scale by 127/63; channel 1
    peaks at 50 and stays as it is. The dequantized weights move by at most half a new step."""
    codes = np.array([[127, -64, 10], [50, -20, 3]], dtype=np.int8)
    scales = np.array([0.01, 0.02], dtype=np.float32)
    node = onnx.helper.make_node("DequantizeLinear", ["w", "s"], ["w_dq"], axis=0)
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [],
        [onnx.helper.make_tensor_value_info("w_dq", onnx.TensorProto.FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(codes, "w"), onnx.numpy_helper.from_array(scales, "s")],
    )
    proto = onnx.helper.make_model(graph)
    assert openvino_backend.narrow_weights(proto) == 1
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert inits["w"].tolist() == [[63, -32, 5], [50, -20, 3]]
    np.testing.assert_allclose(inits["s"], [0.01 * 127 / 63, 0.02], rtol=1e-6)
    before = codes * scales[:, None]
    after = inits["w"] * inits["s"][:, None]
    assert np.abs(after - before).max() <= 0.5 * inits["s"][0] + 1e-7
    assert openvino_backend.narrow_weights(proto) == 0  # already within the grid


def test_openvino_int8_on_a_cpu_that_saturates_takes_seven_bit_weights(student, monkeypatch, tmp_path):
    """Where u8 x s8 pair sums saturate (x86 without VNNI: forced here, so every CPU runs this branch) the IR
    holds 7-bit weights, says so, and still computes what PyTorch computes (the int8 gate's agreement)."""
    pytest.importorskip("openvino")
    monkeypatch.setattr(openvino_backend, "u8s8_saturates", lambda: True)
    path = openvino_backend.convert(
        student["model"],
        student["onnx"]["int8"],
        student["example"],
        tmp_path,
        precision="int8",
        max_batch=MAX_BATCH,
        calibration=student["calibration"],
    )
    runner = openvino_backend.load(path, threads=2)
    assert runner.info["weight_bits"] == 7
    images, reference = student["images"], student["reference"]
    logits = np.concatenate([runner(images[i : i + MAX_BATCH]) for i in range(0, len(images), MAX_BATCH)])
    assert np.mean(logits.argmax(1) == reference.argmax(1)) >= MIN_AGREEMENT["int8"]
    assert np.abs(logits - reference).max() <= INT8_MAX_ABS_FRACTION * np.abs(reference).max()
