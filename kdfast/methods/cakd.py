"""CAKD: cross-architecture knowledge distillation from a Transformer teacher into a CNN student.

Numbering used in the docstrings (Liu et al. 2022, "Cross-Architecture Knowledge Distillation",
arXiv:2207.05273):
  (1) PCA projector: Q_S, K_S, V_S = three 3x3 convs of the CNN feature, on the teacher's patch grid and
      split into the teacher's heads; in training each element is replaced by the teacher's with
      probability p (the partially-cross attention), PCAttn_S = softmax(Q'_S K'_S^T / sqrt(d))
  (2) L_PCA = ||Attn_T - PCAttn_S||^2 + ||V_T V_T^T / sqrt(d) - V'_S V'_S^T / sqrt(d)||^2 (mean squared)
  (3) GL projector: a 4x4 neighbourhood shares one FC, 16 FCs map the CNN feature to the N x D token space;
      L_GL = ||GL(F_S) - T||^2 (mean squared) against the teacher's patch tokens T
  (4) multi-view robust training: the student sees random transforms / masks / noise with probability
      view_prob per sample; a 3-FC discriminator tells teacher tokens from GL-projected student tokens and
      the student gets L_MVG = -log D(GL(F_S)) (the non-saturating generator loss)
  (5) L = pca_weight L_PCA + gl_weight L_GL + adversarial_weight L_MVG, this module's term; the logit KD
      and CE of the example config are the methods ``kd`` and ``loss.ce`` beside it
The projectors and the discriminator belong to this loss module, so they are dropped at inference.
The attention matrices of (2) are formed explicitly (B x heads x N x N): CNN students are tapped on small
patch grids (8x8 = 64 tokens in configs/cakd_digits.yaml), where that is a few hundred kB per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kdfast.config import TapConfig
from kdfast.errors import UsageError
from kdfast.methods.base import DistillationLoss, require_tap, step_aside
from kdfast.methods.features import (
    cls_attention_map,
    patch_grid,
    resize_to,
    spatial_feature,
    tap_qkv,
    tap_tensor,
)
from kdfast.methods.registry import Method
from kdfast.schema import positive, unit_interval
from kdfast.taps import QKV

GL_WINDOW = 4  # eq. 3: a 4x4 neighbourhood per teacher token, so 16 FCs


def _patch_tokens(x: torch.Tensor) -> torch.Tensor:
    """(..., tokens, d) without the prefix (CLS) tokens that :func:`~kdfast.methods.features.patch_grid`
    finds."""
    _, prefix = patch_grid(x.shape[-2])
    return x[..., prefix:, :]


def partial_cross(student: QKV, teacher: QKV, replace_prob: float) -> QKV:
    """Eq. 1: each element of the student's Q, K and V replaced by the teacher's with probability
    ``replace_prob``, independently per element."""
    return QKV(
        *(torch.where(torch.rand_like(s) < replace_prob, t, s) for s, t in zip(student, teacher, strict=True))
    )


def pca_loss(student: QKV, teacher: QKV) -> torch.Tensor:
    """Eq. 2: mse(softmax(Q_S K_S^T / sqrt(d)), softmax(Q_T K_T^T / sqrt(d)))
    + mse(V_S V_S^T / sqrt(d), V_T V_T^T / sqrt(d)) for (B, heads, N, d) inputs (the student's already
    partially replaced); the teacher side is detached."""
    s = QKV(*(x.float() for x in student))
    t = QKV(*(x.detach().float() for x in teacher))
    scale = s.q.shape[-1] ** -0.5
    attn_s = torch.softmax(s.q @ s.k.transpose(-1, -2) * scale, dim=-1)
    attn_t = torch.softmax(t.q @ t.k.transpose(-1, -2) * scale, dim=-1)
    return F.mse_loss(attn_s, attn_t) + F.mse_loss(
        s.v @ s.v.transpose(-1, -2) * scale, t.v @ t.v.transpose(-1, -2) * scale
    )


@dataclass
class CAKDConfig:
    """``loss.cakd``: a partially-cross-attention projector (PCA) and a group-wise linear projector (GL) map
    the student's CNN feature into the teacher's attention and token spaces; multi-view robust training
    perturbs the student's input and adds an adversarial term against a discriminator between teacher
    tokens and projected student tokens.

    ``student`` is a student feature tap (B, C, H, W); ``teacher_attention`` a teacher attention tap
    (Q, K, V); ``teacher_tokens`` a teacher feature tap with the block's tokens (B, N, D). ``pca_weight``,
    ``gl_weight`` and ``adversarial_weight`` weigh the three terms of eq. 5; ``replace_prob`` is eq. 1's p,
    ``dropout`` the GL projector's, ``view_prob`` eq. 4's; the discriminator takes one Adam step at
    ``discriminator_lr`` every ``discriminator_every`` student steps.
    """

    weight: float = 1.0
    student: str = ""
    teacher_attention: str = ""
    teacher_tokens: str = ""
    pca_weight: float = 1.0
    gl_weight: float = 1.0
    replace_prob: float = 0.5
    dropout: float = 0.1
    view_prob: float = 0.5
    adversarial_weight: float = 0.1
    discriminator_every: int = 5
    discriminator_lr: float = 1e-4


def validate(
    cfg: CAKDConfig,
    student_taps: Mapping[str, TapConfig],
    teacher_taps: Mapping[str, TapConfig],
    where: str = "loss.cakd",
) -> None:
    """A student feature tap, a teacher attention tap and a teacher feature tap; probabilities in [0, 1];
    a positive discriminator period and learning rate."""
    require_tap(student_taps, cfg.student, role="student", where=f"{where}.student", kind="feature")
    require_tap(
        teacher_taps,
        cfg.teacher_attention,
        role="teacher",
        where=f"{where}.teacher_attention",
        kind="attention",
    )
    require_tap(
        teacher_taps, cfg.teacher_tokens, role="teacher", where=f"{where}.teacher_tokens", kind="feature"
    )
    for key in ("replace_prob", "view_prob", "dropout"):
        unit_interval(getattr(cfg, key), f"{where}.{key}")
    positive(cfg.discriminator_every, f"{where}.discriminator_every")
    positive(cfg.discriminator_lr, f"{where}.discriminator_lr")


class PCAProjector(nn.Module):
    """Eq. 1: three 3x3 convs C -> heads * d make Q, K, V from the CNN feature, which is first resized
    bilinearly to the teacher's patch grid so that both have N = side^2 patch tokens; output channel
    h * d + j is element j of head h, the layout of the teacher's fused qkv."""

    def __init__(self, channels: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Conv2d(channels, heads * head_dim, 3, padding=1) for _ in range(3))

    def forward(self, feature: torch.Tensor) -> QKV:
        def split(x: torch.Tensor) -> torch.Tensor:
            batch, width = x.shape[:2]
            return x.reshape(batch, self.heads, width // self.heads, -1).transpose(-1, -2)

        return QKV(split(self.q(feature)), split(self.k(feature)), split(self.v(feature)))


class GLProjector(nn.Module):
    """Eq. 3, read literally: the CNN feature is resized to 4x the teacher's patch grid, so each patch token
    owns one 4x4 neighbourhood; the 16 positions (i, j) of a neighbourhood have 16 different FCs
    W_ij: C -> D, shared by all neighbourhoods, and token n = sum_ij W_ij F[4 y_n + i, 4 x_n + j] + b.
    That sum is exactly a 4x4 convolution with stride 4 whose kernel tap (i, j) is W_ij, which is how it
    runs. Dropout acts on the CNN feature, so the MSE target (the teacher tokens) is never zeroed."""

    def __init__(self, channels: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fcs = nn.Conv2d(channels, dim, GL_WINDOW, stride=GL_WINDOW)

    def fc(self, i: int, j: int) -> torch.Tensor:
        """W_ij (D, C): the FC of neighbourhood position (i, j)."""
        return self.fcs.weight[:, :, i, j]

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """(B, C, 4 side, 4 side) -> (B, side^2, D) tokens in row-major patch order, as a ViT lays them."""
        return self.fcs(self.dropout(feature)).flatten(2).transpose(1, 2)


def discriminator(dim: int) -> nn.Sequential:
    """Eq. 4: three FC layers, one token (D,) -> one logit (teacher vs projected student)."""
    return nn.Sequential(
        nn.Linear(dim, dim), nn.LeakyReLU(0.2), nn.Linear(dim, dim), nn.LeakyReLU(0.2), nn.Linear(dim, 1)
    )


class CAKDLoss(DistillationLoss):
    """CAKD eq. 5: pca_weight L_PCA (eq. 2) + gl_weight L_GL (eq. 3) + adversarial_weight L_MVG (eq. 4).

    ``forward`` returns (term, parts) with parts {"pca", "gl", "adv"} already weighted, so they sum to the
    term. The projectors' sizes come from the taps, so :meth:`check` on a real batch builds them
    and must run before the optimizer is made (``run_training`` does); it raises UsageError when the taps
    cannot be matched. :meth:`student_view` perturbs the student's input (eq. 4) and :meth:`after_step`
    trains the discriminator every ``discriminator_every``-th optimizer step of the student.

    The discriminator's parameters are registered (``.to()`` moves them, ``state_dict`` saves them, with its
    Adam state and step count as extra state) but have requires_grad False: the training loop optimizes only
    the parameters that require grad, and the generator term sends gradient through the discriminator to
    the student without accumulating any in it. Its own update takes gradients on detached aliases of
    those parameters (``functional_call``) and hands them to its own Adam, so no flag is ever toggled.
    """

    def __init__(
        self,
        cfg: CAKDConfig,
        student_taps: Mapping[str, TapConfig],
        teacher_taps: Mapping[str, TapConfig],
        *,
        kernels_impl: str = "auto",
        label_smoothing: float = 0.0,
    ) -> None:
        validate(cfg, student_taps, teacher_taps)
        super().__init__(kernels_impl, label_smoothing)
        self.cfg = cfg
        self.pca: PCAProjector | None = None
        self.gl: GLProjector | None = None
        self.discriminator: nn.Sequential | None = None
        self.disc_optimizer: torch.optim.Adam | None = None
        self.steps = 0
        self.last_disc_loss: torch.Tensor | None = None
        self._stash: tuple[torch.Tensor, torch.Tensor] | None = None

    def _inputs(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> tuple[torch.Tensor, QKV, torch.Tensor]:
        """(student feature (B, C, H, W), teacher Q/K/V and tokens with the prefix tokens dropped)."""
        cakd = self.cfg
        feature = spatial_feature(tap_tensor(student_taps, cakd.student, "student"), cakd.student)
        attention = QKV(*(_patch_tokens(x) for x in tap_qkv(teacher_taps, cakd.teacher_attention)))
        tokens = tap_tensor(teacher_taps, cakd.teacher_tokens, "teacher")
        if tokens.dim() != 3:
            raise UsageError(
                f"loss.cakd.teacher_tokens: tap {cakd.teacher_tokens!r} has shape {tuple(tokens.shape)}; "
                "point it at a transformer block, whose output is (B, tokens, D)"
            )
        return feature, attention, _patch_tokens(tokens)

    def _build(self, feature: torch.Tensor, attention: QKV, tokens: torch.Tensor) -> None:
        channels, dim = feature.shape[1], tokens.shape[2]
        self.pca = PCAProjector(channels, heads=attention.q.shape[1], head_dim=attention.q.shape[3])
        self.gl = GLProjector(channels, dim, self.cfg.dropout)
        self.discriminator = discriminator(dim).requires_grad_(False)
        self.to(feature.device)
        self.disc_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.cfg.discriminator_lr)

    def check(self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]) -> None:
        """Raise UsageError when the taps of a real batch cannot be matched (a tap of the wrong kind,
        different batch sizes, a teacher without patch tokens, or shapes other than those the projectors
        were built for); on the first call, size and build the projectors and the discriminator."""
        feature, attention, tokens = self._inputs(student_taps, teacher_taps)
        batches = {feature.shape[0], attention.q.shape[0], tokens.shape[0]}
        if len(batches) != 1:
            raise UsageError(
                f"loss.cakd: student feature, teacher attention and teacher tokens have batch sizes "
                f"{feature.shape[0]}, {attention.q.shape[0]}, {tokens.shape[0]}; tap one forward pass each"
            )
        if attention.q.shape[2] == 0 or tokens.shape[1] == 0:
            raise UsageError("loss.cakd: the teacher taps hold no patch tokens; tap a ViT's blocks")
        if self.pca is None:
            self._build(feature, attention, tokens)
        built = (self.pca.q.in_channels, self.pca.heads, self.pca.q.out_channels // self.pca.heads)
        found = (feature.shape[1], attention.q.shape[1], attention.q.shape[3])
        if built != found or self.gl.fcs.out_channels != tokens.shape[2]:
            raise UsageError(
                "loss.cakd: the projectors were built for (student channels, heads, head width, token width) "
                f"= {(*built, self.gl.fcs.out_channels)}, but these taps give {(*found, tokens.shape[2])}"
            )

    def student_view(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 4, multi-view: in training, each sample with probability view_prob gets one of a random shift
        (with a random horizontal flip), a random square cutout or gaussian noise; the others, and every
        sample in eval mode, are returned unchanged. The teacher keeps seeing ``images``."""
        if not self.training or self.cfg.view_prob == 0:
            return images
        batch, device = images.shape[0], images.device
        changed = torch.rand(batch, device=device) < self.cfg.view_prob
        view = torch.randint(3, (batch,), device=device)
        pick = lambda k: (changed & (view == k)).view(-1, 1, 1, 1)
        return torch.where(
            pick(0),
            self._shifted(images),
            torch.where(pick(1), self._cutout(images), torch.where(pick(2), self._noisy(images), images)),
        )

    @staticmethod
    def _shifted(images: torch.Tensor) -> torch.Tensor:
        """A nonzero integer shift of up to 1/8 of the side (zeros shifted in), flipped horizontally with
        probability 0.5; nearest sampling at exact pixel centres, so no pixel is interpolated."""
        batch, _, height, width = images.shape
        device = images.device
        reach = max(1, min(height, width) // 8)
        offsets = torch.randint(1, 2 * reach + 1, (batch, 2), device=device)
        offsets = offsets - reach - (offsets <= reach).long()  # in [-reach, reach] without 0
        flip = torch.where(torch.rand(batch, device=device) < 0.5, -1.0, 1.0)
        theta = torch.zeros(batch, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 1, 1] = flip, 1.0
        theta[:, 0, 2] = -2 * offsets[:, 0] / width
        theta[:, 1, 2] = -2 * offsets[:, 1] / height
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images.float(), grid, mode="nearest", align_corners=False).to(images.dtype)

    @staticmethod
    def _cutout(images: torch.Tensor) -> torch.Tensor:
        """A random square of side 1/4 of the image set to 0 (the normalized data mean)."""
        batch, _, height, width = images.shape
        device = images.device
        side = max(1, min(height, width) // 4)
        top = torch.randint(height - side + 1, (batch, 1, 1), device=device)
        left = torch.randint(width - side + 1, (batch, 1, 1), device=device)
        rows = torch.arange(height, device=device).view(1, -1, 1)
        cols = torch.arange(width, device=device).view(1, 1, -1)
        inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
        return images.masked_fill(inside[:, None], 0)

    @staticmethod
    def _noisy(images: torch.Tensor) -> torch.Tensor:
        """Gaussian noise of std 0.1, a tenth of the normalized data's std."""
        return images + 0.1 * torch.randn_like(images)

    def projections(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> tuple[QKV, QKV, torch.Tensor, torch.Tensor]:
        """(student Q/K/V (eq. 1, partially replaced in training), teacher patch Q/K/V, GL-projected
        student tokens (eq. 3), teacher patch tokens (detached)); the projectors must be built."""
        if self.pca is None:
            raise UsageError("CAKDLoss: call check() on a real batch first; it sizes the projectors")
        feature, attention, tokens = self._inputs(student_taps, teacher_taps)
        attention = QKV(*(x.detach() for x in attention))
        side, _ = patch_grid(attention.q.shape[2])
        student = self.pca(resize_to(feature, (side, side), self.impl))
        if self.training and self.cfg.replace_prob > 0:
            student = partial_cross(student, attention, self.cfg.replace_prob)
        token_side = patch_grid(tokens.shape[1])[0] * GL_WINDOW
        projected = self.gl(resize_to(feature, (token_side, token_side), self.impl))
        return student, attention, projected, tokens.detach()

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        student_taps: Mapping[str, Any],
        teacher_taps: Mapping[str, Any],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cakd = self.cfg
        student, attention, projected, tokens = self.projections(student_taps, teacher_taps)
        fooled = self.discriminator(projected.float())
        parts = {
            "pca": cakd.pca_weight * pca_loss(student, attention),
            "gl": cakd.gl_weight * F.mse_loss(projected.float(), tokens.float()),
            "adv": cakd.adversarial_weight
            * F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled)),
        }
        if self.training:
            self._stash = (tokens.flatten(0, 1), projected.detach().flatten(0, 1))
        return sum(parts.values()), parts

    def after_step(self) -> None:
        """Eq. 4, discriminator: every ``discriminator_every``-th call, one Adam step on
        BCE(D(T), 1) + BCE(D(GL(F_S)), 0) over the tokens of the last training forward."""
        self.steps += 1
        if self.steps % self.cfg.discriminator_every or self._stash is None:
            return
        teacher, student = (x.float() for x in self._stash)

        def discriminator_loss(discriminator: Callable[..., torch.Tensor]) -> torch.Tensor:
            real, fake = discriminator(teacher), discriminator(student)
            return F.binary_cross_entropy_with_logits(
                real, torch.ones_like(real)
            ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))

        self.last_disc_loss = step_aside(self.discriminator, self.disc_optimizer, discriminator_loss)

    def get_extra_state(self) -> dict[str, Any]:
        """The discriminator's Adam state and the step count, so a resumed run keeps its schedule."""
        optimizer = self.disc_optimizer.state_dict() if self.disc_optimizer is not None else None
        return {"steps": self.steps, "disc_optimizer": optimizer}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        if state["disc_optimizer"] is not None:
            if self.disc_optimizer is None:
                raise UsageError("CAKDLoss: call check() on a real batch before loading a saved state")
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])

    def maps(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(student, teacher)] (B, side, side) maps on the teacher's patch grid: the attention-transfer map
        of the student feature and the teacher's CLS attention (AGKD eq. 2, ViT part), or, for a teacher
        without a class token, the attention-transfer map of its patch tokens."""
        cakd = self.cfg
        feature = spatial_feature(tap_tensor(student_taps, cakd.student, "student"), cakd.student).float()
        qkv = tap_qkv(teacher_taps, cakd.teacher_attention)
        side, prefix = patch_grid(qkv.k.shape[2])
        grid = (side, side)
        student = kernels.attention_map(feature, grid, impl=self.impl)
        if prefix:
            return [(student, cls_attention_map(qkv, grid, impl=self.impl))]
        tokens = tap_tensor(teacher_taps, cakd.teacher_tokens, "teacher")
        teacher = kernels.attention_map(
            spatial_feature(tokens, cakd.teacher_tokens).float(), grid, impl=self.impl
        )
        return [(student, teacher)]


METHOD = Method(
    name="cakd",
    schema=CAKDConfig,
    validate=validate,
    loss=CAKDLoss,
    paper="Liu, Cao, Li, Hu, Ding & Li 2022, Cross-Architecture Knowledge Distillation (arXiv:2207.05273)",
)
