"""attention_map and resize: the references against hand computations, the Triton kernels (through the
CPU interpreter) against the references, forward and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.devices import KERNEL_DEVICE

from kernels.attention_map import (
    _feature_plan,
    attention_map,
    attention_map_reference,
    resize,
    resize_reference,
)

# Triton keeps fp32 accumulation and returns fp32 maps; gradients come back in the input dtype, so their
# tolerance is the input dtype's rounding.
GRAD_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-4),
    torch.float16: dict(atol=1e-5, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-4, rtol=1.6e-2),
}
MAP_TOL = dict(atol=1e-6, rtol=1e-5)


def _bilinear_numpy(q: np.ndarray, h: int, w: int) -> np.ndarray:
    """align_corners=False bilinear resize of one (H, W) plane, written from the formula, loop by loop."""
    H, W = q.shape
    out = np.zeros((h, w))
    for y in range(h):
        sy = max((y + 0.5) * H / h - 0.5, 0.0)
        i0 = int(sy)
        i1, ly = min(i0 + 1, H - 1), sy - int(sy)
        for x in range(w):
            sx = max((x + 0.5) * W / w - 0.5, 0.0)
            j0 = int(sx)
            j1, lx = min(j0 + 1, W - 1), sx - int(sx)
            top = q[i0, j0] * (1 - lx) + q[i0, j1] * lx
            bottom = q[i1, j0] * (1 - lx) + q[i1, j1] * lx
            out[y, x] = top * (1 - ly) + bottom * ly
    return out


def test_reference_matches_hand_computed_2x2_to_3x3():
    features = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]], [[-1.0, 0.0], [2.0, 1.0]]]], dtype=torch.float64)
    # mean_c F^2 = [[1, 2], [2, 5]]; rows/cols sample the source at 0 (-1/6 clamped), 0.5 and 1 (7/6 clamped).
    pooled = np.array([[1.0, 2.0], [2.0, 5.0]])
    expected = np.array([[1.0, 1.5, 2.0], [1.5, 2.5, 3.5], [2.0, 3.5, 5.0]])
    np.testing.assert_allclose(_bilinear_numpy(pooled, 3, 3), expected)
    got = attention_map_reference(features, (3, 3))[0].numpy()
    np.testing.assert_allclose(got, expected / np.linalg.norm(expected), rtol=1e-12)
    raw = attention_map_reference(features, (3, 3), normalize=False)[0].numpy()
    np.testing.assert_allclose(raw, expected, rtol=1e-12)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_reference_matches_numpy_at_odd_sizes(p):
    features = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    got = attention_map_reference(features, (7, 3), p=p).numpy()
    for b in range(2):
        pooled = (np.abs(features[b].numpy()) ** p).mean(0)
        expected = _bilinear_numpy(pooled, 7, 3)
        np.testing.assert_allclose(got[b], expected / np.linalg.norm(expected), rtol=1e-10)


def test_reference_gradients_float64():
    features = torch.randn(2, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: attention_map_reference(f, (4, 9), p=3), (features,))
    maps = torch.randn(2, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: resize_reference(m, (3, 7)), (maps,))


def _compare(features, size, *, p=2, normalize=True, same_strides=True):
    """Triton vs the reference evaluated in fp32 on the same input values: maps and feature gradients, on
    the kernel test device (``to`` keeps the memory format; ``same_strides``: the gradient keeps it too)."""
    features = features.to(KERNEL_DEVICE)
    x = features.detach().clone().requires_grad_(True)
    ref_x = features.detach().float().clone().requires_grad_(True)
    out = attention_map(x, size, p=p, normalize=normalize, impl="triton")
    ref = attention_map_reference(ref_x, size, p=p, normalize=normalize)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **MAP_TOL)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    assert x.grad.dtype == features.dtype
    assert not same_strides or x.grad.stride() == features.stride()
    tol = GRAD_TOL[features.dtype]
    torch.testing.assert_close(x.grad.float(), ref_x.grad.to(features.dtype).float(), **tol)


@pytest.mark.parametrize(
    "shape,size",
    [
        ((2, 3, 7, 7), (14, 14)),
        ((1, 2, 56, 56), (14, 14)),
        ((2, 3, 13, 9), (5, 11)),
        ((3, 1, 6, 10), (4, 4)),
        ((2, 40, 5, 5), None),
    ],
    ids=["7to14", "56to14", "13x9to5x11", "C1", "no-resize"],
)
def test_triton_matches_reference(shape, size):
    _compare(torch.randn(shape), size)


@pytest.mark.parametrize("p", [1, 3, 0.5])
def test_triton_matches_reference_for_p(p):
    features = torch.randn(2, 5, 9, 7)
    if p < 1:
        # |F|^(p-1) is unbounded at 0 (eager gives NaN there); keep the input away from 0.
        features = features.abs() + 0.1
    _compare(features, (4, 5), p=p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_reference_low_precision(dtype):
    _compare(torch.randn(2, 6, 11, 11, dtype=dtype), (7, 7))


def test_triton_unnormalized_and_channels_last():
    features = torch.randn(2, 5, 9, 9).to(memory_format=torch.channels_last)
    _compare(features, (6, 6), normalize=False)
    _compare(features, (12, 12))


def test_triton_channels_split_across_programs():
    # 80 channels at 12 x 12: a 128-pixel tile holds 32 channels per step, so the channels are split over
    # three programs per tile whose partial maps the second pass adds.
    assert _feature_plan(torch.Size((2, 80, 12, 12)), (11520, 144, 12, 1), (11520, 144, 12, 1)).grid[2] == 3
    _compare(torch.randn(2, 80, 12, 12), (7, 7))
    _compare(torch.randn(2, 80, 12, 12).to(memory_format=torch.channels_last), None)


def test_triton_strided_rows():
    # A crop of wider rows: the pixels of a plane are not evenly spaced, so the kernels index by row and
    # column; the gradient comes back dense.
    features = torch.randn(2, 3, 9, 13)[..., 2:12]
    _compare(features, (5, 5), same_strides=False)


def test_all_zero_features_give_zero_map_and_finite_grad():
    x = torch.zeros(2, 3, 6, 6, device=KERNEL_DEVICE, requires_grad=True)
    out = attention_map(x, (3, 3), impl="triton")
    assert torch.equal(out, torch.zeros(2, 3, 3, device=KERNEL_DEVICE))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize(
    "shape,size,dtype",
    [
        ((1, 2, 7, 7), (14, 14), torch.float32),
        ((1, 2, 13, 9), (5, 11), torch.float32),
        ((1, 2, 20, 20), (6, 6), torch.float32),
        ((1, 2, 5, 6), (9, 4), torch.float16),
        ((1, 2, 5, 6), (9, 4), torch.bfloat16),
    ],
)
def test_resize_matches_interpolate(shape, size, dtype):
    maps = torch.randn(shape, dtype=dtype, device=KERNEL_DEVICE, requires_grad=True)
    ref_maps = maps.detach().float().requires_grad_(True)
    out = resize(maps, size, impl="triton")
    ref = F.interpolate(ref_maps, size=size, mode="bilinear", align_corners=False)
    assert out.dtype == dtype
    tol = GRAD_TOL[dtype]
    torch.testing.assert_close(out.float(), ref.to(dtype).float(), **tol)
    grad = torch.randn_like(ref)
    out.backward(grad.to(dtype))
    ref.backward(grad.to(dtype).float())
    torch.testing.assert_close(maps.grad.float(), ref_maps.grad.to(dtype).float(), **tol)


def test_resize_channels_last_input():
    maps = torch.randn(2, 3, 8, 6, device=KERNEL_DEVICE).to(memory_format=torch.channels_last)
    ref = F.interpolate(maps, size=(5, 9), mode="bilinear", align_corners=False)
    torch.testing.assert_close(resize(maps, (5, 9), impl="triton"), ref, **MAP_TOL)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: attention_map(torch.randn(3, 4, 4), (2, 2)), "features must be"),
        (lambda: resize(torch.randn(1, 3, 4, 4, 1), (2, 2)), "maps must be"),
        (lambda: attention_map(torch.randn(1, 2, 4, 4), (2, 0)), "size must be"),
        (lambda: attention_map(torch.randn(1, 2, 4, 4), (2,)), "size must be"),
        (lambda: resize(torch.randn(1, 2, 4, 4), (2.0, 3)), "size must be"),
        (lambda: attention_map(torch.randn(1, 2, 4, 4), p=0), "p must be"),
        (lambda: attention_map(torch.ones(1, 2, 4, 4, dtype=torch.int64)), "dtype"),
        (
            lambda: attention_map(
                torch.randn(1, 2, 4, 4, dtype=torch.float64, device=KERNEL_DEVICE), impl="triton"
            ),
            "dtype",
        ),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_opcheck_and_compile_without_graph_break():
    features = torch.randn(2, 3, 6, 5, device=KERNEL_DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.kdfast.attention_map.default, (features, 4, 3, 2.0, True))
    out, norm = torch.ops.kdfast.attention_map(features.detach(), 4, 3, 2.0, True)
    grad = torch.randn(2, 4, 3, device=KERNEL_DEVICE)
    args = (grad, features.detach(), out, norm, 2.0, True, True)
    torch.library.opcheck(torch.ops.kdfast.attention_map_backward.default, args)
    maps = torch.randn(1, 2, 5, 4, device=KERNEL_DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.kdfast.resize.default, (maps, 3, 6))
    grad_maps = torch.randn(1, 2, 3, 6, device=KERNEL_DEVICE)
    torch.library.opcheck(torch.ops.kdfast.resize_backward.default, (grad_maps, 5, 4, True))

    def loss(f):
        return resize(attention_map(f, (4, 4), impl="triton")[:, None], (3, 3), impl="triton").square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    (grad,) = torch.autograd.grad(compiled(features), features)
    ref_features = features.detach().clone().requires_grad_(True)
    ref = resize_reference(attention_map_reference(ref_features, (4, 4))[:, None], (3, 3)).square().sum()
    ref.backward()
    torch.testing.assert_close(grad, ref_features.grad, atol=1e-6, rtol=1e-4)
