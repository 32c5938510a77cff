"""Attention map (AT map + bilinear resize + L2 normalize): Triton vs eager reference vs compiled reference.

Shapes are EfficientNet-B0 stages at batch 128 resized to a 14x14 teacher grid. ``bytes`` is what must
cross HBM at least: fwd reads the feature once; fwd+bwd reads it in the forward, again in the backward (the
feature gradient needs F, and the loss runs between the two passes), and writes its gradient once.
"""

from __future__ import annotations

import pytest
import torch
import triton
from conftest import requires_cuda

from kernels import attention_map, attention_map_reference

SHAPES = [(112, 56), (320, 28), (1280, 14)]
SIZE = (14, 14)
BATCH = 128
IMPLS = ("triton", "reference", "compiled_reference")


def _op(impl: str):
    if impl == "triton":
        return lambda f: attention_map(f, SIZE, impl="triton")
    if impl == "reference":
        return lambda f: attention_map_reference(f, SIZE)
    # Every shape, dtype and grad mode is a new specialization of the same code object; a fresh cache keeps
    # them under dynamo's recompile limit (past it, the "compiled" case would silently run eager).
    torch._dynamo.reset()
    return torch.compile(lambda f: attention_map_reference(f, SIZE))


def _case(c: int, hw: int, dtype: torch.dtype) -> str:
    return f"B{BATCH} C{c} {hw}x{hw}->{SIZE[0]}x{SIZE[1]} {str(dtype).removeprefix('torch.')}"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c,hw", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_map_forward(bench_op, impl, c, hw, dtype):
    features = torch.randn(BATCH, c, hw, hw, device="cuda", dtype=dtype)
    op = _op(impl)
    bench_op(
        lambda: op(features),
        features.device,
        group="attention_map fwd",
        impl=impl,
        case=_case(c, hw, dtype),
        bytes=features.numel() * features.element_size(),
        triton=triton.__version__,
    )


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c,hw", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_map_forward_backward(bench_op, impl, c, hw, dtype):
    features = torch.randn(BATCH, c, hw, hw, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(BATCH, *SIZE, device="cuda")
    op = _op(impl)

    def step():
        features.grad = None
        out = op(features)
        torch.autograd.backward(out, grad.to(out.dtype))

    bench_op(
        step,
        features.device,
        group="attention_map fwd+bwd",
        impl=impl,
        case=_case(c, hw, dtype),
        bytes=3 * features.numel() * features.element_size(),
        triton=triton.__version__,
    )
