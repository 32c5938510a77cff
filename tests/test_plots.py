"""kdfast.plots writes real PNG files (checked by opening them with PIL) and rejects bad input clearly."""

import json

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from kdfast.errors import UsageError
from kdfast.plots import (
    _plot_losses,
    background_cells,
    background_share,
    plot_attention_grid,
    plot_training_curves,
)


def _metrics(path):
    rows = []
    for stage in ("teacher", "distill"):
        for epoch in range(3):
            for step in range(2):
                rows.append(
                    {
                        "stage": stage,
                        "epoch": epoch,
                        "step": epoch * 2 + step,
                        "split": "train",
                        "loss": 2.0 / (epoch + 1) + 0.1 * step,
                        "lr": 1e-3,
                        "top1": None,
                        "top5": None,
                        "parts": {"kd": 1.0 / (epoch + 1), "attention": 0.5},
                        "images_per_s": 100.0,
                    }
                )
            rows.append(
                {
                    "stage": stage,
                    "epoch": epoch,
                    "step": epoch * 2 + 1,
                    "split": "val",
                    "loss": 1.0,
                    "lr": 1e-3,
                    "top1": 0.5 + 0.1 * epoch,
                    "top5": 0.9,
                    "parts": {},
                    "images_per_s": 0.0,
                }
            )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _pixels(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_training_curves_png_has_one_panel_per_stage(tmp_path):
    _metrics(tmp_path / "metrics.jsonl")
    out = tmp_path / "plots" / "curves.png"
    plot_training_curves(tmp_path / "metrics.jsonl", out)
    pixels = _pixels(out)
    # 5.5 x 4 inches per stage at 100 dpi: two stages -> 1100 x 400 pixels
    assert pixels.shape == (400, 1100, 3)
    assert pixels.std() > 0


def test_training_curves_bad_input(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "c.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"stage": "teacher", "epoch": 0, "split": "train", "loss": 1.0}\nnot json\n')
    with pytest.raises(UsageError, match="line 2"):
        plot_training_curves(bad, tmp_path / "c.png")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UsageError, match="no metrics rows"):
        plot_training_curves(tmp_path / "empty.jsonl", tmp_path / "c.png")


def test_ce_only_stage_draws_the_total_once_named_after_its_one_part():
    fig = Figure()
    ce_only, distill = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    epochs = [1, 2, 3]
    _plot_losses(ce_only, {"loss": (epochs, [2.0, 1.0, 0.5]), "ce": (epochs, [2.0, 1.0, 0.5])})
    _plot_losses(
        distill,
        {"loss": (epochs, [3.0, 2.0, 1.0]), "ce": (epochs, [1.0, 0.5, 0.2]), "kd": (epochs, [2.0, 1.5, 0.8])},
    )
    assert [line.get_label() for line in ce_only.get_lines()] == ["train loss (= ce)"]
    assert [line.get_label() for line in distill.get_lines()] == ["train loss", "train ce", "train kd"]
    assert distill.get_lines()[0].get_linewidth() > distill.get_lines()[1].get_linewidth()


def test_background_cells_and_the_share_of_mass_on_them():
    # a black image with a white square in its top-left quarter, and a grey one with a dark bar on the right
    digit = torch.zeros(1, 3, 8, 8)
    digit[..., :4, :4] = 1.0
    grey = torch.full((1, 3, 8, 8), 0.5)
    grey[..., :, 6:] = 0.0
    background = background_cells(torch.cat([digit, grey]), (2, 2))
    assert background.tolist() == [[[False, True], [True, True]], [[True, False], [True, False]]]
    # mass 0.7 on the object cell and 0.1 on each other cell: 30% on background; uniform: 75% and 50%
    maps = torch.tensor([[[7.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    assert background_share(maps, background) == pytest.approx((0.3 + 0.5) / 2)


def test_attention_grid_png(tmp_path):
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.2, 0.2]
    images = torch.randn(3, 3, 16, 16)
    rows = [
        ("teacher vgg", torch.rand(3, 4, 4)),
        ("teacher vit", torch.rand(3, 4, 4)),
        ("student", torch.rand(3, 8, 8)),
    ]
    out = tmp_path / "attention.png"
    plot_attention_grid(images, mean, std, rows, out, labels=["a", "b", "c"], title="three rows")
    pixels = _pixels(out)
    # about (1.7 per image + 3.2) x (1.75 per row + 0.6) inches at 100 dpi, cut to what is drawn
    assert 650 < pixels.shape[1] < 950 and 600 < pixels.shape[0] < 850
    assert pixels.std() > 0


def test_attention_grid_rejects_mismatched_maps(tmp_path):
    images = torch.randn(2, 3, 8, 8)
    with pytest.raises(UsageError, match="'student'"):
        plot_attention_grid(
            images,
            [0.5] * 3,
            [0.5] * 3,
            [("teacher", torch.rand(2, 4, 4)), ("student", torch.rand(3, 4, 4))],
            tmp_path / "a.png",
        )
    with pytest.raises(UsageError, match="labels"):
        plot_attention_grid(
            images,
            [0.5] * 3,
            [0.5] * 3,
            [("teacher", torch.rand(2, 4, 4))],
            tmp_path / "a.png",
            labels=["only one"],
        )
    assert not (tmp_path / "a.png").exists()
