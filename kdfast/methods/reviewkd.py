"""ReviewKD: knowledge review (Chen, Liu, Zhao & Jia, CVPR 2021, "Distilling Knowledge via Knowledge
Review", arXiv:2104.09044), as the authors' code and mdistiller implement it.

Numbering used in the docstrings (Sec. 3):
  (1) the review path: the student's features F_1 ... F_n of the ``pairs`` (shallowest first) are fused from
      the deepest one back: (Y_n, R_n) = ABF_n(F_n), then (Y_i, R_i) = ABF_i(F_i, R_{i+1}) for i = n-1 ... 1;
      Y_i is compared with the teacher's feature T_i of the same pair
  (2) ABF, attention based fusion: X = BN(conv1x1(F_i)) at the middle width; the deeper residual R, upsampled
      (nearest) to X's grid, and X give two attention maps A = sigmoid(conv1x1([X, R])) (2 channels), and
      X <- A_0 X + A_1 R; X is resized (nearest) to T_i's grid, Y_i = BN(conv3x3(X)) at T_i's width, R_i = X
  (3) HCL, hierarchical context loss: per pair, MSE(Y, T) plus MSE after adaptive average pooling of both to
      4x4, 2x2 and 1x1 (a level not smaller than the map's height is skipped, as mdistiller's ``hcl_loss``
      reads only H: on a non-square map the width does not decide), weighted 1, 1/2, 1/4, 1/8 in the order
      the levels are used, divided by the sum of the weights used
  (4) the term: sum over pairs of (3), times the warm-up min(e / warmup, 1) of epoch e counted from 1
      (:func:`kdfast.methods.base.warmup_factor`)
The published runs: CE + 5 L with a 20-epoch warm-up on CIFAR-100 (mdistiller's config and the authors'
script; the script uses 8 for a ShuffleNetV2 student); CE + 1 L with a 1-epoch warm-up on ImageNet. The
student's features are its stages after their activation plus its pooled embedding (as a 1 x 1 map); the
teacher's, its stages before their last activation (``preactI`` in the CIFAR zoo) plus its embedding. The
channel counts of every ABF come from the tapped shapes at the probe forward (:meth:`ReviewKDLoss.check`),
so any pair of CNNs (or ViT tokens, read on their patch grid) works without a table; the middle width is
min(``max_mid_channels``, the deepest student feature's width), at most 512 as in both implementations. The
ABF modules live in the loss module: they train with the student and never reach ``student.pt``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.config import TapConfig
from kdfast.errors import UsageError
from kdfast.methods.base import Batch, DistillationLoss, FeaturePair, Term, require_pairs, warmup_factor
from kdfast.methods.features import pair_maps
from kdfast.methods.registry import Method, TeacherCache
from kdfast.schema import positive

HCL_LEVELS = (4, 2, 1)  # eq. 3: the pyramid's pooled grids, finest first


def hcl_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 3 for one pair of (B, C, H, W) maps of one shape, in float32 at least: (MSE + sum_k w_k
    MSE(pool_l_k(student), pool_l_k(teacher))) / (1 + sum_k w_k) over the levels l_k of HCL_LEVELS smaller
    than H (mdistiller's rule, also on a non-square map: an 8 x 4 map is pooled to 4 x 4, 2 x 2 and 1 x 1),
    w_k = 2^-k (k = 1, 2, ... in the order used), each pool l_k x l_k. Scalar."""
    if student.shape != teacher.shape:
        raise UsageError(
            f"ReviewKD: the student's fused map {tuple(student.shape)} and the teacher's map "
            f"{tuple(teacher.shape)} differ in shape"
        )
    dtype = torch.promote_types(student.dtype, torch.float32)
    student, teacher = student.to(dtype), teacher.to(dtype)
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for level in HCL_LEVELS:
        if level >= student.shape[2]:
            continue
        weight /= 2
        pooled = (F.adaptive_avg_pool2d(x, level) for x in (student, teacher))
        loss = loss + weight * F.mse_loss(*pooled)
        total += weight
    return loss / total


class ABF(nn.Module):
    """Eq. 2: attention based fusion of one student feature (``in_channels``) with the residual of the deeper
    ABF (``mid_channels``; none for the deepest, ``fuse`` False), giving the map compared with a teacher
    feature of ``out_channels`` and the residual passed on. Convolutions as the authors': 1x1 and 3x3
    without bias, each followed by BatchNorm, kaiming-uniform (a = 1) initialized."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels)
        )
        self.output = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.attention = nn.Conv2d(2 * mid_channels, 2, 1) if fuse else None
        for conv in (self.reduce[0], self.output[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)

    def forward(
        self, feature: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Y, R) of eq. 2 for a (B, C_in, H, W) student feature, the deeper residual (None for the deepest
        ABF) and the teacher's grid ``out_size``."""
        x = self.reduce(feature)
        if self.attention is not None:
            residual = F.interpolate(residual, size=x.shape[2:], mode="nearest")
            weights = torch.sigmoid(self.attention(torch.cat([x, residual], dim=1)))
            x = x * weights[:, :1] + residual * weights[:, 1:]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.output(x), x


def review(
    abfs: Sequence[ABF], features: Sequence[torch.Tensor], out_sizes: Sequence[tuple[int, int]]
) -> list[torch.Tensor]:
    """Eq. 1: the fused maps Y_1 ... Y_n (shallowest first) of the student's ``features`` (shallowest first)
    through their ``abfs``, the deepest first, each at its teacher grid in ``out_sizes``."""
    fused: list[torch.Tensor] = []
    residual = None
    for abf, feature, size in zip(reversed(abfs), reversed(features), reversed(out_sizes), strict=True):
        out, residual = abf(feature, residual, size)
        fused.append(out)
    return fused[::-1]


@dataclass
class ReviewKDConfig:
    """``loss.reviewkd``: weight * warm-up * sum over ``pairs`` (shallowest first; the review path runs from
    the last) of HCL (eq. 3) between the ABF-fused student map (eq. 1, 2) and the teacher's feature. Defaults
    as mdistiller's (weight 1, warm-up 20 epochs, middle width at most 512); for CIFAR-100 its config and the
    authors' script set weight 5 (the script 8 for a ShuffleNetV2 student), for ImageNet warm-up 1."""

    weight: float = 1.0
    warmup: int = 20
    max_mid_channels: int = 512
    pairs: list[FeaturePair] = field(default_factory=list)


def validate(
    cfg: ReviewKDConfig,
    student_taps: Mapping[str, TapConfig],
    teacher_taps: Mapping[str, TapConfig],
    where: str = "loss.reviewkd",
) -> None:
    """At least one pair of feature taps; warm-up epochs >= 0; a positive middle width."""
    require_pairs(cfg.pairs, student_taps, teacher_taps, f"{where}.pairs")
    positive(cfg.warmup, f"{where}.warmup", allow_zero=True)
    positive(cfg.max_mid_channels, f"{where}.max_mid_channels")


class ReviewKDLoss(DistillationLoss):
    """Eq. 4: warm-up * sum over pairs of HCL(Y_i, T_i), the teacher's features detached. ``forward`` returns
    (term, parts), one part per pair, named "<student tap>-<teacher tap>" (each times the warm-up), summing to
    the term. :meth:`check` on a real batch builds the ABFs from the tapped shapes. The warm-up factor is a
    buffer that :meth:`start_epoch` sets, so a compiled step reads the new value without recompiling."""

    cfg: ReviewKDConfig
    abfs: nn.ModuleList

    def setup(self, student_taps: Mapping[str, TapConfig], teacher_taps: Mapping[str, TapConfig]) -> None:
        self.register_buffer("warmup", torch.tensor(warmup_factor(0, self.cfg.warmup)), persistent=False)

    def check(self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]) -> None:
        """UsageError when a pair's batch sizes differ or its channel counts are not those the ABFs were
        built for; on the first call, build one ABF per pair: (student channels, middle width, teacher
        channels), fusing for every pair but the deepest."""
        maps = pair_maps(self.cfg.pairs, student_taps, teacher_taps, "reviewkd")
        channels = [(student.shape[1], teacher.shape[1]) for _, student, teacher in maps]
        mid, last = min(self.cfg.max_mid_channels, channels[-1][0]), len(channels) - 1
        abfs = lambda: nn.ModuleList(ABF(s, mid, t, fuse=i < last) for i, (s, t) in enumerate(channels))
        self.build_once(
            channels,
            lambda: {"abfs": abfs()},
            maps[0][1].device,
            "loss.reviewkd: the ABFs were built for (student, teacher) channels",
        )

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Eq. 4: the warm-up factor of this epoch (the stage's length does not enter it)."""
        self.warmup.fill_(warmup_factor(epoch, self.cfg.warmup))

    def term(self, batch: Batch) -> Term:
        self.require_built("ABFs")
        names, students, teachers = zip(
            *pair_maps(self.cfg.pairs, batch.student_taps, batch.teacher_taps, "reviewkd"), strict=True
        )
        fused = review(self.abfs, students, [tuple(t.shape[2:]) for t in teachers])
        parts = {
            name: self.warmup * hcl_loss(y, t) for name, y, t in zip(names, fused, teachers, strict=True)
        }
        return sum(parts.values()), parts


METHOD = Method(
    name="reviewkd",
    schema=ReviewKDConfig,
    validate=validate,
    loss=ReviewKDLoss,
    paper="Chen, Liu, Zhao & Jia 2021, Distilling Knowledge via Knowledge Review (CVPR, arXiv:2104.09044)",
    logits="none",
    teacher_cache=TeacherCache(reads=("features",)),
)
