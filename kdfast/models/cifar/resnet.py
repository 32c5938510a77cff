"""CIFAR ResNets (He et al. 2016, "Deep Residual Learning for Image Recognition", Sec. 4.2): a 3x3 stem and
three stages of n basic blocks at 32x32, 16x16 and 8x8, depth = 6n + 2, global average pool, one linear
layer. ``resnet8x4`` / ``resnet32x4`` are RepDistiller's four-times-wider variants (stage widths 64, 128,
256 after a 32-wide stem instead of 16, 32, 64 after 16).

Module paths (``tap_points``) at 32x32 input, n blocks per stage:
  feat0      ``relu``                 the stem after its ReLU, (B, w0, 32, 32)
  featI      ``layerI``               stage I (1, 2, 3) after its last ReLU: 32x32, 16x16, 8x8
  preactI    ``layerI.{n-1}.preact``  stage I's last block before its ReLU (the residual sum)
  embedding  ``embedding``            the pooled features before ``fc``, (B, w3)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.models.registry import register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and the identity (or a 1x1 conv-BN projection when the shape changes):
    relu(BN(conv(relu(BN(conv(x))))) + shortcut(x)); ``preact`` is the sum before that last ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.preact(out + shortcut))


class CifarResNet(nn.Module):
    """ResNet-(6n + 2) for 32x32 inputs with stem width ``widths[0]`` and stage widths ``widths[1:]``."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet of basic blocks has depth 6n + 2, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        c_in = widths[0]
        for i, (width, stride) in enumerate(zip(widths[1:], (1, 2, 2), strict=True), start=1):
            layers = [
                BasicBlock(c_in if b == 0 else width, width, stride if b == 0 else 1) for b in range(blocks)
            ]
            self.add_module(f"layer{i}", nn.Sequential(*layers))
            c_in = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embedding = nn.Flatten(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.tap_points = {
            "feat0": "relu",
            **{f"feat{i}": f"layer{i}" for i in (1, 2, 3)},
            **{f"preact{i}": f"layer{i}.{blocks - 1}.preact" for i in (1, 2, 3)},
            "embedding": "embedding",
        }
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.embedding(self.avgpool(x)))


NARROW = (16, 16, 32, 64)
WIDE = (32, 64, 128, 256)


@register_model
def resnet8(num_classes: int = 100) -> CifarResNet:
    """ResNet-8 (one block per stage), 0.08M parameters at 100 classes."""
    return CifarResNet(8, NARROW, num_classes)


@register_model
def resnet14(num_classes: int = 100) -> CifarResNet:
    """ResNet-14, 0.18M parameters at 100 classes."""
    return CifarResNet(14, NARROW, num_classes)


@register_model
def resnet20(num_classes: int = 100) -> CifarResNet:
    """ResNet-20, 0.28M parameters at 100 classes."""
    return CifarResNet(20, NARROW, num_classes)


@register_model
def resnet32(num_classes: int = 100) -> CifarResNet:
    """ResNet-32, 0.47M parameters at 100 classes."""
    return CifarResNet(32, NARROW, num_classes)


@register_model
def resnet44(num_classes: int = 100) -> CifarResNet:
    """ResNet-44, 0.67M parameters at 100 classes."""
    return CifarResNet(44, NARROW, num_classes)


@register_model
def resnet56(num_classes: int = 100) -> CifarResNet:
    """ResNet-56, 0.86M parameters at 100 classes."""
    return CifarResNet(56, NARROW, num_classes)


@register_model
def resnet110(num_classes: int = 100) -> CifarResNet:
    """ResNet-110, 1.74M parameters at 100 classes."""
    return CifarResNet(110, NARROW, num_classes)


@register_model
def resnet8x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-8 four times as wide (stem 32, stages 64/128/256), 1.23M parameters at 100 classes."""
    return CifarResNet(8, WIDE, num_classes)


@register_model
def resnet32x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-32 four times as wide (stem 32, stages 64/128/256), 7.43M parameters at 100 classes."""
    return CifarResNet(32, WIDE, num_classes)
