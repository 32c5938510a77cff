"""SSIM and the hybrid SSIM + cosine attention loss (AGKD: alpha * L_SSIM + beta * L_cos).

Reference first (the specification, same numbers as ``pytorch_msssim.ssim(..., size_average=False)``),
then the Triton kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import use_triton


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
    """Per-sample SSIM of (B, C, H, W) inputs, shape (B,). See :func:`ssim_reference`."""
    args = dict(window_size=window_size, sigma=sigma, data_range=data_range, k=k, nonnegative=nonnegative)
    if use_triton(impl, x, y):
        raise NotImplementedError("Triton SSIM: being written")
    return ssim_reference(x, y, **args)


def ssim_cosine_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, alpha: float = 0.5, beta: float = 0.5, impl: str = "auto",
    **ssim_args,
) -> torch.Tensor:
    """Scalar hybrid attention loss; see :func:`ssim_cosine_loss_reference`."""
    if use_triton(impl, student, teacher):
        raise NotImplementedError("Triton SSIM+cosine: being written")
    return ssim_cosine_loss_reference(student, teacher, alpha=alpha, beta=beta, **ssim_args)
