"""RKD: relational knowledge distillation, distance-wise and angle-wise (Park, Kim, Lu & Cho, CVPR 2019,
"Relational Knowledge Distillation", arXiv:1904.05068).

Numbering used in the docstrings (Park et al., Sec. 3.2; t_i, s_i the teacher's and the student's
embeddings of sample i in a batch of B, compared only through relations, so their widths may differ):
  (1) distance potential psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu, mu the mean distance over the pairs
      i != j of the batch (each model normalized by its own mu)
  (2) L_RKD-D = mean over (i, j) of l_delta(psi_D(t_i, t_j), psi_D(s_i, s_j)), l_delta the Huber loss with
      delta = 1 (``F.smooth_l1_loss``)
  (3) angle potential psi_A(t_i, t_j, t_k) = <e_ij, e_kj>, e_ij = (t_i - t_j) / ||t_i - t_j||_2: the cosine
      of the angle at t_j
  (4) L_RKD-A = mean over (i, j, k) of l_delta(psi_A(t_i, t_j, t_k), psi_A(s_i, s_j, s_k))
  (5) L_RKD = distance_weight L_RKD-D + angle_weight L_RKD-A, 25 and 50 in the paper (and mdistiller)
The means run over all B^2 pairs and B^3 triplets, degenerate ones included, as the authors' code and
mdistiller's do: a pair (i, i) has distance 0 and a triplet with a repeated point has cosine 0 on both sides,
so they add nothing but count in the mean. Identical embeddings get distance 0 and unit vector 0 (with zero
gradient): where the student embeds two samples alike and the teacher does not, the reference code's
normalized zero vector has gradients scaled by 1/eps = 1e12 (tests/methods/test_rkd.py shows both).
With a batch of one there is no pair: the loss is 0.

Which embedding: the penultimate one, a feature tap through :func:`kdfast.methods.features.embedding` (a
(B, C, H, W) map is average-pooled): tap the student's and the teacher's global pool or last feature map.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kdfast.config import TapConfig
from kdfast.errors import UsageError
from kdfast.methods.base import Batch, DistillationLoss, Term, require_tap
from kdfast.methods.features import embedding
from kdfast.methods.registry import Method, TeacherCache
from kdfast.schema import positive

SQUARED_EPS = 1e-24  # floor of a squared distance under the square root (only reached by distinct points)


def pairwise_relations(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(psi_D (B, B), psi_A (B, B, B)) of eq. 1 and 3 for (B, ...) embeddings flattened per sample, in float32
    at least, autocast off (a bf16 matmul would round the cosines to bf16's 8-bit mantissa); psi_A[j, i, k] is
    the cosine of the angle at point j. A zero difference has distance 0 and unit vector 0, with zero
    gradient."""
    e = embeddings.flatten(1)
    e = e.to(torch.promote_types(e.dtype, torch.float32))
    with torch.autocast(e.device.type, enabled=False):
        diff = e[None, :, :] - e[:, None, :]  # diff[j, i] = e_i - e_j
        squared = diff.square().sum(dim=2, keepdim=True)
        apart = squared > 0
        norm = squared.clamp_min(SQUARED_EPS).sqrt()
        distance = torch.where(apart, norm, 0.0)[..., 0]
        pairs = max(e.shape[0] * (e.shape[0] - 1), 1)
        mean = (distance.sum() / pairs).clamp_min(SQUARED_EPS**0.5)
        unit = torch.where(apart, diff / norm, 0.0)
        return distance / mean, unit @ unit.transpose(1, 2)


def rkd_parts(
    student_embedding: torch.Tensor, teacher_embedding: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_RKD-D, L_RKD-A) of eq. 2 and 4 for (B, ...) embeddings of the same batch."""
    if student_embedding.shape[0] != teacher_embedding.shape[0]:
        raise UsageError(
            f"RKD compares one batch: the student embedding has {student_embedding.shape[0]} samples and the "
            f"teacher's {teacher_embedding.shape[0]}; tap one forward pass of each model"
        )
    distance_s, angle_s = pairwise_relations(student_embedding)
    distance_t, angle_t = pairwise_relations(teacher_embedding)
    return F.smooth_l1_loss(distance_s, distance_t), F.smooth_l1_loss(angle_s, angle_t)


def rkd_loss(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    *,
    distance_weight: float,
    angle_weight: float,
) -> torch.Tensor:
    """Eq. 5: distance_weight L_RKD-D + angle_weight L_RKD-A, scalar. Gradients reach whichever embedding
    requires them."""
    distance, angle = rkd_parts(student_embedding, teacher_embedding)
    return distance_weight * distance + angle_weight * angle


@dataclass
class RKDConfig:
    """``loss.rkd``: weight * (distance_weight L_RKD-D + angle_weight L_RKD-A) (eq. 5) between the
    embeddings of the student tap ``student`` and the teacher tap ``teacher`` (feature taps; maps are
    average-pooled)."""

    weight: float = 1.0
    student: str = ""
    teacher: str = ""
    distance_weight: float = 25.0
    angle_weight: float = 50.0


def validate(
    cfg: RKDConfig,
    student_taps: Mapping[str, TapConfig],
    teacher_taps: Mapping[str, TapConfig],
    where: str = "loss.rkd",
) -> None:
    """A student and a teacher feature tap; the two weights >= 0."""
    require_tap(student_taps, cfg.student, role="student", where=f"{where}.student", kind="feature")
    require_tap(teacher_taps, cfg.teacher, role="teacher", where=f"{where}.teacher", kind="feature")
    for key in ("distance_weight", "angle_weight"):
        positive(getattr(cfg, key), f"{where}.{key}", allow_zero=True)


class RKDLoss(DistillationLoss):
    """Eq. 5 between the pooled embeddings of the two taps; the teacher's are detached. ``forward`` returns
    (term, {"distance", "angle"}), the parts weighted, so they sum to the term."""

    cfg: RKDConfig

    def embeddings(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(student (B, D_S), teacher (B, D_T) detached) embeddings; UsageError for taps that do not fit."""
        student = embedding(student_taps, self.cfg.student, "student")
        return student, embedding(teacher_taps, self.cfg.teacher, "teacher").detach()

    def check(self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]) -> None:
        """Raise UsageError when the taps of a real batch are not embeddings of one batch."""
        rkd_parts(*self.embeddings(student_taps, teacher_taps))

    def term(self, batch: Batch) -> Term:
        distance, angle = rkd_parts(*self.embeddings(batch.student_taps, batch.teacher_taps))
        parts = {"distance": self.cfg.distance_weight * distance, "angle": self.cfg.angle_weight * angle}
        return parts["distance"] + parts["angle"], parts


METHOD = Method(
    name="rkd",
    schema=RKDConfig,
    validate=validate,
    loss=RKDLoss,
    paper="Park, Kim, Lu & Cho 2019, Relational Knowledge Distillation (CVPR, arXiv:1904.05068)",
    logits="none",
    teacher_cache=TeacherCache(reads=("features",)),
)
