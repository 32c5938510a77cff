"""The TensorRT seam: the only module that imports ``tensorrt`` (TensorRT 10.x / 11.x Python API).

The pure decisions (profile shapes, dtype map, precision -> network/builder flags, parser-error text) are
plain functions so they are tested where TensorRT cannot be installed; the builder and runtime parts
import ``tensorrt`` lazily and run only where it and a CUDA GPU exist.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdfast.atomic import atomic_write

# TensorRT DataType names -> torch dtypes; keyed by name so the map needs no tensorrt import.
_TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "FP8": torch.float8_e4m3fn,
}

# Below this version the FP16/INT8 builder flags still steer weakly typed networks; from it on they are
# deprecated and precision must come from the ONNX types (strongly typed network).
FLAGS_REMOVED_IN = (10, 12)


def unavailable_reason() -> str | None:
    """Why no engine can be built here (one line), or None when a CUDA GPU and TensorRT are both present.

    The GPU is asked about first: without one, installing TensorRT would not help.
    """
    if not torch.cuda.is_available():
        return "TensorRT needs an NVIDIA GPU with CUDA; none here, so no engine was built"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'kdfast[trt]'), so no engine was built"
    return None


def profile_shapes(
    chw: Iterable[int], max_batch: int, opt_batch: int | None = None
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) input shapes of the optimization profile: batch 1, ``opt_batch`` (default max), max."""
    chw = tuple(int(d) for d in chw)
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise ValueError(f"opt batch {opt} must lie in 1..{max_batch}")
    return (1, *chw), (opt, *chw), (max_batch, *chw)


def torch_dtype(trt_dtype: Any) -> torch.dtype:
    """The torch dtype for a TensorRT ``DataType`` (or its name)."""
    name = (
        trt_dtype if isinstance(trt_dtype, str) else getattr(trt_dtype, "name", str(trt_dtype).split(".")[-1])
    )
    if name not in _TORCH_DTYPES:
        raise ValueError(f"TensorRT dtype {name} has no torch equivalent")
    return _TORCH_DTYPES[name]


def parse_version(version: str) -> tuple[int, ...]:
    """'10.12.0.36' -> (10, 12, 0, 36); stops at the first non-numeric part ('11.0.0rc1' -> (11, 0))."""
    parts = []
    for piece in version.split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    if not parts:
        raise ValueError(f"cannot read a TensorRT version from {version!r}")
    return tuple(parts)


@dataclass(frozen=True)
class NetworkPlan:
    strongly_typed: bool
    builder_flags: tuple[str, ...]  # names of trt.BuilderFlag members to set
    cleared_flags: tuple[str, ...]  # names of trt.BuilderFlag members to clear


def network_plan(precision: str, version: str, has_strongly_typed: bool) -> NetworkPlan:
    """How a ``precision`` ONNX is built on TensorRT ``version``.

    The ONNX already carries the precision (fp16 tensors, Q/DQ nodes), so a strongly typed network is used
    wherever the flag exists and no precision flag is set (TensorRT rejects them together). Only on old
    releases without STRONGLY_TYPED, all below 10.12, are the FP16/INT8 builder flags the way to allow
    reduced precision. TF32 is on in a new builder config, so an "fp32" engine would compute convolutions
    and matrix products in TF32 (10-bit mantissa) against the fp32 gate's 1e-4: fp32 clears it.
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"unknown precision {precision!r}; use fp32, fp16 or int8")
    cleared = ("TF32",) if precision == "fp32" else ()
    if has_strongly_typed:
        return NetworkPlan(strongly_typed=True, builder_flags=(), cleared_flags=cleared)
    if parse_version(version)[:2] >= FLAGS_REMOVED_IN:
        raise ValueError(f"TensorRT {version} lacks STRONGLY_TYPED, which every release from 10.12 has")
    flags = {"fp32": (), "fp16": ("FP16",), "int8": ("FP16", "INT8")}[precision]
    return NetworkPlan(strongly_typed=False, builder_flags=flags, cleared_flags=cleared)


def format_parser_errors(errors: Iterable[Any]) -> list[str]:
    """One line per ONNX parser error: code, node index and name/operator when known, description.

    ``errors`` are ``parser.get_error(i)`` objects (``desc()``, ``code()``, ``node()``, and on newer
    releases ``node_name()`` / ``node_operator()``).
    """
    lines = []
    for err in errors:
        where = []
        node = err.node()
        if node is not None and node >= 0:
            where.append(f"node {node}")
        for attr in ("node_name", "node_operator"):
            value = getattr(err, attr, None)
            value = value() if callable(value) else value
            if value:
                where.append(str(value))
        code = err.code()
        code = getattr(code, "name", code)
        prefix = f"[{code}]" + (f" ({', '.join(where)})" if where else "")
        lines.append(f"{prefix} {err.desc()}")
    return lines


class EngineBuildError(RuntimeError):
    """The ONNX could not be parsed or built into an engine; the message lists every parser error."""


def _logger():  # noqa: ANN202 - trt.Logger; the type needs tensorrt imported
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    precision: str,
    chw: Iterable[int],
    max_batch: int,
    opt_batch: int | None = None,
    workspace_bytes: int = 1 << 30,
    earlier_timing_cache: Path | None = None,
) -> dict:
    """Parse ``onnx_path`` and build a serialized engine at ``engine_path``.

    Saves the timing cache beside the engine (``.timing.cache``; an earlier run's, ``earlier_timing_cache``,
    is reused when it exists) and the engine's layer information as JSON (``.layers.json``). Returns what
    was decided (version, plan, profile).
    """
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    has_strong = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    plan = network_plan(precision, trt.__version__, has_strong)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if plan.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        lines = format_parser_errors(parser.get_error(i) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}: " + "; ".join(lines))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in plan.cleared_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    shapes = profile_shapes(chw, max_batch, opt_batch)
    profile = builder.create_optimization_profile()
    profile.set_shape(network.get_input(0).name, *shapes)
    config.add_optimization_profile(profile)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED

    cache_path = engine_path.with_suffix(".timing.cache")
    earlier = earlier_timing_cache if earlier_timing_cache and earlier_timing_cache.is_file() else None
    cache = config.create_timing_cache(earlier.read_bytes() if earlier else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    atomic_write(engine_path, bytes(serialized))
    atomic_write(cache_path, bytes(config.get_timing_cache().serialize()))

    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(serialized))
    inspector = engine.create_engine_inspector()
    layers = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    atomic_write(engine_path.with_suffix(".layers.json"), json.dumps(json.loads(layers), indent=1))
    return {
        "tensorrt": trt.__version__,
        "strongly_typed": plan.strongly_typed,
        "builder_flags": list(plan.builder_flags),
        "cleared_flags": list(plan.cleared_flags),
        "profile": [list(s) for s in shapes],
        "timing_cache": str(cache_path),
    }


class EngineRunner:
    """Runs a serialized engine on torch CUDA tensors on its own (non-default) stream.

    Two timing boundaries (both reported): :meth:`__call__` is end to end, host numpy in -> host numpy out
    (copies, launch, synchronization), the boundary of the CPU backends; :meth:`compute_step` times the
    engine alone with CUDA events on device tensors bound once, as trtexec's GPU compute time does.
    """

    def __init__(self, engine_path: Path):
        import tensorrt as trt

        self.engine = trt.Runtime(_logger()).deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"TensorRT could not deserialize {engine_path}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineBuildError(f"TensorRT could not create an execution context for {engine_path}")
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.input_dtype = torch_dtype(self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = torch_dtype(self.engine.get_tensor_dtype(self.output_name))
        self._outputs: dict[tuple[int, ...], torch.Tensor] = {}
        self._bound: torch.Tensor | None = None

    def bind(self, x: torch.Tensor) -> torch.Tensor:
        """Set shapes and addresses for ``x``; the returned output tensor is filled by :meth:`launch`.

        The engine reads ``x`` by address when it runs, so the (contiguous) tensor bound is kept alive here
        until the next bind: a temporary ``x.contiguous()`` would be freed and its memory reused.
        """
        self._bound = x.to(self.input_dtype).contiguous()
        self.context.set_input_shape(self.input_name, tuple(self._bound.shape))
        shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = self._outputs.get(shape)
        if out is None:
            out = self._outputs[shape] = torch.empty(shape, dtype=self.output_dtype, device=x.device)
        self.context.set_tensor_address(self.input_name, self._bound.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        return out

    def launch(self) -> None:
        """Enqueue one inference on :attr:`stream` for the tensors last bound."""
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EngineBuildError("TensorRT execute_async_v3 failed")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """End to end: host ``x`` -> device -> engine -> host logits (float32)."""
        with torch.cuda.stream(self.stream):
            out = self.bind(torch.from_numpy(x).to("cuda", non_blocking=False))
            self.launch()
            logits = out.float().cpu()
        return logits.numpy()

    def compute_step(self, x: np.ndarray) -> Callable[[], float]:
        """Bind ``x`` on the device once; the step runs the engine once, returning its CUDA-event ms."""
        self.bind(torch.from_numpy(x).cuda())
        torch.cuda.synchronize()

        def step() -> float:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(self.stream)
            self.launch()
            end.record(self.stream)
            end.synchronize()
            return begin.elapsed_time(end)

        return step
