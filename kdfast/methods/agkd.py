"""AGKD: attention alignment between a student's intermediate maps and a hybrid teacher's maps (VGG spatial
attention and ViT CLS attention), the attention part of AGKD's hybrid loss.

Numbering used in the docstrings (AGKD, hybrid loss):
  (1) L_KD = alpha * tau^2 * KL(p_T^tau || p_S^tau) + (1 - alpha) * CE(y, p_S): in kdfast the method ``kd``
      with weight alpha beside ``loss.ce`` = 1 - alpha (``configs/default.yaml``), not part of this module
  (2) teacher attention: VGG spatial maps Q(F) = mean_c |F_c|^2 and ViT CLS attention, resized to one grid and
      combined by addition or concatenation
  (3) attention metric between the student map (resized bilinearly to the teacher grid) and the teacher map:
      MSE, 1 - SSIM, 1 - cos, perceptual (MSE between a frozen pretrained network's features of the two maps),
      or the hybrid alpha * L_SSIM + beta * L_cos
  (5) the paper's SSIM: one global statistic per map (Wang et al. 2004, eq. 13, with the mean, variance and
      covariance of the whole h x w map): ((2 mu_s mu_t + C1)(2 sigma_st + C2)) / ((mu_s^2 + mu_t^2 + C1)
      (sigma_s^2 + sigma_t^2 + C2)), C1 = (0.01 L)^2, C2 = (0.03 L)^2, moments over the N = h w cells (1/N).
      ``ssim: windowed`` is a kdfast option instead: the mean SSIM map under a Gaussian window of
      ``window_size`` (sigma 1.5), pytorch_msssim's form
  (4) L = L_KD + lambda * 1/N sum over the N pairs of (3); this module's term is the 1/N sum (the mean over
      pairs), lambda is ``loss.agkd.weight``
Every map op goes through ``kernels`` with ``impl``, so the Triton kernels take over on the GPU. Which kernel
computes SSIM: the windowed form runs ``kernels.ssim`` / ``kernels.ssim_cosine_loss`` (the fused Triton SSIM +
cosine kernel on the GPU); the global form (5) is five per-map sums (means, second moments, cross moment)
that it shares with the cosine of the hybrid (:func:`global_ssim_cosine`), which ``torch.compile`` (the GPU
path) fuses into one reduction; no Triton kernel of ``kernels`` computes the global form.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import kernels
from kdfast.config import ArchSpec, TapConfig
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.base import Batch, DistillationLoss, Term, require_tap
from kdfast.methods.features import cls_attention_map, patch_grid, spatial_feature, tap_qkv, tap_tensor
from kdfast.methods.registry import Method, TeacherCache
from kdfast.models import build_model
from kdfast.schema import positive
from kdfast.taps import find_module

Metric = Literal["mse", "ssim", "cosine", "perceptual", "hybrid"]
SSIMForm = Literal["global", "windowed"]  # eq. 5, the paper's; a Gaussian window, kdfast's option
RANDOM_FEATURES = "random_features"  # perceptual.arch naming the seeded random network, the fallback

log = logging.getLogger(__name__)


def combine_teacher_maps(
    student: torch.Tensor, teachers: torch.Tensor, combine: Literal["add", "concat"]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2: the (student, teacher) maps of one pair as (B, C, h, w) from the student map (B, h, w) and the
    T teacher maps (B, T, h, w), all L2-normalized: "add" sums the teacher maps and renormalizes (C = 1);
    "concat" keeps them as T channels, the student map repeated per channel."""
    if combine == "add":
        summed = teachers.sum(1)
        teacher = F.normalize(summed.flatten(1), dim=1, eps=1e-12).view_as(summed)[:, None]
        return student[:, None], teacher
    return student[:, None].expand_as(teachers), teachers


def _moments(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(mean_s, mean_t, mean_s^2, mean_t^2, mean_st) over each (h, w) map of (B, C, h, w) maps: (B, C) each,
    in float32 at least."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    s, t = student.to(dtype), teacher.to(dtype)
    return tuple(x.mean(dim=(2, 3)) for x in (s, t, s * s, t * t, s * t))


def _global_ssim(moments: tuple[torch.Tensor, ...], data_range: float) -> torch.Tensor:
    """Eq. 5 per (sample, channel) from :func:`_moments`, (B, C)."""
    mu_s, mu_t, ss, tt, st = moments
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    var_s, var_t, cov = ss - mu_s * mu_s, tt - mu_t * mu_t, st - mu_s * mu_t
    return ((2 * mu_s * mu_t + c1) * (2 * cov + c2)) / ((mu_s**2 + mu_t**2 + c1) * (var_s + var_t + c2))


def global_ssim(student: torch.Tensor, teacher: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Eq. 5 of each sample of (B, C, h, w) maps, the mean over its C channels: (B,)."""
    return _global_ssim(_moments(student, teacher), data_range).mean(1)


def global_ssim_cosine(
    student: torch.Tensor, teacher: torch.Tensor, *, alpha: float, beta: float, data_range: float = 1.0
) -> torch.Tensor:
    """The hybrid of eq. 3 with eq. 5's SSIM: alpha (1 - mean_b SSIM_b) + beta (1 - mean_b cos_b), cos_b
    over the sample's flattened C h w values, both from one set of per-map moments. Scalar."""
    moments = _moments(student, teacher)
    _, _, ss, tt, st = moments
    cos = st.sum(1) / (ss.sum(1) * tt.sum(1)).sqrt().clamp_min(1e-8)  # a floor, as F.cosine_similarity has
    ssim = _global_ssim(moments, data_range).mean(1)
    return alpha * (1 - ssim.mean()) + beta * (1 - cos.mean())


def attention_metric(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    metric: Metric,
    alpha: float = 0.5,
    beta: float = 0.5,
    ssim: SSIMForm = "global",
    window_size: int = 3,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Eq. 3 between (B, C, h, w) student and teacher maps, a scalar: mse; cosine 1 - mean_b cos; ssim
    1 - mean SSIM; hybrid alpha (1 - SSIM) + beta (1 - cos); perceptual mse(features(s), features(t))
    with the teacher side detached. SSIM is eq. 5's global statistic (``ssim="global"``) or the windowed
    mean under a ``window_size`` Gaussian (``"windowed"``). SSIM and the perceptual network see both maps
    divided by the teacher's per-sample max."""
    if metric == "mse":
        return F.mse_loss(student, teacher)
    if metric == "cosine":
        return 1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1).mean()
    # L2-normalized maps hold values near 1/sqrt(h*w), far below SSIM's data_range=1, where c1 and c2
    # swamp the statistics, and far below the pixel range a perceptual network was trained on. Both maps
    # are divided by the teacher's per-sample max (detached), so the teacher spans [0, 1] and data_range=1
    # is right; one factor for both keeps the student/teacher magnitude ratio that SSIM's luminance term
    # compares (and leaves the cosine unchanged), with no host sync, unlike a data_range computed from the
    # batch.
    scale = teacher.detach().flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    student, teacher = student / scale, teacher / scale
    if metric == "perceptual":
        return F.mse_loss(features(student), features(teacher).detach())
    if ssim == "global":
        if metric == "ssim":
            return 1 - global_ssim(student, teacher).mean()
        return global_ssim_cosine(student, teacher, alpha=alpha, beta=beta)
    if metric == "ssim":
        return 1 - kernels.ssim(student, teacher, window_size=window_size, data_range=1.0, impl=impl).mean()
    return kernels.ssim_cosine_loss(
        student, teacher, alpha=alpha, beta=beta, window_size=window_size, data_range=1.0, impl=impl
    )


@dataclass
class AttentionPairConfig:
    """One attention term: a student feature tap against one or more teacher taps combined on one grid."""

    student: str = ""
    teacher: list[str] = field(default_factory=list)
    combine: Literal["add", "concat"] = "add"


@dataclass
class PerceptualConfig:
    """The frozen network of the perceptual metric: a pretrained architecture, its local weights file and the
    module path whose output is compared, e.g. ``{arch: {source: torchvision, name: vgg16}, weights:
    vgg16-397923af.pth, layer: features.8}`` (relu2_2 of torchvision's ImageNet VGG16). ``arch:
    random_features`` names the fallback, a seeded random two-conv network that needs no file (a kdfast
    addition; the run logs a warning when it is used)."""

    arch: ArchSpec | Literal["random_features"] | None = None
    weights: str | None = None
    layer: str | None = None


@dataclass
class AGKDConfig:
    """``loss.agkd``: weight * the mean over ``pairs`` of eq. 3 (eq. 4; ``metric``; ``alpha`` and ``beta``
    weigh the hybrid's SSIM and cosine parts; ``ssim`` its form, ``global`` (eq. 5, the paper's) or
    ``windowed`` (kdfast's option, whose Gaussian window is ``window_size`` wide); ``perceptual`` the
    perceptual metric's network) on the ``grid`` x ``grid`` teacher grid (null: the first teacher feature
    tap's size, else the first ViT's patch grid)."""

    weight: float = 1.0
    metric: Metric = "hybrid"
    alpha: float = 0.5
    beta: float = 0.5
    grid: int | None = None
    ssim: SSIMForm = "global"
    window_size: int = 3
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    pairs: list[AttentionPairConfig] = field(default_factory=list)


def validate(
    cfg: AGKDConfig,
    student_taps: Mapping[str, TapConfig],
    teacher_taps: Mapping[str, TapConfig],
    where: str = "loss.agkd",
) -> None:
    """Pairs name existing taps (students of kind feature), the SSIM window is odd, the grid positive and,
    for the perceptual metric, a network is named: a pretrained one with its weights file and layer, or
    the random-feature fallback (without a file)."""
    if not cfg.pairs:
        raise ConfigError(f"{where}.pairs is empty: name at least one (student tap, teacher taps) pair")
    for i, pair in enumerate(cfg.pairs):
        at = f"{where}.pairs[{i}]"
        require_tap(student_taps, pair.student, role="student", where=f"{at}.student", kind="feature")
        if not pair.teacher:
            raise ConfigError(f"{at}.teacher is empty: name one or more teacher taps")
        for name in pair.teacher:
            require_tap(teacher_taps, name, role="teacher", where=f"{at}.teacher")
    if cfg.window_size % 2 == 0 or cfg.window_size < 1:
        raise ConfigError(f"config key '{where}.window_size' must be odd and >= 1, got {cfg.window_size}")
    if cfg.grid is not None:
        positive(cfg.grid, f"{where}.grid")
    perceptual, at = cfg.perceptual, f"{where}.perceptual"
    if perceptual.weights is not None and not Path(perceptual.weights).is_file():
        raise ConfigError(f"{at}.weights: file not found: {perceptual.weights}")
    if cfg.metric != "perceptual":
        return
    if perceptual.arch is None:
        raise ConfigError(
            f"{where}.metric=perceptual needs {at}.arch: a pretrained network with its local weights file "
            f"and layer (e.g. {{source: torchvision, name: vgg16}}, weights: FILE, layer: features.8), or "
            f"{RANDOM_FEATURES} for the seeded random network"
        )
    if perceptual.arch == RANDOM_FEATURES:
        if perceptual.weights is not None or perceptual.layer is not None:
            raise ConfigError(f"{at}.arch={RANDOM_FEATURES} takes no weights or layer: remove them")
        return
    if perceptual.weights is None:
        raise ConfigError(f"{at}.weights: give the local weights file of the pretrained network {at}.arch")
    if perceptual.layer is None:
        raise ConfigError(f"{at}.layer: name the module path whose output is compared")


class RandomFeatureNet(nn.Module):
    """The perceptual metric's fallback network (``perceptual.arch: random_features``, a kdfast addition):
    two 3x3 conv + ReLU layers with seeded random weights, frozen. Random convolutional features still
    separate local structure (Ulyanov et al. 2018, deep image prior), so the metric runs without a weights
    file; the paper's metric uses a pretrained network."""

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
    """A frozen network cut after one layer (``torchvision``'s FX feature extractor, so nothing after the
    layer runs: VGG16's later pools would shrink a 14 x 14 map to nothing), for the perceptual metric; always
    in eval mode. The random-feature fallback logs a warning line."""

    def __init__(self, cfg: PerceptualConfig) -> None:
        super().__init__()
        if cfg.arch == RANDOM_FEATURES:
            log.warning(
                "warning: the AGKD perceptual metric uses the seeded random-feature network, not a "
                "pretrained one (loss.agkd.perceptual.arch: random_features)"
            )
            network, layer = RandomFeatureNet(), "net.3"
        else:
            network, layer = build_model(cfg.arch, weights=cfg.weights), cfg.layer
        find_module(network, layer, what="loss.agkd.perceptual.layer")
        self.net = create_feature_extractor(network, return_nodes={layer: "layer"})
        self.net.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> PerceptualFeatures:
        # The loop puts the loss module in train mode; a frozen network's BN statistics must not move.
        return self

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        planes = maps.flatten(0, 1)[:, None].expand(-1, 3, -1, -1)
        return self.net(planes)["layer"]


class AGKDLoss(DistillationLoss):
    """Eq. 4's attention part: the mean over the N configured (student tap, teacher taps) pairs of the
    attention metric (eq. 3) between the student map and the combined teacher map (eq. 2).

    ``forward`` returns (term, {}). Call :meth:`check` once on a real batch: it raises UsageError when tap
    shapes cannot match.
    """

    cfg: AGKDConfig

    def setup(self, student_taps: Mapping[str, TapConfig], teacher_taps: Mapping[str, TapConfig]) -> None:
        self.teacher_kinds = {name: tap.kind for name, tap in teacher_taps.items()}
        self.perceptual = PerceptualFeatures(self.cfg.perceptual) if self.cfg.metric == "perceptual" else None

    def _grid(self, pair: AttentionPairConfig, teacher_taps: Mapping[str, Any]) -> tuple[int, int]:
        """cfg grid, else the first teacher feature tap's spatial size, else the first ViT's patch grid."""
        if self.cfg.grid is not None:
            return self.cfg.grid, self.cfg.grid
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
        """(student, teacher) maps of one pair as (B, C, h, w) (eq. 2, :func:`combine_teacher_maps`)."""
        grid = self._grid(pair, teacher_taps)
        feature = spatial_feature(tap_tensor(student_taps, pair.student, "student"), pair.student).float()
        student = kernels.attention_map(feature, grid, impl=self.impl)
        teachers = torch.stack([self._teacher_map(name, teacher_taps, grid) for name in pair.teacher], dim=1)
        if teachers.shape[0] != student.shape[0]:
            raise UsageError(
                f"attention pair {pair.student!r}: student batch {student.shape[0]} "
                f"!= teacher batch {teachers.shape[0]}"
            )
        return combine_teacher_maps(student, teachers, pair.combine)

    def metric(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Eq. 3 with this section's settings (:func:`attention_metric`)."""
        cfg = self.cfg
        return attention_metric(
            student,
            teacher,
            metric=cfg.metric,
            alpha=cfg.alpha,
            beta=cfg.beta,
            ssim=cfg.ssim,
            window_size=cfg.window_size,
            features=self.perceptual,
            impl=self.impl,
        )

    def maps(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (student, teacher) pair of (B, h, w) maps per configured pair (channel mean for concat)."""
        return [
            tuple(m.mean(1) for m in self.pair_maps(pair, student_taps, teacher_taps))
            for pair in self.cfg.pairs
        ]

    def check(self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]) -> None:
        """Raise UsageError when the taps of a real batch cannot be matched (missing, wrong kind or shape)."""
        with torch.no_grad():
            for pair in self.cfg.pairs:
                self.metric(*self.pair_maps(pair, student_taps, teacher_taps))

    def term(self, batch: Batch) -> Term:
        taps = (batch.student_taps, batch.teacher_taps)
        terms = [self.metric(*self.pair_maps(pair, *taps)) for pair in self.cfg.pairs]
        return torch.stack(terms).mean(), {}


METHOD = Method(
    name="agkd",
    schema=AGKDConfig,
    validate=validate,
    loss=AGKDLoss,
    paper="AGKD, hybrid loss: attention-guided KD from a VGG19 + ViT-B/16 hybrid teacher into "
    "EfficientNet-B0 (no bibliographic reference recorded)",
    logits="none",
    teacher_cache=TeacherCache(reads=("features", "attention")),
)
