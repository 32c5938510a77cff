"""The CIFAR zoo against its reference, mdistiller's ``mdistiller/models/cifar/*.py`` (commit a08d46f, the
same definitions as RepDistiller's ``models/``): parameter counts, state-dict names and shapes (so the trained
teachers of ``cifar_teachers.tar`` load), and the logits and every tap point on seeded weights.

``tests/data/cifar_zoo_reference.json`` holds what the reference code computed: written by
``tests/data/make_cifar_zoo_reference.py`` from an mdistiller checkout, with the weights and input of
``tests/support/zoo_probe.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from support.zoo_probe import fingerprint, layout_sha256, probe_input, seeded_state

from kdfast.config import TapConfig
from kdfast.models import build_model
from kdfast.taps import Taps

REFERENCE_FILE = Path(__file__).resolve().parents[1] / "data" / "cifar_zoo_reference.json"
REFERENCE = json.loads(REFERENCE_FILE.read_text())

# The sizes KD papers print for these models, in millions; the reference counts agree to the last printed
# digit (some are rounded, some cut off: 1,736,564 prints as 1.74M, 2,255,156 as 2.25M).
PRINTED_MILLIONS = {
    "resnet20": 0.28,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_2": 0.70,
    "wrn_40_2": 2.25,
    "vgg8": 3.96,
    "vgg13": 9.46,
    "MobileNetV2": 0.81,
    "ShuffleV2": 1.35,
}


def _build(name: str) -> torch.nn.Module:
    return build_model({"source": "kdfast", "name": name}, num_classes=100)


def _assert_same(ours: dict, ref: dict, what: str) -> None:
    assert ours["shape"] == ref["shape"], what
    scale = ref["abs_mean"]
    assert ours["abs_mean"] == pytest.approx(scale, rel=1e-5), what
    assert ours["mean"] == pytest.approx(ref["mean"], abs=1e-5 * scale), what
    assert ours["samples"] == pytest.approx(ref["samples"], abs=1e-5 * scale), what


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_parameters_and_state_dict_layout_match_the_reference(name: str) -> None:
    ref = REFERENCE[name]
    model = _build(name)
    params = sum(p.numel() for p in model.parameters())
    assert params == ref["params"]
    if name in PRINTED_MILLIONS:
        assert abs(params / 1e6 - PRINTED_MILLIONS[name]) < 0.01
    state = model.state_dict()
    assert len(state) == ref["state_entries"]
    assert layout_sha256(state) == ref["state_sha256"]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_logits_and_tap_points_match_the_reference(name: str) -> None:
    ref = REFERENCE[name]
    model = _build(name)
    model.load_state_dict(seeded_state(model.state_dict()))
    model.eval()
    assert set(model.tap_points) == set(ref["taps"])
    tapped = Taps(model, {tap: TapConfig(path=path) for tap, path in model.tap_points.items()})
    with torch.no_grad():
        logits, taps = tapped(probe_input())
    assert logits.shape == (2, 100)
    _assert_same(fingerprint(logits), ref["logits"], "logits")
    for tap, value in taps.items():
        _assert_same(fingerprint(value), ref["taps"][tap], tap)


def test_a_repdistiller_checkpoint_loads_as_weights(tmp_path: Path) -> None:
    """``cifar_teachers.tar`` holds ``{epoch, model: state_dict, accuracy, optimizer}`` per teacher."""
    teacher = _build("resnet8x4")
    trained = seeded_state(teacher.state_dict())
    momentum = {i: {"momentum_buffer": torch.zeros_like(v)} for i, v in enumerate(trained.values()) if v.ndim}
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save(
        {
            "epoch": 240,
            "model": trained,
            "accuracy": torch.tensor(79.42),
            "optimizer": {"state": momentum, "param_groups": [{"lr": 5e-5, "momentum": 0.9, "params": []}]},
        },
        path,
    )
    loaded = build_model({"source": "kdfast", "name": "resnet8x4"}, num_classes=100, weights=str(path))
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, trained[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet8x4", "ShuffleV2"])
def test_exports_to_onnx_with_the_same_logits(name: str, tmp_path: Path) -> None:
    from export.onnx_export import export_onnx

    model = _build(name)
    model.load_state_dict(seeded_state(model.state_dict()))
    model.eval()
    path = export_onnx(model, probe_input(), tmp_path / f"{name}.onnx", max_batch=8, metadata={})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (onnx_logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        expected = model(images).numpy()
    np.testing.assert_allclose(onnx_logits, expected, rtol=1e-4, atol=1e-5)
