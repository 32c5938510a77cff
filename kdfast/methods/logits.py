"""What the logit methods (KD, DKD, DIST) share: the student's logits as one tensor, both models' logits in
float32 at least, and logit standardization (Sun, Ren, Li, Wang & Cao, CVPR 2024, "Logit Standardization in
Knowledge Distillation", arXiv:2403.01427), which the paper applies to any logit method ("plug-and-play").

Numbering used in the docstrings:
  (1) Z(l) = (l - mean(l)) / sigma(l) per sample, sigma(l) = sqrt(1/K sum_k (l_k - mean(l))^2) over the K
      classes (Sun et al., Algorithm 1); a method then applies its temperature tau (the paper's "base
      temperature") to Z(l) where it applied it to l, and keeps its tau^2 factor (Algorithm 2)
"""

from __future__ import annotations

from typing import Any

import torch

from kdfast.errors import UsageError

STD_EPS = 1e-7  # sigma floor: equal logits (sigma = 0) standardize to zeros, a uniform distribution


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Eq. 1: (l - mean(l)) / sigma(l) along the class axis (dim 1), sigma the population standard deviation
    of Algorithm 1 (1/K; the authors' code uses torch.std's 1/(K - 1), which scales Z by sqrt(K / (K - 1))),
    floored at STD_EPS."""
    centred = logits - logits.mean(dim=1, keepdim=True)
    # floor the variance, not sigma: sqrt's infinite slope at 0 would make equal logits' gradient NaN
    sigma = centred.square().mean(dim=1, keepdim=True).clamp_min(STD_EPS**2).sqrt()
    return centred / sigma


def loss_logits(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, standardize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) logits promoted to float32 at least (bf16 logits under autocast lose the small
    differences a softmax at a low temperature reads), each through eq. 1 when ``standardize``."""
    student, teacher = (
        x.to(torch.promote_types(x.dtype, torch.float32)) for x in (student_logits, teacher_logits)
    )
    if standardize:
        return standardize_logits(student), standardize_logits(teacher)
    return student, teacher


def single_head(student_logits: Any, method: str) -> torch.Tensor:
    """The student's logits when they are one tensor; a UsageError naming ``method`` for a two-head student
    (TITN's (class, distillation) pair), whose heads a logit method cannot tell apart."""
    if not isinstance(student_logits, torch.Tensor):
        raise UsageError(
            f"method {method} needs the student's logits as one tensor, got {type(student_logits).__name__} "
            f"(a two-head student such as TITN's): drop {method} from loss.method"
        )
    return student_logits
