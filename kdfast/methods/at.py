"""AT: attention transfer (Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention: Improving
the Performance of Convolutional Neural Networks via Attention Transfer", arXiv:1612.03928).

Numbering used in the docstrings (Sec. 3.1):
  (1) the activation-based spatial attention map of a (C, H, W) feature F: F^p_sum = sum_c |F_c|^p
      (p = 2 in the paper's experiments), Q = vec(F^p_sum), of length H W
  (2) L_AT = L_CE + beta / 2 sum_j || Q_S^j / ||Q_S^j||_2 - Q_T^j / ||Q_T^j||_2 ||_p over the layer pairs j
      (the paper's eq. 2, with p = 2)
The distance used here is the one of the authors' code and of mdistiller: the squared difference of the
normalized maps averaged over the batch and the map positions,
  L_pair = 1 / (B h w) sum_b || q_S,b - q_T,b ||_2^2,  q = Q / ||Q||_2,
summed over the pairs. The factor in front is ``loss.at.weight``: mdistiller's 1000 (its FEAT_WEIGHT, the
paper's beta = 10^3 without the 1/2); the authors' code multiplies by beta / 2 = 500.

Channel mean instead of sum: the map comes from :func:`kernels.attention_map` (the Triton kernel on the GPU),
which takes mean_c |F_c|^p = F^p_sum / C. The L2 normalization in (2) divides that constant 1/C out, so the
normalized maps, and the loss, are the same as with the sum.

Different spatial sizes: both maps are compared on the smaller grid (the smaller height and the smaller
width), the larger map resized bilinearly (``align_corners=False``) by the same kernel before normalization.
mdistiller instead average-pools the larger feature before forming its map; for a 2x ratio the bilinear
resize is the 2 x 2 average of the map, of |F|^p rather than of F.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

import kernels
from kdfast.config import TapConfig
from kdfast.errors import UsageError
from kdfast.methods.base import Batch, DistillationLoss, FeaturePair, Term, require_pairs
from kdfast.methods.features import pair_maps
from kdfast.methods.registry import Method, TeacherCache
from kdfast.schema import positive


def common_grid(student: torch.Tensor, teacher: torch.Tensor) -> tuple[int, int]:
    """The grid two (B, C, H, W) features are compared on: the smaller height and the smaller width."""
    return min(student.shape[2], teacher.shape[2]), min(student.shape[3], teacher.shape[3])


def at_loss(
    student_feature: torch.Tensor, teacher_feature: torch.Tensor, *, p: float = 2, impl: str = "auto"
) -> torch.Tensor:
    """One pair's term: 1 / (B h w) sum_b || q_S,b - q_T,b ||_2^2 with q the L2-normalized attention maps
    (eq. 1, 2) of two (B, C, H, W) features, whose channel counts may differ, on their common grid
    (:func:`common_grid`), in float32 at least. Scalar; gradients reach whichever feature requires them."""
    if student_feature.shape[0] != teacher_feature.shape[0]:
        raise UsageError(
            f"AT: student and teacher features have batch sizes {student_feature.shape[0]} and "
            f"{teacher_feature.shape[0]}"
        )
    size = common_grid(student_feature, teacher_feature)
    q_s = kernels.attention_map(student_feature, size, p=p, impl=impl)
    q_t = kernels.attention_map(teacher_feature, size, p=p, impl=impl)
    dtype = torch.promote_types(q_s.dtype, torch.float32)
    return (q_s.to(dtype) - q_t.to(dtype)).square().mean()


@dataclass
class ATConfig:
    """``loss.at``: weight * sum over ``pairs`` of the AT distance (eq. 2) between the attention maps
    sum_c |F_c|^p of the student and the teacher feature taps. mdistiller's weight is 1000, p 2, and its pairs
    are the stages after the stem (CIFAR ResNets: ``layer1``, ``layer2``, ``layer3``)."""

    weight: float = 1.0
    p: float = 2.0
    pairs: list[FeaturePair] = field(default_factory=list)


def validate(
    cfg: ATConfig,
    student_taps: Mapping[str, TapConfig],
    teacher_taps: Mapping[str, TapConfig],
    where: str = "loss.at",
) -> None:
    """At least one pair of feature taps; p > 0."""
    require_pairs(cfg.pairs, student_taps, teacher_taps, f"{where}.pairs")
    positive(cfg.p, f"{where}.p")


class ATLoss(DistillationLoss):
    """Eq. 2 over the configured pairs, the teacher's features detached. ``forward`` returns (term, parts),
    one part per pair, named "<student tap>-<teacher tap>", summing to the term. No parameters."""

    cfg: ATConfig

    def check(self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]) -> None:
        """UsageError when a pair's taps are not maps (or ViT tokens), their batch sizes differ, or their
        common grid is a single position (a normalized map of one value is 1 for any feature)."""
        for name, student, teacher in pair_maps(self.cfg.pairs, student_taps, teacher_taps, "at"):
            if common_grid(student, teacher) == (1, 1):
                raise UsageError(
                    f"loss.at pair {name}: the maps meet on a 1 x 1 grid, where every attention map is 1; "
                    "tap spatial feature maps"
                )

    def term(self, batch: Batch) -> Term:
        maps = pair_maps(self.cfg.pairs, batch.student_taps, batch.teacher_taps, "at")
        parts = {
            name: at_loss(student, teacher, p=self.cfg.p, impl=self.impl) for name, student, teacher in maps
        }
        return sum(parts.values()), parts

    def maps(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per pair, the (student, teacher) normalized attention maps (eq. 1) on their common grid."""
        return [
            tuple(
                kernels.attention_map(f, common_grid(student, teacher), p=self.cfg.p, impl=self.impl)
                for f in (student, teacher)
            )
            for _, student, teacher in pair_maps(self.cfg.pairs, student_taps, teacher_taps, "at")
        ]


METHOD = Method(
    name="at",
    schema=ATConfig,
    validate=validate,
    loss=ATLoss,
    paper="Zagoruyko & Komodakis 2017, Paying More Attention to Attention: Improving the Performance of "
    "Convolutional Neural Networks via Attention Transfer (ICLR, arXiv:1612.03928)",
    logits="none",
    teacher_cache=TeacherCache(reads=("features",)),
)
