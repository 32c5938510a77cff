"""Hybrid SSIM + cosine loss (AGKD): Triton vs the eager reference vs torch.compile of the reference vs
pytorch_msssim + F.cosine_similarity, forward and forward+backward (student requires grad, teacher not).
Run: ``pytest bench/test_kernels_ssim.py``; every case needs a CUDA GPU.
"""

from __future__ import annotations

import functools

import pytest
import pytorch_msssim
import torch
import torch.nn.functional as F
from conftest import requires_cuda

from kernels.ssim import ssim_cosine_loss, ssim_cosine_loss_reference

SHAPES = [(128, 1, 7, 7), (128, 1, 14, 14), (128, 1, 28, 28), (128, 1, 56, 56), (256, 16, 56, 56)]
IMPLS = ["triton", "reference", "compiled_reference", "pytorch_msssim"]


def _msssim_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The hybrid loss as one would write it with the published libraries."""
    l_ssim = 1 - pytorch_msssim.ssim(student, teacher, data_range=1.0, size_average=True)
    l_cos = 1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1).mean()
    return 0.5 * l_ssim + 0.5 * l_cos


@functools.cache
def _compiled_reference():
    return torch.compile(ssim_cosine_loss_reference, fullgraph=True, dynamic=False)


def _loss_fn(impl: str):
    if impl == "triton":
        return functools.partial(ssim_cosine_loss, impl="triton")
    if impl == "reference":
        return ssim_cosine_loss_reference
    if impl == "compiled_reference":
        return _compiled_reference()
    return _msssim_cosine


@requires_cuda
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_C{}_{}x{}".format(*s))
@pytest.mark.parametrize("impl", IMPLS)
def test_ssim_cosine(bench_op, impl, shape, mode):
    batch, channels, height, width = shape
    group = f"ssim_cosine {mode} B{batch} C{channels} {height}x{width}"
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    student = torch.rand(shape, device=device, generator=gen, requires_grad=mode == "fwd+bwd")
    teacher = (student.detach() + 0.1 * torch.randn(shape, device=device, generator=gen)).clamp(0, 1)
    loss_fn = _loss_fn(impl)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return loss_fn(student, teacher)
        student.grad = None
        loss = loss_fn(student, teacher)
        loss.backward()
        return loss

    bench_op(step, device, group=group, impl=impl, shape=list(shape), mode=mode)
