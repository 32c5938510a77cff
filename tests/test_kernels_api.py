"""The package-level kernels API: exports, and impl dispatch through kernels/_dispatch.py."""

from __future__ import annotations

import pytest
import torch
from conftest import run_without_interpreter

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


def test_auto_on_cpu_runs_the_reference_and_triton_runs_the_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    features = torch.randn(2, 3, 5, 5, dtype=torch.float16)
    # The reference keeps the input dtype; the Triton kernel always returns fp32 maps.
    auto = kernels.attention_map(features, (3, 3))
    assert auto.dtype == torch.float16
    assert torch.equal(auto, kernels.attention_map_reference(features, (3, 3)))
    assert kernels.attention_map(features, (3, 3), impl="triton").dtype == torch.float32
    wide = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    assert torch.equal(kernels.resize(wide, (3, 3)), kernels.resize_reference(wide, (3, 3)))


COMPILE_FOR_SM90 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.attention_map
am = sys.modules["kernels.attention_map"]
scalars = dict(p="fp32", inv_c="fp32", scale_h="fp32", scale_w="fp32", eps="fp32")
cases = [
    (am._pool_kernel, dict(f_ptr="*bf16", q_ptr="*fp32"), dict(P_MODE=0, BLOCK_C=32, BLOCK_HW=128)),
    (am._resize_normalize_kernel, dict(q_ptr="*fp32", out_ptr="*fp32", norm_ptr="*fp32"),
     dict(NORMALIZE=True, BLOCK=256)),
    (am._attention_map_backward_kernel,
     dict(g_ptr="*fp32", out_ptr="*fp32", norm_ptr="*fp32", f_ptr="*bf16", df_ptr="*bf16"),
     dict(NORMALIZE=True, P_MODE=2, BLOCK_C=32, BLOCK_HW=128, BLOCK_X=16, BLOCK_OUT=256)),
    (am._resize_forward_kernel, dict(x_ptr="*fp16", y_ptr="*fp16"), dict(BLOCK=128)),
    (am._resize_backward_kernel, dict(g_ptr="*fp32", dx_ptr="*fp16"), dict(BLOCK=128, BLOCK_X=16)),
]
for fn, types, consts in cases:
    types = {**scalars, **types}
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"], fn.__name__
print("compiled", len(cases))
"""


@pytest.mark.slow
def test_attention_map_kernels_compile_for_sm90_without_a_gpu():
    # The interpreter accepts code the compiler rejects; compiling for an H100 target (no GPU needed)
    # checks the kernels as the GPU will see them.
    done = run_without_interpreter(COMPILE_FOR_SM90)
    assert done.returncode == 0 and "compiled 5" in done.stdout, done.stderr[-2000:]
