"""Attention map (AT map + bilinear resize + L2 normalize): Triton vs eager reference vs compiled reference.

Shapes (``bench/shapes.py``) are EfficientNet-B0 stages at batch 128 resized to a 14x14 teacher grid.
``bytes`` is what must cross HBM at least: fwd reads the feature once; fwd+bwd reads it in the forward, again
in the backward (the feature gradient needs F, and the loss runs between the two passes), and writes its
gradient once.
"""

from __future__ import annotations

import pytest
import shapes
import torch
import triton
from conftest import BENCH_DEVICE, COMPILE_BACKEND, requires_bench_device

from kernels import attention_map, attention_map_reference

SHAPES = shapes.pick(shapes.ATTENTION_MAP, shapes.ATTENTION_MAP_HEADLINE, shapes.ATTENTION_MAP_DRY)
SIZE = shapes.ATTENTION_MAP_SIZE
IMPLS = ("triton", "reference") + (("compiled_reference",) if shapes.COMPILED_BASELINE_EVERYWHERE else ())


def _op(impl: str):
    if impl == "triton":
        return lambda f: attention_map(f, SIZE, impl="triton")
    if impl == "reference":
        return lambda f: attention_map_reference(f, SIZE)
    # Every shape, dtype and grad mode is a new specialization of the same code object; a fresh cache keeps
    # them under dynamo's recompile limit (past it, the "compiled" case would silently run eager).
    torch._dynamo.reset()
    return torch.compile(lambda f: attention_map_reference(f, SIZE), backend=COMPILE_BACKEND)


def _case(b: int, c: int, hw: int, dtype: torch.dtype) -> str:
    return f"B{b} C{c} {hw}x{hw}->{SIZE[0]}x{SIZE[1]} {str(dtype).removeprefix('torch.')}"


@requires_bench_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_C{}_{}".format(*s))
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_map_forward(bench_op, impl, shape, dtype):
    b, c, hw = shape
    features = torch.randn(b, c, hw, hw, device=BENCH_DEVICE, dtype=dtype)
    op = _op(impl)
    bench_op(
        lambda: op(features),
        BENCH_DEVICE,
        group="attention_map fwd",
        impl=impl,
        case=_case(b, c, hw, dtype),
        bytes=features.numel() * features.element_size(),
        triton=triton.__version__,
    )


@requires_bench_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_C{}_{}".format(*s))
@pytest.mark.parametrize("impl", IMPLS)
def test_attention_map_forward_backward(bench_op, impl, shape, dtype):
    b, c, hw = shape
    features = torch.randn(b, c, hw, hw, device=BENCH_DEVICE, dtype=dtype, requires_grad=True)
    grad = torch.randn(b, *SIZE, device=BENCH_DEVICE)
    op = _op(impl)

    def step():
        out = op(features)
        torch.autograd.backward(out, grad.to(out.dtype))
        return out

    bench_op(
        step,
        BENCH_DEVICE,
        forward=lambda: op(features),
        grads_of=[features],
        group="attention_map fwd+bwd",
        impl=impl,
        case=_case(b, c, hw, dtype),
        bytes=3 * features.numel() * features.element_size(),
        triton=triton.__version__,
    )
