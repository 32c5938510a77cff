"""A VGG-style network for small gray images (Fashion-MNIST's 28x28): stages of 3x3 conv-BN-ReLU layers
(Simonyan & Zisserman 2015, with batch normalization, Ioffe & Szegedy 2015), a 2x2 max-pool before every
stage but the first, global average pooling and one linear layer. ``widths`` lists the conv widths of each
stage, so a teacher and a student of the family differ only in those numbers: ``small_vgg_student`` and
``small_vgg_teacher`` are the Fashion-MNIST pair (``configs/benchmarks/fashion_mnist/``).

A conv's cost grows with its map: one narrow conv at full resolution and the wider ones after the pools
keep a 28x28 network cheap on a CPU.

Module paths (``tap_points``) at 28x28 input with three stages:
  featI      ``stages.I``   stage I's last ReLU: (B, widths[0][-1], 28, 28), (B, ..., 14, 14), (B, ..., 7, 7)
  embedding  ``embedding``  the pooled features before ``fc``, (B, widths[-1][-1])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kdfast.models.registry import register_model


class SmallVGG(nn.Module):
    """Stages of 3x3 conv-BN-ReLU (``widths[i]``: the conv widths of stage i), max-pool between stages."""

    def __init__(self, widths: Sequence[Sequence[int]], num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        if not widths or not all(widths):
            raise ValueError(f"small_vgg needs at least one stage of at least one conv, got widths={widths}")
        c_in = in_chans
        self.stages = nn.ModuleList()
        for index, stage in enumerate(widths):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if index else []
            for width in stage:
                layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                c_in = width
            self.stages.append(nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embedding = nn.Flatten(1)
        self.fc = nn.Linear(c_in, num_classes)
        self.tap_points = {
            **{f"feat{i}": f"stages.{i}" for i in range(len(widths))},
            "embedding": "embedding",
        }
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.fc(self.embedding(self.avgpool(x)))


# The Fashion-MNIST comparison's pair (configs/benchmarks/fashion_mnist/cnn_pair.yaml): the student stays
# under the dataset table's 100k parameters; the teacher is wider after the first stage.
STUDENT_WIDTHS = ((24,), (48, 48), (64, 64))
TEACHER_WIDTHS = ((32,), (64, 64), (128, 128))


@register_model
def small_vgg_student(num_classes: int = 10, in_chans: int = 3) -> SmallVGG:
    """24 | 48 48 | 64 64: 97,410 parameters at 10 classes."""
    return SmallVGG(STUDENT_WIDTHS, num_classes, in_chans)


@register_model
def small_vgg_teacher(num_classes: int = 10, in_chans: int = 3) -> SmallVGG:
    """32 | 64 64 | 128 128: 279,466 parameters at 10 classes."""
    return SmallVGG(TEACHER_WIDTHS, num_classes, in_chans)
