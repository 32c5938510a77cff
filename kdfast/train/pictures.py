"""What ``attention.png`` shows and the numbers ``results.md`` gives about it: each teacher tap's map on its
own, the combined map the student is trained toward, the distilled student's map, and each map's share of
mass on background cells.

The share makes an attention sink visible: a ViT whose CLS attention collects on background tokens (Darcet
et al. 2024, "Vision Transformers Need Registers") puts more of its mass on background cells than the cells'
own share of the image, where a map that follows the object puts less.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import kernels
from kdfast.config import Config
from kdfast.errors import UsageError
from kdfast.methods.base import DistillationLoss
from kdfast.methods.features import cls_attention_map, spatial_feature, tap_qkv, tap_tensor
from kdfast.plots import background_cells, background_share, plot_attention_grid
from kdfast.taps import Taps

SHARE_IMAGES = 64  # validation images the shares are averaged over
SHOWN_IMAGES = 8  # of which the picture shows the first


def tap_map(
    name: str, kind: str, taps: Mapping[str, Any], size: tuple[int, int], impl: str
) -> tuple[str, Tensor]:
    """(row label, (B, h, w) map) of one teacher tap on the ``size`` grid: an attention tap's CLS attention
    (AGKD eq. 2, ViT part), a feature tap's energy mean_c |F_c|^2 (eq. 2, VGG part)."""
    if kind == "attention":
        return f"teacher {name}\n(CLS attention)", cls_attention_map(tap_qkv(taps, name), size, impl=impl)
    feature = spatial_feature(tap_tensor(taps, name, "teacher"), name).float()
    return f"teacher {name}\n(feature energy)", kernels.attention_map(feature, size, impl=impl)


def attention_rows(
    student: Taps, teacher: Taps, loss_fn: DistillationLoss, images: Tensor, cfg: Config
) -> list[tuple[str, Tensor]]:
    """(row label, (B, h, w) maps): each teacher tap on its own (:func:`tap_map`; a tap without such a map,
    an attention tap without a class token, has no row), the teacher map the student is trained toward when
    it combines several, and the distilled student's map, from the first pair of ``loss_fn.maps``; none when
    the methods draw no maps."""
    with torch.no_grad():
        _, teacher_taps = teacher(images)
        _, student_taps = student(images)
        pairs = loss_fn.maps(student_taps, teacher_taps)
        if not pairs:
            return []
        student_maps, teacher_maps = pairs[0]
        size = tuple(teacher_maps.shape[-2:])
        rows = []
        for name, spec in cfg.teacher.taps.items():
            try:
                rows.append(tap_map(name, spec.kind, teacher_taps, size, cfg.runtime.kernels))
            except UsageError:
                continue
        if not any(torch.allclose(maps, teacher_maps) for _, maps in rows):
            rows.append(("teacher, combined\n(the target)", teacher_maps))
        rows.append(("distilled student", student_maps))
    return [(label, maps.float().cpu()) for label, maps in rows]


def attention_picture(
    student: Taps,
    teacher: Taps,
    loss_fn: DistillationLoss,
    images: Tensor,
    labels: Tensor,
    info: Any,
    cfg: Config,
    out_png: Path,
) -> dict[str, float]:
    """Draw ``out_png`` from :func:`attention_rows` on the first images and return each map's share of mass on
    background cells over all ``images`` (validation images, normalized), with "background_cells", the
    cells' own share; an empty dict (and no picture) when the methods draw no maps."""
    rows = attention_rows(student, teacher, loss_fn, images, cfg)
    if not rows:
        return {}
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    background = background_cells((images.cpu() * std + mean).clamp(0, 1), tuple(rows[0][1].shape[-2:]))
    shares = [background_share(maps, background) for _, maps in rows]
    cells = float(background.float().mean())
    plot_attention_grid(
        images[:SHOWN_IMAGES].cpu(),
        info.mean,
        info.std,
        [
            (f"{label}\n{share:.0%} on background", maps[:SHOWN_IMAGES])
            for (label, maps), share in zip(rows, shares, strict=True)
        ],
        out_png,
        labels=[info.classes[i] for i in labels[:SHOWN_IMAGES].tolist()],
        title=f"attention as a multiple of a uniform map; share of each map's mass on background cells over "
        f"{len(images)} validation images, where {cells:.0%} of the cells are background",
    )
    return {"background_cells": cells} | {
        label.split("\n")[0]: share for (label, _), share in zip(rows, shares, strict=True)
    }


def background_table(shares: Mapping[str, float], images: int) -> str:
    """The results.md section with :func:`attention_picture`'s shares."""
    lines = [
        "## Attention on background",
        "",
        f"Share of each attention map's mass on background cells (no object), first {images} validation "
        f"images; {shares['background_cells']:.0%} of the cells are background, so a uniform map puts that "
        "much there.",
        "",
        "| map | mass on background |",
        "| --- | ---: |",
    ]
    return "\n".join([*lines, *(f"| {k} | {v:.1%} |" for k, v in shares.items() if k != "background_cells")])
