"""The package-level kernels API: exports, and impl dispatch through kernels/_dispatch.py."""

from __future__ import annotations

import inspect
import operator
import types

import numpy as np
import pytest
import torch
from support.devices import KERNEL_DEVICE

import kernels
from kernels._dispatch import TRITON_AVAILABLE, backport_interpreter_index, interpreting, use_triton
from kernels._launch import Pinned, launch

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl
    from triton.runtime.autotuner import Autotuner

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


# --- kernels/_launch.py: the launch path every op takes ------------------------------------------------

if TRITON_AVAILABLE:

    @triton.autotune(configs=[triton.Config({"BLOCK": 16})], key=["n"])
    @triton.jit
    def _scale_kernel(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * factor, mask=mask)


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs triton")
def test_pinned_goes_through_the_autotuner_once_per_signature_and_keeps_its_grid(monkeypatch):
    calls = []
    autotuner_run = Autotuner.run

    def counted(self, *args, **kwargs):
        calls.append(args[2])  # n
        return autotuner_run(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", counted)
    pinned = Pinned(_scale_kernel)
    # n = 40 twice (the second launch skips the autotuner and reuses the grid of 3 blocks of 16), then a new
    # signature; the factor is a per-call keyword and must not be kept with the config.
    for n, factor in ((40, 2.0), (40, -3.0), (100, 0.5)):
        x = torch.arange(n, dtype=torch.float32, device=KERNEL_DEVICE) + 1
        y = torch.full_like(x, float("nan"))
        pinned((n,), lambda meta, n=n: (triton.cdiv(n, meta["BLOCK"]),), {}, x, y, n, factor=factor)
        torch.testing.assert_close(y, x * factor, rtol=0, atol=0)
    assert calls == [40, 100]
    assert pinned.choices[(40,)]["grid"] == (3,) and pinned.choices[(100,)]["grid"] == (7,)


@pytest.mark.skipif(not TRITON_AVAILABLE, reason="needs triton")
def test_launch_is_kernel_grid_call():
    x = torch.linspace(-2, 2, 50, device=KERNEL_DEVICE)
    y, expected = torch.zeros_like(x), torch.zeros_like(x)
    launch(_scale_kernel.fn, (4,), x, y, 50, 1.5, BLOCK=16)
    _scale_kernel.fn[(4,)](x, expected, 50, 1.5, BLOCK=16)
    torch.testing.assert_close(y, x * 1.5, rtol=0, atol=0)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_interpreter_backport_gives_an_int_for_a_one_element_array():
    # Triton 3.3-3.6's interpreter does int() of a 1-element array, which numpy >= 2.4 refuses; Triton 3.7
    # squeezes it first. The backport wraps the function that installs that conversion.
    class Scalar:
        handle = types.SimpleNamespace(data=np.array([7], dtype=np.int32))

    def _patch_lang_tensor(tensor, scope):
        tensor.__index__ = lambda self: int(self.handle.data)

    interpreter = types.SimpleNamespace(_patch_lang_tensor=_patch_lang_tensor)
    assert backport_interpreter_index(interpreter)
    interpreter._patch_lang_tensor(Scalar, None)
    assert operator.index(Scalar()) == 7 and len(range(Scalar())) == 7
    assert not backport_interpreter_index(interpreter)  # applied once

    def _fixed(tensor, scope):
        tensor.__index__ = lambda self: int(self.handle.data.squeeze())

    assert not backport_interpreter_index(types.SimpleNamespace(_patch_lang_tensor=_fixed))


@pytest.mark.skipif(not (TRITON_AVAILABLE and interpreting()), reason="needs the Triton interpreter")
def test_the_interpreter_in_use_converts_one_element_arrays():
    from triton.runtime import interpreter

    fixed = getattr(interpreter._patch_lang_tensor, "kdfast_backport", False)
    assert fixed or "squeeze" in inspect.getsource(interpreter._patch_lang_tensor)
