"""PT2E post-training static quantization (torchao), shared by the LiteRT and ExecuTorch backends: each
passes its own runtime's quantizer, this module exports, calibrates and converts.

Imported only by those two backends: ``torchao`` comes with either runtime's extra, not with kdfast.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def quantize_static(
    model: nn.Module,
    example: torch.Tensor,
    calibration: np.ndarray,
    quantizer: object,
    *,
    max_batch: int,
    fold_quantize: bool = True,
) -> nn.Module:
    """``model`` with a dynamic batch (1..``max_batch``) through ``prepare_pt2e(quantizer)``, observed on the
    ``calibration`` images (N, C, H, W) in batches of ``max_batch``, then ``convert_pt2e``: a graph of
    quantize/dequantize pairs around float ops (the reference representation that each runtime's lowering
    turns into integer kernels), in eval mode. ``fold_quantize`` stores the weights as int8 constants
    (XNNPACK's lowering wants them so); False keeps float weights behind a quantize node (LiteRT's
    converter wants that)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if calibration is None or len(calibration) == 0:
        raise ValueError("int8 needs calibration images; none were given")
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    prepared = prepare_pt2e(program.module(), quantizer)
    with torch.no_grad():
        for start in range(0, len(calibration), max_batch):
            prepared(torch.from_numpy(np.ascontiguousarray(calibration[start : start + max_batch])))
    quantized = convert_pt2e(prepared, fold_quantize=fold_quantize)
    # The graph was exported from the eval-mode model; this makes sure of its dropout and batch-norm ops, and
    # the flag (which exported modules do not update through .eval()) tells converters the same.
    move_exported_model_to_eval(quantized)
    quantized.training = False
    return quantized
