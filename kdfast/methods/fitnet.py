"""FitNet: hint-based training (Romero, Ballas, Kahou, Chassang, Gatta & Bengio, ICLR 2015, "FitNets: Hints
for Thin Deep Nets", arXiv:1412.6550).

Numbering used in the docstrings (Sec. 2.2):
  (1) the hint loss L_HT(W_Guided, W_r) = 1/2 || u_h(x; W_Hint) - r(v_g(x; W_Guided); W_r) ||^2 between the
      teacher's hint layer u_h and the regressor r applied to the student's guided layer v_g
  (2) the regressor r: a convolution whose kernel makes the student's (C_s, H_s, W_s) map into the teacher's
      (C_t, H_t, W_t) one (the paper: kernel size H_s - H_t + 1 for a student map no smaller than the hint)
The paper trains in two stages (the student up to its guided layer on (1) first, then the whole student with
KD). This module is the one-stage variant of RepDistiller and mdistiller, the one their published numbers use:
(1) is a term of the run's loss from the first step, beside ``loss.ce`` (and any other method). The distance
is theirs too: the mean of the squared difference over every element (``F.mse_loss``), where the paper's 1/2
|| . ||^2 sums; the factor in front is ``loss.fitnet.weight``, 100 in mdistiller (its FEAT_WEIGHT). The
regressor (:class:`HintRegressor`) lives in the loss module: it trains with the student and never reaches
``student.pt``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.config import TapConfig
from kdfast.errors import UsageError
from kdfast.methods.base import Batch, DistillationLoss, FeaturePair, Term, require_pairs
from kdfast.methods.features import pair_maps, resize_to
from kdfast.methods.registry import Method, TeacherCache


def hint_loss(regressed: torch.Tensor, teacher_hint: torch.Tensor) -> torch.Tensor:
    """Eq. 1 as RepDistiller and mdistiller compute it: mean over every element of (r(v_g) - u_h)^2, in
    float32 at least, for tensors of one shape. Scalar; gradients reach whichever input requires them."""
    if regressed.shape != teacher_hint.shape:
        raise UsageError(
            f"FitNet: the regressed student map {tuple(regressed.shape)} and the teacher's hint "
            f"{tuple(teacher_hint.shape)} differ in shape"
        )
    dtype = torch.promote_types(regressed.dtype, torch.float32)
    return F.mse_loss(regressed.to(dtype), teacher_hint.to(dtype))


class HintRegressor(nn.Module):
    """Eq. 2, as mdistiller's ConvReg: a convolution from the student's (C_s, H_s, W_s) map to the teacher's
    (C_t, H_t, W_t), then BatchNorm and (``relu``) ReLU. The convolution by spatial sizes:
      H_s, W_s = 2 H_t, 2 W_t     3x3, stride 2, padding 1
      2 H_s, 2 W_s = H_t, W_t     4x4 transposed, stride 2, padding 1
      H_s >= H_t and W_s >= W_t   (1 + H_s - H_t) x (1 + W_s - W_t), no padding (the paper's; 1x1 for equal
                                  sizes)
      otherwise                   1x1, then a bilinear resize to (H_t, W_t) (kdfast's; mdistiller refuses)
    """

    def __init__(
        self, student: tuple[int, int, int], teacher: tuple[int, int, int], relu: bool = True
    ) -> None:
        super().__init__()
        (cs, hs, ws), (ct, ht, wt) = student, teacher
        self.size = (ht, wt)
        if (hs, ws) == (2 * ht, 2 * wt):
            self.conv: nn.Module = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
        elif (2 * hs, 2 * ws) == (ht, wt):
            self.conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            self.conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
        else:
            self.conv = nn.Conv2d(cs, ct, 1)
        self.bn = nn.BatchNorm2d(ct)
        self.relu = relu

    def forward(self, x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        x = resize_to(self.conv(x), self.size, impl)
        x = self.bn(x)
        return F.relu(x) if self.relu else x


@dataclass
class FitNetConfig:
    """``loss.fitnet``: weight * sum over ``pairs`` (student guided layer, teacher hint layer) of eq. 1
    through one regressor per pair (eq. 2; ReLU after its BatchNorm when ``relu``, as mdistiller: set it false
    when the hint can be negative, a pre-activation or ViT tokens). mdistiller: weight 100, one pair, the
    second stage of both (CIFAR ResNets: ``layer2``)."""

    weight: float = 1.0
    relu: bool = True
    pairs: list[FeaturePair] = field(default_factory=list)


def validate(
    cfg: FitNetConfig,
    student_taps: Mapping[str, TapConfig],
    teacher_taps: Mapping[str, TapConfig],
    where: str = "loss.fitnet",
) -> None:
    """At least one pair of feature taps."""
    require_pairs(cfg.pairs, student_taps, teacher_taps, f"{where}.pairs")


class FitNetLoss(DistillationLoss):
    """Eq. 1 over the configured pairs, the teacher's hints detached. ``forward`` returns (term, parts), one
    part per pair, named "<student tap>-<teacher tap>", summing to the term. :meth:`check` on a real batch
    builds the regressors from the tapped shapes (any CNN or ViT pair; token taps are read as maps)."""

    cfg: FitNetConfig
    regressors: nn.ModuleList

    def check(self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]) -> None:
        """UsageError when a pair's batch sizes differ or its shapes are not those the regressors were built
        for; on the first call, build one regressor per pair."""
        maps = pair_maps(self.cfg.pairs, student_taps, teacher_taps, "fitnet")
        shapes = [(tuple(s.shape[1:]), tuple(t.shape[1:])) for _, s, t in maps]
        self.build_once(
            shapes,
            lambda: {"regressors": nn.ModuleList(HintRegressor(s, t, self.cfg.relu) for s, t in shapes)},
            maps[0][1].device,
            "loss.fitnet: the regressors were built for (student, teacher) shapes",
        )

    def term(self, batch: Batch) -> Term:
        self.require_built("regressors")
        maps = pair_maps(self.cfg.pairs, batch.student_taps, batch.teacher_taps, "fitnet")
        parts = {
            name: hint_loss(regressor(student, self.impl), teacher)
            for regressor, (name, student, teacher) in zip(self.regressors, maps, strict=True)
        }
        return sum(parts.values()), parts


METHOD = Method(
    name="fitnet",
    schema=FitNetConfig,
    validate=validate,
    loss=FitNetLoss,
    paper="Romero, Ballas, Kahou, Chassang, Gatta & Bengio 2015, FitNets: Hints for Thin Deep Nets (ICLR, "
    "arXiv:1412.6550)",
    logits="none",
    teacher_cache=TeacherCache(reads=("features",)),
)
