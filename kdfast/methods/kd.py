"""KD: soft-label knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
Network", arXiv:1503.02531), optionally on standardized logits (Sun et al., CVPR 2024, "Logit
Standardization in Knowledge Distillation", arXiv:2403.01427).

Numbering used in the docstrings:
  (1) p^tau = softmax(l / tau);  L_KD = tau^2 KL(p_T^tau || p_S^tau), batch mean (Hinton et al., Sec. 2:
      the tau^2 keeps the soft-target gradients on the scale of the hard-target ones)
  (2) logit standardization (Sun et al., Algorithm 1, :func:`kdfast.methods.logits.standardize_logits`):
      Z(l) = (l - mean(l)) / sigma(l) per sample; Algorithm 2 then uses softmax(Z(l) / tau) for both models
      in (1) and keeps the tau^2 factor. tau is then the paper's "base temperature": softmax(Z(l) / tau) is
      softmax(l / (tau sigma(l))), each sample's temperature is tau times its logits' standard deviation (the
      abstract's "temperature as the weighted standard deviation of logit"), so the student need not match
      the teacher's logit range, only its relations
The supervised CE of Hinton's objective, (1 - alpha) CE + alpha L_KD, is the run's ``loss.ce`` term
(:class:`kdfast.methods.compose.CompositeLoss`); ``loss.kd.weight`` is alpha. The authors' CIFAR-100 recipe
for KD with standardization (their README: ``--logit-stand --base-temp 2 --kd-weight 9`` on mdistiller, whose
KD CE weight is 0.1) is ``ce: 0.1``, ``kd: {weight: 9, temperature: 2, standardize: true}``
(``configs/kd_ls_digits.yaml``); for some pairs they use base temperature 3.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdfast.config import TapConfig
from kdfast.methods.base import NO_TAPS, Batch, DistillationLoss, Term
from kdfast.methods.logits import loss_logits, single_head
from kdfast.methods.registry import LOGITS_ONLY, Method
from kdfast.schema import positive


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    standardize: bool = False,
) -> torch.Tensor:
    """Eq. 1: tau^2 KL(p_T^tau || p_S^tau) for (B, K) logits, batch mean, computed in float32 at least; with
    ``standardize`` both logits go through eq. 2 first. Gradients reach whichever input requires them."""
    student, teacher = loss_logits(student_logits, teacher_logits, standardize=standardize)
    log_s = F.log_softmax(student / temperature, dim=1)
    log_t = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


@dataclass
class KDConfig:
    """``loss.kd``: weight * tau^2 KL(p_T || p_S) (eq. 1) at ``temperature`` tau, on standardized logits
    (eq. 2) when ``standardize``."""

    weight: float = 1.0
    temperature: float = 4.0
    standardize: bool = False


def validate(
    cfg: KDConfig,
    student_taps: Mapping[str, TapConfig] = NO_TAPS,
    teacher_taps: Mapping[str, TapConfig] = NO_TAPS,
    where: str = "loss.kd",
) -> None:
    """KD reads no taps; its temperature must be > 0."""
    positive(cfg.temperature, f"{where}.temperature")


class KDLoss(DistillationLoss):
    """Eq. 1 (with eq. 2 when ``standardize``) between the student's and the teacher's logits; the teacher's
    are detached. Returns (term, {}): the term is the whole of KD."""

    cfg: KDConfig

    def term(self, batch: Batch) -> Term:
        term = kd_loss(
            single_head(batch.student_logits, "kd"),
            batch.teacher_logits.detach(),
            temperature=self.cfg.temperature,
            standardize=self.cfg.standardize,
        )
        return term, {}


METHOD = Method(
    name="kd",
    schema=KDConfig,
    validate=validate,
    loss=KDLoss,
    paper="Hinton, Vinyals & Dean 2015, Distilling the Knowledge in a Neural Network (arXiv:1503.02531); "
    "standardize: Sun et al. 2024, Logit Standardization in Knowledge Distillation (CVPR)",
    teacher_cache=LOGITS_ONLY,
)
