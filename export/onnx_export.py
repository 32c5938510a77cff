"""PyTorch student -> one self-contained ONNX file with a dynamic batch and preprocessing metadata."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch
from torch import nn

from kdfast.atomic import atomic_write

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_TWO_GB = 2**31


def export_onnx(
    model: nn.Module, example: torch.Tensor, path: Path, *, max_batch: int, metadata: dict[str, object]
) -> Path:
    """Export ``model`` with ``torch.onnx.export(dynamo=True)`` at the default opset, batch 1..``max_batch``.

    ``example`` must have batch >= 2 so the exporter cannot specialize the batch dimension to 1. The model
    is checked (``onnx.checker``), shape-inferred, and ``metadata`` is stored as JSON-valued
    ``metadata_props`` so a consumer can preprocess without kdfast.
    """
    if example.shape[0] < 2:
        raise ValueError(f"the example batch must be >= 2 to keep the batch dynamic, got {example.shape[0]}")
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    program = torch.onnx.export(
        model.eval(),
        (example,),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        external_data=False,
        verbose=False,
    )
    proto = program.model_proto
    if proto.ByteSize() >= _TWO_GB:
        raise ValueError(f"the ONNX model is {proto.ByteSize()} bytes; single-file export needs < 2 GB")
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    set_metadata(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(path, proto.SerializeToString())
    return path


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, object]) -> None:
    """Replace ``metadata_props`` entries by ``metadata`` (values JSON-encoded unless already str)."""
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)


def read_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of the ONNX file at ``path``, raw strings."""
    return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
