"""The LiteRT (TFLite) seam: the only module that imports ``litert_torch`` (Google's PyTorch -> LiteRT
converter, formerly ai-edge-torch) and ``ai_edge_litert`` (its interpreter, XNNPACK on CPU).

One file per batch size: litert-torch 0.10 cannot lower a symbolic batch through ``view``/``flatten`` (its
JAX bridge needs concrete shapes), and a static file's reshape constants reject
``resize_tensor_input``. So :func:`convert` writes ``<stem>.b1.tflite`` and ``<stem>.b<max>.tflite``, and the
runner serves batch 1 and batch max from their own files and any other batch through the batch-max file,
zero-padded, keeping the real rows (the students are per-sample: eval-mode batch norm, no cross-batch op).

int8 is full integer: PT2E static quantization with litert-torch's symmetric quantizer (int8 per-channel
weights, int8 activations calibrated on real images), int8 tensors at the model's input and output; the
runner quantizes the float input and dequantizes the logits with the file's own scale and zero-point.
"""

from __future__ import annotations

import functools
import glob
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.runner import Runner, check_precision, import_failure, quiet_torch_notices
from kdfast.atomic import atomic_write

NAME = "litert"
PRECISIONS = ("fp32", "int8")
DYNAMIC_BATCH = False
_BATCH_FILE = re.compile(r"^(?P<stem>.+)\.b(?P<batch>\d+)\.tflite$")


@functools.cache
def unavailable_reason() -> str | None:
    """Why no LiteRT file can be built or run here (one line), or None when the converter and the interpreter
    both import."""
    try:
        with quiet_torch_notices():
            import litert_torch  # noqa: F401
    except ImportError as e:
        return import_failure("LiteRT's PyTorch converter (litert-torch)", "litert_torch", "litert", e)
    try:
        from ai_edge_litert import interpreter  # noqa: F401
    except ImportError as e:
        return import_failure("The LiteRT interpreter (ai-edge-litert)", "ai_edge_litert", "litert", e)
    return None


def batch_path(stem_path: Path, batch: int) -> Path:
    """``out/student.fp32`` -> ``out/student.fp32.b<batch>.tflite``."""
    return stem_path.with_name(f"{stem_path.name}.b{batch}.tflite")


def batch_files(path: Path) -> dict[int, Path]:
    """Every ``<stem>.b<N>.tflite`` beside ``path`` (itself one of them), by batch size."""
    match = _BATCH_FILE.match(path.name)
    if match is None:
        raise ValueError(f"{path.name} is not a <stem>.b<batch>.tflite file written by convert()")
    found = {}
    for sibling in path.parent.glob(f"{glob.escape(match['stem'])}.b*.tflite"):
        other = _BATCH_FILE.match(sibling.name)
        if other is not None and other["stem"] == match["stem"]:
            found[int(other["batch"])] = sibling
    return found


def artifacts(path: Path) -> list[Path]:
    """Every static-batch file ``load(path)`` reads, by batch size."""
    return [p for _, p in sorted(batch_files(path).items())]


def _quantizer() -> object:
    from litert_torch.quantize import pt2e_quantizer

    config = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False)
    return pt2e_quantizer.PT2EQuantizer().set_global(config)


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
    """Convert ``model`` with litert-torch once per batch size (1 and ``max_batch``), named after
    ``onnx_path``'s stem (``student.int8.onnx`` -> ``student.int8.b1.tflite``, ``student.int8.b8.tflite``).
    int8 quantizes once (PT2E, calibrated on ``calibration`` (N, C, H, W)) and converts that one quantized
    graph at each batch size, so both files carry the same scales. Returns the batch-``max_batch`` path."""
    check_precision("LiteRT", precision, PRECISIONS)
    import litert_torch
    from litert_torch.quantize.quant_config import QuantConfig

    module, quant_config = model.eval(), None
    if precision == "int8":
        from export.pt2e import quantize_static

        quantizer = _quantizer()
        module = quantize_static(
            model, example, calibration, quantizer, max_batch=max_batch, fold_quantize=False
        )
        quant_config = QuantConfig(pt2e_quantizer=quantizer)
    stem = out / onnx_path.with_suffix("").name
    for batch in sorted({1, max_batch}):
        sample = example[:1].expand(batch, *example.shape[1:]).contiguous()
        edge = litert_torch.convert(module, (sample,), quant_config=quant_config)
        atomic_write(batch_path(stem, batch), edge.model_content())
    return batch_path(stem, max_batch)


class _Interpreter:
    """One fixed-batch file in the LiteRT interpreter; float in, float out whatever the file's I/O types."""

    def __init__(self, path: Path, threads: int):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.batch = int(self.input["shape"][0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        dtype = self.input["dtype"]
        if dtype != np.float32:
            scale, zero_point = self.input["quantization"]
            limits = np.iinfo(dtype)
            x = np.clip(np.round(x / scale) + zero_point, limits.min, limits.max).astype(dtype)
        self.interpreter.set_tensor(self.input["index"], np.ascontiguousarray(x))
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"])
        if self.output["dtype"] != np.float32:
            scale, zero_point = self.output["quantization"]
            return (y.astype(np.float32) - zero_point) * scale
        return y.copy()


def load(path: Path, *, threads: int) -> Runner:
    """The files of :func:`batch_files` in the LiteRT interpreter (XNNPACK, ``threads`` threads). A batch with
    its own file runs there; any other runs through the largest file in chunks, the last one zero-padded."""
    import ai_edge_litert

    interpreters = {b: _Interpreter(p, threads) for b, p in sorted(batch_files(path).items())}
    largest = interpreters[max(interpreters)]

    def run(x: np.ndarray) -> np.ndarray:
        exact = interpreters.get(len(x))
        if exact is not None:
            return exact(x)
        chunks = []
        for start in range(0, len(x), largest.batch):
            chunk = x[start : start + largest.batch]
            padded = np.zeros((largest.batch, *x.shape[1:]), dtype=np.float32)
            padded[: len(chunk)] = chunk
            chunks.append(largest(padded)[: len(chunk)])
        return np.concatenate(chunks)

    info = {
        "runtime": f"ai-edge-litert {ai_edge_litert.__version__}",
        "precision": "int8" if largest.input["dtype"] != np.float32 else "fp32",
        "io_dtype": np.dtype(largest.input["dtype"]).name,
        "threads": threads,
        "batch": f"files for {sorted(interpreters)}; other batches zero-padded to {largest.batch}",
    }
    return Runner(run, info)
