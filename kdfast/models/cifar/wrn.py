"""Wide residual networks (Zagoruyko & Komodakis 2016, "Wide Residual Networks", Table 1): WRN-d-k has a
16-wide 3x3 stem and three groups of n = (d - 4) / 6 pre-activation blocks of widths 16k, 32k, 64k at 32x32,
16x16 and 8x8, then BN-ReLU, global average pool and one linear layer.

Module paths (``tap_points``) at 32x32 input:
  feat0      ``conv1``               the stem convolution, (B, 16, 32, 32)
  featI      ``blockI``              group I (1, 2, 3): 32x32, 16x16, 8x8 (pre-activation blocks end on a sum)
  preact1    ``block2.layer.0.bn1``  BN of group 1's output, as group 2 normalizes it before its ReLU
  preact2    ``block3.layer.0.bn1``  BN of group 2's output, likewise
  preact3    ``bn1``                 the final BN of group 3's output, before the last ReLU
  embedding  ``embedding``           the pooled features before ``fc``, (B, 64k)
"""

from __future__ import annotations

import torch
from torch import nn

from kdfast.models.registry import register_model


class BasicBlock(nn.Module):
    """Pre-activation block (WRN eq. 1 with B(3, 3)): x + conv(relu(BN(conv(relu(BN(x)))))); when the width
    or stride changes, the shortcut is a 1x1 conv of relu(BN(x)) instead of x."""

    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(drop_rate)
        self.equal_in_out = c_in == c_out
        # RepDistiller's name, kept so its checkpoints load
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(activated)))))
        return (x if self.equal_in_out else self.convShortcut(activated)) + out


class NetworkBlock(nn.Module):
    """One group: ``layer``, a Sequential of ``n`` blocks, the first one changing width and stride."""

    def __init__(self, n: int, c_in: int, c_out: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` (depth = 6n + 4) for 32x32 inputs."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a wide ResNet has depth 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embedding = nn.Flatten(1)
        self.fc = nn.Linear(widths[3], num_classes)
        self.tap_points = {
            "feat0": "conv1",
            **{f"feat{i}": f"block{i}" for i in (1, 2, 3)},
            "preact1": "block2.layer.0.bn1",
            "preact2": "block3.layer.0.bn1",
            "preact3": "bn1",
            "embedding": "embedding",
        }
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.embedding(self.avgpool(self.relu(self.bn1(x)))))


@register_model
def wrn_16_1(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-16-1, 0.18M parameters at 100 classes."""
    return WideResNet(16, 1, num_classes, drop_rate)


@register_model
def wrn_16_2(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-16-2, 0.70M parameters at 100 classes."""
    return WideResNet(16, 2, num_classes, drop_rate)


@register_model
def wrn_40_1(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-40-1, 0.57M parameters at 100 classes."""
    return WideResNet(40, 1, num_classes, drop_rate)


@register_model
def wrn_40_2(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-40-2, 2.26M parameters at 100 classes (2,255,156; papers print 2.25M)."""
    return WideResNet(40, 2, num_classes, drop_rate)
