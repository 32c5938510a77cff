"""SoKD: a plug-in on top of feature distillation, with DAFA (differentiable feature augmentation) and DAM
(a detection-head module finding areas of mutual interest).

Numbering used in the docstrings (Shen et al. 2024, "Student-Oriented Teacher Knowledge Refinement for
Knowledge Distillation", arXiv:2409.18785):
  (1) base feature distillation: f_s = A(F_S), a 1x1 conv adapter to the teacher's channel count, against
      the teacher feature f_t resized to the student's grid; L_feat = 1/2 mean (target - f_s)^2
  (2) DAFA sub-policy choice: w = Gumbel-softmax(policy logits, tau) with a hard one-hot forward and
      straight-through gradients; each operation applied with a relaxed Bernoulli b (hard forward,
      straight-through) as b op(x, m) + (1 - b) x; magnitudes m in [0, 1], quantized with a
      straight-through estimator
  (3) consistency loss 1/2 mean (s(f_t) - f_s)^2, which trains the DAFA parameters for the first
      ``search_epochs`` epochs; afterwards they are frozen and s(f_t) is the target of (1) and (5)
  (4) DAM: one detection head (heatmap, size, offset branches, each 3x3 conv + ReLU + 1x1 conv) on f_s and
      on f_t; L_D = mse(sigmoid H_s, sigmoid H_t) + l1(size_s, size_t) + l1(offset_s, offset_t)
  (5) mask of mutual interest M: the top-k positions of sigmoid H_s * sigmoid H_t (k = a quarter of the
      grid); L_DA = sum M (target - f_s)^2 / (2 C sum M)
  (6) L = L_feat + alpha L_D + beta L_DA, this module's term; the logit KD and CE of the example config are
      the method ``kd`` and ``loss.ce`` beside it
The base feature loss (1) is kept as its own term "feat" beside the masked L_DA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdfast.config import TapConfig
from kdfast.errors import UsageError
from kdfast.methods.base import DistillationLoss, require_tap, step_aside
from kdfast.methods.features import resize_to, spatial_feature, tap_tensor
from kdfast.methods.registry import Method
from kdfast.schema import positive

MAGNITUDE_LEVELS = 10  # eq. 2: magnitudes live on 11 levels 0, 0.1, ..., 1 in the forward pass
MASK_FRACTION = 0.25  # eq. 5: the mask keeps a quarter of the grid
HEAD_WIDTH = 64


def scale_op(x: torch.Tensor, m: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """Eq. 2, scaling: x (1 + m)."""
    return x * (1 + m)


def noise_op(x: torch.Tensor, m: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """Eq. 2, gaussian noise: x + m z, with ``draw`` z ~ N(0, 1) of x's shape."""
    return x + m * draw


def channel_drop_op(x: torch.Tensor, m: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """Eq. 2, channel dropout: the channels whose ``draw`` u (x's shape, constant over H, W) is below 0.5
    are attenuated by (1 - m); a hard drop would give m no gradient."""
    return x * (1 - m * (draw[:, :, :1, :1] < 0.5).to(x.dtype))


def blur_op(x: torch.Tensor, m: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """Eq. 2, blur: (1 - m) x + m avg3x3(x), the 3x3 mean over the in-bounds neighbours."""
    return (1 - m) * x + m * F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def shift_op(x: torch.Tensor, m: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """Eq. 2, spatial shift: (1 - m) x + m roll(x, (1, 1)), a sub-pixel shift by m of a pixel."""
    return (1 - m) * x + m * torch.roll(x, shifts=(1, 1), dims=(2, 3))


OPS: tuple[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    scale_op,
    noise_op,
    channel_drop_op,
    blur_op,
    shift_op,
)
NOISY_OPS = (noise_op,)  # draw ~ N(0, 1); the other ops take draw ~ U(0, 1)


def straight_through_magnitude(raw: torch.Tensor) -> torch.Tensor:
    """Eq. 2: clamp(raw, 0, 1) rounded to 1/MAGNITUDE_LEVELS in the forward pass, with the gradient of
    the unrounded value (straight-through estimator, Bengio et al. 2013)."""
    m = raw.clamp(0, 1)
    return m + (torch.round(m * MAGNITUDE_LEVELS) / MAGNITUDE_LEVELS - m).detach()


def hard_relaxed_bernoulli(logits: torch.Tensor, temperature: float, uniform: torch.Tensor) -> torch.Tensor:
    """Eq. 2: b_soft = sigmoid((logit + log u - log(1 - u)) / tau) (Maddison et al. 2017), forward 1 where
    b_soft > 0.5, else 0, with the gradient of b_soft."""
    soft = torch.sigmoid((logits + torch.log(uniform) - torch.log1p(-uniform)) / temperature)
    return (soft > 0.5).to(soft.dtype) + soft - soft.detach()


def consistency_loss(augmented: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Eq. 3: 1/2 mean (s(f_t) - f_s)^2."""
    return 0.5 * (augmented.float() - student.float()).square().mean()


def dam_alignment(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Eq. 4: mse(sigmoid H_s, sigmoid H_t) + l1(size_s, size_t) + l1(offset_s, offset_t)."""
    (hs, ss, os_), (ht, st, ot) = student, teacher
    return F.mse_loss(torch.sigmoid(hs), torch.sigmoid(ht)) + F.l1_loss(ss, st) + F.l1_loss(os_, ot)


def mutual_interest_mask(student_heat: torch.Tensor, teacher_heat: torch.Tensor) -> torch.Tensor:
    """Eq. 5: (B, H, W) 0/1 mask of the top ceil(MASK_FRACTION H W) positions of
    sigmoid H_s * sigmoid H_t per sample, for (B, 1, H, W) heatmap logits; no gradient."""
    score = (torch.sigmoid(student_heat) * torch.sigmoid(teacher_heat)).detach().flatten(1)
    k = math.ceil(MASK_FRACTION * score.shape[1])
    mask = torch.zeros_like(score).scatter_(1, score.topk(k, dim=1).indices, 1.0)
    return mask.view(student_heat.shape[0], *student_heat.shape[-2:])


def masked_feature_loss(target: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 5: L_DA = sum_{b,c,y,x} M_{b,y,x} (target - f_s)^2 / (2 C sum M)."""
    squared = (target.float() - student.float()).square()
    return (squared * mask[:, None]).sum() / (2 * student.shape[1] * mask.sum().clamp_min(1))


@dataclass
class SoKDConfig:
    """``loss.sokd``: SoKD on top of feature distillation between a ``student`` and a ``teacher`` feature tap.

    DAFA searches feature augmentation sub-policies applied to the teacher feature (Gumbel-softmax over
    ``sub_policies`` sub-policies of ``ops_per_policy`` operations at ``temperature``, a relaxed Bernoulli
    per operation, straight-through magnitudes) by the consistency loss (eq. 3) for the first
    ``search_epochs`` epochs with Adam at ``search_lr``; DAM's shared detection head (heatmap, size and offset
    branches) finds areas of mutual interest. Term = L_feat + alpha * L_D + beta * L_DA (eq. 6).
    """

    weight: float = 1.0
    student: str = ""
    teacher: str = ""
    alpha: float = 1.0
    beta: float = 1.0
    search_epochs: int = 1
    sub_policies: int = 8
    ops_per_policy: int = 2
    temperature: float = 0.5
    search_lr: float = 3e-3


def validate(
    cfg: SoKDConfig,
    student_taps: Mapping[str, TapConfig],
    teacher_taps: Mapping[str, TapConfig],
    where: str = "loss.sokd",
) -> None:
    """Two feature taps, a search of >= 0 epochs and positive search sizes, temperature and rate."""
    require_tap(student_taps, cfg.student, role="student", where=f"{where}.student", kind="feature")
    require_tap(teacher_taps, cfg.teacher, role="teacher", where=f"{where}.teacher", kind="feature")
    positive(cfg.search_epochs, f"{where}.search_epochs", allow_zero=True)
    for key in ("sub_policies", "ops_per_policy", "temperature", "search_lr"):
        positive(getattr(cfg, key), f"{where}.{key}")


class DAFA(nn.Module):
    """Eq. 2-3: ``sub_policies`` sub-policies of ``ops_per_policy`` operations each, operation k of
    sub-policy p being OPS[(p * ops_per_policy + k) % len(OPS)] so every operation is in the search space.
    Learnable: the sub-policy logits, one Bernoulli logit and one raw magnitude per operation. In training
    one sub-policy is sampled per call (Gumbel-softmax, hard); in eval the feature is returned unchanged."""

    def __init__(self, sub_policies: int, ops_per_policy: int, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature
        self.policy_ops = tuple(
            tuple((p * ops_per_policy + k) % len(OPS) for k in range(ops_per_policy))
            for p in range(sub_policies)
        )
        self.policy_logits = nn.Parameter(torch.zeros(sub_policies))
        self.op_logits = nn.Parameter(torch.zeros(sub_policies, ops_per_policy))
        self.magnitudes = nn.Parameter(torch.full((sub_policies, ops_per_policy), 0.1))

    def apply_policy(
        self, x: torch.Tensor, policy: int, gates: torch.Tensor, draws: list[torch.Tensor]
    ) -> torch.Tensor:
        """Eq. 2: the operations of sub-policy ``policy`` in order, each as b op(x, m) + (1 - b) x with
        the gate b = ``gates[k]``; ``draws[i]`` is the random tensor of OPS[i]."""
        magnitudes = straight_through_magnitude(self.magnitudes[policy])
        for k, op_index in enumerate(self.policy_ops[policy]):
            x = gates[k] * OPS[op_index](x, magnitudes[k], draws[op_index]) + (1 - gates[k]) * x
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """s(x) (eq. 2): sum_p w_p policy_p(x) with w the hard Gumbel-softmax sample, so the forward value is
        the sampled sub-policy's output and every sub-policy logit gets the straight-through gradient.
        Every sub-policy is evaluated (elementwise ops on one feature map), which keeps the graph free of
        data-dependent branches for torch.compile; the sub-policies share one random draw per operation."""
        if not self.training:
            return x
        weights = F.gumbel_softmax(self.policy_logits, tau=self.temperature, hard=True)
        uniform = torch.rand_like(self.op_logits).clamp(1e-6, 1 - 1e-6)
        gates = hard_relaxed_bernoulli(self.op_logits, self.temperature, uniform)
        draws = [torch.randn_like(x) if op in NOISY_OPS else torch.rand_like(x) for op in OPS]
        return sum(weights[p] * self.apply_policy(x, p, gates[p], draws) for p in range(len(self.policy_ops)))


class DetectionHead(nn.Module):
    """Eq. 4: heatmap (1 channel), size (2) and offset (2) branches, each 3x3 conv + ReLU + 1x1 conv."""

    def __init__(self, channels: int, width: int = HEAD_WIDTH) -> None:
        super().__init__()

        def branch(out: int) -> nn.Sequential:
            conv = nn.Conv2d(channels, width, 3, padding=1)
            return nn.Sequential(conv, nn.ReLU(), nn.Conv2d(width, out, 1))

        self.heatmap, self.size, self.offset = branch(1), branch(2), branch(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heatmap(x), self.size(x), self.offset(x)


class SoKDLoss(DistillationLoss):
    """SoKD eq. 6: L_feat (eq. 1) + alpha L_D (eq. 4) + beta L_DA (eq. 5).

    ``forward`` returns (term, parts): "feat" and "dam" (alpha L_D + beta L_DA) sum to the term;
    "dafa" is the consistency loss (eq. 3) of the batch, logged, not part of the student's loss. The
    feature target is f_t during the search epochs and the sampled s(f_t) afterwards.

    The adapter and the detection head train with the student. DAFA's parameters are registered (saved
    in ``state_dict``) but have requires_grad False, so the training loop leaves them out of the student
    optimizer; in the search epochs :meth:`after_step` gives them one Adam step (``search_lr``) on eq. 3
    over the last training batch, through detached aliases (``functional_call``), as CAKD trains its
    discriminator. :meth:`check` on a real batch sizes and builds the sub-networks.
    """

    def __init__(
        self,
        cfg: SoKDConfig,
        student_taps: Mapping[str, TapConfig],
        teacher_taps: Mapping[str, TapConfig],
        *,
        kernels_impl: str = "auto",
        label_smoothing: float = 0.0,
    ) -> None:
        validate(cfg, student_taps, teacher_taps)
        super().__init__(kernels_impl, label_smoothing)
        self.cfg = cfg
        self.adapter: nn.Conv2d | None = None
        self.head: DetectionHead | None = None
        self.dafa: DAFA | None = None
        self.dafa_optimizer: torch.optim.Adam | None = None
        self.searching = self.cfg.search_epochs > 0
        self._stash: tuple[torch.Tensor, torch.Tensor] | None = None

    def _features(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sokd = self.cfg
        student = spatial_feature(tap_tensor(student_taps, sokd.student, "student"), sokd.student)
        teacher = spatial_feature(tap_tensor(teacher_taps, sokd.teacher, "teacher"), sokd.teacher)
        return student, teacher

    def check(self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]) -> None:
        """Raise UsageError when the taps of a real batch cannot be matched (different batch sizes, or
        channel counts other than those the sub-networks were built for); on the first call, build the
        adapter, the detection head and DAFA."""
        student, teacher = self._features(student_taps, teacher_taps)
        if student.shape[0] != teacher.shape[0]:
            raise UsageError(
                f"loss.sokd: student and teacher features have batch sizes {student.shape[0]} and "
                f"{teacher.shape[0]}; tap one forward pass each"
            )
        if self.adapter is None:
            sokd = self.cfg
            self.adapter = nn.Conv2d(student.shape[1], teacher.shape[1], 1)
            self.head = DetectionHead(teacher.shape[1])
            self.dafa = DAFA(sokd.sub_policies, sokd.ops_per_policy, sokd.temperature).requires_grad_(False)
            self.to(student.device)
            self.dafa_optimizer = torch.optim.Adam(self.dafa.parameters(), lr=sokd.search_lr)
        built = (self.adapter.in_channels, self.adapter.out_channels)
        if built != (student.shape[1], teacher.shape[1]):
            raise UsageError(
                f"loss.sokd: the adapter was built for (student, teacher) channels {built}, but these taps "
                f"give {(student.shape[1], teacher.shape[1])}"
            )

    def start_epoch(self, epoch: int) -> None:
        """Eq. 3: DAFA is searched in epochs 0 .. search_epochs - 1 and frozen from then on."""
        self.searching = epoch < self.cfg.search_epochs

    def aligned(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1: (f_s, the adapted student feature; f_t, the teacher feature on the student's grid,
        detached); the sub-networks must be built."""
        if self.adapter is None:
            raise UsageError("SoKDLoss: call check() on a real batch first; it sizes the adapter")
        student, teacher = self._features(student_taps, teacher_taps)
        teacher = resize_to(teacher.detach().float(), tuple(student.shape[-2:]), self.impl)
        return self.adapter(student.float()), teacher

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        student_taps: Mapping[str, Any],
        teacher_taps: Mapping[str, Any],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        sokd = self.cfg
        f_s, f_t = self.aligned(student_taps, teacher_taps)
        augmented = self.dafa(f_t).detach()
        target = f_t if self.searching else augmented
        # The shared head learns from both sides: with the teacher's side detached, its own output is a
        # target that moves with the head's weights, and L_D grew without bound (digits: 0.9 -> 7.6).
        student_head, teacher_head = self.head(f_s), self.head(f_t)
        mask = mutual_interest_mask(student_head[0], teacher_head[0])
        parts = {
            "feat": consistency_loss(target, f_s),
            "dam": sokd.alpha * dam_alignment(student_head, teacher_head)
            + sokd.beta * masked_feature_loss(target, f_s, mask),
        }
        loss = sum(parts.values())
        parts["dafa"] = consistency_loss(augmented, f_s.detach())
        if self.training and self.searching:
            self._stash = (f_t, f_s.detach())
        return loss, parts

    def after_step(self) -> None:
        """Eq. 3, search: in the search epochs, one Adam step of DAFA's parameters on
        1/2 mean (s(f_t) - f_s)^2 over the last training batch; nothing once frozen."""
        if not self.searching or self._stash is None:
            return
        teacher, student = self._stash
        self._stash = None
        step_aside(self.dafa, self.dafa_optimizer, lambda dafa: consistency_loss(dafa(teacher), student))

    def get_extra_state(self) -> dict[str, Any]:
        """DAFA's Adam state, so a resumed search continues where it stopped."""
        return {"dafa_optimizer": self.dafa_optimizer.state_dict() if self.dafa_optimizer else None}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state["dafa_optimizer"] is not None:
            if self.dafa_optimizer is None:
                raise UsageError("SoKDLoss: call check() on a real batch before loading a saved state")
            self.dafa_optimizer.load_state_dict(state["dafa_optimizer"])

    def maps(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(student, teacher)] (B, h, w) DAM heatmaps sigmoid(H) (eq. 4) on the student's grid."""
        f_s, f_t = self.aligned(student_taps, teacher_taps)
        return [(torch.sigmoid(self.head(f_s)[0])[:, 0], torch.sigmoid(self.head(f_t)[0])[:, 0])]


METHOD = Method(
    name="sokd",
    schema=SoKDConfig,
    validate=validate,
    loss=SoKDLoss,
    paper="Shen, Huang, Zhu, Fan & Zhang 2024, Student-Oriented Teacher Knowledge Refinement for Knowledge "
    "Distillation (arXiv:2409.18785)",
)
