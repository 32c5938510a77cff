"""The INT8 stage: one Q/DQ file per scheme, accuracy-controlled against the gates, its per-layer damage
measured."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.accuracy_control import Control, Quality, control_accuracy
from export.backends import batched
from export.int8_damage import layer_sqnr
from export.onnx_export import finish
from export.ort_backend import make_session, runner
from export.quantize import Int8Quantizer, Scheme

# Images the per-layer SQNR is measured on: enough for a stable ratio, few enough to keep every
# intermediate tensor of a ViT in memory.
DAMAGE_IMAGES = 64


@dataclass(frozen=True)
class ControlSet:
    """Labelled images accuracy control measures on, and the float model's logits for them."""

    images: np.ndarray
    reference: np.ndarray
    labels: np.ndarray | None


@dataclass
class Int8File:
    scheme: Scheme
    path: Path
    control: Control | None  # None: not run (no labels)
    layers: list[dict]  # per weighted layer: SQNR all-quantized and as written, and whether it stayed float


def make_int8(
    quantizer: Int8Quantizer,
    scheme: Scheme,
    dst: Path,
    *,
    metadata: dict[str, str],
    control_set: ControlSet,
    min_agreement: float,
    max_drop: float,
    threads: int,
    batch: int,
) -> Int8File:
    """Quantize in ``scheme`` keeping as few layers in float as the gates allow, write ``dst``.

    Accuracy control needs labels: without them (random inputs) every layer is quantized and the control
    is reported as not run.
    """

    def evaluate(keep_float: Sequence[str]) -> Quality:
        session = make_session(quantizer.quantize(scheme, keep_float).SerializeToString(), threads=threads)
        logits = batched(runner(session), control_set.images, batch)
        return Quality.of(logits, control_set.reference, control_set.labels)

    def accept(q: Quality) -> bool:
        return q.agreement >= min_agreement and q.accuracy_drop is not None and q.accuracy_drop <= max_drop

    control = None
    keep: list[str] = []
    if control_set.labels is not None:
        control = control_accuracy(quantizer.candidates(scheme), evaluate, accept)
        keep = control.keep_float
    written = quantizer.quantize(scheme, keep)
    all_int8 = written if not keep else quantizer.quantize(scheme, [])
    layers = layer_sqnr(
        quantizer.float_model,
        {"sqnr_all_int8_db": all_int8, "sqnr_db": written},
        control_set.images[:DAMAGE_IMAGES],
        batch=batch,
        threads=threads,
    )
    for layer in layers:
        layer["float"] = layer["node"] in keep
    finish(written, dst, metadata)
    return Int8File(scheme, dst, control, layers)
