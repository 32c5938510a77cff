"""CRD: contrastive representation distillation (Tian, Krishnan & Isola, ICLR 2020, "Contrastive
Representation Distillation", arXiv:1910.10699), with a FIFO queue of negatives instead of the paper's memory
bank.

Numbering used in the docstrings (Tian et al., Sec. 3.1; s, t the student's and the teacher's embeddings of
one image, a positive pair; an embedding of another image is a negative):
  (1) embedding heads g^S(s) = W_S s + b_S and g^T(t) = W_T t + b_T, each L2-normalized, to feat_dim = 128
  (2) the critic h(T, S) = exp(g^T(t) . g^S(s) / tau) / (exp(g^T(t) . g^S(s) / tau) + N / M), tau = 0.07,
      N negatives per positive, M the size of the data set
  (3) L_crd = -log h(positive) - sum over the N negatives of log(1 - h(negative)), batch mean
  (4) the authors' implementation (RepDistiller, kept by mdistiller): exp(x / tau) is divided by
      Z = M * mean(exp(x / tau)), the mean taken once over the scores of the first batch and then frozen; in
      (2) M cancels, h = e / (e + N Z^), Z^ that mean, e = exp(x / tau). With c = log(N Z^), -log h =
      softplus(c - x / tau) and -log(1 - h) = softplus(x / tau - c), computed so
  (5) both directions: the student's g^S(s) against the teacher's positive and negatives, and the teacher's
      g^T(t) against the student's, each with its own Z^; L = L_S + L_T (the paper's objective adds
      beta L_crd to CE: beta is ``loss.crd.weight``, 0.8 in the authors' runs)
  (6) gradients as the authors': in RepDistiller (``crd/memory.py``, ContrastMemory) both the positive and the
      negatives of an anchor are rows of a memory bank read with ``.detach()``, so only the anchor's head
      receives gradient from its term; here the positive, the other head's live output for the same image, is
      detached too (as MoCo's keys). With a live positive the student's head would also learn as the positive
      of L_T: at initialisation that doubles the gradient reaching the student's embedding (2.0x measured on
      random embeddings, batch 64, K = 16384), the authors' weight 0.8 acting like about 1.6

The queue variant. The paper keeps a memory bank of M x feat_dim per model (every training image's embedding,
a momentum-0.5 average over epochs), takes the positive from that bank and N = 16384 negatives drawn from it;
its memory grows with the data set (M = 1.28 M on ImageNet: 2 x 656 MB in float32) and an entry is refreshed
once an epoch. Here each model has a FIFO queue of its last K = ``queue_size`` embeddings (MoCo, He et al.
2020): the positive is the other model's embedding of the same image in this batch (detached, eq. 6), the N =
K negatives are the queue, and the current batch is enqueued (detached, after the optimizer step) when the
step ends, the oldest rows leaving. Memory is K x feat_dim per model whatever the data set, and a negative is
at most K / B steps old. MoCo's momentum copy of the key encoder is not used: a queue row is the head's output
as it was when enqueued, as a memory-bank entry is the output of an earlier epoch's heads. Keep K below the
number of training images per epoch, so the queue never holds the anchor's own image (from the previous epoch)
as a negative. The queues, their write position and the two Z^ are buffers: they are saved in the training
state, so a resumed run continues with the same negatives. Under DDP every rank enqueues the embeddings of all
ranks (gathered in rank order), so the queues stay identical, as in MoCo.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.config import TapConfig
from kdfast.distributed import gather_rows
from kdfast.errors import UsageError
from kdfast.methods.base import Batch, DistillationLoss, Term, require_tap
from kdfast.methods.features import embedding
from kdfast.methods.registry import Method, TeacherCache
from kdfast.schema import positive

QUEUE_SEED = 0  # the initial queues: random unit vectors, the same on every rank and in every run


def full_precision(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor promoted to float32 at least."""
    return tuple(x.to(torch.promote_types(x.dtype, torch.float32)) for x in tensors)


def nce_normalizer(
    anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """Eq. 4's Z^: the mean of exp(x / tau) over the scores x of (B, d) anchors with their (B, d) positives
    and with the (K, d) negatives, B (K + 1) scores, as a 0-d tensor (float32 at least, autocast off)."""
    anchors, positives, negatives = full_precision(anchors, positives, negatives)
    with torch.autocast(anchors.device.type, enabled=False):
        scores = torch.cat([(anchors * positives).sum(1, keepdim=True), anchors @ negatives.T], dim=1)
        return torch.exp(scores / temperature).mean()


def contrastive_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    *,
    temperature: float,
    normalizer: torch.Tensor | float,
) -> torch.Tensor:
    """Eq. 3 with eq. 4's critic for unit (B, d) anchors, their (B, d) positives and (K, d) negatives shared
    by the batch: mean over anchors of softplus(c - x_pos / tau) + sum_k softplus(x_k / tau - c),
    c = log(K Z^); float32 at least, autocast off (the scores are divided by tau = 0.07, and exp of a bf16
    score would be off by several percent). Gradients reach whichever input requires them."""
    anchors, positives, negatives = full_precision(anchors, positives, negatives)
    with torch.autocast(anchors.device.type, enabled=False):
        c = torch.log(
            torch.as_tensor(normalizer, dtype=anchors.dtype, device=anchors.device) * negatives.shape[0]
        )
        positive_scores = (anchors * positives).sum(1) / temperature
        negative_scores = anchors @ negatives.T / temperature
        return (F.softplus(c - positive_scores) + F.softplus(negative_scores - c).sum(1)).mean()


def crd_loss(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    student_queue: torch.Tensor,
    teacher_queue: torch.Tensor,
    *,
    temperature: float,
    normalizers: tuple[torch.Tensor | float, torch.Tensor | float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5: (L_S, L_T) for the heads' unit (B, d) outputs g^S(s), g^T(t) of one batch and the (K, d) queues
    of past g^S and g^T outputs; ``normalizers`` the two Z^ (student anchors, teacher anchors). Each term's
    positive is the other head's output detached (eq. 6), so g^S(s) receives gradient only as the anchor of
    L_S and g^T(t) only as the anchor of L_T."""
    student_term = contrastive_nce(
        student_embedding,
        teacher_embedding.detach(),
        teacher_queue,
        temperature=temperature,
        normalizer=normalizers[0],
    )
    teacher_term = contrastive_nce(
        teacher_embedding,
        student_embedding.detach(),
        student_queue,
        temperature=temperature,
        normalizer=normalizers[1],
    )
    return student_term, teacher_term


def enqueue(queue: torch.Tensor, pointer: int, rows: torch.Tensor) -> int:
    """Write ``rows`` (n, d) into the FIFO ``queue`` (K, d) in place and return the new write position: row j
    goes to slot (pointer + j) mod K, so the queue wraps around; when n > K only the last K rows can stay and
    only they are written (to the slots the whole sequence would leave them in)."""
    size, count = queue.shape[0], rows.shape[0]
    kept = min(count, size)
    slots = (pointer + count - kept + torch.arange(kept, device=queue.device)) % size
    queue[slots] = rows[count - kept :].to(queue.dtype)
    return (pointer + count) % size


@dataclass
class CRDConfig:
    """``loss.crd``: weight * (L_S + L_T) (eq. 5) between the embeddings of the student tap ``student`` and
    the teacher tap ``teacher`` (feature taps; maps are average-pooled), through linear heads to
    ``feat_dim`` (eq. 1), with ``queue_size`` negatives per model at temperature tau."""

    weight: float = 1.0
    student: str = ""
    teacher: str = ""
    feat_dim: int = 128
    queue_size: int = 16384
    temperature: float = 0.07


def validate(
    cfg: CRDConfig,
    student_taps: Mapping[str, TapConfig],
    teacher_taps: Mapping[str, TapConfig],
    where: str = "loss.crd",
) -> None:
    """A student and a teacher feature tap; feat_dim, queue_size and tau > 0."""
    require_tap(student_taps, cfg.student, role="student", where=f"{where}.student", kind="feature")
    require_tap(teacher_taps, cfg.teacher, role="teacher", where=f"{where}.teacher", kind="feature")
    for key in ("feat_dim", "queue_size", "temperature"):
        positive(getattr(cfg, key), f"{where}.{key}")


class CRDLoss(DistillationLoss):
    """Eq. 5 with the queue variant above. ``forward`` returns (term, {"student", "teacher"}): L_S and L_T,
    which sum to the term.

    The heads' input widths come from the taps, so :meth:`check` on a real batch builds them and sets the two
    Z^ (eq. 4) from that batch against the initial queues, and must run before the optimizer is made (as
    ``run_training`` does). The heads train with the student and are dropped at inference. A training
    forward keeps its detached head outputs; :meth:`after_step` enqueues them.
    """

    cfg: CRDConfig
    embed_student: nn.Linear
    embed_teacher: nn.Linear

    def setup(self, student_taps: Mapping[str, TapConfig], teacher_taps: Mapping[str, TapConfig]) -> None:
        generator = torch.Generator().manual_seed(QUEUE_SEED)
        for name in ("student_queue", "teacher_queue"):
            rows = torch.randn(self.cfg.queue_size, self.cfg.feat_dim, generator=generator)
            self.register_buffer(name, F.normalize(rows, dim=1))
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("normalizers", torch.full((2,), float("nan")))
        self._stash: tuple[torch.Tensor, torch.Tensor] | None = None

    def embeddings(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(student (B, D_S), teacher (B, D_T) detached) pooled tap embeddings, float32 at least."""
        student = embedding(student_taps, self.cfg.student, "student")
        teacher = embedding(teacher_taps, self.cfg.teacher, "teacher").detach()
        if student.shape[0] != teacher.shape[0]:
            raise UsageError(
                f"loss.crd: the student tap gives {student.shape[0]} samples and the teacher tap "
                f"{teacher.shape[0]}; tap one forward pass of each model"
            )
        return full_precision(student, teacher)

    def heads(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1: (g^S(s), g^T(t)), unit rows (B, feat_dim), in float32 (autocast off)."""
        self.require_built("embedding heads")
        with torch.autocast(student.device.type, enabled=False):
            s = F.normalize(self.embed_student(student), dim=1)
            t = F.normalize(self.embed_teacher(teacher), dim=1)
        return s, t

    def check(self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]) -> None:
        """Raise UsageError when the taps of a real batch cannot be matched (not embeddings of one batch, or
        widths other than those the heads were built for); on the first call, build the heads and set the
        two Z^ of eq. 4 from this batch (averaged over ranks under DDP, so every rank uses the same)."""
        student, teacher = self.embeddings(student_taps, teacher_taps)
        widths, dim = (student.shape[1], teacher.shape[1]), self.cfg.feat_dim
        self.build_once(
            widths,
            lambda: {"embed_student": nn.Linear(widths[0], dim), "embed_teacher": nn.Linear(widths[1], dim)},
            student.device,
            "loss.crd: the heads were built for (student, teacher) widths",
        )
        if torch.isnan(self.normalizers).any():
            with torch.no_grad():
                s, t = self.heads(student, teacher)
                tau = self.cfg.temperature
                z = torch.stack(
                    [
                        nce_normalizer(s, t, self.teacher_queue, temperature=tau),
                        nce_normalizer(t, s, self.student_queue, temperature=tau),
                    ]
                )
                self.normalizers.copy_(gather_rows(z[None]).mean(0))

    def term(self, batch: Batch) -> Term:
        s, t = self.heads(*self.embeddings(batch.student_taps, batch.teacher_taps))
        student_term, teacher_term = crd_loss(
            s,
            t,
            self.student_queue,
            self.teacher_queue,
            temperature=self.cfg.temperature,
            normalizers=(self.normalizers[0], self.normalizers[1]),
        )
        if self.training:
            self._stash = (s.detach(), t.detach())
        return student_term + teacher_term, {"student": student_term, "teacher": teacher_term}

    def after_step(self) -> None:
        """Enqueue the last training forward's g^S and g^T (every rank's, under DDP), once."""
        if self._stash is None:
            return
        student, teacher = (gather_rows(x) for x in self._stash)
        self._stash = None
        pointer = int(self.queue_pointer)
        enqueue(self.student_queue, pointer, student)
        self.queue_pointer.fill_(enqueue(self.teacher_queue, pointer, teacher))


METHOD = Method(
    name="crd",
    schema=CRDConfig,
    validate=validate,
    loss=CRDLoss,
    paper="Tian, Krishnan & Isola 2020, Contrastive Representation Distillation (ICLR, arXiv:1910.10699); "
    "negatives from a FIFO queue (He et al. 2020, MoCo) instead of a memory bank",
    logits="none",
    teacher_cache=TeacherCache(reads=("features",)),
)
