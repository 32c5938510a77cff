"""fp32 ONNX -> fp16 ONNX with fp32 inputs and outputs kept (INT8 is :mod:`export.quantize`)."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

from export.onnx_export import finish, read_metadata


def to_fp16(src: Path, dst: Path) -> Path:
    """Convert weights and compute to fp16, keeping fp32 graph inputs/outputs (Casts at the edges).

    ONNX Runtime's converter keeps ops without fp16 kernels in fp32 (its default block list) and clamps
    initializers to the fp16 range, so out-of-range weights saturate instead of becoming inf.
    """
    proto = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    _sort_topologically(proto.graph)
    return finish(proto, dst, read_metadata(src))


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so producers precede consumers: the converter appends its input Casts at the
    end, which ONNX Runtime tolerates but the checker and TensorRT's parser do not."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError(f"the graph has a cycle or a dangling input at node {pending[0].name!r}")
        ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ids]
        ordered += ready
        available.update(o for n in ready for o in n.output)
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)
