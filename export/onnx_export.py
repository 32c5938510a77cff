"""PyTorch student -> one self-contained, clean ONNX file with a dynamic batch and the preprocessing contract.

Clean means: no debug metadata or doc strings (the exporter stores each node's Python stack trace, with the
exporting machine's paths, in ``metadata_props``), constants folded, the exporter's shape subgraphs for
attention rewritten (:mod:`export.graph_rewrites`), and no opset import that no node uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import onnxscript.optimizer
import torch
from torch import nn

from export.graph_rewrites import simplify
from kdfast.atomic import atomic_write

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 20
# The dynamo exporter starts at opset 18; TensorRT's parser reads up to 24 (export.qdq_rules.OPSET_RANGE).
OPSETS = range(18, 25)
_TWO_GB = 2**31


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    max_batch: int,
    metadata: dict[str, object],
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``model`` with ``torch.onnx.export(dynamo=True)`` at ``opset``, batch 1..``max_batch``.

    ``example`` must have batch >= 2 so the exporter cannot specialize the batch dimension to 1. The graph
    is cleaned (:func:`clean`), shape-inferred and checked (``onnx.checker``, full check), and ``metadata``
    is stored as JSON-valued ``metadata_props`` so a consumer can preprocess without kdfast.
    """
    if example.shape[0] < 2:
        raise ValueError(f"the example batch must be >= 2 to keep the batch dynamic, got {example.shape[0]}")
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    program = torch.onnx.export(
        model.eval(),
        (example,),
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        external_data=False,
        verbose=False,
    )
    proto = program.model_proto
    if proto.ByteSize() >= _TWO_GB:
        raise ValueError(f"the ONNX model is {proto.ByteSize()} bytes; single-file export needs < 2 GB")
    proto = onnxscript.optimizer.optimize(simplify(proto))
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    clean(proto)
    set_metadata(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    atomic_write(path, proto.SerializeToString())
    return path


def clean(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Strip doc strings and per-node / per-value metadata (debug information: stack traces, source
    paths, FX node dumps) and drop opset imports no node uses; in place, returns ``proto``."""
    proto.doc_string = ""
    graph = proto.graph
    graph.doc_string = ""
    del graph.metadata_props[:]
    for node in graph.node:
        node.doc_string = ""
        del node.metadata_props[:]
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.doc_string = ""
        del value.metadata_props[:]
    for tensor in graph.initializer:
        tensor.doc_string = ""
        del tensor.metadata_props[:]
    used = {node.domain for node in graph.node} | {"", "ai.onnx"}
    keep = [o for o in proto.opset_import if o.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    return proto


def set_metadata(proto: onnx.ModelProto, metadata: dict[str, object]) -> None:
    """Replace ``metadata_props`` by ``metadata`` (values JSON-encoded unless already str)."""
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)


def read_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of the ONNX file at ``path``, raw strings."""
    return {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}


def finish(proto: onnx.ModelProto, path: Path, metadata: dict[str, str]) -> Path:
    """Clean a converted model (fp16, INT8), give it the fp32 file's ``metadata``, check and write it."""
    clean(proto)
    set_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    atomic_write(path, proto.SerializeToString())
    return path
