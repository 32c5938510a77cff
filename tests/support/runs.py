"""Tiny ``python -m kdfast.train`` runs the end-to-end tests share: the overrides that make a run fit a shared
2-core CPU, the command itself, and what a finished run is checked with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# A run small enough for a shared 2-core CPU: 16x16 digits, 64 training images, one epoch per stage.
TINY = [
    "data.image_size=16",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "data.max_train_samples=64",
    "data.max_val_samples=48",
    "teacher.arch.kwargs.image_size=16",
    "teacher.taps.vgg.path=vgg.features.13",
    "teacher.taps.vit.path=vit.encoder.layers.encoder_layer_3.self_attention",
    "student.taps.mid.path=blocks.2",
    "loss.agkd.grid=4",
    "teacher.train.epochs=1",
    "student.train.epochs=1",
    "runtime.progress=false",
    "runtime.tensorboard=false",
]

# A smaller budget for a ``configs/*_digits.yaml`` run at its own image size and taps: 64 training images, the
# teacher left untrained (a pipeline check), one student epoch, no baseline.
TINY_CONFIG = [
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "data.max_train_samples=64",
    "data.max_val_samples=48",
    "teacher.train.epochs=0",
    "student.train.epochs=1",
    "baseline=false",
    "runtime.progress=false",
    "runtime.tensorboard=false",
]


def set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def train(out: Path, overrides: list[str], config: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m kdfast.train`` of ``config`` (the embedded default when None) into ``out``."""
    chosen = ["--config", str(config)] if config is not None else []
    return subprocess.run(
        [sys.executable, "-m", "kdfast.train", *chosen, "--out", str(out), *set_args(overrides)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m module args`` in ``cwd`` with this checkout first on the import path, its output kept."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


def recompute_metrics(ckpt: dict, expect_images: int) -> tuple[torch.nn.Module, float, float, float]:
    """The checkpoint's model rebuilt and scored on its validation split with plain torch:
    (model, top-1 %, top-5 %, mean cross-entropy)."""
    from kdfast.data import dataset_from_record
    from kdfast.models import build_model

    model = build_model(ckpt["arch"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    val = dataset_from_record(ckpt["data"], "val")
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.tensor([val[i][1] for i in range(len(val))])
    assert len(labels) == expect_images
    with torch.no_grad():
        logits = model(images)
    top1 = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    top5 = 100.0 * (logits.topk(5, 1).indices == labels[:, None]).any(1).float().mean().item()
    return model, top1, top5, F.cross_entropy(logits, labels).item()


def distill_epoch_row(out: Path) -> dict:
    """The last training row of the distillation stage at epoch scope in ``out/metrics.jsonl``."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if (r["stage"], r["split"], r["scope"]) == ("distill", "train", "epoch")]
    return epochs[-1]
