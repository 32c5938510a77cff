"""DKD: decoupled knowledge distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022, "Decoupled Knowledge
Distillation", arXiv:2203.08679), optionally on standardized logits (Sun et al., CVPR 2024).

Numbering used in the docstrings (Zhao et al., Sec. 3.1 and 3.2; t is the target class of the sample,
p = softmax(z / tau) over the K classes):
  (1) b = [p_t, p_\\t] with p_\\t = 1 - p_t = sum_{k != t} p_k: the binary target / non-target distribution
  (2) p^_k = exp(z_k / tau) / sum_{j != t} exp(z_j / tau) for k != t: the distribution among the non-target
      classes, each model's own
  (3) KD = KL(b^T || b^S) + (1 - p^T_t) KL(p^^T || p^^S) = TCKD + (1 - p^T_t) NCKD: classical KD decoupled,
      the NCKD weight suppressed exactly when the teacher is confident
  (4) DKD = alpha TCKD + beta NCKD, each KL times tau^2 as in KD, batch mean
  (5) the warm-up of the reference implementation (mdistiller ``DKD.py``): the whole DKD term is multiplied by
      min(e / warmup, 1) in the e-th training epoch, counted from 1 (20 epochs of 240 in the paper's CIFAR-100
      runs; :func:`kdfast.methods.base.warmup_factor`)
The reference implementation computes (3)'s masks as products of probabilities, takes ``torch.log`` of the
summed b^S, and gets p^ by adding -1000 to the target logit before a softmax over all K classes. Here b is
formed in log space (log p_t = log_softmax(z / tau)_t, log p_\\t = logsumexp_{k != t}(z_k / tau) -
logsumexp(z / tau)) and p^ is a softmax over the K - 1 non-target logits gathered out: the same numbers where
exp(-1000) underflows (always, in float32 and float64), and no log(0) = -inf when a saturated student puts
all its mass on one side (tests/methods/test_dkd.py compares the two forms).

The supervised CE of the paper's objective is the run's ``loss.ce`` (1.0 in mdistiller's configs: CIFAR-100
ResNet32x4 -> ResNet8x4 with alpha 1, beta 8, tau 4, warm-up 20; ImageNet ResNet-34 -> ResNet-18 with alpha 1,
beta 0.5, tau 1, warm-up 1). With ``standardize`` both logits are z-scored
first (:func:`kdfast.methods.logits.standardize_logits`); Sun et al. report DKD + standardization with base
temperature 2 and "kd-weight" 9 (their README); their script multiplies alpha by 9 and then sets beta to the
new alpha times 9, and leaves DKD's own temperature at 4 (it writes the base temperature to KD's key), so the
run it describes is alpha 9, beta 81, tau 4.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdfast.config import TapConfig
from kdfast.errors import UsageError
from kdfast.methods.base import NO_TAPS, Batch, DistillationLoss, Term, hard_labels, warmup_factor
from kdfast.methods.logits import loss_logits, single_head
from kdfast.methods.registry import LOGITS_ONLY, Method
from kdfast.schema import positive


def non_target_classes(targets: torch.Tensor, classes: int) -> torch.Tensor:
    """(B, K - 1) indices of the classes other than each sample's target, in increasing order: column j is
    class j below the target and j + 1 from it on (a static shape, no boolean indexing)."""
    columns = torch.arange(classes - 1, device=targets.device)
    return columns + (columns >= targets[:, None]).long()


def decoupled_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    standardize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD) for (B, K) logits and (B,) integer targets, each tau^2 KL(teacher || student) batch mean:
    TCKD over the binary distributions of eq. 1, NCKD over the non-target distributions of eq. 2. Computed in
    float32 at least, z-scored first when ``standardize``. Gradients reach whichever logits require them."""
    student, teacher = loss_logits(student_logits, teacher_logits, standardize=standardize)
    classes = student.shape[1]
    if classes < 2:
        raise UsageError(f"DKD needs at least 2 classes (a target and a non-target), got {classes}")
    targets = targets.long()
    others = non_target_classes(targets, classes)

    def binary_and_non_target(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = logits / temperature
        total = torch.logsumexp(scaled, dim=1, keepdim=True)
        non_target = scaled.gather(1, others)
        log_b = torch.cat(
            [
                scaled.gather(1, targets[:, None]) - total,
                torch.logsumexp(non_target, 1, keepdim=True) - total,
            ],
            dim=1,
        )
        return log_b, F.log_softmax(non_target, dim=1)

    log_b_s, log_hat_s = binary_and_non_target(student)
    log_b_t, log_hat_t = binary_and_non_target(teacher)
    scale = temperature**2
    tckd = F.kl_div(log_b_s, log_b_t, reduction="batchmean", log_target=True) * scale
    nckd = F.kl_div(log_hat_s, log_hat_t, reduction="batchmean", log_target=True) * scale
    return tckd, nckd


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float,
    standardize: bool = False,
) -> torch.Tensor:
    """Eq. 4: alpha TCKD + beta NCKD (:func:`decoupled_kl`), batch mean, scalar."""
    tckd, nckd = decoupled_kl(
        student_logits, teacher_logits, targets, temperature=temperature, standardize=standardize
    )
    return alpha * tckd + beta * nckd


@dataclass
class DKDConfig:
    """``loss.dkd``: weight * warm-up(epoch) * (alpha TCKD + beta NCKD) at temperature tau (eq. 4, 5), on
    standardized logits when ``standardize``. Defaults: the paper's CIFAR-100 setting."""

    weight: float = 1.0
    alpha: float = 1.0
    beta: float = 8.0
    temperature: float = 4.0
    warmup: int = 20
    standardize: bool = False


def validate(
    cfg: DKDConfig,
    student_taps: Mapping[str, TapConfig] = NO_TAPS,
    teacher_taps: Mapping[str, TapConfig] = NO_TAPS,
    where: str = "loss.dkd",
) -> None:
    """DKD reads no taps; tau > 0, alpha, beta and the warm-up epochs >= 0."""
    positive(cfg.temperature, f"{where}.temperature")
    for key in ("alpha", "beta", "warmup"):
        positive(getattr(cfg, key), f"{where}.{key}", allow_zero=True)


class DKDLoss(DistillationLoss):
    """Eq. 4 times the warm-up factor of eq. 5 between the student's and the teacher's logits (the teacher's
    detached). ``forward`` returns (term, {"tckd", "nckd"}), the parts weighted by alpha, beta and the
    warm-up, so they sum to the term.

    Targets are the batch's labels; CutMix's soft targets (B, K) name the class with the larger share as the
    target, the one whose logit DKD separates. The warm-up factor is a buffer that :meth:`start_epoch` sets,
    so a compiled step reads the new value without recompiling; it is not saved (the loop calls
    ``start_epoch`` for every epoch, resumed ones included).
    """

    cfg: DKDConfig

    def setup(self, student_taps: Mapping[str, TapConfig], teacher_taps: Mapping[str, TapConfig]) -> None:
        self.register_buffer("warmup", torch.tensor(warmup_factor(0, self.cfg.warmup)), persistent=False)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Eq. 5: the warm-up factor of this epoch (the stage's epoch count is not needed)."""
        self.warmup.fill_(warmup_factor(epoch, self.cfg.warmup))

    def term(self, batch: Batch) -> Term:
        tckd, nckd = decoupled_kl(
            single_head(batch.student_logits, "dkd"),
            batch.teacher_logits.detach(),
            hard_labels(batch.targets),
            temperature=self.cfg.temperature,
            standardize=self.cfg.standardize,
        )
        parts = {
            "tckd": self.warmup * self.cfg.alpha * tckd,
            "nckd": self.warmup * self.cfg.beta * nckd,
        }
        return parts["tckd"] + parts["nckd"], parts


METHOD = Method(
    name="dkd",
    schema=DKDConfig,
    validate=validate,
    loss=DKDLoss,
    paper="Zhao, Cui, Song, Qiu & Liang 2022, Decoupled Knowledge Distillation (CVPR, arXiv:2203.08679)",
    teacher_cache=LOGITS_ONLY,
)
