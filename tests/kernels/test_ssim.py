"""SSIM and the hybrid SSIM + cosine loss: the reference against pytorch_msssim and F.cosine_similarity,
the Triton kernels (CPU interpreter here) against the reference, forward and gradients."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from support.devices import KERNEL_DEVICE

from kernels.ssim import (
    MAX_CHANNELS,
    _check_triton_limits,
    _ssim,
    ssim,
    ssim_cosine_loss,
    ssim_cosine_loss_reference,
    ssim_reference,
)


def _pair(shape, dtype=torch.float32, noise=0.2, seed=0):
    """A map and a noisy copy of it, in [0, 1], on the kernel test device: SSIM well inside (0, 1) and
    structure to compare."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    y = (x + noise * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    return x.to(KERNEL_DEVICE, dtype), y.to(KERNEL_DEVICE, dtype)


def _msssim(x, y, **kw):
    """pytorch_msssim per sample; it builds its window in fp32, so it agrees with ours to ~1e-7."""
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pytorch_msssim warns when it skips smoothing a short side
        return pytorch_msssim.ssim(x, y, size_average=False, **kw)


@pytest.mark.parametrize(
    ("shape", "window_size", "sigma"),
    [
        ((2, 3, 16, 16), 11, 1.5),
        ((2, 1, 13, 29), 3, 0.8),
        ((2, 2, 9, 12), 5, 1.0),
        ((1, 2, 7, 9), 9, 2.0),  # H shorter than the window: only W is smoothed
        ((2, 1, 7, 7), 11, 1.5),  # both sides shorter: no smoothing at all
        ((2, 1, 9, 20), 1, 1.5),  # one tap
    ],
)
def test_reference_matches_pytorch_msssim(shape, window_size, sigma):
    x, y = _pair(shape, torch.float64)
    ours = ssim_reference(x, y, window_size=window_size, sigma=sigma)
    theirs = _msssim(x, y, data_range=1.0, win_size=window_size, win_sigma=sigma)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("side", [2, 3])
def test_reference_one_pixel_side_matches_pytorch_msssim_on_repeated_rows(side):
    # pytorch_msssim squeezes a side of 1 away and then refuses the input; a side shorter than the window
    # is not smoothed, so repeating each row (column) `side` times must leave every SSIM unchanged.
    x, y = _pair((3, 2, 1, 20), torch.float64)
    theirs = _msssim(x.repeat(1, 1, side, 1), y.repeat(1, 1, side, 1), data_range=1.0, win_size=7)
    torch.testing.assert_close(ssim_reference(x, y, window_size=7), theirs, rtol=1e-6, atol=1e-9)
    xt, yt = x.transpose(2, 3), y.transpose(2, 3)
    torch.testing.assert_close(ssim_reference(xt, yt, window_size=7), theirs, rtol=1e-6, atol=1e-9)


def test_reference_data_range_k_and_nonnegative_match_pytorch_msssim():
    x, y = _pair((4, 2, 12, 12), torch.float64)
    x, y = 255 * x, 255 * (1 - y)  # anti-correlated: some planes have negative SSIM
    for nonnegative in (False, True):
        ours = ssim_reference(x, y, window_size=5, data_range=255.0, k=(0.02, 0.05), nonnegative=nonnegative)
        theirs = _msssim(x, y, data_range=255.0, win_size=5, K=(0.02, 0.05), nonnegative_ssim=nonnegative)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    assert (ssim_reference(x, y, window_size=5, data_range=255.0) < 0).any()


def test_reference_hybrid_loss_matches_msssim_and_cosine_similarity():
    x, y = _pair((3, 2, 10, 11), torch.float64)
    loss = ssim_cosine_loss_reference(x, y, alpha=0.3, beta=0.7, window_size=5)
    cos = F.cosine_similarity(x.flatten(1), y.flatten(1), dim=1, eps=1e-8)
    expected = 0.3 * (1 - _msssim(x, y, data_range=1.0, win_size=5).mean()) + 0.7 * (1 - cos.mean())
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-9)


def test_reference_gradcheck_float64():
    x, y = _pair((2, 1, 6, 7), torch.float64)
    x.requires_grad_()
    y.requires_grad_()

    def loss_fn(a, b):
        return ssim_cosine_loss_reference(a, b, alpha=0.4, beta=0.6, window_size=3)

    assert torch.autograd.gradcheck(loss_fn, (x, y), fast_mode=True)


def _check_triton(x, y, *, rtol=1e-5, atol=1e-6, grad_rtol=1e-4, student_only=False, **kw):
    """Triton loss and gradients against the reference evaluated in float64 on the same inputs."""
    xs = x.clone().requires_grad_()
    ys = y.clone().requires_grad_(not student_only)
    loss = ssim_cosine_loss(xs, ys, impl="triton", alpha=0.3, beta=0.7, **kw)
    loss.backward()
    xr = x.double().requires_grad_()
    yr = y.double().requires_grad_()
    ref = ssim_cosine_loss_reference(xr, yr, alpha=0.3, beta=0.7, **kw)
    ref.backward()
    assert loss.dtype == x.dtype and xs.grad.dtype == x.dtype
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=atol)
    scale = xr.grad.abs().max()
    torch.testing.assert_close(xs.grad.double(), xr.grad, rtol=grad_rtol, atol=grad_rtol * scale)
    if student_only:
        assert ys.grad is None
    else:
        torch.testing.assert_close(ys.grad.double(), yr.grad, rtol=grad_rtol, atol=grad_rtol * scale)


@pytest.mark.parametrize(
    ("shape", "window_size"),
    [
        ((6, 1, 28, 28), 11),  # a realistic attention-map shape
        ((2, 3, 14, 14), 11),
        ((2, 2, 7, 7), 11),  # shorter than the window: no smoothing
        ((2, 1, 9, 20), 1),  # a window of one tap: no smoothing either
        ((2, 1, 13, 29), 7),
        ((2, 2, 1, 37), 5),  # 1 x W
        ((2, 1, 23, 1), 5),  # H x 1
        ((1, 2, 70, 19), 11),  # H > 64: the tiled path, with halos between row tiles
        ((1, 1, 66, 20), 19),  # a window wide enough that the backward's halo needs 128-row tiles
    ],
)
def test_triton_matches_reference(shape, window_size):
    x, y = _pair(shape)
    torch.testing.assert_close(
        ssim(x, y, window_size=window_size, impl="triton").double(),
        ssim_reference(x.double(), y.double(), window_size=window_size),
        rtol=1e-5,
        atol=1e-6,
    )
    _check_triton(x, y, window_size=window_size)


def test_triton_tiled_both_sides_and_student_only_gradient():
    x, y = _pair((1, 1, 75, 80), seed=3)
    _check_triton(x, y, window_size=9, sigma=2.0, student_only=True)


def test_triton_per_sample_ssim_gradient():
    x, y = _pair((3, 2, 12, 17))
    g = torch.randn(3, dtype=torch.float64, device=KERNEL_DEVICE)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    (ssim(xs, ys, window_size=5, impl="triton") * g.float()).sum().backward()
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    (ssim_reference(xr, yr, window_size=5) * g).sum().backward()
    torch.testing.assert_close(xs.grad.double(), xr.grad, rtol=1e-4, atol=1e-4 * xr.grad.abs().max())
    torch.testing.assert_close(ys.grad.double(), yr.grad, rtol=1e-4, atol=1e-4 * yr.grad.abs().max())


def test_triton_nonnegative_data_range_and_k():
    x, y = _pair((4, 3, 12, 12), seed=1)
    x, y = 4 * x, 4 * (1 - y)  # anti-correlated: negative-SSIM planes get no SSIM gradient
    kw = dict(window_size=5, data_range=4.0, k=(0.02, 0.05), nonnegative=True)
    assert (ssim_reference(x, y, **{**kw, "nonnegative": False}) < 0).any()
    _check_triton(x, y, **kw)


def test_triton_non_contiguous_inputs():
    x, y = _pair((2, 4, 18, 15))
    x, y = x[:, ::2].transpose(2, 3)[:, :, 1:], y[:, 1::2].transpose(2, 3)[:, :, 1:]
    assert not x.is_contiguous() and not y.is_contiguous()
    _check_triton(x, y, window_size=7)


@pytest.mark.parametrize("kind", ["constant", "zero"])
def test_triton_constant_and_zero_maps_have_no_nan(kind):
    x, y = _pair((2, 2, 14, 14))
    if kind == "constant":
        x = torch.full_like(x, 0.25)
        y = torch.full_like(y, 0.75)
    else:
        x = torch.zeros_like(x)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss = ssim_cosine_loss(xs, ys, impl="triton")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(xs.grad).all() and torch.isfinite(ys.grad).all()
    _check_triton(x, y)


@pytest.mark.parametrize(
    ("dtype", "rtol", "grad_rtol"), [(torch.float16, 2e-3, 2e-3), (torch.bfloat16, 1e-2, 1e-2)]
)
def test_triton_half_precision(dtype, rtol, grad_rtol):
    # fp32 inside the kernel, so the only error left is rounding the inputs (shared with the reference)
    # and the outputs (checked by these tolerances).
    x, y = _pair((3, 2, 14, 14), dtype)
    _check_triton(x, y, rtol=rtol, atol=rtol, grad_rtol=grad_rtol)
    torch.testing.assert_close(
        ssim(x, y, impl="triton").double(), ssim_reference(x.double(), y.double()), rtol=rtol, atol=rtol
    )


def test_opcheck():
    x, y = _pair((2, 1, 6, 6))
    args = (x.clone().requires_grad_(), y.clone().requires_grad_(), 3, 1.5, 1.0, 0.01, 0.03, True, 0.5, 0.5)
    torch.library.opcheck(_ssim.forward_op, args)
    stats = _ssim.forward_op(x, y, *args[2:])[2]
    grads = (torch.tensor(1.0, device=KERNEL_DEVICE), torch.randn(2, device=KERNEL_DEVICE))
    torch.library.opcheck(_ssim.backward_op, (*grads, x, y, stats, *args[2:], True, True))
    torch.library.opcheck(_ssim.backward_op, (*grads, x, y, stats, *args[2:], True, False))


def test_compile_fullgraph_has_no_graph_break():
    x, y = _pair((2, 1, 9, 10))

    def loss_fn(s, t):
        return ssim_cosine_loss(s, t, impl="triton", window_size=3)

    compiled = torch.compile(loss_fn, fullgraph=True)
    xs = x.clone().requires_grad_()
    loss = compiled(xs, y)
    loss.backward()
    xr = x.double().requires_grad_()
    ref = ssim_cosine_loss_reference(xr, y.double(), window_size=3)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xs.grad.double(), xr.grad, rtol=1e-4, atol=1e-4 * xr.grad.abs().max())


@pytest.mark.parametrize(
    ("x_shape", "y_shape", "kw", "match"),
    [
        ((2, 8, 8), (2, 8, 8), {}, "must be 4-D"),
        ((2, 1, 8, 8), (2, 1, 8, 9), {}, "same shape"),
        ((2, 1, 8, 8), (2, 1, 8, 8), {"window_size": 4}, "odd integer"),
        ((2, 1, 8, 8), (2, 1, 8, 8), {"window_size": -1}, "odd integer"),
        ((2, 1, 8, 8), (2, 1, 8, 8), {"data_range": 0.0}, "data_range"),
        ((2, 1, 8, 8), (2, 1, 8, 8), {"data_range": float("inf")}, "data_range"),
        ((2, 1, 8, 8), (2, 1, 8, 8), {"sigma": float("nan")}, "sigma"),
    ],
)
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bad_input_raises_value_error(x_shape, y_shape, kw, match, impl):
    with pytest.raises(ValueError, match=match):
        ssim_cosine_loss(
            torch.rand(x_shape, device=KERNEL_DEVICE),
            torch.rand(y_shape, device=KERNEL_DEVICE),
            impl=impl,
            **kw,
        )


def test_triton_window_limit_on_tiled_sides():
    x = torch.rand(1, 1, 80, 8, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="window_size <= 33"):
        ssim(x, x, window_size=35, impl="triton")
    assert ssim(x, x, window_size=35, impl="reference").shape == (1,)


def test_bad_dtype_raises_value_error():
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64, device=KERNEL_DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        ssim(x, x, impl="triton")
    with pytest.raises(ValueError, match="dtype"):
        ssim(x.to(torch.int32), x.to(torch.int32), impl="reference")
    with pytest.raises(ValueError, match="share a dtype"):
        ssim(x, x.float(), impl="reference")
    assert ssim(x, x, impl="reference").dtype == torch.float64


# --- the limits of the Triton path (meta tensors: shapes and strides without memory) -------------------


def _meta_view(shape, strides):
    return torch.empty(2**32, device="meta").as_strided(shape, strides)


def test_plane_offsets_past_32_bits_are_refused_at_exactly_2_31():
    # In-plane offsets are rows * stride_h + cols * stride_w in 32 bits: the last pixel of a 2 x 2 plane sits
    # at stride_h + 1. 2^31 - 1 is the largest offset int32 holds; one more wraps.
    fits = _meta_view((1, 1, 2, 2), (4, 4, 2**31 - 2, 1))
    wraps = _meta_view((1, 1, 2, 2), (4, 4, 2**31 - 1, 1))
    _check_triton_limits(fits.shape, fits.stride(), fits.stride())
    small = torch.empty(1, 1, 2, 2, device="meta")
    for x, y, name in ((wraps, small, "x"), (small, wraps, "y")):
        with pytest.raises(ValueError, match=f"one \\(b, c\\) plane of {name} .* spans 2\\^31 elements"):
            ssim_cosine_loss(x, y, impl="triton")
    with pytest.raises(ValueError, match="fewer than 2\\^31 pixels"):
        ssim(*[_meta_view((1, 1, 2**16, 2**15), (0, 0, 2**15, 1))] * 2, impl="triton")


def test_at_most_4096_channels_and_the_grid_of_planes():
    # 4096 channels compile without spills (bench/compile_targets.py, "api ssim 4096 channels").
    at_limit = torch.empty(1, MAX_CHANNELS, 2, 2, device="meta")
    _check_triton_limits(at_limit.shape, at_limit.stride(), at_limit.stride())
    over = torch.empty(1, MAX_CHANNELS + 1, 2, 2, device="meta")
    with pytest.raises(ValueError, match="at most 4096 channels per sample, got 4097; use impl='reference'"):
        ssim(over, over, impl="triton")
    wide = torch.rand(1, MAX_CHANNELS + 1, 2, 2)
    assert ssim(wide, wide, impl="reference").shape == (1,)
    planes = _meta_view((2**20, 2**11, 1, 1), (2**11, 1, 1, 1))  # 2^31 planes: one past grid axis x
    with pytest.raises(ValueError, match="2147483648 programs along grid axis x, more than CUDA.s"):
        ssim(planes, planes, impl="triton")
