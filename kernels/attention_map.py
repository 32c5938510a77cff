"""Attention-transfer maps (Zagoruyko & Komodakis 2017) and their bilinear resize to a common grid.

Reference first (the specification), then the Triton kernels, their launchers, the ``torch.library``
registration (namespace ``kdfast``) and the public functions.

Bilinear resize is ``F.interpolate(mode="bilinear", align_corners=False)``: output row y samples the
source at s(y) = max((y + 0.5) * H / h - 0.5, 0) between rows i0 = floor(s) and i1 = min(i0 + 1, H - 1)
with weights 1 - (s - i0) and s - i0 (columns likewise). As a matrix, resize(Q) = R_h Q R_w^T with
R_h (h x H) and R_w (w x W) holding those weights, so its transpose is dQ = R_h^T dM R_w. The backward
kernels evaluate that transpose as a gather: each program owns a tile of source pixels and sums over the
output rows that can touch the tile, building the few needed entries of R_h and R_w on the fly (no atomics,
no dense matrices in memory).
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._dispatch import signature_check, use_triton
from kernels._launch import check_grid, launch
from kernels._op import FusedOp

EPS = 1e-12
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = (*TRITON_DTYPES, torch.float64)


def resize_reference(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) maps, ``F.interpolate(..., align_corners=False)`` semantics."""
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def attention_map_reference(
    features: torch.Tensor, size: tuple[int, int] | None = None, *, p: float = 2, normalize: bool = True
) -> torch.Tensor:
    """Q(F) = mean_c |F_c|^p, resized bilinearly to ``size``, L2-normalized over h*w: (B, h, w)."""
    maps = features.abs().pow(p).mean(1, keepdim=True)
    if size is not None:
        maps = resize_reference(maps, size)
    maps = maps[:, 0]
    if normalize:
        maps = F.normalize(maps.flatten(1), dim=1, eps=1e-12).view_as(maps)
    return maps


# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _abs_pow(x, p, P_MODE: tl.constexpr):
    """|x|^p in fp32; P_MODE 1 and 2 are exact fast paths, 0 is any p > 0 (0 at x = 0)."""
    ax = tl.abs(x)
    if P_MODE == 1:
        return ax
    elif P_MODE == 2:
        return x * x
    else:
        return tl.where(ax > 0, tl.exp2(p * tl.log2(tl.where(ax > 0, ax, 1.0))), 0.0)


@triton.jit
def _abs_pow_grad(x, p, P_MODE: tl.constexpr):
    """d|x|^p / dx = p |x|^(p-1) sign(x), taken as 0 at x = 0 (the subgradient; eager gives NaN for p < 1)."""
    if P_MODE == 1:
        return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
    elif P_MODE == 2:
        return 2.0 * x
    else:
        ax = tl.abs(x)
        mag = tl.where(ax > 0, p * tl.exp2((p - 1.0) * tl.log2(tl.where(ax > 0, ax, 1.0))), 0.0)
        return tl.where(x < 0, -mag, mag)


@triton.jit
def _source_index(dst, scale, size_in):
    """Source coordinate of output index ``dst`` under align_corners=False: (i0, i1, weight of i1)."""
    src = tl.maximum((dst.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), size_in - 1)
    i1 = tl.minimum(i0 + 1, size_in - 1)
    return i0, i1, src - i0.to(tl.float32)


@triton.jit
def _bilinear_gather(src_ptr, stride_h, stride_w, offs, h, w, H, W, scale_h, scale_w, mask):
    """Values at flat output offsets ``offs`` of an (h, w) bilinear resize of one (H, W) fp32-read plane."""
    y = offs // w
    x = offs % w
    i0, i1, ly = _source_index(y, scale_h, H)
    j0, j1, lx = _source_index(x, scale_w, W)
    v00 = tl.load(src_ptr + i0 * stride_h + j0 * stride_w, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(src_ptr + i0 * stride_h + j1 * stride_w, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(src_ptr + i1 * stride_h + j0 * stride_w, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(src_ptr + i1 * stride_h + j1 * stride_w, mask=mask, other=0.0).to(tl.float32)
    top = v00 * (1.0 - lx) + v01 * lx
    bottom = v10 * (1.0 - lx) + v11 * lx
    return top * (1.0 - ly) + bottom * ly


@triton.jit
def _resize_transpose_tile(
    g_ptr,
    o_ptr,
    coef_g,
    coef_o,
    i,
    j,
    mask,
    tile_start,
    tile_end,
    h,
    w,
    H,
    W,
    scale_h,
    scale_w,
    HAS_O: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    """(R_h^T D R_w)[i, j] for a tile of source pixels, with D = coef_g * G + coef_o * O, G and O
    contiguous (h, w) fp32 planes (O only when HAS_O). Only output rows that can touch the tile's source
    rows are visited: s(y) is monotone, so they form a range; one row of slack each side absorbs rounding
    (extra rows carry zero weight, so the range need only be a superset)."""
    row_lo = tile_start // W
    row_hi = (tile_end - 1) // W
    y_lo = tl.maximum(((row_lo - 0.5) / scale_h - 0.5).to(tl.int32) - 1, 0)
    y_hi = tl.minimum(((row_hi + 1.5) / scale_h - 0.5).to(tl.int32) + 2, h)
    acc = tl.zeros(i.shape, dtype=tl.float32)
    for y in range(y_lo, y_hi):
        # A 1-element tensor: the interpreter hands loop indices over as Python ints.
        i0, i1, ly = _source_index(tl.zeros((1,), dtype=tl.int32) + y, scale_h, H)
        wy = tl.where(i == i0, 1.0 - ly, 0.0) + tl.where(i == i1, ly, 0.0)
        row = tl.zeros(i.shape, dtype=tl.float32)
        for x0 in range(0, w, BLOCK_X):
            xs = x0 + tl.arange(0, BLOCK_X)
            xmask = xs < w
            d = coef_g * tl.load(g_ptr + y * w + xs, mask=xmask, other=0.0)
            if HAS_O:
                d += coef_o * tl.load(o_ptr + y * w + xs, mask=xmask, other=0.0)
            j0, j1, lx = _source_index(xs, scale_w, W)
            wx = tl.where(j[None, :] == j0[:, None], (1.0 - lx)[:, None], 0.0)
            wx += tl.where(j[None, :] == j1[:, None], lx[:, None], 0.0)
            row += tl.sum(d[:, None] * wx, axis=0)
        acc += wy * row
    return tl.where(mask, acc, 0.0)


@triton.jit
def _feature_offsets(offs, W, stride_h, stride_w, FLAT: tl.constexpr):
    """Offsets of the flat pixel indices ``offs`` in one (b, c) plane. FLAT (stride_h == W * stride_w:
    NCHW and channels_last alike) needs no division: pixels are evenly spaced, so a tile's loads are
    contiguous along the pixels (NCHW, stride_w = 1) or the channels (channels_last, stride_c = 1) and
    vectorize."""
    if FLAT:
        return offs * stride_w
    else:
        return (offs // W) * stride_h + (offs % W) * stride_w


@triton.jit
def _pool_kernel(
    f_ptr,
    q_ptr,
    C,
    HW,
    W,
    stride_b,
    stride_c,
    stride_h,
    stride_w,
    p,
    inv_c,
    c_per_split,
    P_MODE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    FLAT: tl.constexpr,
):
    """Q_s[b, tile] = sum over split s's channels of |F[b, c, tile]|^p / C in fp32: the only pass over the
    feature in the forward.

    Programs own (sample, spatial tile, channel split) triples rather than whole samples: at B = 128 one
    program per sample leaves most of the GPU's memory pipes idle, and at 14 x 14 maps the spatial tiles
    alone are too few, so the channels are split too (``_resize_normalize_kernel`` adds the splits' partial
    maps in a fixed order: deterministic). The resize and the L2 norm need the whole pooled map, so they run
    there, a second pass over splits * B * H * W fp32 values."""
    b = tl.program_id(0)
    split = tl.program_id(2)
    offs = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = offs < HW
    spatial = _feature_offsets(offs, W, stride_h, stride_w, FLAT)
    base = f_ptr + b.to(tl.int64) * stride_b
    c_lo = split * c_per_split
    c_hi = tl.minimum(c_lo + c_per_split, C)
    acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        m = (cs[:, None] < c_hi) & mask[None, :]
        x = tl.load(base + cs[:, None] * stride_c + spatial[None, :], mask=m, other=0.0)
        acc += _abs_pow(x.to(tl.float32), p, P_MODE)
    out = q_ptr + (split * tl.num_programs(0) + b).to(tl.int64) * HW
    tl.store(out + offs, tl.sum(acc, axis=0) * inv_c, mask=mask)


@triton.jit
def _resize_normalize_kernel(
    q_ptr,
    out_ptr,
    norm_ptr,
    splits,
    split_stride,
    h,
    w,
    H,
    W,
    scale_h,
    scale_w,
    eps,
    NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per sample: Q = the sum of the channel splits' partial maps, M = resize(Q) (the resize
    is linear: the sum of the partial maps' resizes), out = M / max(||M||_2, eps); saves ||M||_2 for
    backward."""
    b = tl.program_id(0)
    hw = h * w
    q = q_ptr + b * H * W
    out = out_ptr + b * hw
    sumsq = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, hw, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < hw
        m = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(splits):
            m += _bilinear_gather(q + s * split_stride, W, 1, offs, h, w, H, W, scale_h, scale_w, mask)
        sumsq += m * m
        tl.store(out + offs, m, mask=mask)
    norm = tl.sqrt(tl.sum(sumsq, axis=0))
    tl.store(norm_ptr + b, norm)
    if NORMALIZE:
        inv = 1.0 / tl.maximum(norm, eps)
        for start in range(0, hw, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < hw
            tl.store(out + offs, tl.load(out + offs, mask=mask) * inv, mask=mask)


@triton.jit
def _attention_map_backward_kernel(
    g_ptr,
    out_ptr,
    norm_ptr,
    f_ptr,
    df_ptr,
    C,
    h,
    w,
    H,
    W,
    stride_b,
    stride_c,
    stride_h,
    stride_w,
    dstride_b,
    dstride_c,
    dstride_h,
    dstride_w,
    scale_h,
    scale_w,
    p,
    inv_c,
    eps,
    c_per_split,
    NORMALIZE: tl.constexpr,
    P_MODE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
    BLOCK_X: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    FLAT: tl.constexpr,
):
    """dF[b, :, tile] = (R_h^T dM R_w)[tile] * p |F|^(p-1) sign(F) / C, one pass over F and dF.

    dM = (G - out <out, G>) / ||M|| is the F.normalize backward (G / eps once ||M|| < eps, where the clamp
    has no gradient). Each program recomputes <out, G> over the h*w map (a few hundred values) and its
    tile of R_h^T dM R_w rather than launching a separate pass for them; programs own (sample, spatial
    tile, channel split) triples, as in the forward."""
    b = tl.program_id(0)
    tile_start = tl.program_id(1) * BLOCK_HW
    offs = tile_start + tl.arange(0, BLOCK_HW)
    HW = H * W
    mask = offs < HW
    hw = h * w
    g = g_ptr + b * hw
    o = out_ptr + b * hw
    coef_g = 1.0
    coef_o = 0.0
    if NORMALIZE:
        dot = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
        for start in range(0, hw, BLOCK_OUT):
            k = start + tl.arange(0, BLOCK_OUT)
            km = k < hw
            dot += tl.load(g + k, mask=km, other=0.0) * tl.load(o + k, mask=km, other=0.0)
        norm = tl.load(norm_ptr + b)
        coef_g = 1.0 / tl.maximum(norm, eps)
        coef_o = tl.where(norm >= eps, -tl.sum(dot, axis=0) * coef_g, 0.0)
    i = offs // W
    j = offs % W
    dq = _resize_transpose_tile(
        g,
        o,
        coef_g,
        coef_o,
        i,
        j,
        mask,
        tile_start,
        tl.minimum(tile_start + BLOCK_HW, HW),
        h,
        w,
        H,
        W,
        scale_h,
        scale_w,
        NORMALIZE,
        BLOCK_X,
    )
    dq = dq * inv_c
    src = f_ptr + b.to(tl.int64) * stride_b + _feature_offsets(offs, W, stride_h, stride_w, FLAT)[None, :]
    dst = df_ptr + b.to(tl.int64) * dstride_b + _feature_offsets(offs, W, dstride_h, dstride_w, FLAT)[None, :]
    c_lo = tl.program_id(2) * c_per_split
    c_hi = tl.minimum(c_lo + c_per_split, C)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cs = (c0 + tl.arange(0, BLOCK_C))[:, None]
        m = (cs < c_hi) & mask[None, :]
        x = tl.load(src + cs * stride_c, mask=m, other=0.0)
        grad = dq[None, :] * _abs_pow_grad(x.to(tl.float32), p, P_MODE)
        tl.store(dst + cs * dstride_c, grad.to(x.dtype), mask=m)


@triton.jit
def _resize_forward_kernel(
    x_ptr,
    y_ptr,
    C,
    h,
    w,
    H,
    W,
    stride_b,
    stride_c,
    stride_h,
    stride_w,
    scale_h,
    scale_w,
    BLOCK: tl.constexpr,
):
    """Y[plane, tile] = bilinear gather from X[plane]; one program per (plane, output tile)."""
    plane = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < h * w
    src = x_ptr + (plane // C).to(tl.int64) * stride_b + (plane % C).to(tl.int64) * stride_c
    val = _bilinear_gather(src, stride_h, stride_w, offs, h, w, H, W, scale_h, scale_w, mask)
    tl.store(y_ptr + plane.to(tl.int64) * h * w + offs, val.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _resize_backward_kernel(
    g_ptr,
    dx_ptr,
    h,
    w,
    H,
    W,
    scale_h,
    scale_w,
    BLOCK: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    """dX[plane, tile] = (R_h^T G R_w)[tile] for a contiguous fp32 G; one program per (plane, source tile)."""
    plane = tl.program_id(0).to(tl.int64)
    tile_start = tl.program_id(1) * BLOCK
    offs = tile_start + tl.arange(0, BLOCK)
    mask = offs < H * W
    g = g_ptr + plane * h * w
    dx = _resize_transpose_tile(
        g,
        g,
        1.0,
        0.0,
        offs // W,
        offs % W,
        mask,
        tile_start,
        tl.minimum(tile_start + BLOCK, H * W),
        h,
        w,
        H,
        W,
        scale_h,
        scale_w,
        False,
        BLOCK_X,
    )
    tl.store(dx_ptr + plane * H * W + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launchers

# Up to 128 source pixels x 32 channels per step: 4K fp32 accumulators per program, 128 contiguous pixels
# per channel row (NCHW) or 32 contiguous channels per pixel (channels_last). Smaller maps trade pixels for
# channels so the tile stays full.
BLOCK_HW = 128
TILE = 4096
BLOCK_X = 16
# Channel splits are added until the passes over the feature have about this many programs: a few waves
# of CTAs on a 132-SM H100 (at B = 128 and 14 x 14 maps the spatial tiles alone make 256).
TARGET_PROGRAMS = 1024
INT32_SPAN = 2**31


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _p_mode(p: float) -> int:
    """The kernels' P_MODE: exact fast paths for p = 1 and p = 2, exp2/log2 for any other p."""
    return 1 if p == 1 else 2 if p == 2 else 0


def _scale(size_in: int, size_out: int) -> float:
    """PyTorch's area_pixel_compute_scale for align_corners=False and an explicit size (fp32 in the kernel,
    as in ATen's float kernels)."""
    return size_in / size_out


def _flat(shape: torch.Size, strides: tuple[int, ...]) -> bool:
    """Whether the pixels of a (B, C, H, W) tensor are evenly spaced in each plane (stride_h == W * stride_w,
    or one row), so the kernels address them as offs * stride_w."""
    return strides[2] == shape[3] * strides[3] or shape[2] == 1


class _FeaturePlan(NamedTuple):
    """Launch constants of the passes over one feature signature, computed once."""

    grid: tuple[int, int, int]
    c_per_split: int
    meta: dict


@functools.lru_cache(maxsize=256)
def _feature_plan(shape: torch.Size, strides: tuple[int, ...], grad_strides: tuple[int, ...]) -> _FeaturePlan:
    B, C, H, W = shape
    HW = H * W
    if sum((n - 1) * s for n, s in zip(shape[1:], strides[1:], strict=True)) >= INT32_SPAN:
        raise ValueError(
            f"one sample of the {tuple(shape)} features with strides {strides} spans 2^31 elements or more;"
            " split the batch's channels"
        )
    block_hw = min(BLOCK_HW, _pow2(HW))
    block_c = min(TILE // block_hw, _pow2(C))
    tiles = _cdiv(HW, block_hw)
    splits = min(max(1, TARGET_PROGRAMS // max(1, B * tiles)), _cdiv(C, block_c))
    c_per_split = _cdiv(_cdiv(C, splits), block_c) * block_c
    splits = _cdiv(C, c_per_split)
    flat = _flat(shape, strides) and _flat(shape, grad_strides)
    check_grid((B, tiles, splits), f"attention_map of {tuple(shape)} features", "use impl='reference'")
    return _FeaturePlan((B, tiles, splits), c_per_split, dict(BLOCK_C=block_c, BLOCK_HW=block_hw, FLAT=flat))


class _Launch(NamedTuple):
    """One kernel launch with every argument but the tensors fixed: ``launch(kernel, grid, *tensors,
    *args, **kwargs)``."""

    grid: tuple[int, ...]
    args: tuple
    kwargs: dict


class _ForwardPlan(NamedTuple):
    pooled_shape: tuple[int, int, int, int]
    pool: _Launch
    resize_normalize: _Launch


@functools.lru_cache(maxsize=256)
def _forward_plan(
    shape: torch.Size, strides: tuple[int, ...], h: int, w: int, p: float, normalize: bool
) -> _ForwardPlan:
    B, C, H, W = shape
    plan = _feature_plan(shape, strides, strides)
    splits = plan.grid[2]
    pool = _Launch(
        plan.grid,
        (C, H * W, W, *strides, float(p), 1.0 / C, plan.c_per_split),
        dict(P_MODE=_p_mode(p), **plan.meta),
    )
    resize_normalize = _Launch(
        (B,),
        (splits, B * H * W, h, w, H, W, _scale(H, h), _scale(W, w), EPS),
        dict(NORMALIZE=normalize, BLOCK=min(_pow2(h * w), 1024)),
    )
    return _ForwardPlan((splits, B, H, W), pool, resize_normalize)


@functools.lru_cache(maxsize=256)
def _backward_plan(
    shape: torch.Size,
    strides: tuple[int, ...],
    grad_strides: tuple[int, ...],
    h: int,
    w: int,
    p: float,
    normalize: bool,
) -> _Launch:
    B, C, H, W = shape
    plan = _feature_plan(shape, strides, grad_strides)
    return _Launch(
        plan.grid,
        (
            C,
            h,
            w,
            H,
            W,
            *strides,
            *grad_strides,
            _scale(H, h),
            _scale(W, w),
            float(p),
            1.0 / C,
            EPS,
            plan.c_per_split,
        ),
        dict(
            NORMALIZE=normalize,
            P_MODE=_p_mode(p),
            BLOCK_X=BLOCK_X,
            BLOCK_OUT=min(_pow2(h * w), 1024),
            **plan.meta,
        ),
    )


def _attention_map_forward(
    features: torch.Tensor, h: int, w: int, p: float, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    B = features.shape[0]
    out = torch.empty(B, h, w, device=features.device, dtype=torch.float32)
    norm = torch.empty(B, device=features.device, dtype=torch.float32)
    if B == 0:
        return out, norm
    plan = _forward_plan(features.shape, features.stride(), h, w, p, normalize)
    pooled = torch.empty(plan.pooled_shape, device=features.device, dtype=torch.float32)
    launch(_pool_kernel, plan.pool.grid, features, pooled, *plan.pool.args, **plan.pool.kwargs)
    step = plan.resize_normalize
    launch(_resize_normalize_kernel, step.grid, pooled, out, norm, *step.args, **step.kwargs)
    return out, norm


def _attention_map_backward(
    grad: torch.Tensor,
    features: torch.Tensor,
    out: torch.Tensor,
    norm: torch.Tensor,
    p: float,
    normalize: bool,
    need: bool,
) -> torch.Tensor:
    """dLoss/dfeatures from dLoss/dmap ``grad`` (``need``: the convention of kernels/_op.py, always True)."""
    dfeatures = torch.empty_like(features)
    if features.shape[0] == 0:
        return dfeatures
    if grad.dtype != torch.float32 or not grad.is_contiguous():
        grad = grad.to(torch.float32).contiguous()
    out = out.contiguous()
    h, w = out.shape[1:]
    step = _backward_plan(features.shape, features.stride(), dfeatures.stride(), h, w, p, normalize)
    launch(
        _attention_map_backward_kernel,
        step.grid,
        grad,
        out,
        norm,
        features,
        dfeatures,
        *step.args,
        **step.kwargs,
    )
    return dfeatures


@functools.lru_cache(maxsize=256)
def _resize_grid(planes: int, pixels: int) -> tuple[int, int]:
    """One program per (plane, tile of BLOCK_HW pixels), within CUDA's grid limits."""
    grid = (planes, _cdiv(pixels, BLOCK_HW))
    check_grid(grid, f"resize of {planes} planes of {pixels} pixels", "use impl='reference'")
    return grid


def _resize_forward(maps: torch.Tensor, h: int, w: int) -> torch.Tensor:
    B, C, H, W = maps.shape
    out = torch.empty(B, C, h, w, device=maps.device, dtype=maps.dtype)
    if out.numel():
        launch(
            _resize_forward_kernel, _resize_grid(B * C, h * w),
            maps, out, C, h, w, H, W, *maps.stride(), _scale(H, h), _scale(W, w), BLOCK=BLOCK_HW,
        )  # fmt: skip
    return out


def _resize_backward(grad: torch.Tensor, H: int, W: int, need: bool) -> torch.Tensor:
    """dLoss/dmaps of the (H, W) maps from dLoss/dresized ``grad`` (``need``: kernels/_op.py's convention)."""
    B, C, h, w = grad.shape
    dmaps = torch.empty(B, C, H, W, device=grad.device, dtype=grad.dtype)
    if dmaps.numel():
        if grad.dtype != torch.float32 or not grad.is_contiguous():
            grad = grad.to(torch.float32).contiguous()
        launch(
            _resize_backward_kernel, _resize_grid(B * C, H * W),
            grad, dmaps, h, w, H, W, _scale(H, h), _scale(W, w), BLOCK=BLOCK_HW, BLOCK_X=BLOCK_X,
        )  # fmt: skip
    return dmaps


def _attention_map_fake(features, h, w, p, normalize):
    B = features.shape[0]
    return features.new_empty(B, h, w, dtype=torch.float32), features.new_empty(B, dtype=torch.float32)


def _attention_map_backward_fake(grad, features, out, norm, p, normalize, need):
    return torch.empty_like(features)


def _resize_fake(maps, h, w):
    return maps.new_empty(maps.shape[0], maps.shape[1], h, w)


def _resize_backward_fake(grad, H, W, need):
    return grad.new_empty(grad.shape[0], grad.shape[1], H, W)


# Both autograd paths of each op (eager autograd.Function, torch.compile custom ops) from one description.
_attention_map_op = FusedOp(
    "attention_map",
    forward=_attention_map_forward,
    forward_fake=_attention_map_fake,
    backward=_attention_map_backward,
    backward_fake=_attention_map_backward_fake,
    grad_inputs=1,
    grad_outputs=(0,),
    save=lambda inputs, outputs: ((inputs[0], *outputs), inputs[3:]),
)
_resize_op = FusedOp(
    "resize",
    forward=_resize_forward,
    forward_fake=_resize_fake,
    backward=_resize_backward,
    backward_fake=_resize_backward_fake,
    grad_inputs=1,
    grad_outputs=(0,),
    save=lambda inputs, outputs: ((), tuple(inputs[0].shape[2:])),
)


# -------------------------------------------------------------------------------------- public functions


@signature_check
def _check_input(shape: torch.Size, dtype: torch.dtype, name: str, triton_path: bool) -> None:
    if len(shape) != 4:
        raise ValueError(f"{name} must be (B, C, H, W), got shape {tuple(shape)}")
    allowed = TRITON_DTYPES if triton_path else REFERENCE_DTYPES
    if dtype not in allowed:
        raise ValueError(f"{name} dtype must be one of {allowed}, got {dtype}")


def _check_size(size) -> tuple[int, int]:
    ok = (
        isinstance(size, (tuple, list, torch.Size))
        and len(size) == 2
        and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in size)
    )
    if not ok:
        raise ValueError(f"size must be two positive ints (h, w), got {size!r}")
    return int(size[0]), int(size[1])


def resize(maps: torch.Tensor, size: tuple[int, int], *, impl: str = "auto") -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) maps to ``size`` (AGKD: student maps resized to the teacher grid),
    ``F.interpolate(mode="bilinear", align_corners=False)`` semantics; output in the input dtype."""
    triton_path = use_triton(impl, maps)
    _check_input(maps.shape, maps.dtype, "maps", triton_path)
    h, w = _check_size(size)
    if not triton_path:
        return resize_reference(maps, (h, w))
    return _resize_op(None, maps, h, w)


def attention_map(
    features: torch.Tensor,
    size: tuple[int, int] | None = None,
    *,
    p: float = 2,
    normalize: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """Attention-transfer map (Zagoruyko & Komodakis 2017, Sec. 3.1, F^p_sum taken as a channel mean):
    Q = mean_c |F_c|^p, resized bilinearly to ``size`` (None: kept; AGKD resizes student maps to the teacher
    grid), then Q / max(||Q||_2, 1e-12) over h*w, the normalization inside their AT loss (eq. 2).
    (B, C, H, W) -> (B, h, w). The Triton path accepts fp32/fp16/bf16 and always returns fp32 maps (they
    feed losses, accumulated in fp32); gradients come back in the feature dtype and memory format."""
    triton_path = use_triton(impl, features)
    _check_input(features.shape, features.dtype, "features", triton_path)
    out_size = None if size is None else _check_size(size)
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    if not triton_path:
        return attention_map_reference(features, out_size, p=p, normalize=normalize)
    h, w = out_size if out_size is not None else features.shape[2:]
    return _attention_map_op(0, features, h, w, float(p), bool(normalize))
