"""MTD: distilling a ViT's attention distributions (CAD) and value relations (VR), layer by layer (Chen et
al. 2022, "Multimodal Transformer Distillation for Audio-Visual Synchronization", arXiv:2210.15563).

Numbering used in the docstrings:
  (1) CAD = softmax(Q K^T / sqrt(d_q)),  L_CAD = KL(CAD_s || CAD_t)
  (2) VR = softmax(V V^T / sqrt(d_v)),   L_VR = KL(VR_s || VR_t)
  (3) relation heads (MiniLMv2, a kdfast extension, off unless ``relation_heads`` is set): heads concatenated,
      (B, H, N, d) -> (B, N, H * d), and re-split into R heads for both models, so teacher and student may
      have different head counts; MTD itself pairs each model's own heads. With R one model's own head count
      that model keeps its heads (the re-split is the identity) and only the other is re-split: R = the
      student's count distills the attention the student computes
  (4) task weighting, task 0 being the supervised task loss L_0 = CE(y, p_S) and tasks 1..K the distillation
      terms, one per (layer, relation) ("layer_kind", 25D for 12 layers) or one per layer with CAD and VR
      summed ("layer", 13D):
        uniform      sum_{k=0..K} L_k                                     (every weight 1)
        manual       L_0 + sum_k m_k L_k
        learnable    sum_{k=0..K} softmax(theta)_k L_k                    (AW, theta learnable)
        uncertainty  sum_{k=0..K} L_k / (2 w_k^2) + ln(1 + w_k^2)         (w learnable, init 1)
      The learnable theta and w get no weight decay (``no_weight_decay``): the authors' code trains them with
      Adam without decay (xjchenGit/MTDVocaLiST, train_MTD.py).
Logit KD is not part of MTD: ``loss.method: [kd, mtd]`` adds ``kd``'s weighted tau^2 KL beside the weighted
tasks, an extension of kdfast's (off in the paper's configuration).
Both KL terms go through ``kernels.attention_kl``, so on the GPU no N x N matrix is ever stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

import kernels
from kdfast.config import TapConfig
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.base import Batch, DistillationLoss, Term, require_tap, supervised_ce
from kdfast.methods.features import cls_attention_map, patch_grid
from kdfast.methods.registry import Method, TeacherCache
from kdfast.schema import positive
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


@dataclass
class MTDPairConfig:
    """One distilled transformer layer: a student attention tap against a teacher attention tap."""

    student: str = ""
    teacher: str = ""


@dataclass
class MTDConfig:
    """``loss.mtd``: per layer pair, L_CAD (eq. 1) and L_VR (eq. 2) of ``relations``; the terms and the
    supervised task loss L_0 = CE(y, p_S) combined by ``weighting`` (eq. 4).

    ``granularity`` "layer_kind" gives each (layer, CAD|VR) term its own weight ("25D" for 12 layers); "layer"
    shares one weight per layer ("13D"). ``manual_weights`` lists one weight per distillation task for
    ``weighting: manual``. ``relation_heads`` (a kdfast extension, eq. 3; null in the paper's setting)
    re-splits the concatenated heads of both models into this many heads, for a pair whose head counts differ;
    set to the student's count, the student's own heads are kept and only the teacher's re-split.
    ``direction`` "teacher_student" computes KL(t || s) instead: MiniLM's direction, and what the authors'
    code computes (``F.kl_div(log CAD_s, CAD_t)`` is KL(CAD_t || CAD_s)), where the paper writes KL(CAD_s ||
    CAD_t).
    """

    weight: float = 1.0
    pairs: list[MTDPairConfig] = field(default_factory=list)
    relations: list[Literal["cad", "vr"]] = field(default_factory=lambda: ["cad", "vr"])
    weighting: Literal["uniform", "manual", "learnable", "uncertainty"] = "uncertainty"
    granularity: Literal["layer_kind", "layer"] = "layer_kind"
    manual_weights: list[float] | None = None
    relation_heads: int | None = None
    direction: Literal["student_teacher", "teacher_student"] = "student_teacher"


def task_names(cfg: MTDConfig) -> list[str]:
    """The K distillation tasks of eq. 4: one per layer pair ("layer") or per (pair, relation)."""
    if cfg.granularity == "layer":
        return [f"{pair.student}_{pair.teacher}" for pair in cfg.pairs]
    return [f"{pair.student}_{pair.teacher}_{rel}" for pair in cfg.pairs for rel in cfg.relations]


def validate(
    cfg: MTDConfig,
    student_taps: Mapping[str, TapConfig],
    teacher_taps: Mapping[str, TapConfig],
    where: str = "loss.mtd",
) -> None:
    """Pairs of attention taps, at least one relation, one manual weight per task, positive heads."""
    if not cfg.pairs:
        raise ConfigError(f"method mtd needs {where}.pairs: the (student, teacher) attention taps to distill")
    for i, pair in enumerate(cfg.pairs):
        at = f"{where}.pairs[{i}]"
        require_tap(student_taps, pair.student, role="student", where=f"{at}.student", kind="attention")
        require_tap(teacher_taps, pair.teacher, role="teacher", where=f"{at}.teacher", kind="attention")
    if not cfg.relations:
        raise ConfigError(f"{where}.relations is empty: list 'cad', 'vr' or both")
    if cfg.weighting == "manual":
        count = len(task_names(cfg))
        if cfg.manual_weights is None or len(cfg.manual_weights) != count:
            per_pair = count // len(cfg.pairs)
            raise ConfigError(
                f"{where}.weighting=manual needs {where}.manual_weights with {count} values "
                f"({len(cfg.pairs)} pairs x {per_pair} per pair), got {cfg.manual_weights}"
            )
    if cfg.relation_heads is not None:
        positive(cfg.relation_heads, f"{where}.relation_heads")


class MTDLoss(DistillationLoss):
    """MTD: the supervised task loss L_0 = CE and L_CAD (eq. 1) and L_VR (eq. 2) per configured (student,
    teacher) attention tap pair, combined by the task weighting of eq. 4.

    ``forward`` returns (term, parts): "ce" (L_0), "cad" and "vr" (the unweighted sums over layers of eq. 1
    and eq. 2, those configured), "total_distill" (the loss minus the weighted L_0 term) and "w_<task>" (the
    current coefficient of each task's loss, detached). The weighting's learnable parameters, if any, are
    parameters of this module, exempt from weight decay. The teacher's taps are detached: gradients reach the
    student and the task weights only. Call :meth:`check` once on a real batch: it raises UsageError when tap
    shapes cannot be matched.
    """

    cfg: MTDConfig

    def setup(self, student_taps: Mapping[str, TapConfig], teacher_taps: Mapping[str, TapConfig]) -> None:
        self.tasks = task_names(self.cfg)
        if self.cfg.weighting == "learnable":
            self.task_logits = nn.Parameter(torch.zeros(len(self.tasks) + 1))
        elif self.cfg.weighting == "uncertainty":
            self.task_w = nn.Parameter(torch.ones(len(self.tasks) + 1))

    def no_weight_decay(self) -> set[str]:
        """The task weights of eq. 4 (theta or w), when the weighting learns them."""
        return {name for name, _ in self.named_parameters()}

    def _split(self, qkv: QKV) -> QKV:
        if self.cfg.relation_heads is None:
            return qkv
        return QKV(*(relation_heads(x, self.cfg.relation_heads) for x in qkv))

    def relations(self, pair: MTDPairConfig, student: QKV, teacher: QKV) -> dict[str, torch.Tensor]:
        """The configured terms of one layer pair: {"cad": L_CAD (eq. 1), "vr": L_VR (eq. 2)}, each the
        mean over B * heads * N rows of the row KL; the teacher side is detached."""
        s = self._split(student)
        t = self._split(QKV(*(x.detach() for x in teacher)))
        operands = {"cad": (s.q, s.k, t.q, t.k), "vr": (s.v, s.v, t.v, t.v)}
        return {
            rel: kernels.attention_kl(*operands[rel], direction=self.cfg.direction, impl=self.impl)
            for rel in self.cfg.relations
        }

    def combine(self, supervised: torch.Tensor, distill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 4: (total, coefficients) for the supervised loss L_0 and the K distillation task losses;
        ``coefficients`` (K+1,) is what multiplies each task loss (for logging)."""
        losses = torch.cat([supervised.reshape(1), distill])
        weighting = self.cfg.weighting
        if weighting == "uncertainty":
            return uncertainty_weighting(losses, self.task_w), 1 / (2 * self.task_w.square())
        if weighting == "learnable":
            coefficients = torch.softmax(self.task_logits, dim=0)
        elif weighting == "manual":
            coefficients = losses.new_tensor([1.0, *self.cfg.manual_weights])
        else:
            coefficients = torch.ones_like(losses)
        return (coefficients * losses).sum(), coefficients

    def term(self, batch: Batch) -> Term:
        supervised = supervised_ce(batch.student_logits, batch.targets, self.label_smoothing)
        parts = {"ce": supervised}
        layers = [
            self.relations(pair, batch.student_taps[pair.student], batch.teacher_taps[pair.teacher])
            for pair in self.cfg.pairs
        ]
        if self.cfg.granularity == "layer":
            distill = torch.stack([torch.stack(list(terms.values())).sum() for terms in layers])
        else:
            distill = torch.stack([term for terms in layers for term in terms.values()])
        total, coefficients = self.combine(supervised, distill)
        for rel in self.cfg.relations:
            parts[rel] = torch.stack([terms[rel] for terms in layers]).sum()
        weighted_supervised = coefficients[0] * supervised
        if self.cfg.weighting == "uncertainty":
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
        pair = self.cfg.pairs[-1]
        teacher = teacher_taps[pair.teacher]
        side, _ = patch_grid(teacher.k.shape[2])
        grid = (side, side)
        student = cls_attention_map(student_taps[pair.student], grid, impl=self.impl)
        return [(student, cls_attention_map(teacher, grid, impl=self.impl))]

    def check(self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]) -> None:
        """Raise UsageError when the taps of a real batch cannot be matched: a tap that gave no Q, K, V,
        different batch sizes or token counts N, or heads that cannot be paired (eq. 3)."""
        heads = self.cfg.relation_heads
        for pair in self.cfg.pairs:
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


METHOD = Method(
    name="mtd",
    schema=MTDConfig,
    validate=validate,
    loss=MTDLoss,
    paper="Chen, Wu, Wang, Lee & Jang 2022, Multimodal Transformer Distillation for Audio-Visual "
    "Synchronization (arXiv:2210.15563)",
    supervised=True,
    teacher_cache=TeacherCache(
        reason="it reads the Q, K and V of every distilled teacher layer (3 x tokens x width values per "
        "layer and image, in float32 since softmax(Q K^T / sqrt(d)) amplifies float16 rounding): per layer "
        "more bytes than the image itself, read back every step"
    ),
)
