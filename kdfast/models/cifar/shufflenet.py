"""CIFAR ShuffleNets as RepDistiller defines them: ShuffleNet V1 (Zhang et al. 2018, "ShuffleNet", Table 1 at
g = 3: stages of 240, 480, 960 channels with 4, 8, 4 units) and ShuffleNet V2 (Ma et al. 2018, "ShuffleNet
V2", Table 5 at 1x: stages of 116, 232, 464 channels with 3, 7, 3 units after a downsampling unit, then a
1x1 conv to 1024). Both start with a 1x1 conv to 24 channels at full 32x32 resolution (no stride, no max
pool), so the three stages run at 16x16, 8x8 and 4x4.

Module paths (``tap_points``) at 32x32 input, the stage's last unit at index k:
  feat0      ``relu``               the stem after its ReLU, (B, 24, 32, 32)
  featI      ``layerI``             stage I (1, 2, 3) after its last ReLU (V2: and channel shuffle)
  preactI    ``layerI.{k}.preact``  stage I's last unit before that ReLU (V2: before the shuffle)
  embedding  ``embedding``          the pooled features before ``linear``: (B, 960) V1, (B, 1024) V2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.models.registry import register_model


class ShuffleBlock(nn.Module):
    """Channel shuffle (ShuffleNet Sec. 3.1): (B, g * n, H, W) -> view (B, g, n) -> transpose -> flatten."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        g = self.groups
        return x.reshape(batch, g, channels // g, height, width).transpose(1, 2).reshape(x.shape)


class Bottleneck(nn.Module):
    """ShuffleNet V1 unit (Fig. 2 b/c): 1x1 group conv, shuffle, 3x3 depthwise (stride s), 1x1 group conv;
    added to the input, or at stride 2 concatenated with its 3x3 average pool. The first unit after the
    24-channel stem uses a plain 1x1 conv (too few input channels to group)."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = c_out // 4
        g = 1 if c_in == 24 else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ShuffleBlock(g)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, 2, 1)) if stride == 2 else nn.Sequential()
        self.preact = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        residual = self.shortcut(x)
        return F.relu(self.preact(torch.cat([out, residual], 1) if self.stride == 2 else out + residual))


class ShuffleNetV1(nn.Module):
    """ShuffleNet V1 for 32x32 inputs: each stage's first unit has stride 2 and ``widths[i] - c_in`` outputs
    (its concatenation with the pooled input restores ``widths[i]``)."""

    def __init__(
        self, widths: tuple[int, ...], units: tuple[int, ...], groups: int, num_classes: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        c_in = 24
        for i, (width, n) in enumerate(zip(widths, units, strict=True), start=1):
            layers = [Bottleneck(c_in, width - c_in, 2, groups)]
            layers += [Bottleneck(width, width, 1, groups) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*layers))
            c_in = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embedding = nn.Flatten(1)
        self.linear = nn.Linear(widths[-1], num_classes)
        self.tap_points = _tap_points([n - 1 for n in units])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.embedding(self.avgpool(x)))


class DownBlock(nn.Module):
    """ShuffleNet V2 spatial down-sampling unit (Fig. 3 d): both branches stride 2 (left: 3x3 depthwise,
    1x1; right: 1x1, 3x3 depthwise, 1x1), each to half the output channels, concatenated and shuffled."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_out // 2
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return self.shuffle(torch.cat([left, right], 1))


class BasicBlock(nn.Module):
    """ShuffleNet V2 basic unit (Fig. 3 c): channel split in halves; the second half goes through 1x1,
    3x3 depthwise, 1x1; the halves are concatenated and shuffled. ``preact`` is the concatenation before
    the branch's last ReLU; the kept half is already non-negative, so one ReLU of the whole concatenation
    is the reference's ReLU of the branch alone."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.half = channels // 2
        c = channels - self.half
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.preact = nn.Identity()
        self.shuffle = ShuffleBlock(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, branch = x[:, : self.half], x[:, self.half :]
        branch = self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(branch)))))))
        return self.shuffle(F.relu(self.preact(torch.cat([kept, branch], 1))))


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2 for 32x32 inputs: per stage a down-sampling unit and ``units[i]`` basic units, then a
    1x1 conv-BN-ReLU to ``widths[-1]`` channels."""

    def __init__(self, widths: tuple[int, ...], units: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        c_in = 24
        for i, (width, n) in enumerate(zip(widths[:3], units, strict=True), start=1):
            self.add_module(
                f"layer{i}", nn.Sequential(DownBlock(c_in, width), *(BasicBlock(width) for _ in range(n)))
            )
            c_in = width
        self.conv2 = nn.Conv2d(c_in, widths[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.embedding = nn.Flatten(1)
        self.linear = nn.Linear(widths[3], num_classes)
        self.tap_points = _tap_points(list(units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(self.embedding(self.avgpool(x)))


def _tap_points(last_units: list[int]) -> dict[str, str]:
    return {
        "feat0": "relu",
        **{f"feat{i}": f"layer{i}" for i in (1, 2, 3)},
        **{f"preact{i}": f"layer{i}.{k}.preact" for i, k in enumerate(last_units, start=1)},
        "embedding": "embedding",
    }


@register_model(name="ShuffleV1")
def shufflenet_v1_cifar(num_classes: int = 100) -> ShuffleNetV1:
    """RepDistiller's ``ShuffleV1`` (g = 3), 0.95M parameters at 100 classes."""
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, num_classes)


@register_model(name="ShuffleV2")
def shufflenet_v2_cifar(num_classes: int = 100) -> ShuffleNetV2:
    """RepDistiller's ``ShuffleV2`` (1x), 1.36M parameters at 100 classes (1,355,528; papers print 1.35M)."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes)
