"""AGKD losses: soft-label KD plus attention alignment between student maps and hybrid-teacher maps.

AGKD (hybrid loss) numbering used in the docstrings:
  (1) L_KD = alpha * tau^2 * KL(p_T^tau || p_S^tau) + (1 - alpha) * CE(y, p_S)
  (2) teacher attention: VGG spatial maps Q(F) = mean_c |F_c|^2 and ViT CLS attention, resized to one grid and
      combined by addition or concatenation
  (3) attention metric between the student map (resized bilinearly to the teacher grid) and the teacher map:
      MSE, 1 - SSIM, 1 - cos, perceptual, or the hybrid alpha * L_SSIM + beta * L_cos
  (4) L = L_KD + lambda * sum over pairs of (3)
Every map op goes through ``kernels`` with ``impl``, so the Triton kernels take over on the GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import kernels
from kdfast.config import AttentionPairConfig, LossConfig, PerceptualConfig, TapConfig
from kdfast.errors import UsageError
from kdfast.models import build_model
from kdfast.taps import QKV, Taps


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau^2 * KL(p_T^tau || p_S^tau), batch mean (Hinton et al. 2015; AGKD eq. 1, first term unweighted)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


def supervised_ce(
    student_logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """CE(y, p_S) for integer labels (B,) or soft target probabilities (B, K) (CutMix; AGKD eq. 1)."""
    targets = targets.float() if targets.is_floating_point() else targets
    return F.cross_entropy(student_logits.float(), targets, label_smoothing=label_smoothing)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """AGKD eq. 1: alpha * tau^2 * KL(p_T || p_S) + (1 - alpha) * CE(targets)."""
    return alpha * kd_kl(student_logits, teacher_logits, temperature) + (1 - alpha) * supervised_ce(
        student_logits, targets, label_smoothing
    )


def patch_grid(tokens: int) -> tuple[int, int]:
    """(side, prefix): the largest square side with side^2 <= tokens; the rest are prefix (CLS) tokens."""
    side = math.isqrt(tokens)
    return side, tokens - side * side


def cls_attention_map(qkv: QKV, size: tuple[int, int], *, impl: str = "auto") -> torch.Tensor:
    """AGKD eq. 2, ViT part: softmax(q_cls K^T / sqrt(d)) over all tokens, patch entries kept, mean over
    heads, on the patch grid, resized bilinearly to ``size`` and L2-normalized: (B, h, w). Only the CLS row
    of the attention matrix is formed (B x heads x N), never N x N."""
    q, k = qkv.q.float(), qkv.k.float()
    side, prefix = patch_grid(k.shape[2])
    if prefix == 0:
        raise UsageError(
            f"attention tap has {k.shape[2]} tokens and no class token: tap a ViT with a CLS token"
        )
    row = torch.softmax((q[:, :, :1] @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    patches = row[:, :, 0, prefix:].mean(1).reshape(-1, 1, side, side)
    maps = kernels.resize(patches, size, impl=impl)[:, 0]
    return F.normalize(maps.flatten(1), dim=1, eps=1e-12).view_as(maps)


def resize_to(feature: torch.Tensor, size: tuple[int, int], impl: str = "auto") -> torch.Tensor:
    """(B, C, H, W) resized bilinearly to ``size`` by the kernels op; unchanged when it has that size."""
    return feature if tuple(feature.shape[-2:]) == tuple(size) else kernels.resize(feature, size, impl=impl)


def spatial_feature(feature: torch.Tensor, name: str) -> torch.Tensor:
    """A feature tap as (B, C, H, W): CNN maps as they are; ViT tokens (B, N, D) without the prefix tokens."""
    if feature.dim() == 4:
        return feature
    if feature.dim() == 3:
        side, prefix = patch_grid(feature.shape[1])
        return feature[:, prefix:].transpose(1, 2).reshape(feature.shape[0], -1, side, side)
    raise UsageError(
        f"feature tap {name!r} has shape {tuple(feature.shape)}: expected (B, C, H, W) or (B, tokens, D)"
    )


class RandomFeatureNet(nn.Module):
    """The default perceptual network: two 3x3 conv + ReLU layers with seeded random weights, frozen.
    Random convolutional features still separate local structure (Ulyanov et al. 2018, deep image prior),
    so the perceptual metric works without a weight file to download."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()
        )
        generator = torch.Generator().manual_seed(seed)
        for conv in (self.net[0], self.net[2]):
            bound = 1 / math.sqrt(conv.weight[0].numel())
            conv.weight.data.uniform_(-bound, bound, generator=generator)
            conv.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PerceptualFeatures(nn.Module):
    """A frozen network's features at one layer, for AGKD's perceptual metric; always in eval mode."""

    def __init__(self, cfg: PerceptualConfig) -> None:
        super().__init__()
        if cfg.arch is None:
            self.net: nn.Module = Taps(RandomFeatureNet(), {"layer": TapConfig(path="net.3")})
        else:
            if cfg.layer is None:
                raise UsageError(
                    "loss.attention.perceptual.layer: name the module path whose output is compared"
                )
            self.net = Taps(build_model(cfg.arch, weights=cfg.weights), {"layer": TapConfig(path=cfg.layer)})
        self.net.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> PerceptualFeatures:
        # The loop puts the loss module in train mode; a frozen network's BN statistics must not move.
        return self

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        planes = maps.flatten(0, 1)[:, None].expand(-1, 3, -1, -1)
        return self.net(planes)[1]["layer"]


def step_aside(
    module: nn.Module, optimizer: torch.optim.Optimizer, loss_of: Callable[[Callable[..., Any]], torch.Tensor]
) -> torch.Tensor:
    """One ``optimizer`` step of a sub-network that the student's optimizer must not see (its parameters keep
    ``requires_grad=False``): ``loss_of(net)`` computes the loss with ``net(*inputs)``, which runs ``module``
    on detached aliases of its parameters (``functional_call``), so no flag is ever toggled. CAKD's
    discriminator and SoKD's augmentation search train this way. Returns the detached loss."""
    params = dict(module.named_parameters())
    with torch.enable_grad():
        leaves = {name: p.detach().requires_grad_(True) for name, p in params.items()}
        loss = loss_of(lambda *inputs: functional_call(module, leaves, inputs))
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    for p, grad in zip(params.values(), grads, strict=True):
        p.grad = grad
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


class DistillationLoss(nn.Module):
    """What the training loop asks of a distillation method (AGKD, MTD, CAKD, TITN, SoKD): a loss module.

    ``forward(student_logits, teacher_logits, targets, student_taps, teacher_taps) -> (loss, parts)``;
    ``check(student_taps, teacher_taps)`` raises UsageError on taps whose shapes cannot be matched;
    ``maps(student_taps, teacher_taps)`` gives (student, teacher) attention maps for pictures. Its trainable
    parameters (projectors, task weights) are optimized and checkpointed with the student and dropped at
    inference. ``kd``, ``impl`` and ``label_smoothing`` are the settings every method shares. The hooks below
    default to nothing; a method that needs one overrides it.
    """

    def __init__(
        self, cfg: LossConfig | None = None, kernels_impl: str = "auto", label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.kd = cfg.kd if cfg is not None else None
        self.impl = kernels_impl
        self.label_smoothing = label_smoothing

    def prepare_student(self, student: nn.Module) -> None:
        """Called once before the distillation stage (TITN switches on the distillation head here)."""

    def student_view(self, images: torch.Tensor) -> torch.Tensor:
        """The student's input for this batch; the teacher always sees ``images`` (CAKD's multi-view)."""
        return images

    def after_step(self) -> None:
        """Called after each optimizer step of the student (CAKD trains its discriminator here)."""

    def start_epoch(self, epoch: int) -> None:
        """Called at the start of each training epoch, counted from 0 (SoKD ends its search phase here)."""


class AGKDLoss(DistillationLoss):
    """AGKD eq. 4: kd_loss (eq. 1) + weight * sum over the configured (student tap, teacher taps) pairs of the
    attention metric (eq. 3) between the student map and the combined teacher map (eq. 2).

    ``forward`` returns (loss, parts) with parts {"kd", "ce", "attention"} already weighted, so they sum to
    the loss. Call :meth:`check` once on a real batch: it raises UsageError when tap shapes cannot match.
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
        self.attention = cfg.attention
        self.student_kinds = {name: tap.kind for name, tap in student_taps_cfg.items()}
        self.teacher_kinds = {name: tap.kind for name, tap in teacher_taps_cfg.items()}
        for pair in self.attention.pairs:
            self._names(pair)
        use_net = self.attention.metric == "perceptual" and bool(self.attention.pairs)
        self.perceptual = PerceptualFeatures(self.attention.perceptual) if use_net else None

    def _names(self, pair: AttentionPairConfig) -> None:
        if pair.student not in self.student_kinds:
            raise UsageError(
                f"attention pair names student tap {pair.student!r}, which is not in student.taps"
            )
        if self.student_kinds[pair.student] != "feature":
            raise UsageError(f"attention pair: student tap {pair.student!r} must have kind 'feature'")
        for name in pair.teacher:
            if name not in self.teacher_kinds:
                raise UsageError(f"attention pair names teacher tap {name!r}, which is not in teacher.taps")

    def _grid(self, pair: AttentionPairConfig, teacher_taps: Mapping[str, Any]) -> tuple[int, int]:
        """cfg grid, else the first teacher feature tap's spatial size, else the first ViT's patch grid."""
        if self.attention.grid is not None:
            return self.attention.grid, self.attention.grid
        for name in pair.teacher:
            if self.teacher_kinds[name] == "feature":
                return tuple(spatial_feature(tap_tensor(teacher_taps, name, "teacher"), name).shape[-2:])
        side, _ = patch_grid(tap_qkv(teacher_taps, pair.teacher[0]).k.shape[2])
        return side, side

    def _teacher_map(self, name: str, teacher_taps: Mapping[str, Any], grid: tuple[int, int]) -> torch.Tensor:
        if self.teacher_kinds[name] == "attention":
            return cls_attention_map(tap_qkv(teacher_taps, name), grid, impl=self.impl)
        feature = spatial_feature(tap_tensor(teacher_taps, name, "teacher"), name).float()
        return kernels.attention_map(feature, grid, impl=self.impl)

    def pair_maps(
        self, pair: AttentionPairConfig, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) maps of one pair as (B, C, h, w): C = 1 for "add", the number of teacher taps
        for "concat" (the student map repeated per channel); AGKD eq. 2."""
        grid = self._grid(pair, teacher_taps)
        feature = spatial_feature(tap_tensor(student_taps, pair.student, "student"), pair.student).float()
        student = kernels.attention_map(feature, grid, impl=self.impl)
        teachers = torch.stack([self._teacher_map(name, teacher_taps, grid) for name in pair.teacher], dim=1)
        if teachers.shape[0] != student.shape[0]:
            raise UsageError(
                f"attention pair {pair.student!r}: student batch {student.shape[0]} "
                f"!= teacher batch {teachers.shape[0]}"
            )
        if pair.combine == "add":
            summed = teachers.sum(1)
            teacher = F.normalize(summed.flatten(1), dim=1, eps=1e-12).view_as(summed)[:, None]
            return student[:, None], teacher
        return student[:, None].expand_as(teachers), teachers

    def metric(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """AGKD eq. 3 between (B, C, h, w) student and teacher maps, a scalar."""
        cfg = self.attention
        if cfg.metric == "mse":
            return F.mse_loss(student, teacher)
        if cfg.metric == "cosine":
            return 1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1).mean()
        # L2-normalized maps hold values near 1/sqrt(h*w), far below SSIM's data_range=1, where c1 and c2
        # swamp the statistics. Both maps are divided by the teacher's per-sample max (detached), so the
        # teacher spans [0, 1] and data_range=1 is right; one factor for both keeps the student/teacher
        # magnitude ratio that SSIM's luminance term compares (and leaves the cosine unchanged), with no
        # host sync, unlike a data_range computed from the batch.
        scale = teacher.detach().flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        student, teacher = student / scale, teacher / scale
        if cfg.metric == "ssim":
            return (
                1
                - kernels.ssim(
                    student, teacher, window_size=cfg.window_size, data_range=1.0, impl=self.impl
                ).mean()
            )
        if cfg.metric == "hybrid":
            return kernels.ssim_cosine_loss(
                student,
                teacher,
                alpha=cfg.alpha,
                beta=cfg.beta,
                window_size=cfg.window_size,
                data_range=1.0,
                impl=self.impl,
            )
        return F.mse_loss(self.perceptual(student), self.perceptual(teacher).detach())

    def maps(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (student, teacher) pair of (B, h, w) maps per configured pair (channel mean for concat)."""
        return [
            tuple(m.mean(1) for m in self.pair_maps(pair, student_taps, teacher_taps))
            for pair in self.attention.pairs
        ]

    def check(self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]) -> None:
        """Raise UsageError when the taps of a real batch cannot be matched (missing, wrong kind or shape)."""
        with torch.no_grad():
            for pair in self.attention.pairs:
                student, teacher = self.pair_maps(pair, student_taps, teacher_taps)
                self.metric(student, teacher)

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
            "kd": alpha * kd_kl(student_logits, teacher_logits, self.kd.temperature),
            "ce": (1 - alpha) * supervised_ce(student_logits, targets, self.label_smoothing),
        }
        if self.attention.pairs:
            terms = [
                self.metric(*self.pair_maps(pair, student_taps, teacher_taps))
                for pair in self.attention.pairs
            ]
            parts["attention"] = self.attention.weight * torch.stack(terms).sum()
        return sum(parts.values()), parts


def tap_tensor(taps: Mapping[str, Any], name: str, role: str) -> torch.Tensor:
    value = taps.get(name)
    if not isinstance(value, torch.Tensor):
        got = "nothing" if value is None else type(value).__name__
        raise UsageError(f"{role} tap {name!r} gave {got}; a feature tap must give a tensor (check its path)")
    return value


def tap_qkv(taps: Mapping[str, Any], name: str) -> QKV:
    value = taps.get(name)
    if not isinstance(value, QKV):
        got = "nothing" if value is None else type(value).__name__
        raise UsageError(
            f"teacher tap {name!r} gave {got}; an attention tap must give Q, K, V (check its kind)"
        )
    return value
