"""Pictures of a run: training curves from ``metrics.jsonl`` and teacher-vs-student attention grids.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global figure state), so
plotting works on a headless training machine and inside a long-running loop.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
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
        for name, points in series.items():
            ax.plot(*_per_epoch_mean(points), marker="o", label=f"train {name}")
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


def _overlay(maps: Tensor, size: torch.Size) -> Tensor:
    """Maps resized to the image and each scaled to [0, 1], so teacher and student share one colour scale."""
    maps = maps.detach().float().cpu()[:, None]
    flat = F.interpolate(maps, size=size, mode="bilinear", align_corners=False).flatten(1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view(-1, *size)


def plot_attention_grid(
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    teacher_maps: Tensor,
    student_maps: Tensor,
    out_png: Path,
    titles: tuple[str, str] = ("teacher", "student"),
    labels: Sequence[str] | None = None,
) -> None:
    """A grid with one column per image: the de-normalized image, then the teacher map and the student map
    (AGKD's attention maps, each resized bilinearly to the image and scaled to [0, 1]) overlaid on it, and a
    shared colorbar."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise UsageError(f"plot_attention_grid takes images (B, 3, H, W), got {tuple(images.shape)}")
    for name, maps in (("teacher_maps", teacher_maps), ("student_maps", student_maps)):
        if maps.dim() != 3 or maps.shape[0] != images.shape[0]:
            raise UsageError(f"{name} must be (B, h, w) with B={images.shape[0]}, got {tuple(maps.shape)}")
    if labels is not None and len(labels) != images.shape[0]:
        raise UsageError(f"labels must name {images.shape[0]} images, got {len(labels)}")
    images = images.detach().float().cpu()
    size = images.shape[-2:]
    pixels = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    pixels = pixels.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    overlays = [_overlay(teacher_maps, size), _overlay(student_maps, size)]
    batch = images.shape[0]
    fig = Figure(figsize=(2.2 * batch + 1.0, 6.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, batch, squeeze=False)
    shown = None
    for col in range(batch):
        axes[0, col].imshow(pixels[col])
        axes[0, col].set_title(labels[col] if labels is not None else f"image {col}", fontsize="small")
        for row, (title, maps) in enumerate(zip(titles, overlays, strict=True), start=1):
            axes[row, col].imshow(pixels[col])
            shown = axes[row, col].imshow(maps[col].numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            axes[row, col].set_title(title, fontsize="small")
        for ax in axes[:, col]:
            ax.set_axis_off()
    fig.colorbar(shown, ax=axes[1:, :].ravel().tolist(), label="attention (scaled to [0, 1])")
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
