"""The TensorRT seam's pure parts, without tensorrt; the engine path runs only with TensorRT + a GPU."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from export import tensorrt_backend as trtb


def test_profile_shapes():
    assert trtb.profile_shapes([3, 32, 32], 8) == ((1, 3, 32, 32), (8, 3, 32, 32), (8, 3, 32, 32))
    assert trtb.profile_shapes((1, 28, 28), 16, opt_batch=4) == (
        (1, 1, 28, 28),
        (4, 1, 28, 28),
        (16, 1, 28, 28),
    )
    with pytest.raises(ValueError, match="opt batch 9 must lie in 1..8"):
        trtb.profile_shapes([3, 32, 32], 8, opt_batch=9)


def test_dtype_map_by_enum_like_objects_and_names():
    assert trtb.torch_dtype(SimpleNamespace(name="FLOAT")) is torch.float32
    assert trtb.torch_dtype(SimpleNamespace(name="HALF")) is torch.float16
    assert trtb.torch_dtype("INT8") is torch.int8
    assert trtb.torch_dtype("BOOL") is torch.bool
    with pytest.raises(ValueError, match="INT4 has no torch equivalent"):
        trtb.torch_dtype("INT4")


def test_version_parsing():
    assert trtb.parse_version("10.12.0.36") == (10, 12, 0, 36)
    assert trtb.parse_version("11.0.0rc1") == (11, 0)
    with pytest.raises(ValueError):
        trtb.parse_version("dev")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_strongly_typed_never_takes_precision_flags(precision):
    for version in ("10.3.0", "10.11.0", "10.12.0", "11.1.0"):
        plan = trtb.network_plan(precision, version, has_strongly_typed=True)
        assert plan.strongly_typed and plan.builder_flags == ()


@pytest.mark.parametrize("strong", [True, False])
def test_fp32_engines_clear_tf32(strong):
    """A new builder config has TF32 on: an "fp32" engine would compute in TF32 (10-bit mantissa)."""
    assert trtb.network_plan("fp32", "10.3.0", strong).cleared_flags == ("TF32",)
    assert trtb.network_plan("fp16", "10.3.0", strong).cleared_flags == ()


def test_precision_flags_only_below_10_12_without_strong_typing():
    assert trtb.network_plan("fp32", "8.6.1", False).builder_flags == ()
    assert trtb.network_plan("fp16", "8.6.1", False).builder_flags == ("FP16",)
    assert trtb.network_plan("int8", "9.3.0", False) == trtb.NetworkPlan(False, ("FP16", "INT8"), ())
    with pytest.raises(ValueError, match="lacks STRONGLY_TYPED"):
        trtb.network_plan("fp16", "10.12.0", False)
    with pytest.raises(ValueError, match="unknown precision 'bf16'"):
        trtb.network_plan("bf16", "10.12.0", True)


class _ParserError:
    """Shaped like ``parser.get_error(i)``: methods, as in TensorRT's Python bindings."""

    def __init__(self, code, node, desc, node_name=None, node_operator=None):
        self._code, self._node, self._desc = code, node, desc
        if node_name is not None:
            self.node_name = lambda: node_name
            self.node_operator = lambda: node_operator

    def code(self):
        return self._code

    def node(self):
        return self._node

    def desc(self):
        return self._desc


def test_parser_errors_are_all_reported():
    errors = [
        _ParserError(
            SimpleNamespace(name="UNSUPPORTED_NODE"),
            12,
            "No importer registered for op: Foo",
            node_name="/blocks/Foo",
            node_operator="Foo",
        ),
        _ParserError("INVALID_GRAPH", -1, "graph input has no shape"),
    ]
    assert trtb.format_parser_errors(errors) == [
        "[UNSUPPORTED_NODE] (node 12, /blocks/Foo, Foo) No importer registered for op: Foo",
        "[INVALID_GRAPH] graph input has no shape",
    ]


def test_unavailable_reason_asks_for_the_gpu_first():
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    reason = trtb.unavailable_reason()
    if not torch.cuda.is_available():
        # installing TensorRT cannot help here, so the line must not suggest it
        assert reason == "TensorRT needs an NVIDIA GPU with CUDA; none here, so no engine was built"
    elif not has_trt:
        assert reason.startswith("TensorRT is not installed (pip install 'kdfast[trt]')")
    else:
        assert reason is None


class _Context:
    """Records what ``IExecutionContext`` is told; shaped like TensorRT's Python bindings."""

    def __init__(self):
        self.addresses, self.shapes = {}, {}

    def set_input_shape(self, name, shape):
        self.shapes[name] = shape

    def get_tensor_shape(self, name):
        return (self.shapes["x"][0], 10)

    def set_tensor_address(self, name, address):
        self.addresses[name] = address


def test_bind_keeps_the_bound_input_alive():
    """The engine reads its input by address at launch: binding a temporary ``x.contiguous()`` would leave
    a dangling address once the temporary is freed. ``bind`` keeps the tensor it bound."""
    runner = trtb.EngineRunner.__new__(trtb.EngineRunner)  # the binding logic, without an engine
    runner.context, runner.input_name, runner.output_name = _Context(), "x", "y"
    runner.input_dtype, runner.output_dtype, runner._outputs = torch.float32, torch.float32, {}
    x = torch.randn(3, 4, 5).transpose(0, 2)  # not contiguous: bind must copy
    out = runner.bind(x)
    bound = runner._bound
    assert bound.is_contiguous() and torch.equal(bound, x)
    assert runner.context.addresses == {"x": bound.data_ptr(), "y": out.data_ptr()}
    assert runner.context.shapes["x"] == (5, 4, 3) and out.shape == (5, 10)
    assert runner.bind(x) is not None and runner._outputs[(5, 10)] is out  # outputs reused per shape


@pytest.mark.gpu
def test_engine_builds_and_matches_pytorch(tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from support.students import write_student

    from export.trt import main

    path, _ = write_student(tmp_path / "student.pt")
    out = tmp_path / "out"
    code = main(
        [
            "--model",
            str(path),
            "--out",
            str(out),
            "--backends",
            "trt",
            "--baselines",
            "--max-batch",
            "4",
            "--calib-samples",
            "16",
            "--iters",
            "5",
            "--min-time-s",
            "0.05",
        ]
    )
    report = json.loads((out / "report.json").read_text())
    rows = {r["precision"]: r for r in report["rows"] if r["backend"] == "tensorrt"}
    assert set(rows) == {"fp32", "fp16", "int8"}
    assert code == 0, report["status"]
    for prec in rows:
        assert (out / f"student.{prec}.engine").stat().st_size > 0
        assert (out / f"student.{prec}.timing.cache").exists()
        assert json.loads((out / f"student.{prec}.layers.json").read_text())
