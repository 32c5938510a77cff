"""Accuracy-controlled quantization: keep the layers that hurt most in float until the INT8 model meets its
gates (NNCF's ``quantize_with_accuracy_control`` idea: a ``max_drop`` in the metric, layers ranked by how
much reverting each alone restores, reverted greedily in that order).

Here the gates are the export's own, both at once: top-1 agreement with the float model at least a floor,
and the accuracy drop on labelled images at most a limit. Layers are ranked by the SQNR of the logits
(:func:`sqnr_db`) gained when that layer alone stays float, a continuous score where top-1 agreement on a
few hundred images would tie.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm


def sqnr_db(reference: np.ndarray, quantized: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``20 log10(||x|| / ||x - x_q||)`` in dB over all elements
    (norms floored at float64 epsilon, so identical tensors give a large finite value)."""
    x = np.asarray(reference, dtype=np.float64).reshape(-1)
    noise = x - np.asarray(quantized, dtype=np.float64).reshape(-1)
    eps = np.finfo(np.float64).eps
    return 20.0 * math.log10(max(float(np.linalg.norm(x)), eps) / max(float(np.linalg.norm(noise)), eps))


@dataclass(frozen=True)
class Quality:
    """How close quantized logits are to the float model's on one image set."""

    agreement: float  # fraction of top-1 predictions equal to the float model's
    accuracy_drop: float | None  # float accuracy minus quantized accuracy, in points; None without labels
    sqnr_db: float  # of the logits

    @staticmethod
    def of(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> Quality:
        predicted, expected = logits.argmax(1), reference.argmax(1)
        drop = None
        if labels is not None:
            drop = 100.0 * (float(np.mean(expected == labels)) - float(np.mean(predicted == labels)))
        return Quality(float(np.mean(predicted == expected)), drop, sqnr_db(reference, logits))


@dataclass
class Control:
    """What accuracy control did: the layers kept in float, the ranking, and the quality after each step."""

    keep_float: list[str]
    initial: Quality
    final: Quality
    met: bool
    ranking: list[dict] = field(default_factory=list)  # {"node", "sqnr_gain_db"}, best first
    steps: list[dict] = field(default_factory=list)  # {"node", **Quality} after keeping each one float

    def as_dict(self) -> dict:
        return {
            "keep_float": self.keep_float,
            "initial": asdict(self.initial),
            "final": asdict(self.final),
            "met": self.met,
            "ranking": self.ranking,
            "steps": self.steps,
        }


def control_accuracy(
    candidates: Sequence[str],
    evaluate: Callable[[Sequence[str]], Quality],
    accept: Callable[[Quality], bool],
    *,
    max_float: int | None = None,
) -> Control:
    """Keep layers of ``candidates`` in float, most damaging first, until ``accept`` holds.

    ``evaluate(keep_float)`` quantizes with those layers left in float and measures the result. Ranking
    costs one evaluation per candidate and runs only when the fully quantized model is not accepted;
    ``max_float`` bounds how many layers may be kept (None: all of them, which is the float model).
    """
    initial = evaluate([])
    if accept(initial):
        return Control([], initial, initial, met=True)
    gains = []
    for node in tqdm(candidates, desc="INT8 accuracy control: ranking layers", unit="layer", leave=False):
        gains.append({"node": node, "sqnr_gain_db": evaluate([node]).sqnr_db - initial.sqnr_db})
    gains.sort(key=lambda g: -g["sqnr_gain_db"])
    keep: list[str] = []
    steps: list[dict] = []
    current = initial
    limit = len(gains) if max_float is None else min(max_float, len(gains))
    for gain in tqdm(
        gains[:limit], desc="INT8 accuracy control: keeping layers float", unit="layer", leave=False
    ):
        keep.append(gain["node"])
        current = evaluate(keep)
        steps.append({"node": gain["node"], **asdict(current)})
        if accept(current):
            return Control(keep, initial, current, True, gains, steps)
    return Control(keep, initial, current, False, gains, steps)
