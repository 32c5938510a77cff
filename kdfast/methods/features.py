"""Reading taps as the methods need them: a feature tap as a (B, C, H, W) map or as one embedding per sample,
an attention tap as Q, K, V, ViT token grids, bilinear resizing and the CLS attention map, each raising one
UsageError line on a tap that does not fit."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

import kernels
from kdfast.errors import UsageError
from kdfast.taps import QKV


def tap_tensor(taps: Mapping[str, Any], name: str, role: str) -> torch.Tensor:
    """The tensor a feature tap recorded; UsageError when it recorded nothing or Q, K, V."""
    value = taps.get(name)
    if not isinstance(value, torch.Tensor):
        got = "nothing" if value is None else type(value).__name__
        raise UsageError(f"{role} tap {name!r} gave {got}; a feature tap must give a tensor (check its path)")
    return value


def tap_qkv(taps: Mapping[str, Any], name: str) -> QKV:
    """The Q, K, V an attention tap recorded; UsageError when it recorded anything else."""
    value = taps.get(name)
    if not isinstance(value, QKV):
        got = "nothing" if value is None else type(value).__name__
        raise UsageError(
            f"teacher tap {name!r} gave {got}; an attention tap must give Q, K, V (check its kind)"
        )
    return value


def patch_grid(tokens: int) -> tuple[int, int]:
    """(side, prefix): the largest square side with side^2 <= tokens; the rest are prefix (CLS) tokens."""
    side = math.isqrt(tokens)
    return side, tokens - side * side


def spatial_feature(feature: torch.Tensor, name: str) -> torch.Tensor:
    """A feature tap as (B, C, H, W): CNN maps as they are; ViT tokens (B, N, D) without the prefix tokens."""
    if feature.dim() == 4:
        return feature
    if feature.dim() == 3:
        side, prefix = patch_grid(feature.shape[1])
        return feature[:, prefix:].transpose(1, 2).reshape(feature.shape[0], -1, side, side)
    raise UsageError(
        f"feature tap {name!r} has shape {tuple(feature.shape)}: expected (B, C, H, W) or (B, tokens, D)"
    )


def embedding(taps: Mapping[str, Any], name: str, role: str) -> torch.Tensor:
    """A feature tap as one vector per sample, (B, D): a (B, D) tap as it is, a (B, C, H, W) map
    average-pooled over H x W (the penultimate embedding of a CNN: tap its last feature map or its global
    pool). Token sequences (B, N, D) are refused: which token is the embedding depends on the model."""
    value = tap_tensor(taps, name, role)
    if value.dim() == 2:
        return value
    if value.dim() == 4:
        return value.mean(dim=(2, 3))
    raise UsageError(
        f"{role} tap {name!r} has shape {tuple(value.shape)}: an embedding tap must give (B, D) or a "
        "(B, C, H, W) map to pool; for a ViT tap the pooled output (timm: fc_norm or head_drop)"
    )


def resize_to(feature: torch.Tensor, size: tuple[int, int], impl: str = "auto") -> torch.Tensor:
    """(B, C, H, W) resized bilinearly to ``size`` by the kernels op; unchanged when it has that size."""
    return feature if tuple(feature.shape[-2:]) == tuple(size) else kernels.resize(feature, size, impl=impl)


def cls_attention_map(qkv: QKV, size: tuple[int, int], *, impl: str = "auto") -> torch.Tensor:
    """AGKD eq. 2, ViT part: softmax(q_cls K^T / sqrt(d)) over all tokens, patch entries kept, mean over
    heads, on the patch grid, resized bilinearly to ``size`` and L2-normalized: (B, h, w). Only the CLS row
    of the attention matrix is formed (B x heads x N), never N x N."""
    q, k = qkv.q.float(), qkv.k.float()
    side, prefix = patch_grid(k.shape[2])
    if prefix == 0:
        raise UsageError(
            f"attention tap has {k.shape[2]} tokens and no class token: tap a ViT with a CLS token"
        )
    row = torch.softmax((q[:, :, :1] @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    patches = row[:, :, 0, prefix:].mean(1).reshape(-1, 1, side, side)
    maps = kernels.resize(patches, size, impl=impl)[:, 0]
    return F.normalize(maps.flatten(1), dim=1, eps=1e-12).view_as(maps)
