"""Pictures of a run: training curves from ``metrics.jsonl`` and teacher-vs-student attention grids.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global figure state), so
plotting works on a headless training machine and inside a long-running loop.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from torch import Tensor

from kdfast.atomic import atomic_path
from kdfast.errors import UsageError


def _read_rows(metrics_jsonl: Path) -> list[dict]:
    path = Path(metrics_jsonl)
    if not path.is_file():
        raise UsageError(f"metrics file not found: {path} (expected the metrics.jsonl a training run writes)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path} line {number} is not a JSON object") from None
        if not isinstance(row, dict) or "stage" not in row or "epoch" not in row or "split" not in row:
            raise UsageError(f"{path} line {number} lacks 'stage', 'epoch' or 'split'")
        rows.append(row)
    if not rows:
        raise UsageError(f"{path} holds no metrics rows")
    return rows


def _per_epoch_mean(points: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    by_epoch: dict[float, list[float]] = defaultdict(list)
    for epoch, value in points:
        by_epoch[epoch].append(value)
    epochs = sorted(by_epoch)
    return epochs, [float(np.mean(by_epoch[e])) for e in epochs]


def plot_training_curves(metrics_jsonl: Path, out_png: Path) -> None:
    """One panel per stage: the training loss and its parts (mean over each epoch's logged steps) on the
    left axis, validation top-1 per epoch on the right axis."""
    rows = _read_rows(metrics_jsonl)
    stages = list(dict.fromkeys(row["stage"] for row in rows))
    fig = Figure(figsize=(5.5 * len(stages), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    for column, stage in enumerate(stages, start=1):
        ax = fig.add_subplot(1, len(stages), column)
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        top1: list[tuple[float, float]] = []
        for row in rows:
            # the loop writes step rows and an epoch-mean row; plot the epoch rows where they exist
            if row["stage"] != stage or row.get("scope", "epoch") != "epoch":
                continue
            if row["split"] == "train" and row.get("loss") is not None:
                series["loss"].append((row["epoch"], float(row["loss"])))
                for name, value in (row.get("parts") or {}).items():
                    if not name.rpartition("/")[2].startswith("w_"):  # task weights (MTD) are not losses
                        series[name].append((row["epoch"], float(value)))
            elif row["split"] == "val" and row.get("top1") is not None:
                top1.append((row["epoch"], float(row["top1"])))
        _plot_losses(ax, {name: _per_epoch_mean(points) for name, points in series.items()})
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title(str(stage))
        handles, names = ax.get_legend_handles_labels()
        if top1:
            right = ax.twinx()
            (line,) = right.plot(*_per_epoch_mean(top1), color="black", linestyle="--", marker="s")
            right.set_ylabel("val top-1")
            handles, names = handles + [line], names + ["val top-1"]
        if handles:
            ax.legend(handles, names, fontsize="small", loc="center right")  # losses fall, top-1 rises
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def _plot_losses(ax: Any, curves: dict[str, tuple[list[float], list[float]]]) -> None:
    """The total training loss as a thick dark line, then each part in colour; a part equal to the total at
    every epoch (the CE of a CE-only stage) is named in the total's label instead of drawn on top of it."""
    total = curves.pop("loss", None)
    if total is None:
        return
    same = [
        name
        for name, (epochs, values) in curves.items()
        if epochs == total[0] and np.allclose(values, total[1], rtol=1e-6, atol=1e-9)
    ]
    label = f"train loss (= {', '.join(same)})" if same else "train loss"
    ax.plot(*total, color="0.15", linewidth=2.4, marker="o", label=label)
    for name, (epochs, values) in curves.items():
        if name not in same:
            ax.plot(epochs, values, marker="o", markersize=4, linewidth=1.3, label=f"train {name}")


def attention_mass(maps: Tensor) -> Tensor:
    """Non-negative (B, h, w) maps as shares of their total: each map sums to 1 over its h * w cells."""
    maps = maps.detach().float().cpu().clamp_min(0)
    return maps / maps.flatten(1).sum(1).clamp_min(1e-12).view(-1, 1, 1)


def background_cells(pixels: Tensor, grid: tuple[int, int], threshold: float = 0.1) -> Tensor:
    """(B, h, w) bool: the cells of an h x w grid over de-normalized images (B, 3, H, W) in [0, 1] that hold
    no object, i.e. whose pixels differ from the image's frame (the median colour of its outermost pixels)
    by less than ``threshold`` on average (the black around a digit, a plain sky)."""
    frame = torch.cat([pixels[..., 0, :], pixels[..., -1, :], pixels[..., :, 0], pixels[..., :, -1]], dim=-1)
    ink = (pixels - frame.median(dim=-1).values[..., None, None]).abs().amax(1, keepdim=True)
    return F.adaptive_avg_pool2d(ink, grid)[:, 0] < threshold


def background_share(maps: Tensor, background: Tensor) -> float:
    """The mean share of the maps' mass (:func:`attention_mass`) on the ``background`` cells."""
    return float((attention_mass(maps) * background).flatten(1).sum(1).mean())


def _overlay(maps: Tensor, size: torch.Size) -> Tensor:
    """Maps as multiples of a uniform map (mass x h * w: 1 everywhere when uniform), resized to the image."""
    mass = attention_mass(maps) * maps.shape[-2] * maps.shape[-1]
    return F.interpolate(mass[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def plot_attention_grid(
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    rows: Sequence[tuple[str, Tensor]],
    out_png: Path,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> None:
    """One column per image and one row per map: the de-normalized image on top, then each (label, (B, h, w)
    maps) row overlaid on the images and labelled once, at its left. Maps are drawn as multiples of a uniform
    map (:func:`_overlay`) on one colour scale shared by every row, so a flat map looks flat and rows compare
    directly; ``title`` goes above the grid."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise UsageError(f"plot_attention_grid takes images (B, 3, H, W), got {tuple(images.shape)}")
    for name, maps in rows:
        if maps.dim() != 3 or maps.shape[0] != images.shape[0]:
            raise UsageError(
                f"maps {name!r} must be (B, h, w) with B={images.shape[0]}, got {tuple(maps.shape)}"
            )
    if labels is not None and len(labels) != images.shape[0]:
        raise UsageError(f"labels must name {images.shape[0]} images, got {len(labels)}")
    images = images.detach().float().cpu()
    size = images.shape[-2:]
    pixels = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    pixels = pixels.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    overlays = [_overlay(maps, size) for _, maps in rows]
    # one scale for every row, square-root so that a peaked map (a ViT's CLS attention) leaves the others
    # readable
    scale = PowerNorm(0.5, vmin=0.0, vmax=max([float(o.max()) for o in overlays], default=1.0))
    batch = images.shape[0]
    fig = Figure(figsize=(1.7 * batch + 3.2, 1.75 * (len(rows) + 1) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows) + 1, batch, squeeze=False)
    shown = None
    for col in range(batch):
        axes[0, col].imshow(pixels[col])
        axes[0, col].set_title(labels[col] if labels is not None else f"image {col}", fontsize="small")
        for row, maps in enumerate(overlays, start=1):
            axes[row, col].imshow(pixels[col])
            shown = axes[row, col].imshow(maps[col].numpy(), cmap="jet", alpha=0.5, norm=scale)
    for row, ax_row in enumerate(axes):
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
        ax_row[0].set_ylabel(
            "image" if row == 0 else rows[row - 1][0], fontsize="small", rotation=0, ha="right", va="center"
        )
    if shown is not None:
        fig.colorbar(
            shown,
            ax=axes[1:, :].ravel().tolist(),
            label="attention (x uniform, square-root scale)",
            shrink=0.8,
        )
    if title is not None:
        fig.suptitle(title, fontsize="medium")
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight", pad_inches=0.1)  # row labels whole
