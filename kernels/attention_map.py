"""Attention-transfer maps (Zagoruyko & Komodakis 2017) and their bilinear resize to a common grid.

Reference first (the specification), then the Triton kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._dispatch import use_triton


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


def resize(maps: torch.Tensor, size: tuple[int, int], *, impl: str = "auto") -> torch.Tensor:
    if use_triton(impl, maps):
        raise NotImplementedError("Triton resize: being written")
    return resize_reference(maps, size)


def attention_map(
    features: torch.Tensor,
    size: tuple[int, int] | None = None,
    *,
    p: float = 2,
    normalize: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    if use_triton(impl, features):
        raise NotImplementedError("Triton attention map: being written")
    return attention_map_reference(features, size, p=p, normalize=normalize)
