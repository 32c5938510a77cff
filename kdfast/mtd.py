"""MTD: distilling a ViT's attention distributions (CAD) and value relations (VR), layer by layer.

Numbering used in the docstrings:
  (1) CAD = softmax(Q K^T / sqrt(d_q)),  L_CAD = KL(CAD_s || CAD_t)
  (2) VR = softmax(V V^T / sqrt(d_v)),   L_VR = KL(VR_s || VR_t)
  (3) relation heads (MiniLMv2): heads concatenated, (B, H, N, d) -> (B, N, H * d), and re-split into R
      heads for both models, so teacher and student may have different head counts and widths
  (4) task weighting, task 0 being the supervised loss L_0 = kd_loss (AGKD eq. 1) and tasks 1..K the
      distillation terms, one per (layer, relation) ("layer_kind", 25D for 12 layers) or one per layer with
      CAD and VR summed ("layer", 13D):
        uniform      L_0 + 1/K sum_k L_k
        manual       L_0 + sum_k m_k L_k
        learnable    sum_{k=0..K} softmax(theta)_k L_k                    (AW, theta learnable)
        uncertainty  sum_{k=0..K} L_k / (2 w_k^2) + ln(1 + w_k^2)         (w learnable, init 1)
Both KL terms go through ``kernels.attention_kl``, so on the GPU no N x N matrix is ever stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import kernels
from kdfast.config import LossConfig, MTDPairConfig, TapConfig
from kdfast.errors import UsageError
from kdfast.losses import DistillationLoss, cls_attention_map, kd_kl, patch_grid, supervised_ce
from kdfast.taps import QKV


def relation_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Eq. 3 (MiniLMv2): (B, H, N, d) -> concatenate the heads (B, N, H * d) -> re-split into ``heads``
    heads of width H * d / heads: (B, heads, N, H * d / heads)."""
    batch, _, tokens, _ = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads, -1).transpose(1, 2)


def uncertainty_weighting(losses: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Eq. 4, uncertainty: sum_k L_k / (2 w_k^2) + ln(1 + w_k^2) over the task losses (K+1,) and the
    learnable (K+1,) w. The ln(1 + w^2) regularizer stays >= 0, so the weights cannot buy a negative loss."""
    return (losses / (2 * w.square()) + torch.log1p(w.square())).sum()


class MTDLoss(DistillationLoss):
    """MTD: kd_loss (AGKD eq. 1) + L_CAD (eq. 1) and L_VR (eq. 2) per configured (student, teacher) attention
    tap pair, combined by the task weighting of eq. 4; same interface as :class:`kdfast.losses.AGKDLoss`.

    ``forward`` returns (loss, parts): "kd" and "ce" (the two summands of L_0), "cad" and "vr" (the
    unweighted sums over layers of eq. 1 and eq. 2, those configured), "total_distill" (the loss minus the
    weighted L_0 term) and "w_<task>" (the current coefficient of each task's loss, detached). The
    weighting's learnable parameters, if any, are parameters of this module. The teacher's logits and taps
    are detached: gradients reach the student and the task weights only. Call :meth:`check` once on a
    real batch: it raises UsageError when tap shapes cannot be matched.
    """

    def __init__(
        self,
        cfg: LossConfig,
        student_taps_cfg: Mapping[str, TapConfig],
        teacher_taps_cfg: Mapping[str, TapConfig],
        kernels_impl: str = "auto",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(cfg, kernels_impl, label_smoothing)
        self.mtd = cfg.mtd
        if not self.mtd.pairs:
            raise UsageError("loss.mtd.pairs is empty: name the (student, teacher) attention taps to distill")
        for pair in self.mtd.pairs:
            for role, taps_cfg in (("student", student_taps_cfg), ("teacher", teacher_taps_cfg)):
                name = getattr(pair, role)
                if name not in taps_cfg or taps_cfg[name].kind != "attention":
                    raise UsageError(f"loss.mtd pair names {role} tap {name!r}: it must be an attention tap")
        if self.mtd.granularity == "layer":
            self.tasks = [f"{pair.student}_{pair.teacher}" for pair in self.mtd.pairs]
        else:
            self.tasks = [
                f"{pair.student}_{pair.teacher}_{rel}"
                for pair in self.mtd.pairs
                for rel in self.mtd.relations
            ]
        count = len(self.tasks)
        if self.mtd.weighting == "manual" and len(self.mtd.manual_weights or ()) != count:
            raise UsageError(
                f"loss.mtd.manual_weights needs {count} values (one per distillation task), "
                f"got {self.mtd.manual_weights}"
            )
        if self.mtd.weighting == "learnable":
            self.task_logits = nn.Parameter(torch.zeros(count + 1))
        elif self.mtd.weighting == "uncertainty":
            self.task_w = nn.Parameter(torch.ones(count + 1))

    def _split(self, qkv: QKV) -> QKV:
        if self.mtd.relation_heads is None:
            return qkv
        return QKV(*(relation_heads(x, self.mtd.relation_heads) for x in qkv))

    def relations(self, pair: MTDPairConfig, student: QKV, teacher: QKV) -> dict[str, torch.Tensor]:
        """The configured terms of one layer pair: {"cad": L_CAD (eq. 1), "vr": L_VR (eq. 2)}, each the
        mean over B * heads * N rows of the row KL; the teacher side is detached."""
        s = self._split(student)
        t = self._split(QKV(*(x.detach() for x in teacher)))
        operands = {"cad": (s.q, s.k, t.q, t.k), "vr": (s.v, s.v, t.v, t.v)}
        return {
            rel: kernels.attention_kl(*operands[rel], direction=self.mtd.direction, impl=self.impl)
            for rel in self.mtd.relations
        }

    def combine(self, supervised: torch.Tensor, distill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 4: (total, coefficients) for the supervised loss L_0 and the K distillation task losses;
        ``coefficients`` (K+1,) is what multiplies each task loss (for logging)."""
        losses = torch.cat([supervised.reshape(1), distill])
        count = distill.numel()
        weighting = self.mtd.weighting
        if weighting == "uncertainty":
            return uncertainty_weighting(losses, self.task_w), 1 / (2 * self.task_w.square())
        if weighting == "learnable":
            coefficients = torch.softmax(self.task_logits, dim=0)
        elif weighting == "manual":
            coefficients = losses.new_tensor([1.0, *self.mtd.manual_weights])
        else:
            coefficients = torch.cat([losses.new_ones(1), losses.new_full((count,), 1 / count)])
        return (coefficients * losses).sum(), coefficients

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        student_taps: Mapping[str, Any],
        teacher_taps: Mapping[str, Any],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        alpha = self.kd.alpha
        parts = {
            "kd": alpha * kd_kl(student_logits, teacher_logits.detach(), self.kd.temperature),
            "ce": (1 - alpha) * supervised_ce(student_logits, targets, self.label_smoothing),
        }
        layers = [
            self.relations(pair, student_taps[pair.student], teacher_taps[pair.teacher])
            for pair in self.mtd.pairs
        ]
        if self.mtd.granularity == "layer":
            distill = torch.stack([torch.stack(list(terms.values())).sum() for terms in layers])
        else:
            distill = torch.stack([term for terms in layers for term in terms.values()])
        supervised = parts["kd"] + parts["ce"]
        total, coefficients = self.combine(supervised, distill)
        for rel in self.mtd.relations:
            parts[rel] = torch.stack([terms[rel] for terms in layers]).sum()
        weighted_supervised = coefficients[0] * supervised
        if self.mtd.weighting == "uncertainty":
            weighted_supervised = weighted_supervised + torch.log1p(self.task_w[0].square())
        parts["total_distill"] = total - weighted_supervised
        coefficients = coefficients.detach()
        parts["w_supervised"] = coefficients[0]
        parts.update({f"w_{task}": c for task, c in zip(self.tasks, coefficients[1:], strict=True)})
        return total, parts

    def maps(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(student, teacher)] CLS-attention maps (B, h, w) of the last distilled pair (AGKD eq. 2, ViT
        part), both on the teacher's patch grid."""
        pair = self.mtd.pairs[-1]
        teacher = teacher_taps[pair.teacher]
        side, _ = patch_grid(teacher.k.shape[2])
        grid = (side, side)
        student = cls_attention_map(student_taps[pair.student], grid, impl=self.impl)
        return [(student, cls_attention_map(teacher, grid, impl=self.impl))]

    def check(self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]) -> None:
        """Raise UsageError when the taps of a real batch cannot be matched: a tap that gave no Q, K, V,
        different batch sizes or token counts N, or heads that cannot be paired (eq. 3)."""
        heads = self.mtd.relation_heads
        for pair in self.mtd.pairs:
            named = {"student": (pair.student, student_taps), "teacher": (pair.teacher, teacher_taps)}
            for role, (name, taps) in named.items():
                if not isinstance(taps.get(name), QKV):
                    raise UsageError(f"{role} tap {name!r} gave no Q, K, V: point it at an attention module")
            s, t = student_taps[pair.student].q, teacher_taps[pair.teacher].q
            where = f"loss.mtd pair ({pair.student!r}, {pair.teacher!r})"
            if s.shape[0] != t.shape[0] or s.shape[2] != t.shape[2]:
                raise UsageError(
                    f"{where}: student has (B, N) = ({s.shape[0]}, {s.shape[2]}) and teacher "
                    f"({t.shape[0]}, {t.shape[2]}); MTD needs the same batch and token count (match the "
                    "patch size and image size)"
                )
            if heads is None and s.shape[1] != t.shape[1]:
                raise UsageError(
                    f"{where}: student has {s.shape[1]} heads and teacher {t.shape[1]}; set "
                    "loss.mtd.relation_heads to re-split both into the same number of heads"
                )
            for role, x in (("student", s), ("teacher", t)):
                width = x.shape[1] * x.shape[3]
                if heads is not None and width % heads:
                    raise UsageError(
                        f"{where}: loss.mtd.relation_heads={heads} does not divide the {role}'s "
                        f"concatenated head width {width}; pick a common divisor of both widths"
                    )
