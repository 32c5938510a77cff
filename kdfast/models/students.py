"""Small edge students: plain conv / BN / ReLU / add, so ONNX export and INT8 quantization need no
special handling."""

from __future__ import annotations

import torch
from torch import nn

from kdfast.models.registry import register_model


def _conv_bn(
    c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """MobileNetV2 inverted residual (Sandler et al. 2018, Table 1): 1x1 expand, 3x3 depthwise, 1x1 linear
    projection; the identity is added when shape allows. ``expand=1`` is a depthwise-separable block."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        expand_layer = [_conv_bn(c_in, hidden)] if expand != 1 else []
        self.block = nn.Sequential(
            *expand_layer,
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, c_out, act=False),
        )
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class EdgeCNN(nn.Module):
    """A ~75k-parameter MBConv student: 32x32 -> 16x16 -> 8x8 (``blocks.2``, the tap point) -> 4x4."""

    def __init__(self, num_classes: int, in_chans: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        self.stem = _conv_bn(in_chans, 16, 3)
        self.blocks = nn.Sequential(
            MBConv(16, 24, stride=2, expand=1),
            MBConv(24, 32, stride=2, expand=4),
            MBConv(32, 32, stride=1, expand=4),
            MBConv(32, 64, stride=2, expand=4),
            MBConv(64, 64, stride=1, expand=4),
        )
        self.head = _conv_bn(64, 128)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.dropout(self.pool(x).flatten(1)))


@register_model
def edge_cnn(num_classes: int = 10, in_chans: int = 3, dropout: float = 0.1) -> EdgeCNN:
    """The embedded default's student (tap ``blocks.2``: an 8x8 map at 32x32 input)."""
    return EdgeCNN(num_classes, in_chans, dropout)
