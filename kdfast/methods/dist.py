"""DIST: distillation from a stronger teacher by relations of the predictions (Huang, You, Wang, Qian & Xu,
NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher", arXiv:2205.10536), optionally on
standardized logits (Sun et al., CVPR 2024).

Numbering used in the docstrings (Huang et al., Sec. 3; Y = softmax(Z / tau) row-wise, a (B, K) matrix of
predictions, one row per sample, one column per class):
  (1) rho_p(u, v) = <u - mean(u), v - mean(v)> / (||u - mean(u)|| ||v - mean(v)||), Pearson's correlation;
      d_p(u, v) = 1 - rho_p(u, v)
  (2) inter-class relation: L_inter = 1/B sum_i d_p(Y^S_i,:, Y^T_i,:), each sample's predictions over the
      classes
  (3) intra-class relation: L_intra = 1/K sum_j d_p(Y^S_:,j, Y^T_:,j), each class's predictions over the
      batch
  (4) L_DIST = tau^2 (beta L_inter + gamma L_intra) (the paper's L_tr adds alpha CE: the run's ``loss.ce``)
As in the authors' code (and mmrazor's DISTLoss), (1) adds eps = 1e-8 to the product of the norms: a row or
column without variance correlates 0 with anything (d_p = 1), instead of 0/0. So with a batch of one, each
class's column has one entry and no variance, and L_intra is the constant 1: only L_inter teaches
(tests/methods/test_dist.py checks this). The temperature: the authors' classification code
(hunto/image_classification_sota, ``lib/models/losses/dist_kd.py``) takes softmax(Z) with beta = gamma = 1,
that is tau = 1, the defaults here; mmrazor's DISTLoss divides the logits by tau and multiplies each relation
by tau^2, which (4) follows (the same numbers at tau = 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from kdfast.config import TapConfig
from kdfast.methods.base import NO_TAPS, Batch, DistillationLoss, Term
from kdfast.methods.logits import loss_logits, single_head
from kdfast.methods.registry import LOGITS_ONLY, Method
from kdfast.schema import positive

PEARSON_EPS = 1e-8  # the authors' eps in the denominator of eq. 1


def pearson_correlation(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Eq. 1, row by row: rho_p(u_i, v_i) for (N, D) inputs, (N,) out; eps = PEARSON_EPS is added to the
    product of the centred norms."""
    u = u - u.mean(dim=1, keepdim=True)
    v = v - v.mean(dim=1, keepdim=True)
    return (u * v).sum(dim=1) / (u.norm(dim=1) * v.norm(dim=1) + PEARSON_EPS)


def inter_class_relation(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Eq. 2: the mean over samples of d_p between the rows of (B, K) predictions."""
    return 1 - pearson_correlation(student_probs, teacher_probs).mean()


def intra_class_relation(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Eq. 3: the mean over classes of d_p between the columns of (B, K) predictions."""
    return inter_class_relation(student_probs.transpose(0, 1), teacher_probs.transpose(0, 1))


def dist_relations(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    standardize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau^2 L_inter, tau^2 L_intra) (eq. 2, 3 and the tau^2 of eq. 4) for (B, K) logits, on
    Y = softmax(Z / tau); float32 at least, z-scored first when ``standardize``."""
    student, teacher = loss_logits(student_logits, teacher_logits, standardize=standardize)
    y_s = torch.softmax(student / temperature, dim=1)
    y_t = torch.softmax(teacher / temperature, dim=1)
    scale = temperature**2
    return scale * inter_class_relation(y_s, y_t), scale * intra_class_relation(y_s, y_t)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    temperature: float,
    standardize: bool = False,
) -> torch.Tensor:
    """Eq. 4: tau^2 (beta L_inter + gamma L_intra), scalar."""
    inter, intra = dist_relations(
        student_logits, teacher_logits, temperature=temperature, standardize=standardize
    )
    return beta * inter + gamma * intra


@dataclass
class DISTConfig:
    """``loss.dist``: weight * tau^2 (beta L_inter + gamma L_intra) (eq. 4) at temperature tau, on
    standardized logits when ``standardize``."""

    weight: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    temperature: float = 1.0
    standardize: bool = False


def validate(
    cfg: DISTConfig,
    student_taps: Mapping[str, TapConfig] = NO_TAPS,
    teacher_taps: Mapping[str, TapConfig] = NO_TAPS,
    where: str = "loss.dist",
) -> None:
    """DIST reads no taps; tau > 0, beta and gamma >= 0."""
    positive(cfg.temperature, f"{where}.temperature")
    for key in ("beta", "gamma"):
        positive(getattr(cfg, key), f"{where}.{key}", allow_zero=True)


class DISTLoss(DistillationLoss):
    """Eq. 4 between the student's and the teacher's logits (the teacher's detached). ``forward`` returns
    (term, {"inter", "intra"}), the parts weighted by tau^2 and beta or gamma, so they sum to the term."""

    cfg: DISTConfig

    def term(self, batch: Batch) -> Term:
        inter, intra = dist_relations(
            single_head(batch.student_logits, "dist"),
            batch.teacher_logits.detach(),
            temperature=self.cfg.temperature,
            standardize=self.cfg.standardize,
        )
        parts = {"inter": self.cfg.beta * inter, "intra": self.cfg.gamma * intra}
        return parts["inter"] + parts["intra"], parts


METHOD = Method(
    name="dist",
    schema=DISTConfig,
    validate=validate,
    loss=DISTLoss,
    paper="Huang, You, Wang, Qian & Xu 2022, Knowledge Distillation from A Stronger Teacher (NeurIPS, "
    "arXiv:2205.10536)",
    teacher_cache=LOGITS_ONLY,
)
