"""MobileNetV2 as the CIFAR distillation benchmarks use it (Sandler et al. 2018, Table 2, at width multiplier
0.5 with expansion t = 6; RepDistiller's ``mobile_half``): a stride-2 3x3 stem (32x32 -> 16x16), the seven
inverted-residual stages of Table 2 (strides 1, 1, 2, 2, 1, 2, 1: the second stage keeps stride 1), a 1x1
conv to 1280 channels, global average pool and one linear layer. Each inverted residual keeps its 1x1
expansion conv even where t = 1, as the reference does.

Module paths (``tap_points``) at 32x32 input:
  feat0      ``conv1``      the stem, (B, 16, 16, 16)
  feat1      ``blocks.1``   (B, 12, 16, 16)
  feat2      ``blocks.2``   (B, 16, 8, 8)
  feat3      ``blocks.4``   (B, 48, 4, 4)
  feat4      ``blocks.6``   (B, 160, 2, 2)
  embedding  ``embedding``  the pooled 1x1-conv features before ``classifier``, (B, 1280)
"""

from __future__ import annotations

import torch
from torch import nn

from kdfast.models.registry import register_model

# Table 2's output channels c, repeats n and first stride s per stage (the second keeps stride 1 here)
STAGES = [(16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1)]


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(c_out), nn.ReLU()]


class InvertedResidual(nn.Module):
    """1x1 expansion to t * c_in, 3x3 depthwise (stride s), 1x1 linear projection (Sandler et al. Table 1);
    the input is added when stride is 1 and the width is unchanged."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.conv = nn.Sequential(
            *_conv_bn_relu(c_in, hidden, 1),
            *_conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.use_res_connect = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 at width ``width`` and expansion ``expand`` for 32x32 inputs (1280 final channels at
    width <= 1, scaled above)."""

    def __init__(self, num_classes: int = 100, width: float = 0.5, expand: int = 6) -> None:
        super().__init__()
        c_in = int(32 * width)
        self.conv1 = nn.Sequential(*_conv_bn_relu(3, c_in, 3, 2))
        self.blocks = nn.ModuleList()
        for index, (c, n, s) in enumerate(STAGES):
            c_out = int(c * width)
            t = 1 if index == 0 else expand  # Table 2: the first bottleneck does not expand
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
            self.blocks.append(nn.Sequential(*stage))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = nn.Sequential(*_conv_bn_relu(c_in, last, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embedding = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        self.tap_points = {
            "feat0": "conv1",
            "feat1": "blocks.1",
            "feat2": "blocks.2",
            "feat3": "blocks.4",
            "feat4": "blocks.6",
            "embedding": "embedding",
        }
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(self.embedding(self.avgpool(self.conv2(x))))


@register_model(name="MobileNetV2")
def mobilenetv2_cifar(num_classes: int = 100) -> CifarMobileNetV2:
    """RepDistiller's / mdistiller's ``MobileNetV2`` (``mobile_half``: width 0.5, t = 6), 0.81M parameters at
    100 classes."""
    return CifarMobileNetV2(num_classes)
