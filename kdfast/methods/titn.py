"""TITN: a transformer-in-transformer student with a class token and a distillation token, taught by a CNN
teacher through DeiT's hard-label distillation (Touvron et al. 2021, Sec. 4) on CutMix batches (Rahman et al.
2025, "A Transformer-in-Transformer Network Utilizing Knowledge Distillation for Image Recognition",
arXiv:2502.16762).

Numbering used in the docstrings:
  (1) L = alpha * CE(psi(Z_cls), y~) + (1 - alpha) * CE(psi(Z_dist), y_T),  y_T = argmax_c Z_T(c)
      y~ the CutMix target lam * onehot(y_a) + (1 - lam) * onehot(y_b), lam ~ Beta(0.5, 0.5) (Yun et al.
      2019; the loop draws it, see ``kdfast.data.BatchMix``), or the integer label without CutMix
  (2) inference: one output from the two heads, by the student's ``head_fusion`` (``kdfast.models.tnt``,
      eq. 6): their mean (DeiT's rule, the default) or their per-class max (the top-1 of Algorithm 1's
      concatenation of the two heads' logits); the exported student computes the same
The paper's teacher is torchvision's VGG16-BN with its classifier for the data set's classes (134.7M
parameters at 100 classes), ``configs/titn_vgg16bn_tnt_ti_cifar100.yaml``; ``vgg16_bn_cifar`` (global pool +
one linear layer, 14.8M) is a small variant for the digits example. ``loss.method`` may add only methods that
read no logits beside ``titn`` (its student's training output is the two heads): ``[kd, titn]`` is refused.
The student is :class:`kdfast.models.tnt.TNTDistilled`; any model with ``set_distilled_training`` that
returns the (class, distillation) pair in training mode (timm's ``deit_*_distilled_*``) works as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.config import TapConfig
from kdfast.errors import UsageError
from kdfast.methods.base import NO_TAPS, Batch, DistillationLoss, Term, supervised_ce
from kdfast.methods.registry import LOGITS_ONLY, Method
from kdfast.schema import unit_interval
from kdfast.taps import Taps, unwrap


def hard_distillation_loss(distill_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 1, second term unweighted: CE(psi(Z_dist), y_T) with y_T = argmax_c Z_T(c), the teacher's hard
    decision (DeiT, Touvron et al. 2021, eq. 3), batch mean; the teacher is detached."""
    return F.cross_entropy(distill_logits.float(), teacher_logits.detach().argmax(dim=1))


@dataclass
class TITNConfig:
    """``loss.titn``: alpha * CutMix-CE(class head, labels) + (1 - alpha) * CE(distillation head, argmax
    teacher) (eq. 1); the student is a transformer-in-transformer with a class token and a distillation token.
    TITN computes the supervised term itself (its class head), so the run adds no ``loss.ce``."""

    weight: float = 1.0
    alpha: float = 0.5


def validate(
    cfg: TITNConfig,
    student_taps: Mapping[str, TapConfig] = NO_TAPS,
    teacher_taps: Mapping[str, TapConfig] = NO_TAPS,
    where: str = "loss.titn",
) -> None:
    """TITN reads no taps; alpha mixes the two heads' losses, in [0, 1]."""
    unit_interval(cfg.alpha, f"{where}.alpha")


def distilled_student(student: nn.Module) -> nn.Module:
    """The model inside Taps / DDP / ``torch.compile`` wrappers that owns ``set_distilled_training``."""
    while True:
        inner = unwrap(student)
        if not isinstance(inner, Taps):
            return inner
        student = inner.model


class TITNLoss(DistillationLoss):
    """Eq. 1: alpha * CE(class head, targets) + (1 - alpha) * CE(distillation head, argmax teacher).

    ``forward`` returns (term, parts) with parts {"cls", "distill"} already weighted, so they sum to the
    term. The student's logits must be the (class, distillation) pair of a training-mode forward with
    distilled training on (:meth:`prepare_student` switches it on). TITN uses no taps: the constructor
    takes the tap configs only to share the interface of the other methods.
    """

    cfg: TITNConfig

    def prepare_student(self, student: nn.Module) -> None:
        """Switch on the distillation head's output (DeiT): the student must have a distillation token."""
        model = distilled_student(student)
        if not callable(getattr(model, "set_distilled_training", None)):
            raise UsageError(
                f"method titn needs a student with a distillation token, and {type(model).__name__} has "
                "none: use student.arch {source: kdfast, name: tnt_distilled_digits} (or tnt_distilled_ti)"
            )
        model.set_distilled_training(True)

    def heads(self, student_logits: Any, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class_logits, distill_logits) of the student, each (B, K) with the teacher's B and K; a
        UsageError names what does not match."""
        if not (isinstance(student_logits, (tuple, list)) and len(student_logits) == 2):
            got = (
                f"one tensor of shape {tuple(student_logits.shape)}"
                if isinstance(student_logits, torch.Tensor)
                else type(student_logits).__name__
            )
            raise UsageError(
                f"method titn needs the student's training-mode output (class_logits, distill_logits), "
                f"got {got}: use a tnt_distilled_* student and call TITNLoss.prepare_student on it"
            )
        logits, distill = student_logits
        expected = tuple(teacher_logits.shape)
        for name, tensor in (("class", logits), ("distillation", distill)):
            if tuple(tensor.shape) != expected:
                raise UsageError(
                    f"the student's {name} logits have shape {tuple(tensor.shape)} and the teacher's "
                    f"{expected}: build both for the same data set (the same number of classes)"
                )
        return logits, distill

    def check(
        self,
        student_taps: Mapping[str, Any],
        teacher_taps: Mapping[str, Any],
        *,
        student_logits: Any = None,
        teacher_logits: torch.Tensor | None = None,
    ) -> None:
        """Raise UsageError when the student's training-mode logits are not a (class, distillation) pair
        of the teacher's shape. TITN uses no taps; without logits there is nothing to check."""
        if student_logits is not None and teacher_logits is not None:
            self.heads(student_logits, teacher_logits)

    def term(self, batch: Batch) -> Term:
        logits, distill = self.heads(batch.student_logits, batch.teacher_logits)
        alpha = self.cfg.alpha
        parts = {
            "cls": alpha * supervised_ce(logits, batch.targets, self.label_smoothing),
            "distill": (1 - alpha) * hard_distillation_loss(distill, batch.teacher_logits),
        }
        return sum(parts.values()), parts


METHOD = Method(
    name="titn",
    schema=TITNConfig,
    validate=validate,
    loss=TITNLoss,
    paper="Rahman, Sarker, Mazumder & Anower 2025, A Transformer-in-Transformer Network Utilizing Knowledge "
    "Distillation for Image Recognition (arXiv:2502.16762)",
    supervised=True,
    logits="pair",
    teacher_cache=LOGITS_ONLY,
)
