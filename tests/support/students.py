"""Students trained on scikit-learn's digits, as test fixtures that look like real exports: non-zero biases,
BatchNorm statistics of real data, a real accuracy (the all-zero-bias fixture of an untrained network is
what once hid int32 bias quantization from the INT8 tests)."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from kdfast.checkpoint import save_checkpoint
from kdfast.data import dataset_from_record
from kdfast.models import build_model

CLASSES = [str(i) for i in range(10)]
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def digits_record(max_val: int = 12, max_train: int = 16) -> dict:
    return {
        "name": "digits",
        "root": None,
        "image_size": 32,
        "val_fraction": 0.2,
        "seed": 0,
        "max_val_samples": max_val,
        "max_train_samples": max_train,
        "mean": MEAN,
        "std": STD,
        "classes": CLASSES,
    }


def write_student(
    path: Path,
    name: str = "test_efficientnet",
    kwargs: dict | None = None,
    model: nn.Module | None = None,
    **overrides,
) -> tuple[Path, nn.Module]:
    """A timm student on digits at 32x32, as kdfast.train would write it."""
    arch = {"source": "timm", "name": name, "kwargs": kwargs or {}}
    torch.manual_seed(0)
    if model is None:
        model = timm.create_model(name, num_classes=len(CLASSES), **(kwargs or {})).eval()
    fields = dict(
        arch=arch,
        input={"size": [3, 32, 32], "mean": MEAN, "std": STD},
        classes=CLASSES,
        data=digits_record(),
        metrics={"val_accuracy": 0.5},
        config={"seed": 0},
    )
    fields.update(overrides)
    save_checkpoint(path, model, **fields)
    return path, model


EDGE_CNN = {"source": "kdfast", "name": "edge_cnn", "kwargs": {"num_classes": 10}}


def train_on_digits(
    model: nn.Module,
    *,
    epochs: int,
    images: int | None = None,
    lr: float = 3e-3,
    batch: int = 32,
    seed: int = 0,
) -> nn.Module:
    """Plain cross-entropy training on ``images`` digits training images (all 1437 by default), 32x32."""
    torch.manual_seed(seed)
    data = dataset_from_record(digits_record(max_val=None, max_train=images), "train")
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.as_tensor(data.targets)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for i in range(0, len(images), batch):
            idx = order[i : i + batch]
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def save_student(
    path: Path, model: nn.Module, arch: dict, *, max_val: int = 96, max_train: int = 128
) -> Path:
    """``model`` as kdfast.train writes a student; the data record limits the images export will load."""
    save_checkpoint(
        path,
        model,
        arch=arch,
        input={"size": [3, 32, 32], "mean": MEAN, "std": STD},
        classes=CLASSES,
        data=digits_record(max_val=max_val, max_train=max_train),
        metrics={},
        config={"seed": 0},
    )
    return path


def qad_source(path: Path) -> Path:
    """The student QAD starts from: an edge_cnn trained 2 epochs on 720 digits images, its data record
    limited to 128 training and 96 validation images so QAD runs in seconds."""
    torch.manual_seed(0)
    model = train_on_digits(build_model(EDGE_CNN), epochs=2, images=720)
    return save_student(path, model, EDGE_CNN)
