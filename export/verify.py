"""Parity metrics between a reference (the PyTorch student) and an exported backend, and the gates on them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Parity:
    """How far a backend's logits are from the reference's on the same inputs."""

    max_abs: float
    max_rel: float
    failing: int  # elements outside tolerance under the Polygraphy rule
    elements: int
    top1_agreement: float
    accuracy_ref: float | None
    accuracy: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def parity(
    ref: np.ndarray, out: np.ndarray, *, atol: float, rtol: float, labels: np.ndarray | None = None
) -> Parity:
    """Compare logits ``out`` with ``ref`` (both (N, classes)).

    Polygraphy's rule: an element fails only where ``|out - ref| > atol`` and ``|out - ref| / |ref| > rtol``
    both hold. Relative error divides by ``|ref|`` (inf where ``ref`` is 0 and the outputs differ).
    Accuracies are top-1 against ``labels`` when given.
    """
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"output shape {out.shape} differs from the reference {ref.shape}")
    diff = np.abs(out - ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / np.abs(ref))
    failing = int(np.count_nonzero((diff > atol) & (rel > rtol)))
    top_ref, top_out = ref.argmax(axis=1), out.argmax(axis=1)
    return Parity(
        max_abs=float(diff.max(initial=0.0)),
        max_rel=float(rel.max(initial=0.0)),
        failing=failing,
        elements=int(diff.size),
        top1_agreement=float(np.mean(top_ref == top_out)),
        accuracy_ref=None if labels is None else float(np.mean(top_ref == labels)),
        accuracy=None if labels is None else float(np.mean(top_out == labels)),
    )


@dataclass
class Gates:
    """Thresholds for one precision; ``max_accuracy_drop`` is in percentage points, None disables a gate."""

    atol: float
    rtol: float
    min_agreement: float | None
    max_accuracy_drop: float | None
    elementwise: bool


DEFAULT_GATES = {
    "fp32": Gates(atol=1e-4, rtol=1e-3, min_agreement=0.999, max_accuracy_drop=None, elementwise=True),
    "fp16": Gates(atol=2e-2, rtol=2e-2, min_agreement=0.99, max_accuracy_drop=None, elementwise=True),
    "int8": Gates(
        atol=float("inf"), rtol=float("inf"), min_agreement=0.99, max_accuracy_drop=1.0, elementwise=False
    ),
}

NOT_MEASURED = "not measured: no labelled images (random inputs)"


def _not_measured(name: str, threshold: float) -> dict:
    return {
        "gate": name,
        "value": None,
        "threshold": threshold,
        "passed": None,
        "miss": None,
        "note": NOT_MEASURED,
    }


def check_gates(p: Parity, gates: Gates) -> list[dict]:
    """One entry per gate: name, measured value, threshold, passed, and the margin by which it missed.

    Top-1 agreement and accuracy drop are accuracy gates, measured on real labelled images only: without
    labels (random inputs) they are "not measured" (``passed`` None), and a run with an unmeasured gate
    cannot pass. The element-wise parity gate is measured on any input.
    """
    results = []
    labelled = p.accuracy is not None and p.accuracy_ref is not None
    if gates.elementwise:
        results.append(
            _gate(
                f"elements within atol={gates.atol:g} or rtol={gates.rtol:g} (count failing)",
                p.failing,
                0,
                p.failing <= 0,
            )
        )
    if gates.min_agreement is not None:
        if not labelled:
            results.append(_not_measured("top-1 agreement", gates.min_agreement))
        else:
            results.append(
                _gate(
                    "top-1 agreement",
                    p.top1_agreement,
                    gates.min_agreement,
                    p.top1_agreement >= gates.min_agreement,
                )
            )
    if gates.max_accuracy_drop is not None:
        if not labelled:
            results.append(_not_measured("accuracy drop (points)", gates.max_accuracy_drop))
        else:
            drop = 100.0 * (p.accuracy_ref - p.accuracy)
            results.append(
                _gate(
                    "accuracy drop (points)", drop, gates.max_accuracy_drop, drop <= gates.max_accuracy_drop
                )
            )
    return results


def _gate(name: str, value: float, threshold: float, passed: bool) -> dict:
    return {
        "gate": name,
        "value": value,
        "threshold": threshold,
        "passed": bool(passed),
        "miss": None if passed else abs(value - threshold),
    }


def failed_gates(results: list[dict]) -> list[dict]:
    """The gates that were measured and failed."""
    return [g for g in results if g["passed"] is False]


def unmeasured_gates(results: list[dict]) -> list[dict]:
    """The gates that could not be measured: not a failure, but not a pass either."""
    return [g for g in results if g["passed"] is None]
