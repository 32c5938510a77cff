"""SSIM and the hybrid SSIM + cosine attention loss (AGKD: alpha * L_SSIM + beta * L_cos).

Reference first (the specification, same numbers as ``pytorch_msssim.ssim(..., size_average=False)``),
then the Triton kernels.

Kernel design: the separable 'valid' Gaussian of a plane is two small matmuls, G_h (H_out x H) @ X @
G_w^T (W x W_out), with banded window matrices built in registers (the identity where a side is shorter
than the window). Both directions are then plain ``tl.dot``s on power-of-two tiles: the backward maps
dLoss/dmoments back through the transposed bands. One program owns one (b, c) plane, which is whole in
registers up to 64 x 64 (attention maps are 7x7..56x56) and walked in 32-row/column steps with a halo
beyond that. Launches: forward 2 (planes; a one-program reduction to per-sample SSIM and the scalar
loss), backward 1 (moments recomputed, never stored; only 4 floats per plane are saved).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels._dispatch import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS / Windows: the reference still runs, use_triton never picks Triton there
    triton = None


def gaussian_window(window_size: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """The normalized 1-D Gaussian g[i] ~ exp(-(i - window_size // 2)^2 / (2 sigma^2))."""
    coords = torch.arange(window_size, device=device, dtype=dtype) - window_size // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _smooth(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter per plane; a side shorter than the window is not smoothed."""
    c = x.shape[1]
    k = window.numel()
    if x.shape[2] >= k:
        x = F.conv2d(x, window.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    if x.shape[3] >= k:
        x = F.conv2d(x, window.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return x


def ssim_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
    k: tuple[float, float] = (0.01, 0.03),
    nonnegative: bool = False,
) -> torch.Tensor:
    """Per-sample SSIM (Wang et al. 2004, eq. 13) with a Gaussian window, averaged over the valid map
    and then over channels; shape (B,)."""
    c1 = (k[0] * data_range) ** 2
    c2 = (k[1] * data_range) ** 2
    window = gaussian_window(window_size, sigma, device=x.device, dtype=x.dtype)
    mu_x, mu_y = _smooth(x, window), _smooth(y, window)
    sigma_xx = _smooth(x * x, window) - mu_x**2
    sigma_yy = _smooth(y * y, window) - mu_y**2
    sigma_xy = _smooth(x * y, window) - mu_x * mu_y
    contrast_structure = (2 * sigma_xy + c2) / (sigma_xx + sigma_yy + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    per_channel = (luminance * contrast_structure).flatten(2).mean(-1)
    if nonnegative:
        per_channel = torch.relu(per_channel)
    return per_channel.mean(1)


def ssim_cosine_loss_reference(
    student: torch.Tensor, teacher: torch.Tensor, *, alpha: float = 0.5, beta: float = 0.5, **ssim_args
) -> torch.Tensor:
    """alpha * (1 - mean_b SSIM) + beta * (1 - mean_b cos(student_b, teacher_b)), samples flattened."""
    l_ssim = 1 - ssim_reference(student, teacher, **ssim_args).mean()
    l_cos = 1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1).mean()
    return alpha * l_ssim + beta * l_cos


DTYPES_REFERENCE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPES_TRITON = (torch.float32, torch.float16, torch.bfloat16)
COSINE_EPS = 1e-8
# A side whose padded tile is at most this long is held whole by one program; longer sides are tiled.
# 64 keeps a 64 x 64 fp32 tile (and its five moment maps) within what 8 warps can hold in registers.
MAX_WHOLE_SIDE = 64
# Rows (columns) of a tiled side that one step of the loop produces; the halo of window_size - 1 more
# input rows rides on top, so a 32-row step with an 11-tap window reads a 64-row tile.
TILE_STEP = 32
MAX_TILED_WINDOW = 33
# tf32x3 (three TF32 tensor-core products) keeps fp32 accuracy, which the variance E[x^2] - mu^2 needs:
# plain TF32 (10-bit mantissa) would cancel away the structure term of nearly-constant maps.
DOT_PRECISION = "tf32x3"


def _check_inputs(
    x: torch.Tensor,
    y: torch.Tensor,
    window_size: int,
    sigma: float,
    data_range: float,
    dtypes: tuple[torch.dtype, ...],
) -> None:
    """Raise a ValueError naming what to change when the inputs do not fit the SSIM contract."""
    for name, t in (("x", x), ("y", y)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise ValueError(f"{name} must have a dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype:
        raise ValueError(f"x and y must share a dtype, got {x.dtype} and {y.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x and y must not be empty, got shape {tuple(x.shape)}")
    if not isinstance(window_size, int) or window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be an odd integer >= 1, got {window_size!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not (math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a finite number > 0, got {data_range!r}")


class _Axis(NamedTuple):
    """How one spatial side is cut into tiles (all block sizes are powers of two >= 16, as tl.dot needs).

    Forward: each step makes ``fwd_out`` output rows from ``fwd_in`` input rows. Backward: each step
    makes ``bwd_tile`` input-gradient rows from ``bwd_out`` output rows (the tile plus a halo of
    ``halo`` rows on the low side), whose moments need ``bwd_in`` input rows.
    """

    size: int
    out: int
    identity: bool
    fwd_out: int
    fwd_in: int
    fwd_steps: int
    bwd_tile: int
    bwd_out: int
    bwd_in: int
    bwd_steps: int
    halo: int


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@functools.lru_cache(maxsize=256)
def _axis(size: int, window_size: int) -> _Axis:
    """Tiling of one side; a side shorter than the window is not smoothed (identity), as pytorch_msssim."""
    identity = size < window_size
    out = size if identity else size - window_size + 1
    if _pow2(size) <= MAX_WHOLE_SIDE:
        whole, whole_out = _pow2(size), _pow2(out)
        return _Axis(size, out, identity, whole_out, whole, 1, whole, whole_out, whole, 1, 0)
    if window_size > MAX_TILED_WINDOW:
        raise ValueError(
            f"impl='triton' supports window_size <= {MAX_TILED_WINDOW} on sides longer than "
            f"{MAX_WHOLE_SIDE}, got {window_size} on a side of {size}; use impl='reference'"
        )
    halo = window_size - 1
    return _Axis(
        size,
        out,
        False,
        TILE_STEP,
        _pow2(TILE_STEP + halo),
        triton.cdiv(out, TILE_STEP),
        TILE_STEP,
        _pow2(TILE_STEP + halo),
        _pow2(TILE_STEP + 2 * halo),
        triton.cdiv(size, TILE_STEP),
        halo,
    )


if triton is not None:

    @triton.jit
    def _window(
        ROWS: tl.constexpr,
        COLS: tl.constexpr,
        shift,
        ksize,
        sigma,
        inv_norm,
        TRANS: tl.constexpr,
        IDENTITY: tl.constexpr,
    ):
        """Banded matrix W[i, j] = g[j - i + shift] (g[i - j + shift] if TRANS): one 1-D 'valid' Gaussian
        pass as a matmul. Built in registers so no host tensor or cache is needed per shape."""
        rows = tl.arange(0, ROWS)[:, None]
        cols = tl.arange(0, COLS)[None, :]
        if TRANS:
            tap = rows - cols + shift
        else:
            tap = cols - rows + shift
        if IDENTITY:
            w = tl.where(tap == 0, 1.0, 0.0)
        else:
            d = (tap - ksize // 2).to(tl.float32)
            w = tl.where((tap >= 0) & (tap < ksize), tl.exp(-d * d / (2.0 * sigma * sigma)) * inv_norm, 0.0)
        return w

    @triton.jit
    def _blur(v, gh, gwt, PREC: tl.constexpr):
        return tl.dot(tl.dot(gh, v, input_precision=PREC), gwt, input_precision=PREC)

    # C is not specialized: C == 1 would only save one integer division per program, and one compiled
    # kernel then serves both single-map and multi-channel batches of a plane size.
    @triton.jit(do_not_specialize=["C"])
    def _ssim_fwd_kernel(
        x_ptr,
        y_ptr,
        stats_ptr,
        C,
        H,
        W,
        H_OUT,
        W_OUT,
        steps_h,
        steps_w,
        sxb,
        sxc,
        sxh,
        sxw,
        syb,
        syc,
        syh,
        syw,
        ksize,
        sigma,
        inv_norm,
        c1,
        c2,
        ID_H: tl.constexpr,
        ID_W: tl.constexpr,
        BO_H: tl.constexpr,
        BI_H: tl.constexpr,
        BO_W: tl.constexpr,
        BI_W: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """One program per (b, c) plane: reads x and y once, writes [mean SSIM map, x.y, x.x, y.y]."""
        plane = tl.program_id(0)
        b = plane // C
        ch = plane % C
        x_base = x_ptr + b.to(tl.int64) * sxb + ch * sxc
        y_base = y_ptr + b.to(tl.int64) * syb + ch * syc
        gh = _window(BO_H, BI_H, 0, ksize, sigma, inv_norm, False, ID_H)
        gwt = _window(BI_W, BO_W, 0, ksize, sigma, inv_norm, True, ID_W)
        ssim_sum = 0.0
        xy = 0.0
        xx = 0.0
        yy = 0.0
        for th in range(steps_h):
            r0 = th * BO_H
            rows = r0 + tl.arange(0, BI_H)[:, None]
            out_rows = r0 + tl.arange(0, BO_H)[:, None]
            # Each input row is counted once in the cosine sums: by the step that starts on it, or the last.
            own_rows = (rows < r0 + BO_H) | (th == steps_h - 1)
            for tw in range(steps_w):
                c0 = tw * BO_W
                cols = c0 + tl.arange(0, BI_W)[None, :]
                out_cols = c0 + tl.arange(0, BO_W)[None, :]
                inside = (rows < H) & (cols < W)
                x = tl.load(x_base + rows * sxh + cols * sxw, mask=inside, other=0.0).to(tl.float32)
                y = tl.load(y_base + rows * syh + cols * syw, mask=inside, other=0.0).to(tl.float32)
                own = own_rows & ((cols < c0 + BO_W) | (tw == steps_w - 1))
                xy += tl.sum(tl.where(own, x * y, 0.0))
                xx += tl.sum(tl.where(own, x * x, 0.0))
                yy += tl.sum(tl.where(own, y * y, 0.0))
                mu_x = _blur(x, gh, gwt, PREC)
                mu_y = _blur(y, gh, gwt, PREC)
                var_x = _blur(x * x, gh, gwt, PREC) - mu_x * mu_x
                var_y = _blur(y * y, gh, gwt, PREC) - mu_y * mu_y
                cov = _blur(x * y, gh, gwt, PREC) - mu_x * mu_y
                s = (
                    (2.0 * mu_x * mu_y + c1)
                    / (mu_x * mu_x + mu_y * mu_y + c1)
                    * (2.0 * cov + c2)
                    / (var_x + var_y + c2)
                )
                ssim_sum += tl.sum(tl.where((out_rows < H_OUT) & (out_cols < W_OUT), s, 0.0))
        out = stats_ptr + plane * 4
        tl.store(out, ssim_sum / (H_OUT * W_OUT))
        tl.store(out + 1, xy)
        tl.store(out + 2, xx)
        tl.store(out + 3, yy)

    @triton.jit
    def _ssim_reduce_kernel(
        stats_ptr,
        ssim_ptr,
        loss_ptr,
        B,
        C,
        alpha,
        beta,
        eps,
        NONNEGATIVE: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """One program: per-sample SSIM (mean over channels) and the scalar hybrid loss from plane stats."""
        offs_c = tl.arange(0, BLOCK_C)[None, :]
        ssim_total = 0.0
        cos_total = 0.0
        for b0 in range(0, B, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            mask = (offs_b[:, None] < B) & (offs_c < C)
            at = stats_ptr + (offs_b[:, None] * C + offs_c) * 4
            s = tl.load(at, mask=mask, other=0.0)
            if NONNEGATIVE:
                s = tl.maximum(s, 0.0)
            ssim_b = tl.sum(s, axis=1) / C
            xy = tl.sum(tl.load(at + 1, mask=mask, other=0.0), axis=1)
            nx = tl.maximum(tl.sqrt(tl.sum(tl.load(at + 2, mask=mask, other=0.0), axis=1)), eps)
            ny = tl.maximum(tl.sqrt(tl.sum(tl.load(at + 3, mask=mask, other=0.0), axis=1)), eps)
            tl.store(ssim_ptr + offs_b, ssim_b, mask=offs_b < B)
            ssim_total += tl.sum(ssim_b)
            cos_total += tl.sum(tl.where(offs_b < B, xy / (nx * ny), 0.0))
        tl.store(loss_ptr, alpha * (1.0 - ssim_total / B) + beta * (1.0 - cos_total / B))

    @triton.jit
    def _ssim_bwd_kernel(
        x_ptr,
        y_ptr,
        dx_ptr,
        dy_ptr,
        stats_ptr,
        gloss_ptr,
        gssim_ptr,
        gssim_stride,
        C,
        H,
        W,
        H_OUT,
        W_OUT,
        steps_h,
        steps_w,
        sxb,
        sxc,
        sxh,
        sxw,
        syb,
        syc,
        syh,
        syw,
        ksize,
        sigma,
        inv_norm,
        c1,
        c2,
        ssim_scale,
        cos_scale,
        eps,
        HALO_H,
        HALO_W,
        ID_H: tl.constexpr,
        ID_W: tl.constexpr,
        NONNEGATIVE: tl.constexpr,
        HAS_GLOSS: tl.constexpr,
        HAS_GSSIM: tl.constexpr,
        BT_H: tl.constexpr,
        BO_H: tl.constexpr,
        BI_H: tl.constexpr,
        BT_W: tl.constexpr,
        BO_W: tl.constexpr,
        BI_W: tl.constexpr,
        BLOCK_C: tl.constexpr,
        PREC: tl.constexpr,
    ):
        """One program per plane: recomputes the five moments (no map is stored by the forward), turns
        dLoss/dSSIM-map into dLoss/dmoments (eq. 13 differentiated), and maps those back through the
        transposed window matrices; each step writes a disjoint tile of dx and dy."""
        plane = tl.program_id(0)
        b = plane // C
        ch = plane % C
        g_ssim = 0.0
        if HAS_GSSIM:
            g_ssim += tl.load(gssim_ptr + b * gssim_stride).to(tl.float32)
        if HAS_GLOSS:
            g_loss = tl.load(gloss_ptr).to(tl.float32)
            g_ssim += ssim_scale * g_loss
        g_ssim = g_ssim / C
        if NONNEGATIVE:
            g_ssim = tl.where(tl.load(stats_ptr + plane * 4) > 0.0, g_ssim, 0.0)
        weight = g_ssim / (H_OUT * W_OUT)
        cos_y = 0.0
        cos_x = 0.0
        cos_xx = 0.0
        cos_yy = 0.0
        if HAS_GLOSS:
            sample_stats = stats_ptr + (b * C + tl.arange(0, BLOCK_C)) * 4
            in_c = tl.arange(0, BLOCK_C) < C
            xy = tl.sum(tl.load(sample_stats + 1, mask=in_c, other=0.0))
            nx = tl.sqrt(tl.sum(tl.load(sample_stats + 2, mask=in_c, other=0.0)))
            ny = tl.sqrt(tl.sum(tl.load(sample_stats + 3, mask=in_c, other=0.0)))
            nx_c = tl.maximum(nx, eps)
            ny_c = tl.maximum(ny, eps)
            g_cos = cos_scale * g_loss
            cos = xy / (nx_c * ny_c)
            # d cos / dx = y / (|x| |y|) - cos x / |x|^2, the norm clamped at eps as F.cosine_similarity.
            cos_y = g_cos / (nx_c * ny_c)
            cos_x = cos_y
            cos_xx = tl.where(nx >= eps, g_cos * cos / (nx_c * nx_c), 0.0)
            cos_yy = tl.where(ny >= eps, g_cos * cos / (ny_c * ny_c), 0.0)
        x_base = x_ptr + b.to(tl.int64) * sxb + ch * sxc
        y_base = y_ptr + b.to(tl.int64) * syb + ch * syc
        d_base = plane.to(tl.int64) * H * W
        gh = _window(BO_H, BI_H, 0, ksize, sigma, inv_norm, False, ID_H)
        gwt = _window(BI_W, BO_W, 0, ksize, sigma, inv_norm, True, ID_W)
        gh_back = _window(BT_H, BO_H, HALO_H, ksize, sigma, inv_norm, True, ID_H)
        gw_back = _window(BO_W, BT_W, HALO_W, ksize, sigma, inv_norm, False, ID_W)
        for th in range(steps_h):
            r0 = th * BT_H
            rows = r0 - HALO_H + tl.arange(0, BI_H)[:, None]
            out_rows = r0 - HALO_H + tl.arange(0, BO_H)[:, None]
            tile_rows = r0 + tl.arange(0, BT_H)[:, None]
            for tw in range(steps_w):
                c0 = tw * BT_W
                cols = c0 - HALO_W + tl.arange(0, BI_W)[None, :]
                out_cols = c0 - HALO_W + tl.arange(0, BO_W)[None, :]
                tile_cols = c0 + tl.arange(0, BT_W)[None, :]
                inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
                x = tl.load(x_base + rows * sxh + cols * sxw, mask=inside, other=0.0).to(tl.float32)
                y = tl.load(y_base + rows * syh + cols * syw, mask=inside, other=0.0).to(tl.float32)
                mu_x = _blur(x, gh, gwt, PREC)
                mu_y = _blur(y, gh, gwt, PREC)
                var_x = _blur(x * x, gh, gwt, PREC) - mu_x * mu_x
                var_y = _blur(y * y, gh, gwt, PREC) - mu_y * mu_y
                cov = _blur(x * y, gh, gwt, PREC) - mu_x * mu_y
                a1 = 2.0 * mu_x * mu_y + c1
                b1 = mu_x * mu_x + mu_y * mu_y + c1
                b2 = var_x + var_y + c2
                lum = a1 / b1
                cs = (2.0 * cov + c2) / b2
                valid = (out_rows >= 0) & (out_rows < H_OUT) & (out_cols >= 0) & (out_cols < W_OUT)
                w = tl.where(valid, weight, 0.0)
                d_mu_x = w * (2.0 * cs * (mu_y - mu_x * lum) / b1 + 2.0 * lum * (mu_x * cs - mu_y) / b2)
                d_mu_y = w * (2.0 * cs * (mu_x - mu_y * lum) / b1 + 2.0 * lum * (mu_y * cs - mu_x) / b2)
                d_sq = -w * lum * cs / b2
                d_xy = w * 2.0 * lum / b2
                p_x = _blur(d_mu_x, gh_back, gw_back, PREC)
                p_y = _blur(d_mu_y, gh_back, gw_back, PREC)
                p_sq = _blur(d_sq, gh_back, gw_back, PREC)
                p_xy = _blur(d_xy, gh_back, gw_back, PREC)
                in_tile = (tile_rows < H) & (tile_cols < W)
                xt = tl.load(x_base + tile_rows * sxh + tile_cols * sxw, mask=in_tile, other=0.0)
                yt = tl.load(y_base + tile_rows * syh + tile_cols * syw, mask=in_tile, other=0.0)
                xt = xt.to(tl.float32)
                yt = yt.to(tl.float32)
                dx = p_x + 2.0 * xt * p_sq + yt * p_xy + cos_x * yt - cos_xx * xt
                dy = p_y + 2.0 * yt * p_sq + xt * p_xy + cos_y * xt - cos_yy * yt
                grad_at = d_base + tile_rows * W + tile_cols
                tl.store(dx_ptr + grad_at, dx.to(dx_ptr.dtype.element_ty), mask=in_tile)
                tl.store(dy_ptr + grad_at, dy.to(dy_ptr.dtype.element_ty), mask=in_tile)


@functools.lru_cache(maxsize=256)
def _window_norm(window_size: int, sigma: float) -> float:
    """1 / sum of the unnormalized Gaussian taps, so the in-kernel window sums to one."""
    half = window_size // 2
    return 1.0 / sum(math.exp(-((i - half) ** 2) / (2 * sigma**2)) for i in range(window_size))


def _num_warps(*blocks: int) -> int:
    # A 64 x 64 fp32 tile is 16 registers per thread at 8 warps; with x, y and five moments live, fewer
    # warps would spill.
    return 8 if max(blocks) >= 64 else 4


def _launch_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    window_size: int,
    sigma: float,
    data_range: float,
    k1: float,
    k2: float,
    nonnegative: bool,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two launches: the plane kernel (moments, SSIM mean, cosine partial sums) and the reduction."""
    batch, channels, height, width = x.shape
    ah, aw = _axis(height, window_size), _axis(width, window_size)
    stats = torch.empty((batch * channels, 4), device=x.device, dtype=torch.float32)
    _ssim_fwd_kernel[(batch * channels,)](
        x,
        y,
        stats,
        channels,
        height,
        width,
        ah.out,
        aw.out,
        ah.fwd_steps,
        aw.fwd_steps,
        *x.stride(),
        *y.stride(),
        window_size,
        sigma,
        _window_norm(window_size, sigma),
        (k1 * data_range) ** 2,
        (k2 * data_range) ** 2,
        ID_H=ah.identity,
        ID_W=aw.identity,
        BO_H=ah.fwd_out,
        BI_H=ah.fwd_in,
        BO_W=aw.fwd_out,
        BI_W=aw.fwd_in,
        PREC=DOT_PRECISION,
        num_warps=_num_warps(ah.fwd_in, aw.fwd_in),
    )
    per_sample = torch.empty((batch,), device=x.device, dtype=x.dtype)
    loss = torch.empty((), device=x.device, dtype=x.dtype)
    block_c = triton.next_power_of_2(channels)
    block_b = max(1, min(triton.next_power_of_2(batch), 4096 // block_c))
    _ssim_reduce_kernel[(1,)](
        stats,
        per_sample,
        loss,
        batch,
        channels,
        alpha,
        beta,
        COSINE_EPS,
        NONNEGATIVE=nonnegative,
        BLOCK_B=block_b,
        BLOCK_C=block_c,
    )
    return loss, per_sample, stats


def _launch_backward(
    grad_loss: torch.Tensor | None,
    grad_ssim: torch.Tensor | None,
    x: torch.Tensor,
    y: torch.Tensor,
    stats: torch.Tensor,
    window_size: int,
    sigma: float,
    data_range: float,
    k1: float,
    k2: float,
    nonnegative: bool,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: dx and dy of alpha * (1 - mean SSIM) + beta * (1 - mean cos) and/or of SSIM per sample."""
    batch, channels, height, width = x.shape
    ah, aw = _axis(height, window_size), _axis(width, window_size)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dy = torch.empty(y.shape, device=y.device, dtype=y.dtype)
    _ssim_bwd_kernel[(batch * channels,)](
        x,
        y,
        dx,
        dy,
        stats,
        x if grad_loss is None else grad_loss,
        x if grad_ssim is None else grad_ssim,
        0 if grad_ssim is None else grad_ssim.stride(0),
        channels,
        height,
        width,
        ah.out,
        aw.out,
        ah.bwd_steps,
        aw.bwd_steps,
        *x.stride(),
        *y.stride(),
        window_size,
        sigma,
        _window_norm(window_size, sigma),
        (k1 * data_range) ** 2,
        (k2 * data_range) ** 2,
        -alpha / batch,
        -beta / batch,
        COSINE_EPS,
        ah.halo,
        aw.halo,
        ID_H=ah.identity,
        ID_W=aw.identity,
        NONNEGATIVE=nonnegative,
        HAS_GLOSS=grad_loss is not None,
        HAS_GSSIM=grad_ssim is not None,
        BT_H=ah.bwd_tile,
        BO_H=ah.bwd_out,
        BI_H=ah.bwd_in,
        BT_W=aw.bwd_tile,
        BO_W=aw.bwd_out,
        BI_W=aw.bwd_in,
        BLOCK_C=triton.next_power_of_2(channels),
        PREC=DOT_PRECISION,
        num_warps=_num_warps(ah.bwd_in, aw.bwd_in),
    )
    return dx, dy


@torch.library.custom_op("kdfast::ssim_fwd", mutates_args=())
def _ssim_fwd(
    x: torch.Tensor,
    y: torch.Tensor,
    window_size: int,
    sigma: float,
    data_range: float,
    k1: float,
    k2: float,
    nonnegative: bool,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hybrid loss, per-sample SSIM, per-plane stats [mean SSIM, x.y, x.x, y.y] saved for backward)."""
    return _launch_forward(x, y, window_size, sigma, data_range, k1, k2, nonnegative, alpha, beta)


@_ssim_fwd.register_fake
def _(x, y, window_size, sigma, data_range, k1, k2, nonnegative, alpha, beta):
    batch, channels = x.shape[:2]
    return (
        x.new_empty(()),
        x.new_empty((batch,)),
        x.new_empty((batch * channels, 4), dtype=torch.float32),
    )


@torch.library.custom_op("kdfast::ssim_bwd", mutates_args=())
def _ssim_bwd(
    grad_loss: torch.Tensor | None,
    grad_ssim: torch.Tensor | None,
    x: torch.Tensor,
    y: torch.Tensor,
    stats: torch.Tensor,
    window_size: int,
    sigma: float,
    data_range: float,
    k1: float,
    k2: float,
    nonnegative: bool,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input gradients of kdfast::ssim_fwd given the gradients of its loss and per-sample SSIM outputs."""
    return _launch_backward(
        grad_loss, grad_ssim, x, y, stats, window_size, sigma, data_range, k1, k2, nonnegative, alpha, beta
    )


@_ssim_bwd.register_fake
def _(grad_loss, grad_ssim, x, y, stats, window_size, sigma, data_range, k1, k2, nonnegative, alpha, beta):
    return x.new_empty(x.shape), y.new_empty(y.shape)


_PARAMS = ("window_size", "sigma", "data_range", "k1", "k2", "nonnegative", "alpha", "beta")


def _setup_context(ctx, inputs, output) -> None:
    x, y, *params = inputs
    ctx.save_for_backward(x, y, output[2])
    ctx.params = params
    # Leave unused output gradients as None so the backward kernel skips them instead of reading zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, grad_ssim, grad_stats):
    x, y, stats = ctx.saved_tensors
    dx, dy = _ssim_bwd(grad_loss, grad_ssim, x, y, stats, *ctx.params)
    return (dx if ctx.needs_input_grad[0] else None, dy if ctx.needs_input_grad[1] else None) + (None,) * 8


_ssim_fwd.register_autograd(_backward, setup_context=_setup_context)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
    k: tuple[float, float] = (0.01, 0.03),
    nonnegative: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-sample SSIM of (B, C, H, W) inputs (Wang et al. 2004, eq. 13), shape (B,).

    Same numbers as ``pytorch_msssim.ssim(..., size_average=False)``; see :func:`ssim_reference`.
    """
    triton_path = use_triton(impl, x, y)
    _check_inputs(x, y, window_size, sigma, data_range, DTYPES_TRITON if triton_path else DTYPES_REFERENCE)
    if triton_path:
        return _ssim_fwd(
            x,
            y,
            window_size,
            float(sigma),
            float(data_range),
            float(k[0]),
            float(k[1]),
            bool(nonnegative),
            0.0,
            0.0,
        )[1]
    return ssim_reference(
        x, y, window_size=window_size, sigma=sigma, data_range=data_range, k=k, nonnegative=nonnegative
    )


def ssim_cosine_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    alpha: float = 0.5,
    beta: float = 0.5,
    impl: str = "auto",
    window_size: int = 11,
    sigma: float = 1.5,
    data_range: float = 1.0,
    k: tuple[float, float] = (0.01, 0.03),
    nonnegative: bool = False,
) -> torch.Tensor:
    """AGKD hybrid attention loss alpha * L_SSIM + beta * L_cos = alpha * (1 - mean_b SSIM_b)
    + beta * (1 - mean_b cos(student_b, teacher_b)), a scalar; see :func:`ssim_cosine_loss_reference`."""
    triton_path = use_triton(impl, student, teacher)
    _check_inputs(
        student, teacher, window_size, sigma, data_range, DTYPES_TRITON if triton_path else DTYPES_REFERENCE
    )
    if triton_path:
        return _ssim_fwd(
            student,
            teacher,
            window_size,
            float(sigma),
            float(data_range),
            float(k[0]),
            float(k[1]),
            bool(nonnegative),
            float(alpha),
            float(beta),
        )[0]
    return ssim_cosine_loss_reference(
        student,
        teacher,
        alpha=alpha,
        beta=beta,
        window_size=window_size,
        sigma=sigma,
        data_range=data_range,
        k=k,
        nonnegative=nonnegative,
    )
