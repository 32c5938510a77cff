"""KD: soft-label knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
Network", arXiv:1503.02531), optionally on standardized logits (Sun et al., CVPR 2024, "Logit
Standardization in Knowledge Distillation", arXiv:2403.01427).

Numbering used in the docstrings:
  (1) p^tau = softmax(l / tau);  L_KD = tau^2 KL(p_T^tau || p_S^tau), batch mean (Hinton et al., Sec. 2:
      the tau^2 keeps the soft-target gradients on the scale of the hard-target ones)
  (2) logit standardization (Sun et al., Algorithm 1): Z(l) = (l - mean(l)) / sigma(l) per sample, with
      sigma(l) = sqrt(1/K sum_k (l_k - mean(l))^2) over the K classes; Algorithm 2 then uses
      softmax(Z(l) / tau) for both models in (1) and keeps the tau^2 factor
The supervised CE of Hinton's objective, (1 - alpha) CE + alpha L_KD, is the run's ``loss.ce`` term
(:class:`kdfast.methods.compose.CompositeLoss`); ``loss.kd.weight`` is alpha.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kdfast.config import TapConfig
from kdfast.errors import UsageError
from kdfast.methods.base import NO_TAPS, DistillationLoss
from kdfast.methods.registry import Method
from kdfast.schema import positive

STD_EPS = 1e-7  # sigma floor: equal logits (sigma = 0) standardize to zeros, a uniform distribution


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Eq. 2: (l - mean(l)) / sigma(l) along the class axis (dim 1), sigma the population standard deviation
    of Algorithm 1 (1/K; the authors' code uses torch.std's 1/(K - 1), which scales Z by sqrt(K / (K - 1))),
    floored at STD_EPS."""
    centred = logits - logits.mean(dim=1, keepdim=True)
    # floor the variance, not sigma: sqrt's infinite slope at 0 would make equal logits' gradient NaN
    sigma = centred.square().mean(dim=1, keepdim=True).clamp_min(STD_EPS**2).sqrt()
    return centred / sigma


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float,
    standardize: bool = False,
) -> torch.Tensor:
    """Eq. 1: tau^2 KL(p_T^tau || p_S^tau) for (B, K) logits, batch mean, computed in float32 at least; with
    ``standardize`` both logits go through eq. 2 first. Gradients reach whichever input requires them."""
    student, teacher = (
        x.to(torch.promote_types(x.dtype, torch.float32)) for x in (student_logits, teacher_logits)
    )
    if standardize:
        student, teacher = standardize_logits(student), standardize_logits(teacher)
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

    def __init__(
        self,
        cfg: KDConfig,
        student_taps: Mapping[str, TapConfig] = NO_TAPS,
        teacher_taps: Mapping[str, TapConfig] = NO_TAPS,
        *,
        kernels_impl: str = "auto",
        label_smoothing: float = 0.0,
    ) -> None:
        validate(cfg, student_taps, teacher_taps)
        super().__init__(kernels_impl, label_smoothing)
        self.cfg = cfg

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        student_taps: Mapping[str, Any],
        teacher_taps: Mapping[str, Any],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(student_logits, torch.Tensor):
            raise UsageError(
                f"method kd needs the student's logits as one tensor, got {type(student_logits).__name__} "
                "(a two-head student such as TITN's): drop kd from loss.method"
            )
        term = kd_loss(
            student_logits,
            teacher_logits.detach(),
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
)
