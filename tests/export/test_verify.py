"""Parity metrics and gates on hand-computed cases, and the AOTInductor backend."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from export.verify import DEFAULT_GATES, check_gates, failed_gates, parity, unmeasured_gates


def test_polygraphy_rule_fails_only_where_both_tolerances_are_exceeded():
    ref = np.array([[1.0, 100.0, 0.0], [2.0, -1.0, 0.5]])
    out = np.array([[1.2, 100.5, 0.0], [2.0, -1.0, 0.5]])
    # |diff| = 0.2 (rel 0.2) and 0.5 (rel 0.005): with atol 0.1, rtol 0.01 only the first fails.
    p = parity(ref, out, atol=0.1, rtol=0.01, labels=np.array([1, 0]))
    assert p.failing == 1 and p.elements == 6
    assert p.max_abs == pytest.approx(0.5) and p.max_rel == pytest.approx(0.2)
    assert p.top1_agreement == 1.0 and p.accuracy_ref == p.accuracy == 1.0


def test_relative_error_against_zero_reference_is_infinite():
    p = parity(np.array([[0.0, 1.0]]), np.array([[1e-3, 1.0]]), atol=1e-2, rtol=1e-3)
    assert p.max_rel == np.inf and p.failing == 0


def test_gates_report_value_threshold_and_miss():
    ref = np.eye(4)[[0, 1, 2, 3]] * 5
    out = ref.copy()
    out[3] = np.eye(4)[0] * 5  # one flipped prediction out of four
    labels = np.arange(4)
    p = parity(ref, out, atol=1e-4, rtol=1e-3, labels=labels)
    fp32 = failed_gates(check_gates(p, DEFAULT_GATES["fp32"]))
    assert [g["gate"].split(" (")[0] for g in fp32] == [
        "elements within atol=0.0001 or rtol=0.001",
        "top-1 agreement",
    ]
    assert fp32[1]["value"] == 0.75 and fp32[1]["miss"] == pytest.approx(0.999 - 0.75)
    agreement, drop = check_gates(p, DEFAULT_GATES["int8"])
    assert agreement["value"] == 0.75 and agreement["passed"] is False
    assert drop["value"] == pytest.approx(25.0) and drop["passed"] is False


def test_accuracy_gates_are_not_measured_without_labels():
    """Random inputs: the element-wise parity is still measured, top-1 agreement and accuracy drop are not,
    and "not measured" is neither a failure nor a pass."""
    ref = np.eye(4) * 5
    p = parity(ref, ref.copy(), atol=1e-4, rtol=1e-3)
    for precision in ("fp32", "fp16", "int8"):
        gates = check_gates(p, DEFAULT_GATES[precision])
        unmeasured = unmeasured_gates(gates)
        assert {g["gate"] for g in unmeasured} <= {"top-1 agreement", "accuracy drop (points)"}
        assert unmeasured and failed_gates(gates) == []
        assert all(g["passed"] is True for g in gates if g not in unmeasured)


@pytest.mark.slow
def test_aotinductor_package_matches_pytorch(tmp_path):
    from export.aoti import compile_package, load_package

    model = timm.create_model("test_efficientnet", num_classes=10).eval()
    path = compile_package(model, torch.randn(2, 3, 32, 32), tmp_path / "s.pt2", max_batch=4)
    run = load_package(path)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(run(x), model(x), atol=1e-4, rtol=1e-3)
