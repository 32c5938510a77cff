"""KL divergence between attention distributions (MTD's CAD and VR; MiniLM's direction), flash-style.

Reference first (explicit softmax, the specification), then the Triton kernels that never store N x N.
"""

from __future__ import annotations

import torch

from kernels._dispatch import use_triton


def attention_kl_reference(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    *,
    scale_s: float | None = None,
    scale_t: float | None = None,
    direction: str = "student_teacher",
    reduction: str = "mean",
) -> torch.Tensor:
    """Row-wise KL between softmax(q_s k_s^T * scale_s) and softmax(q_t k_t^T * scale_t).

    direction "student_teacher": KL(A_s || A_t) (MTD, L_CAD and L_VR); "teacher_student": KL(A_t || A_s).
    """
    scale_s = q_s.shape[-1] ** -0.5 if scale_s is None else scale_s
    scale_t = q_t.shape[-1] ** -0.5 if scale_t is None else scale_t
    log_s = torch.log_softmax((q_s.float() @ k_s.float().transpose(-1, -2)) * scale_s, dim=-1)
    log_t = torch.log_softmax((q_t.float() @ k_t.float().transpose(-1, -2)) * scale_t, dim=-1)
    if direction == "student_teacher":
        kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl.mean() if reduction == "mean" else kl


def attention_kl(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    *,
    scale_s: float | None = None,
    scale_t: float | None = None,
    direction: str = "student_teacher",
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """(B, H, N, D_s) and (B, H, N, D_t) inputs; see :func:`attention_kl_reference`."""
    if use_triton(impl, q_s, k_s, q_t, k_t):
        raise NotImplementedError("Triton attention KL: being written")
    return attention_kl_reference(
        q_s, k_s, q_t, k_t, scale_s=scale_s, scale_t=scale_t, direction=direction, reduction=reduction
    )
