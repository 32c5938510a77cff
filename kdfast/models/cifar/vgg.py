"""CIFAR VGGs with batch norm (Simonyan & Zisserman 2015, configurations A, B, D, E; VGG-8 is RepDistiller's
configuration "S", one conv per block): five blocks of 3x3 conv-BN-ReLU layers, 2x2 max pools after the
first three (the fourth pool of the ImageNet network is left out at 32x32, so the last two blocks run at
4x4), global average pool and one linear layer.

Module paths (``tap_points``) at 32x32 input:
  featI      ``blockI``        block I (0 ... 4) after its last ReLU: 32x32, 16x16, 8x8, 4x4, 4x4
  preactI    ``blockI.{3m-2}`` block I's last BN, before that ReLU (m convs in the block; I = 1 ... 4)
  embedding  ``embedding``     the pooled features before ``classifier``, (B, 512)
"""

from __future__ import annotations

import torch
from torch import nn

from kdfast.models.registry import register_model

# widths of the convolutions of each of the five blocks
CONFIGS = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _block(widths: list[int], c_in: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        c_in = width
    return nn.Sequential(*layers)


class CifarVGG(nn.Module):
    """VGG with batch norm for 32x32 inputs; ``config`` lists the conv widths of the five blocks."""

    def __init__(self, config: list[list[int]], num_classes: int = 100) -> None:
        super().__init__()
        c_in = 3
        for i, widths in enumerate(config):
            self.add_module(f"block{i}", _block(widths, c_in))
            c_in = widths[-1]
        for i in range(3):
            self.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.embedding = nn.Flatten(1)
        self.classifier = nn.Linear(c_in, num_classes)
        self.tap_points = {
            **{f"feat{i}": f"block{i}" for i in range(5)},
            **{f"preact{i}": f"block{i}.{3 * len(config[i]) - 2}" for i in range(1, 5)},
            "embedding": "embedding",
        }
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block4(self.block3(x))
        return self.classifier(self.embedding(self.pool4(x)))


@register_model
def vgg8(num_classes: int = 100) -> CifarVGG:
    """VGG-8 with BN (configuration "S"), 3.97M parameters at 100 classes (3,965,028; papers print 3.96M)."""
    return CifarVGG(CONFIGS["S"], num_classes)


@register_model
def vgg11(num_classes: int = 100) -> CifarVGG:
    """VGG-11 with BN (configuration "A"), 9.28M parameters at 100 classes."""
    return CifarVGG(CONFIGS["A"], num_classes)


@register_model
def vgg13(num_classes: int = 100) -> CifarVGG:
    """VGG-13 with BN (configuration "B"), 9.46M parameters at 100 classes."""
    return CifarVGG(CONFIGS["B"], num_classes)


@register_model
def vgg16(num_classes: int = 100) -> CifarVGG:
    """VGG-16 with BN (configuration "D"), 14.77M parameters at 100 classes. Unlike ``vgg16_bn_cifar``
    (torchvision's layers, all five max pools), the last two blocks run at 4x4 as in RepDistiller."""
    return CifarVGG(CONFIGS["D"], num_classes)


@register_model
def vgg19(num_classes: int = 100) -> CifarVGG:
    """VGG-19 with BN (configuration "E"), 20.09M parameters at 100 classes."""
    return CifarVGG(CONFIGS["E"], num_classes)
