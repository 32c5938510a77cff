"""The package-level kernels API: exports, and impl dispatch through kernels/_dispatch.py."""

from __future__ import annotations

import pytest
import torch
from conftest import KERNEL_DEVICE

import kernels
from kernels._dispatch import use_triton

EXPORTS = {
    "ssim",
    "ssim_reference",
    "ssim_cosine_loss",
    "ssim_cosine_loss_reference",
    "attention_kl",
    "attention_kl_reference",
    "attention_map",
    "attention_map_reference",
    "resize",
    "resize_reference",
}


def test_import_kernels_exports_every_op_and_reference():
    assert set(kernels.__all__) == EXPORTS
    for name in EXPORTS:
        assert callable(getattr(kernels, name)), name


def test_use_triton_resolves_each_impl(monkeypatch):
    cpu = torch.zeros(1)
    assert use_triton("reference", cpu) is False
    assert use_triton("auto", cpu) is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton("triton", cpu) is True
    with pytest.raises(ValueError, match="impl must be one of"):
        use_triton("cuda", cpu)


def test_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.attention_map(torch.randn(1, 2, 4, 4), impl="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.resize(torch.randn(1, 2, 4, 4), (2, 2), impl="triton")


def test_auto_on_cpu_runs_the_reference_and_triton_runs_the_kernel():
    features = torch.randn(2, 3, 5, 5, dtype=torch.float16)
    # The reference keeps the input dtype; the Triton kernel always returns fp32 maps.
    auto = kernels.attention_map(features, (3, 3))
    assert auto.dtype == torch.float16
    assert torch.equal(auto, kernels.attention_map_reference(features, (3, 3)))
    on_device = features.to(KERNEL_DEVICE)
    assert kernels.attention_map(on_device, (3, 3), impl="triton").dtype == torch.float32
    wide = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    assert torch.equal(kernels.resize(wide, (3, 3)), kernels.resize_reference(wide, (3, 3)))
