"""Where INT8 quantization damages a network: the SQNR of every weighted layer's output in the Q/DQ model
against the same tensor in the float model, on the same images.

Both graphs come from the same pre-processed float model (ONNX Runtime's quantizer keeps the names of the
tensors it quantizes), so each weighted op's output exists in both. The Q/DQ graph runs with ONNX
Runtime's graph optimizations off, i.e. its own Q/DQ arithmetic in float, not a fused integer kernel's: the
damage is that of the quantization itself. The SQNR at a layer accumulates everything upstream; where it
falls most is where the damage enters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from export.accuracy_control import sqnr_db
from export.qdq_rules import weighted_layers


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names:
        if name not in present:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


def run_tensors(
    model: onnx.ModelProto, names: Sequence[str], images: np.ndarray, batch: int, threads: int
) -> dict[str, np.ndarray]:
    """The tensors ``names`` of ``model`` (any, not only its outputs) on ``images``, by name, from ONNX
    Runtime with graph optimizations off: a Q/DQ graph's own arithmetic, not a fused kernel's."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        _with_outputs(model, names).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    input_name = session.get_inputs()[0].name
    chunks = [
        session.run(list(names), {input_name: images[i : i + batch]}) for i in range(0, len(images), batch)
    ]
    return {name: np.concatenate([c[k] for c in chunks]) for k, name in enumerate(names)}


def _layer_name(node: onnx.NodeProto) -> str:
    """The module path of a layer when its weight is named after it (``blocks.2.conv.weight``), else the
    node's name (the exporter names transposed Linear weights ``val_<n>``)."""
    weight = node.input[1]
    return weight.removesuffix(".weight") if "." in weight else node.name


def layer_sqnr(
    float_model: onnx.ModelProto,
    qdq_models: dict[str, onnx.ModelProto],
    images: np.ndarray,
    *,
    batch: int = 32,
    threads: int = 1,
) -> list[dict]:
    """One entry per weighted layer of ``float_model`` (then the logits): node, op, output tensor, and the
    SQNR in dB of that tensor in each of ``qdq_models`` (by label) against the float model."""
    layers = weighted_layers(float_model)
    logits = float_model.graph.output[0].name
    names = [n.output[0] for n in layers] + [logits]
    reference = run_tensors(float_model, names, images, batch, threads)
    rows = [{"node": n.name, "layer": _layer_name(n), "op": n.op_type, "tensor": n.output[0]} for n in layers]
    rows.append({"node": "output", "layer": "logits", "op": "logits", "tensor": logits})
    for label, model in qdq_models.items():
        produced = {o for n in model.graph.node for o in n.output} | {logits}
        present = [name for name in names if name in produced]
        quantized = run_tensors(model, present, images, batch, threads)
        for row in rows:
            got = quantized.get(row["tensor"])
            row[label] = None if got is None else sqnr_db(reference[row["tensor"]], got)
    return rows
