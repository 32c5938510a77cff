"""SoKD: a plug-in on top of feature distillation, with DAFA (differentiable automatic feature augmentation)
refining the teacher feature for the student and DAM (a detection head) finding areas of mutual interest.

Numbering used in the docstrings (Shen, Huang, Zhu, Fan & Zhang 2024, "Student-Oriented Teacher Knowledge
Refinement for Knowledge Distillation", ACM MM 2024, arXiv:2409.18785):
  (DAFA) s(F^t): a sub-policy of feature operations applied to the teacher feature F^t; the sub-policy is
      chosen by a Gumbel-softmax over learnable logits, each of its operations applied or not by a relaxed
      Bernoulli with a learnable probability, at a learnable magnitude m in [0, 1]
  (10) magnitudes take the straight-through gradient dF/dm = 1 (the operations need not be differentiable
      in m)
  (L_aug) 1/2 (s(F^t) - F^s)^2, the consistency loss that trains the DAFA parameters during the search
  (11) DAM: a detection head of three branches (heatmap, size, offset; each 3x3 conv + ReLU + 1x1 conv),
      shared by the student branch Phi_s(F^s) (Phi_s: a 1x1 adapter to the teacher's channels) and the
      teacher branch
  (12) L_D = sum_i ||conv_i(Phi_s(F^s)) - conv_i(s(F^t))||^2 over the three branches i, on their raw outputs;
      the teacher branch sees the augmented teacher feature s(F^t)
  (13) the areas A_1..A_P decoded from heatmap, size and offset as CenterNet boxes
  (14) L_DA = sum_p ||M(A_p) Phi_s(F^s) - M(A_p) s(F^t)||^2, the feature loss inside the areas
  (15) L = L_task + alpha L_D + beta L_DA; L_task is the base method's objective (CE, and the base feature
      method's loss when SoKD plugs into one: compose ``loss.method: [fitnet, sokd]`` and so on)
The search lasts ``search_epochs`` (the paper's best: 20 of 240 epochs); the student trains against s(F^t)
throughout: the sampled sub-policy while searching, the argmax sub-policy once the search ends. Every
||.||^2 is taken as a mean over elements (batch mean), as every kdfast feature loss.
"""

from __future__ import annotations

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
from kdfast.methods.registry import Method, TeacherCache
from kdfast.schema import positive

HEAD_WIDTH = 64  # eq. 11: the hidden width of each branch (kdfast's choice)
PEAK_KERNEL = 3  # eq. 13: a peak is a heatmap cell equal to the maximum of its 3x3 neighbourhood (CenterNet)
SEARCH_FRACTION = 20 / 240  # the paper's best search length, as a fraction of the run


def scale_op(x: torch.Tensor, m: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """DAFA scaling: x (1 + m)."""
    return x * (1 + m)


def noise_op(x: torch.Tensor, m: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """DAFA gaussian noise: x + m z, with ``draw`` z ~ N(0, 1) of x's shape."""
    return x + m * draw


def channel_drop_op(x: torch.Tensor, m: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """DAFA channel masking: the channels whose ``draw`` u (x's shape, read at H = W = 0) is below m are
    zeroed, so m is the expected fraction dropped."""
    return x * (draw[:, :, :1, :1] >= m).to(x.dtype)


def blur_op(x: torch.Tensor, m: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """DAFA blur: (1 - m) x + m avg3x3(x), the 3x3 mean over the in-bounds neighbours."""
    return (1 - m) * x + m * F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def shift_op(x: torch.Tensor, m: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
    """DAFA spatial shift: (1 - m) x + m roll(x, (1, 1)), a sub-pixel shift by m of a pixel."""
    return (1 - m) * x + m * torch.roll(x, shifts=(1, 1), dims=(2, 3))


OPS: tuple[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    scale_op,
    noise_op,
    channel_drop_op,
    blur_op,
    shift_op,
)
NOISY_OPS = (noise_op,)  # draw ~ N(0, 1); the other ops take draw ~ U(0, 1)


def straight_through_op(
    op: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    m: torch.Tensor,
    draw: torch.Tensor,
) -> torch.Tensor:
    """Eq. 10: op(x, m) in the forward pass, with dF/dm = 1 for every element of the output (the
    straight-through estimator) and the operation's own gradient with respect to x."""
    return op(x, m.detach(), draw) + (m - m.detach())


def hard_relaxed_bernoulli(logits: torch.Tensor, temperature: float, uniform: torch.Tensor) -> torch.Tensor:
    """DAFA's operation gate: b_soft = sigmoid((logit + log u - log(1 - u)) / tau) (Maddison et al. 2017),
    forward 1 where b_soft > 0.5, else 0, with the gradient of b_soft."""
    soft = torch.sigmoid((logits + torch.log(uniform) - torch.log1p(-uniform)) / temperature)
    return (soft > 0.5).to(soft.dtype) + soft - soft.detach()


def consistency_loss(augmented: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """L_aug: 1/2 mean (s(F^t) - F^s)^2."""
    return 0.5 * (augmented.float() - student.float()).square().mean()


def dam_alignment(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Eq. 12: sum over the heatmap, size and offset branches of mean (conv_i(Phi_s(F^s)) - conv_i(s(F^t)))^2,
    on the branches' raw outputs."""
    return sum(F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher, strict=True))


def decode_areas(heatmap: torch.Tensor, size: torch.Tensor, offset: torch.Tensor, areas: int) -> torch.Tensor:
    """Eqs. 11 and 13, CenterNet's decoding (Zhou et al. 2019) on a (B, 1, H, W) heatmap (logits), a
    (B, 2, H, W) size (width, height) and a (B, 2, H, W) offset (x, y), in grid cells.

    The peaks are the cells whose sigmoid score equals the maximum of their 3x3 neighbourhood; the P =
    ``areas`` highest peaks are kept (fewer when the map has fewer peaks). Peak (y, x) gives the centre
    (x + o_x, y + o_y) and the box centre -/+ size / 2 (a negative size counts as 0), clipped to the grid;
    area p covers the cells (i, j) with floor(top) <= i <= floor(bottom) and floor(left) <= j <=
    floor(right). Returns the (B, P, H, W) 0/1 masks M(A_p); no gradient."""
    heatmap, size, offset = (x.detach().float() for x in (heatmap, size, offset))
    batch, _, height, width = heatmap.shape
    score = torch.sigmoid(heatmap)
    peaks = score == F.max_pool2d(score, PEAK_KERNEL, stride=1, padding=PEAK_KERNEL // 2)
    top, index = torch.where(peaks, score, 0.0).flatten(1).topk(min(areas, height * width), dim=1)
    ys, xs = (index // width).float(), (index % width).float()
    wh = size.flatten(2).gather(2, index[:, None].expand(-1, 2, -1)).clamp_min(0)
    shift = offset.flatten(2).gather(2, index[:, None].expand(-1, 2, -1))
    cx, cy = xs + shift[:, 0], ys + shift[:, 1]
    left = (cx - wh[:, 0] / 2).clamp(0, width - 1).floor()
    right = (cx + wh[:, 0] / 2).clamp(0, width - 1).floor()
    upper = (cy - wh[:, 1] / 2).clamp(0, height - 1).floor()
    lower = (cy + wh[:, 1] / 2).clamp(0, height - 1).floor()
    rows = torch.arange(height, device=heatmap.device).view(1, 1, -1, 1)
    cols = torch.arange(width, device=heatmap.device).view(1, 1, 1, -1)
    inside = (rows >= upper[..., None, None]) & (rows <= lower[..., None, None])
    inside = inside & (cols >= left[..., None, None]) & (cols <= right[..., None, None])
    return (inside & (top > 0)[..., None, None]).float()


def area_feature_loss(target: torch.Tensor, student: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Eq. 14: sum_p ||M(A_p) student - M(A_p) target||^2, divided by the number of feature elements
    (B C H W), for (B, C, H, W) features and (B, P, H, W) masks; a cell inside k areas counts k times."""
    squared = (target.float() - student.float()).square()
    return (squared * masks.sum(1, keepdim=True)).sum() / student.numel()


@dataclass
class SoKDConfig:
    """``loss.sokd``: SoKD between a ``student`` and a ``teacher`` feature tap; its term is alpha L_D +
    beta L_DA (eq. 15 without L_task, which the run's CE and the base method give).

    DAFA searches ``sub_policies`` sub-policies of ``ops_per_policy`` operations (Gumbel-softmax and relaxed
    Bernoulli at ``temperature``) by L_aug with Adam at ``search_lr`` for ``search_epochs`` epochs (null: the
    paper's best 20 of 240, scaled to the run: round(epochs / 12), at least 1); DAM decodes ``areas`` (P)
    areas of mutual interest. ``feature_weight`` adds the unmasked feature loss 1/2 mean (s(F^t) -
    Phi_s(F^s))^2: a kdfast addition (not in eq. 15), 0 (off) in the paper's setting; it stands in for a
    FitNet-style base method where none is composed.
    """

    weight: float = 1.0
    student: str = ""
    teacher: str = ""
    alpha: float = 1.0
    beta: float = 1.0
    areas: int = 8
    search_epochs: int | None = None
    sub_policies: int = 8
    ops_per_policy: int = 2
    temperature: float = 0.5
    search_lr: float = 3e-3
    feature_weight: float = 0.0


def validate(
    cfg: SoKDConfig,
    student_taps: Mapping[str, TapConfig],
    teacher_taps: Mapping[str, TapConfig],
    where: str = "loss.sokd",
) -> None:
    """Two feature taps; a search of >= 0 epochs; positive areas, search sizes, temperature and rate; a
    feature weight >= 0."""
    require_tap(student_taps, cfg.student, role="student", where=f"{where}.student", kind="feature")
    require_tap(teacher_taps, cfg.teacher, role="teacher", where=f"{where}.teacher", kind="feature")
    if cfg.search_epochs is not None:
        positive(cfg.search_epochs, f"{where}.search_epochs", allow_zero=True)
    for key in ("areas", "sub_policies", "ops_per_policy", "temperature", "search_lr"):
        positive(getattr(cfg, key), f"{where}.{key}")
    positive(cfg.feature_weight, f"{where}.feature_weight", allow_zero=True)


def search_length(search_epochs: int | None, epochs: int) -> int:
    """The number of search epochs: ``search_epochs`` when given, else the paper's 20 of 240 scaled to a run
    of ``epochs`` epochs, round(epochs / 12), at least 1."""
    if search_epochs is not None:
        return search_epochs
    return max(1, round(epochs * SEARCH_FRACTION))


class DAFA(nn.Module):
    """DAFA: ``sub_policies`` sub-policies of ``ops_per_policy`` operations each, operation k of sub-policy p
    being OPS[(p * ops_per_policy + k) % len(OPS)] so every operation is in the search space. Learnable: the
    sub-policy logits, one probability logit and one raw magnitude per operation (m = clamp(raw, 0, 1)).

    ``forward(x, search)``: in training, with ``search`` a sub-policy sampled by a hard Gumbel-softmax and
    each operation gated by a hard relaxed Bernoulli (gradients to every parameter), without ``search`` the
    searched sub-policy, argmax of the logits, each of its operations applied with its learned probability
    (a fresh Bernoulli draw per call, as an AutoAugment policy applies its operations); in eval the
    feature is returned unchanged."""

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
        """The operations of sub-policy ``policy`` in order, each as b op(x, m) + (1 - b) x with the gate
        b = ``gates[k]`` and eq. 10's straight-through magnitude; ``draws[i]`` is OPS[i]'s random tensor."""
        magnitudes = self.magnitudes[policy].clamp(0, 1)
        for k, op_index in enumerate(self.policy_ops[policy]):
            applied = straight_through_op(OPS[op_index], x, magnitudes[k], draws[op_index])
            x = gates[k] * applied + (1 - gates[k]) * x
        return x

    def searched_policy(self) -> int:
        """The sub-policy the search chose: argmax of the sub-policy logits."""
        return int(self.policy_logits.argmax())

    def forward(self, x: torch.Tensor, search: bool) -> torch.Tensor:
        """s(x). While searching: sum_p w_p policy_p(x) with w the hard Gumbel-softmax sample, so the forward
        value is the sampled sub-policy's output and every sub-policy logit gets the straight-through
        gradient; every sub-policy is evaluated (elementwise ops on one feature map), which keeps the graph
        free of data-dependent branches for torch.compile; the sub-policies share one draw per operation."""
        if not self.training:
            return x
        draws = [torch.randn_like(x) if op in NOISY_OPS else torch.rand_like(x) for op in OPS]
        if not search:
            policy = self.searched_policy()
            gates = (torch.rand_like(self.op_logits[policy]) < torch.sigmoid(self.op_logits[policy])).float()
            return self.apply_policy(x, policy, gates, draws)
        weights = F.gumbel_softmax(self.policy_logits, tau=self.temperature, hard=True)
        uniform = torch.rand_like(self.op_logits).clamp(1e-6, 1 - 1e-6)
        gates = hard_relaxed_bernoulli(self.op_logits, self.temperature, uniform)
        return sum(weights[p] * self.apply_policy(x, p, gates[p], draws) for p in range(len(self.policy_ops)))


class DetectionHead(nn.Module):
    """Eq. 11: heatmap (1 channel), size (2) and offset (2) branches, each 3x3 conv + ReLU + 1x1 conv."""

    def __init__(self, channels: int, width: int = HEAD_WIDTH) -> None:
        super().__init__()

        def branch(out: int) -> nn.Sequential:
            conv = nn.Conv2d(channels, width, 3, padding=1)
            return nn.Sequential(conv, nn.ReLU(), nn.Conv2d(width, out, 1))

        self.heatmap, self.size, self.offset = branch(1), branch(2), branch(2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.heatmap(x), self.size(x), self.offset(x)


class SoKDLoss(DistillationLoss):
    """SoKD eq. 15 without L_task: alpha L_D (eq. 12) + beta L_DA (eq. 14) (+ feature_weight times the
    unmasked feature loss, a kdfast option).

    ``forward`` returns (term, parts): "dam" (alpha L_D), "areas" (beta L_DA) and, when ``feature_weight``
    is set, "feat" sum to the term; "aug" is L_aug of the batch, logged, not part of the student's loss.
    The target is s(F^t) (the teacher feature on the student's grid, refined by DAFA, detached): the
    sampled sub-policy in the search epochs, the searched one afterwards. The areas (eq. 13) are decoded
    from the student branch's outputs: the head is shared and L_D aligns the branches, so they are the
    areas both find.

    The adapter and the detection head train with the student. DAFA's parameters are registered (saved
    in ``state_dict``) but have requires_grad False, so the training loop leaves them out of the student
    optimizer; in the search epochs :meth:`after_step` gives them one Adam step (``search_lr``) on L_aug
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
        self.searching = cfg.search_epochs is None or cfg.search_epochs > 0
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

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """The search runs in epochs 0 .. n - 1 of the ``epochs`` (n: :func:`search_length`); DAFA is frozen
        from then on."""
        self.searching = epoch < search_length(self.cfg.search_epochs, epochs)

    def aligned(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Phi_s(F^s), the adapted student feature; F^t, the teacher feature on the student's grid,
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
        target = self.dafa(f_t, self.searching).detach()
        # The shared head learns from both branches: with the teacher's detached, its own output is a
        # target that moves with the head's weights.
        student_head, teacher_head = self.head(f_s), self.head(target)
        masks = decode_areas(*student_head, sokd.areas)
        parts = {
            "dam": sokd.alpha * dam_alignment(student_head, teacher_head),
            "areas": sokd.beta * area_feature_loss(target, f_s, masks),
        }
        if sokd.feature_weight:
            parts["feat"] = sokd.feature_weight * consistency_loss(target, f_s)
        loss = sum(parts.values())
        parts["aug"] = consistency_loss(target, f_s.detach())
        if self.training and self.searching:
            self._stash = (f_t, f_s.detach())
        return loss, parts

    def after_step(self) -> None:
        """In the search epochs, one Adam step of DAFA's parameters on L_aug = 1/2 mean (s(F^t) - F^s)^2
        over the last training batch, with a freshly sampled sub-policy; nothing once frozen."""
        if not self.searching or self._stash is None:
            return
        teacher, student = self._stash
        self._stash = None
        searched = lambda dafa: consistency_loss(dafa(teacher, True), student)
        step_aside(self.dafa, self.dafa_optimizer, searched)

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
        """[(student, teacher)] (B, h, w) DAM heatmaps sigmoid(H) (eq. 11) on the student's grid."""
        f_s, f_t = self.aligned(student_taps, teacher_taps)
        return [(torch.sigmoid(self.head(f_s)[0])[:, 0], torch.sigmoid(self.head(f_t)[0])[:, 0])]


METHOD = Method(
    name="sokd",
    schema=SoKDConfig,
    validate=validate,
    loss=SoKDLoss,
    paper="Shen, Huang, Zhu, Fan & Zhang 2024, Student-Oriented Teacher Knowledge Refinement for Knowledge "
    "Distillation (arXiv:2409.18785)",
    logits="none",
    teacher_cache=TeacherCache(reads=("features",)),
)
