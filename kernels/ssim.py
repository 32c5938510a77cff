"""SSIM and the hybrid SSIM + cosine attention loss (AGKD: alpha * L_SSIM + beta * L_cos).

Reference first (the specification, same numbers as ``pytorch_msssim.ssim(..., size_average=False)``),
then the Triton kernels.

Kernel design: the separable 'valid' Gaussian of a plane is two small matmuls, G_h (H_out x H) @ X @
G_w^T (W x W_out), with banded window matrices built in registers; along a side shorter than the window
(or with a window of 1) the pass is the identity and no product is computed at all. Both directions are
plain ``tl.dot``s on power-of-two tiles (tf32x3: fp32 accuracy on tensor cores): the backward maps
dLoss/dmoments back through the transposed bands. One program owns one (b, c) plane. Rows up to 16 are
held whole; longer ones are walked in strips of 16 output rows (32 for windows wider than 17), whose
moments need the strip plus a halo of window_size - 1 input rows; the backward carries the previous strip's
dLoss/dmoments, as the transposed band of a strip's input rows reaches back one strip. Columns up to 64 are
held whole, longer ones in 32-column tiles with a halo on both sides. Four moment maps per tile (mu_x, mu_y,
the blur of x^2 + y^2 and of x y: the two variances enter SSIM only as their sum). Launches: forward 2
(planes; a one-program reduction to per-sample SSIM and the scalar loss), backward 1 (moments recomputed,
never stored; 4 floats per plane are saved), computing the teacher's gradient only when it requires one.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels._dispatch import signature_check, use_triton
from kernels._launch import check_grid, launch
from kernels._op import FusedOp

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
# Sides at most this long (padded to a power of two) are held whole by one program. Rows beyond it are
# walked in strips, columns in tiles: registers hold a few tiles of strip x columns fp32 values, and at
# 56 x 56 maps a whole 64 x 64 plane with its moment maps outgrew them (spills, one CTA per SM).
MAX_WHOLE_ROWS = 16
MAX_WHOLE_COLS = 64
# Output columns per tile of a tiled (long) column side; the halo of window_size - 1 more input columns
# rides on each side in the backward.
COL_STEP = 32
MAX_TILED_WINDOW = 33
# The reduction to per-sample SSIM (and the backward's cosine terms) holds one sample's channels in one tile:
# next_pow2(C) fp32 values, at most 4096 (as many as the B x C tile of the reduction kernel holds at 4 warps;
# bench/RESOURCES*.md compiles C = 4096 without spills). Plane offsets are 32-bit (checked).
MAX_CHANNELS = 4096
INT32_SPAN = 2**31
# tf32x3 (three TF32 tensor-core products) keeps fp32 accuracy, which the variance E[x^2] - mu^2 needs:
# plain TF32 (10-bit mantissa) would cancel away the structure term of nearly-constant maps.
DOT_PRECISION = "tf32x3"


@signature_check
def _check_inputs(
    x_shape: torch.Size,
    y_shape: torch.Size,
    x_dtype: torch.dtype,
    y_dtype: torch.dtype,
    window_size: int,
    sigma: float,
    data_range: float,
    dtypes: tuple[torch.dtype, ...],
) -> None:
    """Raise a ValueError naming what to change when the inputs do not fit the SSIM contract."""
    for name, shape, dtype in (("x", x_shape, x_dtype), ("y", y_shape, y_dtype)):
        if len(shape) != 4:
            raise ValueError(f"{name} must be 4-D (B, C, H, W), got shape {tuple(shape)}")
        if dtype not in dtypes:
            raise ValueError(f"{name} must have a dtype in {[str(d) for d in dtypes]}, got {dtype}")
    if x_shape != y_shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x_shape)} and {tuple(y_shape)}")
    if x_dtype != y_dtype:
        raise ValueError(f"x and y must share a dtype, got {x_dtype} and {y_dtype}")
    if math.prod(x_shape) == 0:
        raise ValueError(f"x and y must not be empty, got shape {tuple(x_shape)}")
    if not isinstance(window_size, int) or window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be an odd integer >= 1, got {window_size!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    if not (math.isfinite(data_range) and data_range > 0):
        raise ValueError(f"data_range must be a finite number > 0, got {data_range!r}")


@signature_check
def _check_triton_limits(shape: torch.Size, x_strides: tuple[int, ...], y_strides: tuple[int, ...]) -> None:
    """Raise a ValueError naming what to change when the kernels cannot take this signature: more channels
    than the reduction's one tile holds, more planes than the grid holds, or a plane whose in-plane offsets
    (32-bit: rows * stride_h + cols * stride_w) would pass 2^31 elements."""
    batch, channels, height, width = shape
    if channels > MAX_CHANNELS:
        raise ValueError(
            f"impl='triton' takes at most {MAX_CHANNELS} channels per sample, got {channels}; use"
            " impl='reference' or split the channels over several calls"
        )
    check_grid((batch * channels,), f"ssim of {tuple(shape)} inputs", "split the batch")
    if height * width >= INT32_SPAN:
        raise ValueError(
            f"impl='triton' takes planes of fewer than 2^31 pixels, got {height} x {width};"
            " use impl='reference'"
        )
    for name, strides in (("x", x_strides), ("y", y_strides)):
        if (height - 1) * strides[2] + (width - 1) * strides[3] >= INT32_SPAN:
            raise ValueError(
                f"one (b, c) plane of {name} {tuple(shape)} with strides {tuple(strides)} spans 2^31 elements"
                " or more; make it contiguous"
            )


def _check(x: torch.Tensor, y: torch.Tensor, window_size, sigma, data_range, triton_path: bool) -> None:
    dtypes = DTYPES_TRITON if triton_path else DTYPES_REFERENCE
    _check_inputs(x.shape, y.shape, x.dtype, y.dtype, window_size, sigma, data_range, dtypes)
    if triton_path:
        _check_triton_limits(x.shape, x.stride(), y.stride())


class _Axis(NamedTuple):
    """How one spatial side is cut into tiles (all block sizes are powers of two >= 16, as tl.dot needs).

    Forward: each step makes ``fwd_out`` output rows from ``fwd_in`` input rows. Backward: each step
    makes ``bwd_tile`` input-gradient rows from ``bwd_out`` dLoss/dmoment rows (starting ``halo`` rows
    before the tile), whose moments need ``bwd_in`` input rows; ``carry``: the rows of the previous step's
    dLoss/dmoments reach this step's tile too (strips of a long row side).
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
    carry: bool


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_tiled_window(size: int, window_size: int, whole: int) -> None:
    if window_size > MAX_TILED_WINDOW:
        raise ValueError(
            f"impl='triton' supports window_size <= {MAX_TILED_WINDOW} on sides longer than {whole}, got "
            f"{window_size} on a side of {size}; use impl='reference'"
        )


@functools.lru_cache(maxsize=256)
def _axis(size: int, window_size: int, rows: bool) -> _Axis:
    """Tiling of one side. A side shorter than the window, or a window of 1, is not smoothed (identity),
    as in pytorch_msssim."""
    identity = size < window_size or window_size == 1
    out = size if identity else size - window_size + 1
    halo = 0 if identity else window_size - 1
    whole_limit = MAX_WHOLE_ROWS if rows else MAX_WHOLE_COLS
    if _pow2(size) <= whole_limit:
        whole, whole_out = _pow2(size), _pow2(out)
        return _Axis(size, out, identity, whole_out, whole, 1, whole, whole_out, whole, 1, 0, False)
    _check_tiled_window(size, window_size, whole_limit)
    if rows:
        # Strips as deep as the halo (at least 16), so a tile's transposed band reaches one strip back.
        strip = _pow2(halo)
        tile_in = _pow2(strip + halo)
        return _Axis(
            size, out, identity, strip, tile_in, _cdiv(out, strip), strip, strip, tile_in, _cdiv(size, strip),
            0, True,
        )  # fmt: skip
    return _Axis(
        size, out, identity, COL_STEP, _pow2(COL_STEP + halo), _cdiv(out, COL_STEP), COL_STEP,
        _pow2(COL_STEP + halo), _pow2(COL_STEP + 2 * halo), _cdiv(size, COL_STEP), halo, False,
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _window(ROWS: tl.constexpr, COLS: tl.constexpr, shift, ksize, sigma, inv_norm, TRANS: tl.constexpr):
        """Banded matrix W[i, j] = g[j - i + shift] (g[i - j + shift] if TRANS): one 1-D 'valid' Gaussian
        pass as a matmul. Built in registers so no host tensor or cache is needed per shape."""
        rows = tl.arange(0, ROWS)[:, None]
        cols = tl.arange(0, COLS)[None, :]
        if TRANS:
            tap = rows - cols + shift
        else:
            tap = cols - rows + shift
        d = (tap - ksize // 2).to(tl.float32)
        return tl.where((tap >= 0) & (tap < ksize), tl.exp(-d * d / (2.0 * sigma * sigma)) * inv_norm, 0.0)

    @triton.jit
    def _down(g, v, IDENTITY: tl.constexpr, PREC: tl.constexpr):
        """g @ v, a Gaussian pass along the rows of v; v itself along an identity side (no product)."""
        if IDENTITY:
            out = v
        else:
            out = tl.dot(g, v, input_precision=PREC)
        return out

    @triton.jit
    def _across(v, g, IDENTITY: tl.constexpr, PREC: tl.constexpr):
        """v @ g, a Gaussian pass along the columns of v; v itself along an identity side (no product)."""
        if IDENTITY:
            out = v
        else:
            out = tl.dot(v, g, input_precision=PREC)
        return out

    @triton.jit
    def _blur(v, gh, gwt, ID_H: tl.constexpr, ID_W: tl.constexpr, PREC: tl.constexpr):
        return _across(_down(gh, v, ID_H, PREC), gwt, ID_W, PREC)

    @triton.jit
    def _blur_transposed(
        d, d_prev, gh_back, gh_carry, gw_back, ID_H: tl.constexpr, ID_W: tl.constexpr, CARRY: tl.constexpr,
        PREC: tl.constexpr,
    ):  # fmt: skip
        """G_h^T d G_w for a tile: the input-gradient rows of the tile from dLoss/dmoment rows ``d`` and, in a
        strip walk, the previous strip's ``d_prev``, whose band reaches this tile's first rows."""
        rows = _down(gh_back, d, ID_H, PREC)
        if CARRY:
            if not ID_H:
                rows += tl.dot(gh_carry, d_prev, input_precision=PREC)
        return _across(rows, gw_back, ID_W, PREC)

    @triton.jit
    def _shifts(x_base, y_base):
        """The plane's first pixels: the moments are taken of x - x[0, 0] and y - y[0, 0]. Variances and the
        covariance do not change under a shift, and E[x'^2] - mu'^2 then cancels far less in fp32 where a
        map is nearly constant (exactly 0 for a constant one); the means get the shift back."""
        return tl.load(x_base).to(tl.float32), tl.load(y_base).to(tl.float32)

    # C is not specialized: C == 1 would only save one integer division per program, and one compiled
    # kernel then serves both single-map and multi-channel batches of a plane size.
    @triton.jit(do_not_specialize=["C"])
    def _ssim_fwd_kernel(
        x_ptr, y_ptr, stats_ptr, C, H, W, H_OUT, W_OUT, steps_h, steps_w,
        sxb, sxc, sxh, sxw, syb, syc, syh, syw, ksize, sigma, inv_norm, c1, c2,
        ID_H: tl.constexpr, ID_W: tl.constexpr, BO_H: tl.constexpr, BI_H: tl.constexpr, BO_W: tl.constexpr,
        BI_W: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """One program per (b, c) plane: reads x and y once, writes [mean SSIM map, x.y, x.x, y.y]."""
        plane = tl.program_id(0)
        b = plane // C
        ch = plane % C
        x_base = x_ptr + b.to(tl.int64) * sxb + ch.to(tl.int64) * sxc
        y_base = y_ptr + b.to(tl.int64) * syb + ch.to(tl.int64) * syc
        shift_x, shift_y = _shifts(x_base, y_base)
        gh = _window(BO_H, BI_H, 0, ksize, sigma, inv_norm, False)
        gwt = _window(BI_W, BO_W, 0, ksize, sigma, inv_norm, True)
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
                xs = x - shift_x
                ys = y - shift_y
                mu_xs = _blur(xs, gh, gwt, ID_H, ID_W, PREC)
                mu_ys = _blur(ys, gh, gwt, ID_H, ID_W, PREC)
                mu_x = mu_xs + shift_x
                mu_y = mu_ys + shift_y
                # sigma_x^2 + sigma_y^2 = blur(x^2 + y^2) - mu_x^2 - mu_y^2: one product for both.
                var_sum = _blur(xs * xs + ys * ys, gh, gwt, ID_H, ID_W, PREC) - mu_xs * mu_xs - mu_ys * mu_ys
                cov = _blur(xs * ys, gh, gwt, ID_H, ID_W, PREC) - mu_xs * mu_ys
                lum = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
                s = lum * (2.0 * cov + c2) / (var_sum + c2)
                ssim_sum += tl.sum(tl.where((out_rows < H_OUT) & (out_cols < W_OUT), s, 0.0))
        out = stats_ptr + plane * 4
        tl.store(out, ssim_sum / (H_OUT * W_OUT))
        tl.store(out + 1, xy)
        tl.store(out + 2, xx)
        tl.store(out + 3, yy)

    @triton.jit
    def _ssim_reduce_kernel(
        stats_ptr, ssim_ptr, loss_ptr, B, C, alpha, beta, eps,
        NONNEGATIVE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
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
        x_ptr, y_ptr, dx_ptr, dy_ptr, stats_ptr, gloss_ptr, gssim_ptr, gssim_stride,
        C, H, W, H_OUT, W_OUT, steps_h, steps_w, sxb, sxc, sxh, sxw, syb, syc, syh, syw,
        ksize, sigma, inv_norm, c1, c2, ssim_scale, cos_scale, eps, HALO_W,
        ID_H: tl.constexpr, ID_W: tl.constexpr, NONNEGATIVE: tl.constexpr, HAS_GLOSS: tl.constexpr,
        HAS_GSSIM: tl.constexpr, NEED_X: tl.constexpr, NEED_Y: tl.constexpr, CARRY: tl.constexpr,
        BT_H: tl.constexpr, BO_H: tl.constexpr, BI_H: tl.constexpr, BT_W: tl.constexpr, BO_W: tl.constexpr,
        BI_W: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr,
    ):  # fmt: skip
        """One program per plane: recomputes the four moment maps (no map is stored by the forward), turns
        dLoss/dSSIM-map into dLoss/dmoments (eq. 13 differentiated), and maps those back through the
        transposed window matrices; each step writes a disjoint tile of dx (and of dy when NEED_Y)."""
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
        x_base = x_ptr + b.to(tl.int64) * sxb + ch.to(tl.int64) * sxc
        y_base = y_ptr + b.to(tl.int64) * syb + ch.to(tl.int64) * syc
        d_base = plane.to(tl.int64) * H * W
        shift_x, shift_y = _shifts(x_base, y_base)
        gh = _window(BO_H, BI_H, 0, ksize, sigma, inv_norm, False)
        gwt = _window(BI_W, BO_W, 0, ksize, sigma, inv_norm, True)
        gh_back = _window(BT_H, BO_H, 0, ksize, sigma, inv_norm, True)
        gh_carry = _window(BT_H, BO_H, BO_H, ksize, sigma, inv_norm, True)
        gw_back = _window(BO_W, BT_W, HALO_W, ksize, sigma, inv_norm, False)
        for tw in range(steps_w):
            c0 = tw * BT_W
            cols = c0 - HALO_W + tl.arange(0, BI_W)[None, :]
            out_cols = c0 - HALO_W + tl.arange(0, BO_W)[None, :]
            tile_cols = c0 + tl.arange(0, BT_W)[None, :]
            # dLoss/dmoments of the previous strip (CARRY): its band reaches the first rows of this one.
            prev_mu_x = tl.zeros((BO_H, BO_W), tl.float32)
            prev_mu_y = tl.zeros((BO_H, BO_W), tl.float32)
            prev_sq = tl.zeros((BO_H, BO_W), tl.float32)
            prev_xy = tl.zeros((BO_H, BO_W), tl.float32)
            for th in range(steps_h):
                r0 = th * BT_H
                rows = r0 + tl.arange(0, BI_H)[:, None]
                out_rows = r0 + tl.arange(0, BO_H)[:, None]
                tile_rows = r0 + tl.arange(0, BT_H)[:, None]
                inside = (rows < H) & (cols >= 0) & (cols < W)
                x = tl.load(x_base + rows * sxh + cols * sxw, mask=inside, other=0.0).to(tl.float32)
                y = tl.load(y_base + rows * syh + cols * syw, mask=inside, other=0.0).to(tl.float32)
                xs = x - shift_x
                ys = y - shift_y
                mu_xs = _blur(xs, gh, gwt, ID_H, ID_W, PREC)
                mu_ys = _blur(ys, gh, gwt, ID_H, ID_W, PREC)
                mu_x = mu_xs + shift_x
                mu_y = mu_ys + shift_y
                b1 = mu_x * mu_x + mu_y * mu_y + c1
                b2 = _blur(xs * xs + ys * ys, gh, gwt, ID_H, ID_W, PREC) - mu_xs * mu_xs - mu_ys * mu_ys + c2
                lum = (2.0 * mu_x * mu_y + c1) / b1
                cs = (2.0 * (_blur(xs * ys, gh, gwt, ID_H, ID_W, PREC) - mu_xs * mu_ys) + c2) / b2
                valid = (out_rows < H_OUT) & (out_cols >= 0) & (out_cols < W_OUT)
                w = tl.where(valid, weight, 0.0)
                d_sq = -w * lum * cs / b2
                d_xy = w * 2.0 * lum / b2
                p_sq = _blur_transposed(d_sq, prev_sq, gh_back, gh_carry, gw_back, ID_H, ID_W, CARRY, PREC)
                p_xy = _blur_transposed(d_xy, prev_xy, gh_back, gh_carry, gw_back, ID_H, ID_W, CARRY, PREC)
                prev_sq = d_sq
                prev_xy = d_xy
                in_tile = (tile_rows < H) & (tile_cols < W)
                xt = tl.load(x_base + tile_rows * sxh + tile_cols * sxw, mask=in_tile, other=0.0)
                yt = tl.load(y_base + tile_rows * syh + tile_cols * syw, mask=in_tile, other=0.0)
                xt = xt.to(tl.float32)
                yt = yt.to(tl.float32)
                xts = xt - shift_x
                yts = yt - shift_y
                grad_at = d_base + tile_rows * W + tile_cols
                if NEED_X:
                    d_mu_x = w * (2.0 * cs * (mu_y - mu_x * lum) / b1 + 2.0 * lum * (mu_xs * cs - mu_ys) / b2)
                    p_x = _blur_transposed(
                        d_mu_x, prev_mu_x, gh_back, gh_carry, gw_back, ID_H, ID_W, CARRY, PREC
                    )
                    prev_mu_x = d_mu_x
                    dx = p_x + 2.0 * xts * p_sq + yts * p_xy + cos_x * yt - cos_xx * xt
                    tl.store(dx_ptr + grad_at, dx.to(dx_ptr.dtype.element_ty), mask=in_tile)
                if NEED_Y:
                    d_mu_y = w * (2.0 * cs * (mu_x - mu_y * lum) / b1 + 2.0 * lum * (mu_ys * cs - mu_xs) / b2)
                    p_y = _blur_transposed(
                        d_mu_y, prev_mu_y, gh_back, gh_carry, gw_back, ID_H, ID_W, CARRY, PREC
                    )
                    prev_mu_y = d_mu_y
                    dy = p_y + 2.0 * yts * p_sq + xts * p_xy + cos_y * xt - cos_yy * yt
                    tl.store(dy_ptr + grad_at, dy.to(dy_ptr.dtype.element_ty), mask=in_tile)


@functools.lru_cache(maxsize=256)
def _window_norm(window_size: int, sigma: float) -> float:
    """1 / sum of the unnormalized Gaussian taps, so the in-kernel window sums to one."""
    half = window_size // 2
    return 1.0 / sum(math.exp(-((i - half) ** 2) / (2 * sigma**2)) for i in range(window_size))


def _num_warps(rows: int, cols: int) -> int:
    # 8 warps from 32 x 64 strips on (56 x 56 maps). ptxas on sm_80 / sm_90 at that strip: 4 warps spill
    # 0-8 B forward and 1.4-1.6 KB backward (2 CTAs per SM); 8 warps 0 B and 244-260 B (1 CTA of 8 warps);
    # 16 warps, capped at 128 registers, 176-208 B and 1.3-2.7 KB. Smaller strips fit 4 warps without spills.
    return 8 if rows * cols >= 32 * 64 else 4


class _Plan(NamedTuple):
    """What the launches need beyond the tensors, computed once per signature."""

    window: tuple[int, float, float, float, float]  # ksize, sigma, 1 / sum of taps, c1, c2
    forward_sizes: tuple[int, ...]
    forward_meta: dict
    reduce_meta: dict
    backward_sizes: tuple[int, ...]
    halo_w: int
    backward_meta: dict


@functools.lru_cache(maxsize=256)
def _plan(
    batch: int, channels: int, height: int, width: int, window_size: int, sigma: float, data_range: float,
    k1: float, k2: float, nonnegative: bool,
) -> _Plan:  # fmt: skip
    ah, aw = _axis(height, window_size, True), _axis(width, window_size, False)
    block_c = 1 << (channels - 1).bit_length()
    return _Plan(
        window=(window_size, sigma, _window_norm(window_size, sigma), (k1 * data_range) ** 2,
                (k2 * data_range) ** 2),
        forward_sizes=(channels, height, width, ah.out, aw.out, ah.fwd_steps, aw.fwd_steps),
        forward_meta=dict(
            ID_H=ah.identity, ID_W=aw.identity, BO_H=ah.fwd_out, BI_H=ah.fwd_in, BO_W=aw.fwd_out,
            BI_W=aw.fwd_in, PREC=DOT_PRECISION, num_warps=_num_warps(ah.fwd_in, aw.fwd_in),
        ),
        reduce_meta=dict(
            NONNEGATIVE=nonnegative, BLOCK_B=max(1, min(1 << (batch - 1).bit_length(), 4096 // block_c)),
            BLOCK_C=block_c,
        ),
        backward_sizes=(channels, height, width, ah.out, aw.out, ah.bwd_steps, aw.bwd_steps),
        halo_w=aw.halo,
        backward_meta=dict(
            ID_H=ah.identity, ID_W=aw.identity, NONNEGATIVE=nonnegative, CARRY=ah.carry, BT_H=ah.bwd_tile,
            BO_H=ah.bwd_out, BI_H=ah.bwd_in, BT_W=aw.bwd_tile, BO_W=aw.bwd_out, BI_W=aw.bwd_in,
            BLOCK_C=block_c, PREC=DOT_PRECISION, num_warps=_num_warps(ah.bwd_in, aw.bwd_in),
        ),
    )  # fmt: skip


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
    batch, channels = x.shape[:2]
    plan = _plan(*x.shape, window_size, sigma, data_range, k1, k2, nonnegative)
    stats = torch.empty((batch * channels, 4), device=x.device, dtype=torch.float32)
    launch(
        _ssim_fwd_kernel, (batch * channels,),
        x, y, stats, *plan.forward_sizes, *x.stride(), *y.stride(), *plan.window, **plan.forward_meta,
    )  # fmt: skip
    per_sample = torch.empty((batch,), device=x.device, dtype=x.dtype)
    loss = torch.empty((), device=x.device, dtype=x.dtype)
    launch(
        _ssim_reduce_kernel, (1,),
        stats, per_sample, loss, batch, channels, alpha, beta, COSINE_EPS, **plan.reduce_meta,
    )  # fmt: skip
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
    need_x: bool,
    need_y: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch: dx and dy of alpha * (1 - mean SSIM) + beta * (1 - mean cos) and/or of SSIM per sample;
    an input whose gradient is not needed gets an empty tensor and no work."""
    batch, channels = x.shape[:2]
    plan = _plan(*x.shape, window_size, sigma, data_range, k1, k2, nonnegative)
    dx = x.new_empty(x.shape if need_x else (0,))
    dy = y.new_empty(y.shape if need_y else (0,))
    if not (need_x or need_y):
        return dx, dy
    launch(
        _ssim_bwd_kernel, (batch * channels,), x, y, dx, dy, stats,
        x if grad_loss is None else grad_loss,
        x if grad_ssim is None else grad_ssim,
        0 if grad_ssim is None else grad_ssim.stride(0),
        *plan.backward_sizes, *x.stride(), *y.stride(), *plan.window,
        -alpha / batch, -beta / batch, COSINE_EPS, plan.halo_w,
        HAS_GLOSS=grad_loss is not None, HAS_GSSIM=grad_ssim is not None, NEED_X=need_x, NEED_Y=need_y,
        **plan.backward_meta,
    )  # fmt: skip
    return dx, dy


def _forward_fake(x, y, window_size, sigma, data_range, k1, k2, nonnegative, alpha, beta):
    batch, channels = x.shape[:2]
    stats = x.new_empty((batch * channels, 4), dtype=torch.float32)
    return x.new_empty(()), x.new_empty((batch,)), stats


def _backward_fake(grad_loss, grad_ssim, x, y, stats, *params):
    need_x, need_y = params[-2:]
    return x.new_empty(x.shape if need_x else (0,)), y.new_empty(y.shape if need_y else (0,))


# Both autograd paths (eager autograd.Function, torch.compile custom ops) from one description (_op.py): the
# outputs are (hybrid loss, per-sample SSIM, per-plane stats [mean SSIM, x.y, x.x, y.y] saved for backward).
_ssim = FusedOp(
    "ssim",
    forward=_launch_forward,
    forward_fake=_forward_fake,
    backward=_launch_backward,
    backward_fake=_backward_fake,
    grad_inputs=2,
    grad_outputs=(0, 1),
    save=lambda inputs, outputs: ((*inputs[:2], outputs[2]), inputs[2:]),
)


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
    _check(x, y, window_size, sigma, data_range, triton_path)
    if triton_path:
        params = (window_size, float(sigma), float(data_range), float(k[0]), float(k[1]), bool(nonnegative))
        return _ssim(1, x, y, *params, 0.0, 0.0)
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
    + beta * (1 - mean_b cos(student_b, teacher_b)), a scalar; see :func:`ssim_cosine_loss_reference`.
    Gradients go to whichever inputs require them (the teacher's only when it does)."""
    triton_path = use_triton(impl, student, teacher)
    _check(student, teacher, window_size, sigma, data_range, triton_path)
    if triton_path:
        params = (window_size, float(sigma), float(data_range), float(k[0]), float(k[1]), bool(nonnegative))
        return _ssim(0, student, teacher, *params, float(alpha), float(beta))
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
