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
  (7) the search: DAFA's parameters minimize L_aug as a validation loss, on held-out images the student does
      not train on, while the student minimizes eq. 15 on the training images (a bi-level problem)
  (11) DAM: a detection head of three branches (heatmap, size, offset; each 3x3 conv + ReLU + 1x1 conv),
      shared by the student branch Phi_s(F^s) (Phi_s: a 1x1 adapter to the teacher's channels) and the
      teacher branch
  (12) L_D = sum_i ||conv_i(Phi_s(F^s)) - conv_i(s(F^t))||^2 over the three branches i, on their raw outputs;
      the teacher branch sees the augmented teacher feature s(F^t)
  (13) the areas A_1..A_P decoded from heatmap, size and offset as CenterNet boxes
  (14) L_DA = sum_p ||M(A_p) Phi_s(F^s) - M(A_p) s(F^t)||^2, the feature loss inside the areas
  (15) L = L_task + alpha L_D + beta L_DA; L_task is the base method's objective (CE, and the base feature
      method's loss when SoKD plugs into one: compose ``loss.method: [fitnet, sokd]`` and so on; the base
      method reads s(F^t) in place of F^t, :meth:`SoKDLoss.teacher_view`)
The search lasts ``search_epochs`` (the paper's best: 20 of 240 epochs) and reads a held-out share
``search_split`` of the training split (eq. 7; the run trains every stage on the rest, so the student never
fits those images; the share is kdfast's, the text available here does not state the paper's); the student
trains against s(F^t) throughout: the sampled sub-policy while searching, the argmax sub-policy once the
search ends. Every ||.||^2 is taken as a mean over elements (batch mean), as every kdfast feature loss.
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
from kdfast.methods.base import Batch, DistillationLoss, Term, require_tap, step_aside
from kdfast.methods.features import patch_grid, resize_to, spatial_feature, tap_tensor
from kdfast.methods.registry import Method, TeacherCache
from kdfast.schema import at_most, positive

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
    paper's best 20 of 240, scaled to the run: round(epochs / 12), at least 1) on the held-out share
    ``search_split`` of the training images (eq. 7); DAM decodes ``areas`` (P) areas of mutual interest.
    ``feature_weight`` adds the unmasked feature loss 1/2 mean (s(F^t) - Phi_s(F^s))^2: a kdfast addition
    (not in eq. 15), 0 (off) in the paper's setting, where the composed base method gives L_task.
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
    search_split: float = 0.1
    feature_weight: float = 0.0


def validate(
    cfg: SoKDConfig,
    student_taps: Mapping[str, TapConfig],
    teacher_taps: Mapping[str, TapConfig],
    where: str = "loss.sokd",
) -> None:
    """Two feature taps; a search of >= 0 epochs; positive areas, search sizes, temperature and rate; a
    held-out share in (0, 0.5]; a feature weight >= 0."""
    require_tap(student_taps, cfg.student, role="student", where=f"{where}.student", kind="feature")
    require_tap(teacher_taps, cfg.teacher, role="teacher", where=f"{where}.teacher", kind="feature")
    if cfg.search_epochs is not None:
        positive(cfg.search_epochs, f"{where}.search_epochs", allow_zero=True)
    for key in ("areas", "sub_policies", "ops_per_policy", "temperature", "search_lr"):
        positive(getattr(cfg, key), f"{where}.{key}")
    positive(cfg.search_split, f"{where}.search_split")
    at_most(cfg.search_split, 0.5, f"{where}.search_split", "the student would train on fewer images")
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
    The target is s(F^t), refined by DAFA (the sampled sub-policy in the search epochs, the searched one
    afterwards) and detached: :meth:`teacher_view` puts it in place of the teacher tap, so the feature method
    SoKD plugs into (``loss.method: [fitnet, sokd]``, L_task of eq. 15) distills s(F^t) too; SoKD's own terms
    read it on the student's grid. The areas (eq. 13) are decoded from the student branch's outputs: the head
    is shared and L_D aligns the branches, so they are the areas both find.

    The adapter and the detection head train with the student. DAFA's parameters are registered (saved
    in ``state_dict``) but have requires_grad False, so the training loop leaves them out of the student
    optimizer; in the search epochs :meth:`after_step` gives them one Adam step (``search_lr``) on L_aug
    over the next batch of the held-out images (:meth:`use_held_out`), through detached aliases
    (``functional_call``), as CAKD trains its discriminator. :meth:`check` on a real batch sizes and
    builds the sub-networks.
    """

    cfg: SoKDConfig
    adapter: nn.Conv2d
    head: DetectionHead
    dafa: DAFA

    def setup(self, student_taps: Mapping[str, TapConfig], teacher_taps: Mapping[str, TapConfig]) -> None:
        self.dafa_optimizer: torch.optim.Adam | None = None
        self.searching = self.cfg.search_epochs is None or self.cfg.search_epochs > 0
        self._held_out: Callable[[], tuple[Mapping[str, Any], Mapping[str, Any]]] | None = None

    def _features(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(F^s, F^t) as (B, C, H, W) maps (ViT tokens on their patch grid), each on its own grid."""
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
        sokd, channels = self.cfg, (student.shape[1], teacher.shape[1])
        built = self.build_once(
            channels,
            lambda: {
                "adapter": nn.Conv2d(*channels, 1),
                "head": DetectionHead(channels[1]),
                "dafa": DAFA(sokd.sub_policies, sokd.ops_per_policy, sokd.temperature).requires_grad_(False),
            },
            student.device,
            "loss.sokd: the adapter was built for (student, teacher) channels",
        )
        if built:
            self.dafa_optimizer = torch.optim.Adam(self.dafa.parameters(), lr=sokd.search_lr)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """The search runs in epochs 0 .. n - 1 of the ``epochs`` (n: :func:`search_length`); DAFA is frozen
        from then on."""
        self.searching = epoch < search_length(self.cfg.search_epochs, epochs)

    def held_out_share(self) -> float:
        """Eq. 7: L_aug is a validation loss, so the search reads images the student does not train on: the
        share ``search_split`` of the training split (none when the run has no search epochs)."""
        return 0.0 if self.cfg.search_epochs == 0 else self.cfg.search_split

    def use_held_out(self, taps: Callable[[], tuple[Mapping[str, Any], Mapping[str, Any]]]) -> None:
        """``taps()``: the (student, teacher) taps of the next held-out batch, read by the search."""
        self._held_out = taps

    def teacher_view(self, teacher_taps: Mapping[str, Any]) -> Mapping[str, Any]:
        """The teacher taps with the tap ``teacher`` replaced by s(F^t), detached: DAFA on its map (ViT
        tokens on their patch grid, the prefix tokens kept as they are), in float32; unchanged in eval mode,
        where DAFA is the identity."""
        self.require_built("adapter")
        name = self.cfg.teacher
        feature = tap_tensor(teacher_taps, name, "teacher").detach().float()
        refined = self.dafa(spatial_feature(feature, name), self.searching).detach()
        if feature.dim() == 3:
            prefix = patch_grid(feature.shape[1])[1]
            refined = torch.cat([feature[:, :prefix], refined.flatten(2).transpose(1, 2)], dim=1)
        return {**teacher_taps, name: refined}

    def aligned(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Phi_s(F^s), the adapted student feature; the teacher tap on the student's grid, detached); the
        sub-networks must be built."""
        self.require_built("adapter")
        student, teacher = self._features(student_taps, teacher_taps)
        return self.adapter(student.float()), self.on_student_grid(teacher.detach(), student)

    def on_student_grid(self, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """A teacher map resized bilinearly to the student map's grid, in float32."""
        return resize_to(teacher.float(), tuple(student.shape[-2:]), self.impl)

    def term(self, batch: Batch) -> Term:
        sokd = self.cfg
        f_s, target = self.aligned(batch.student_taps, batch.teacher_taps)  # s(F^t): teacher_view's
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
        return loss, parts

    def after_step(self) -> None:
        """In the search epochs, one Adam step of DAFA's parameters on L_aug = 1/2 mean (s(F^t) -
        Phi_s(F^s))^2 over the next held-out batch (eq. 7), with a freshly sampled sub-policy; nothing once
        frozen."""
        if not self.searching:
            return
        if self._held_out is None:
            raise UsageError(
                "SoKDLoss: the search reads held-out images; give use_held_out() the taps of held-out "
                "batches (the training loop does when held_out_share() > 0)"
            )
        student_taps, teacher_taps = self._held_out()
        with torch.no_grad():
            student, teacher = self._features(student_taps, teacher_taps)
            f_s = self.adapter(student.float())
        teacher = teacher.detach().float()

        def l_aug(dafa: Callable[..., torch.Tensor]) -> torch.Tensor:
            return consistency_loss(self.on_student_grid(dafa(teacher, True), f_s), f_s)

        step_aside(self.dafa, self.dafa_optimizer, l_aug)

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
