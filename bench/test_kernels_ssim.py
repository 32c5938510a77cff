"""Hybrid SSIM + cosine loss (AGKD): Triton vs the eager reference vs torch.compile of the reference vs
pytorch_msssim + F.cosine_similarity, forward and forward+backward (student requires grad, teacher not), at
the shapes of ``bench/shapes.py``. Run: ``pytest bench/test_kernels_ssim.py``; every case needs a CUDA GPU
(or a dry run). Where pytorch-msssim is not installed its baseline is skipped, with that reason.
"""

from __future__ import annotations

import functools

import pytest
import shapes
import torch
import torch.nn.functional as F
from conftest import BENCH_DEVICE, COMPILE_BACKEND, requires_bench_device

from kernels.ssim import ssim_cosine_loss, ssim_cosine_loss_reference

SHAPES = shapes.pick(shapes.SSIM, shapes.SSIM_HEADLINE, shapes.SSIM_DRY)
IMPLS = ["triton", "reference", "compiled_reference", "pytorch_msssim"]


def _msssim_cosine(student: torch.Tensor, teacher: torch.Tensor, pytorch_msssim) -> torch.Tensor:
    """The hybrid loss as one would write it with the published libraries."""
    l_ssim = 1 - pytorch_msssim.ssim(student, teacher, data_range=1.0, size_average=True)
    l_cos = 1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1).mean()
    return 0.5 * l_ssim + 0.5 * l_cos


def _loss_fn(impl: str):
    if impl == "triton":
        return functools.partial(ssim_cosine_loss, impl="triton")
    if impl == "reference":
        return ssim_cosine_loss_reference
    if impl == "compiled_reference":
        # One compiled function per case: each shape and grad mode is a new specialization of the same code
        # object, and past dynamo's recompile limit (8) a shared one would fail (fullgraph) or run eager.
        torch._dynamo.reset()
        return torch.compile(
            ssim_cosine_loss_reference, fullgraph=True, dynamic=False, backend=COMPILE_BACKEND
        )
    pytorch_msssim = pytest.importorskip(
        "pytorch_msssim", reason="pytorch-msssim is not installed: its baseline is not measured here"
    )
    return functools.partial(_msssim_cosine, pytorch_msssim=pytorch_msssim)


@requires_bench_device
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_C{}_{}x{}".format(*s))
@pytest.mark.parametrize("impl", IMPLS)
def test_ssim_cosine(bench_op, impl, shape, mode):
    batch, channels, height, width = shape
    group = f"ssim_cosine {mode} B{batch} C{channels} {height}x{width}"
    gen = torch.Generator(device=BENCH_DEVICE).manual_seed(0)
    student = torch.rand(shape, device=BENCH_DEVICE, generator=gen, requires_grad=mode == "fwd+bwd")
    teacher = (student.detach() + 0.1 * torch.randn(shape, device=BENCH_DEVICE, generator=gen)).clamp(0, 1)
    loss_fn = _loss_fn(impl)

    def forward():
        return loss_fn(student, teacher)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return forward()
        loss = forward()
        loss.backward()
        return loss

    bench_op(
        step,
        BENCH_DEVICE,
        forward=forward if mode == "fwd+bwd" else None,
        grads_of=[student] if mode == "fwd+bwd" else [],
        group=group,
        impl=impl,
        case=f"B{batch} C{channels} {height}x{width} fp32",
        mode=mode,
    )
