"""CAKD: cross-architecture knowledge distillation from a Transformer teacher into a CNN student.

Numbering used in the docstrings (Liu et al. 2022, "Cross-Architecture Knowledge Distillation", ACCV 2022,
arXiv:2207.05273):
  (1) {Q_S, K_S, V_S} = Proj1(h_S): three 3x3 convs of the CNN feature h_S, on the teacher's patch grid and
      split into the teacher's heads
  (2) Attn = softmax(Q K^T / sqrt(d)) V, a self-attention output
  (3) PCAttn_S = softmax(g(Q_S) g(K_S)^T / sqrt(d)) g(V_S), where g(M)[i, j] is the teacher's M_T[i, j] with
      probability p and the student's M_S[i, j] otherwise (the partially cross attention, training only)
  (4) L_proj1 = ||Attn_T - PCAttn_S||^2 + ||V_T V_T^T / sqrt(d) - V_S V_S^T / sqrt(d)||^2
  (5) h'_S = Proj2(h_S): the group-wise linear projector, N student pixels -> N tokens of width D, the
      pixels of one 4x4 spatial group sharing one FC
  (6) L_proj2 = ||h_T - h'_S||^2 against the teacher's patch tokens h_T
  (7) x~ = MVG(x): the student's input x unchanged with probability 1 - p, else transformed by one of colour
      jitter, crop, rotation and patch masking (chosen uniformly: eq. 7 names one transform, not which)
  (8) L_MAD = -(1/m) sum_k [log D(h_T) + log(1 - D(h'_S^(k)))], the multi-view discriminator's loss
  (9) L_MVG = (1/m) sum_k log(1 - D(h'_S^(k))), the student's (generator's) adversarial term
  (10) L = L_proj1 + L_proj2 + lambda L_MVG
Algorithm 1 updates the student every step and the discriminator D when step % 5 == 0. Every ||.||^2 is
taken as a mean over elements (batch mean), as every kdfast feature loss. The projectors and the
discriminator belong to this loss module, so they are dropped at inference. The logit KD and CE of the
example configs are the method ``kd`` and ``loss.ce`` beside this one. The student runs once per step, on x~,
so ``loss.ce`` (and any composed logit method) reads the logits of x~, the input the projected features of
(8)-(9) come from; with p = 0.5 half of the inputs are x itself. Which input the paper's CE reads is not in
the text available here (its full text was not reachable), so kdfast does not claim to follow it there. The
attention matrices of (2)-(4) are formed explicitly (B x heads x N x N): 196 tokens for ViT-B/16 at 224, a
few hundred kB per sample and head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kdfast.config import TapConfig
from kdfast.errors import UsageError
from kdfast.methods.base import Batch, DistillationLoss, Term, require_tap, step_aside
from kdfast.methods.features import (
    cls_attention_map,
    patch_grid,
    resize_to,
    spatial_feature,
    tap_qkv,
    tap_tensor,
)
from kdfast.methods.registry import Method, TeacherCache
from kdfast.schema import positive, unit_interval
from kdfast.taps import QKV

GL_GROUP = 4  # eq. 5: a 4x4 spatial group of pixels shares one FC (16 FCs on ViT-B/16's 14x14 grid)

# Eq. 7 lists the transforms without their strengths; these are kdfast's. All act on normalized images.
JITTER = 0.4  # colour jitter factors in [1 - JITTER, 1 + JITTER], torchvision's ColorJitter(0.4, 0.4, 0.4)
MIN_CROP = 0.5  # a random square crop of side MIN_CROP..1 of the image, resized back
MAX_ROTATION = 30.0  # degrees, uniform in [-MAX_ROTATION, MAX_ROTATION]
MASK_GRID, MASK_RATIO = 8, 0.25  # patch masking: an 8x8 grid of patches, each zeroed with probability 0.25
VIEWS = 4  # eq. 7's transforms: colour jitter, crop, rotation, patch masking


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Eq. 2: softmax(q k^T / sqrt(d)) v for (..., n, d) queries and (..., m, d) keys and values."""
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v


def value_relation(v: torch.Tensor) -> torch.Tensor:
    """Eq. 4, second term: V V^T / sqrt(d) for (..., n, d) values."""
    return v @ v.transpose(-1, -2) * v.shape[-1] ** -0.5


def swap_masks(student: QKV, replace_prob: float) -> QKV:
    """Eq. 3's draw: one Bernoulli(``replace_prob``) per element of Q, K and V (True: take the teacher's)."""
    return QKV(*(torch.rand_like(x, dtype=torch.float32) < replace_prob for x in student))


def partially_cross(student: QKV, teacher: QKV, swap: QKV) -> QKV:
    """Eq. 3's g: g(M)[i, j] = M_T[i, j] where ``swap`` is True, M_S[i, j] elsewhere, for M in Q, K, V, all
    (B, heads, N, d) over the same N patch tokens."""
    return QKV(*(torch.where(m, t, s) for s, t, m in zip(student, teacher, swap, strict=True)))


def pca_loss(student: QKV, teacher: QKV, swap: QKV | None = None) -> torch.Tensor:
    """Eq. 4: mse(Attn_T, PCAttn_S) + mse(V_T V_T^T / sqrt(d), V_S V_S^T / sqrt(d)).

    ``student``: the projector's Q_S, K_S, V_S (B, heads, N, d) over the N patch tokens. ``teacher``: the
    teacher block's Q, K, V (B, heads, P + N, d), whose first P tokens are prefix (CLS) tokens. Attn_T is the
    teacher's own attention output for its N patch queries: every key and value, CLS included, stays in
    the softmax and the sum, as in the teacher's forward; the CLS query row is left out, the student having
    no token for it. PCAttn_S (eq. 3) mixes the student's Q, K, V with the teacher's patch-token Q, K, V by
    ``swap`` (no mixing when None, as in evaluation) and attends over the N student tokens. The value
    relation compares the teacher's patch-token V with the student's own V, not the mixed one. The
    teacher side is detached.
    """
    s = QKV(*(x.float() for x in student))
    t = QKV(*(x.detach().float() for x in teacher))
    prefix = t.q.shape[2] - s.q.shape[2]
    patches = QKV(*(x[:, :, prefix:] for x in t))
    attn_t = self_attention(patches.q, t.k, t.v)
    mixed = s if swap is None else partially_cross(s, patches, swap)
    attn_s = self_attention(mixed.q, mixed.k, mixed.v)
    return F.mse_loss(attn_s, attn_t) + F.mse_loss(value_relation(s.v), value_relation(patches.v))


def gl_groups(side: int) -> torch.Tensor:
    """Eq. 5's grouping on a side x side grid: g(n) = (y // 4) * ceil(side / 4) + x // 4 for the row-major
    token n = y * side + x, so each 4x4 block of neighbouring pixels is one group (the last row and column of
    blocks are narrower when 4 does not divide ``side``: 14 -> 4 x 4 = 16 groups). (side^2,) long."""
    blocks = math.ceil(side / GL_GROUP)
    rows = torch.arange(side).view(-1, 1) // GL_GROUP
    cols = torch.arange(side).view(1, -1) // GL_GROUP
    return (rows * blocks + cols).flatten()


def generator_loss(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The student's adversarial term on discriminator logits z (D = sigmoid(z)), batch mean. ``minimax``
    is eq. 9, mean log(1 - D(h'_S)) = -mean softplus(z); ``non_saturating`` is Goodfellow et al.'s
    -mean log D(h'_S) = mean softplus(-z), a kdfast option (same fixed point, stronger early gradients)."""
    z = logits.float()
    return -F.softplus(z).mean() if kind == "minimax" else F.softplus(-z).mean()


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Eq. 8: -[mean log D(h_T) + mean log(1 - D(h'_S))] on discriminator logits of teacher (real) and
    projected student (fake) features."""
    return F.binary_cross_entropy_with_logits(
        real.float(), torch.ones_like(real, dtype=torch.float32)
    ) + F.binary_cross_entropy_with_logits(fake.float(), torch.zeros_like(fake, dtype=torch.float32))


@dataclass
class CAKDConfig:
    """``loss.cakd``: a partially-cross-attention projector (PCA) and a group-wise linear projector (GL) map
    the student's CNN feature into the teacher's attention and token spaces; multi-view robust training
    perturbs the student's input and adds an adversarial term against a discriminator between teacher
    tokens and projected student tokens.

    ``student`` is a student feature tap (B, C, H, W); ``teacher_attention`` a teacher attention tap (Q, K,
    V); ``teacher_tokens`` a teacher feature tap with the block's tokens (B, N, D). ``pca_weight``,
    ``gl_weight`` and ``adversarial_weight`` (lambda) weigh the three terms of eq. 10; ``replace_prob`` is eq.
    3's p, ``dropout`` the GL projector's, ``view_prob`` eq. 7's p (an input is transformed, by one transform,
    with probability p). ``adversarial``: ``minimax`` is eq. 9; ``non_saturating`` (-log D) is a kdfast
    option, off in the paper's setting. The discriminator (3 FC layers of width ``discriminator_width`` on a
    sample's flattened N x D projected feature; the width is kdfast's choice) takes one Adam step at
    ``discriminator_lr`` on the optimizer steps whose 0-based index is a multiple of ``discriminator_every``
    (Algorithm 1: step % 5 == 0).
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
    adversarial: Literal["minimax", "non_saturating"] = "minimax"
    discriminator_width: int = 256
    discriminator_every: int = 5
    discriminator_lr: float = 1e-4


def validate(
    cfg: CAKDConfig,
    student_taps: Mapping[str, TapConfig],
    teacher_taps: Mapping[str, TapConfig],
    where: str = "loss.cakd",
) -> None:
    """A student feature tap, a teacher attention tap and a teacher feature tap; probabilities in [0, 1];
    a positive discriminator width, period and learning rate."""
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
    for key in ("discriminator_width", "discriminator_every", "discriminator_lr"):
        positive(getattr(cfg, key), f"{where}.{key}")


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
    """Eq. 5: each of the N = side^2 student pixels maps to its own token, token n = W_g(n) h_S[n] + b_g(n),
    with one FC (W_g: C -> D, b_g) per 4x4 spatial group g (:func:`gl_groups`). The student map is resized
    bilinearly to the teacher's patch grid first (in the paper's pairs the grids already agree: ResNet-50's
    layer3 and ViT-B/16 are both 14x14 at 224). Dropout acts on the CNN feature, so the MSE target (the
    teacher tokens) is never zeroed.

    The FCs run as one batched matmul: the tokens are gathered group by group into (groups, B * 16, C),
    padded with a zero row where a group has fewer than 16 members, and scattered back to token order."""

    def __init__(self, channels: int, dim: int, side: int, dropout: float) -> None:
        super().__init__()
        self.side = side
        groups = gl_groups(side)
        count = int(groups.max()) + 1
        members = [torch.nonzero(groups == g).flatten() for g in range(count)]
        width = max(len(m) for m in members)
        padded = torch.full((count, width), side * side)  # index side^2: the zero row appended in forward
        for g, m in enumerate(members):
            padded[g, : len(m)] = m
        slot = torch.empty(side * side, dtype=torch.long)  # where token n sits in the flattened groups
        for g, m in enumerate(members):
            slot[m] = g * width + torch.arange(len(m))
        self.register_buffer("members", padded, persistent=False)
        self.register_buffer("slot", slot, persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.weight = nn.Parameter(torch.empty(count, dim, channels))
        self.bias = nn.Parameter(torch.empty(count, dim))
        bound = 1 / math.sqrt(channels)  # nn.Linear's initialization, per FC
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """(B, C, side, side) -> (B, side^2, D) tokens in row-major patch order, as a ViT lays them."""
        tokens = self.dropout(feature).flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2])], dim=1)
        grouped = tokens[:, self.members].permute(1, 0, 2, 3)  # (groups, B, width, C)
        count, batch, width, channels = grouped.shape
        out = torch.baddbmm(
            self.bias[:, None], grouped.reshape(count, batch * width, channels), self.weight.transpose(1, 2)
        )
        out = out.view(count, batch, width, -1).permute(1, 0, 2, 3).reshape(batch, count * width, -1)
        return out[:, self.slot]


def discriminator(tokens: int, dim: int, width: int) -> nn.Sequential:
    """Eq. 8: three FC layers on a sample's whole projected feature, (B, N, D) -> one logit (B, 1)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(tokens * dim, width),
        nn.LeakyReLU(0.2),
        nn.Linear(width, width),
        nn.LeakyReLU(0.2),
        nn.Linear(width, 1),
    )


def jitter_colours(
    images: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor
) -> torch.Tensor:
    """Eq. 7, colour jitter on normalized (B, 3, H, W) images with per-sample factors (B,): contrast scales
    each image about its mean, saturation blends it with its channel mean (grey) by the factor, brightness
    adds (factor - 1) data standard deviations. In normalized space, where 0 is the data's mean colour."""
    b, c, s = (x.view(-1, 1, 1, 1).to(images.dtype) for x in (brightness, contrast, saturation))
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    out = (images - mean) * c + mean
    grey = out.mean(dim=1, keepdim=True)
    return grey + (out - grey) * s + (b - 1)


def crop_and_rotate(
    images: torch.Tensor, side: torch.Tensor, centre: torch.Tensor, angle: torch.Tensor
) -> torch.Tensor:
    """Eq. 7, crop and rotation as one bilinear resampling of (B, C, H, W) images: output pixel u (in
    [-1, 1] coordinates) reads input side * R(angle) u + centre, i.e. a square crop of ``side`` (B,) times
    the image centred at ``centre`` (B, 2; x, y in [-1, 1]), rotated by ``angle`` (B,) radians
    counter-clockwise, resized back; zeros (the data mean) where it reads outside the image."""
    batch, _, height, width = images.shape
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(batch, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 1] = side * cos, -side * sin * height / width
    theta[:, 1, 0], theta[:, 1, 1] = side * sin * width / height, side * cos
    theta[:, :, 2] = centre
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", align_corners=False).to(images.dtype)


def mask_patches(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Eq. 7, patch masking: ``keep`` (B, g, g) bool over a g x g grid of patches; the image is zeroed (the
    data mean) on the patches that are not kept (patch edges at round(i * H / g))."""
    height, width = images.shape[-2:]
    grid = keep.shape[-1]
    rows = torch.arange(height, device=images.device) * grid // height
    cols = torch.arange(width, device=images.device) * grid // width
    pixels = keep[:, rows][:, :, cols]
    return images * pixels[:, None].to(images.dtype)


class CAKDLoss(DistillationLoss):
    """CAKD eq. 10: pca_weight L_proj1 (eq. 4) + gl_weight L_proj2 (eq. 6) + adversarial_weight L_MVG (eq. 9).

    ``forward`` returns (term, parts) with parts {"pca", "gl", "adv"} already weighted, so they sum to the
    term. The projectors' sizes come from the taps, so :meth:`check` on a real batch builds them and must
    run before the optimizer is made (``run_training`` does); it raises UsageError when the taps cannot be
    matched. :meth:`student_view` is the multi-view generator (eq. 7) and :meth:`after_step` trains the
    discriminator (eq. 8) on Algorithm 1's schedule.

    The discriminator's parameters are registered (``.to()`` moves them, ``state_dict`` saves them, with its
    Adam state and step count as extra state) but have requires_grad False: the training loop optimizes only
    the parameters that require grad, and the generator term sends gradient through the discriminator to
    the student without accumulating any in it. Its own update takes gradients on detached aliases of
    those parameters (``functional_call``) and hands them to its own Adam, so no flag is ever toggled.
    """

    cfg: CAKDConfig
    pca: PCAProjector
    gl: GLProjector
    discriminator: nn.Sequential

    def setup(self, student_taps: Mapping[str, TapConfig], teacher_taps: Mapping[str, TapConfig]) -> None:
        self.disc_optimizer: torch.optim.Adam | None = None
        self.steps = 0
        self.last_disc_loss: torch.Tensor | None = None
        self._stash: tuple[torch.Tensor, torch.Tensor] | None = None

    def _inputs(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> tuple[torch.Tensor, QKV, torch.Tensor]:
        """(student feature (B, C, H, W), teacher Q/K/V with every token, teacher patch tokens (B, N, D))."""
        cakd = self.cfg
        feature = spatial_feature(tap_tensor(student_taps, cakd.student, "student"), cakd.student)
        attention = tap_qkv(teacher_taps, cakd.teacher_attention)
        tokens = tap_tensor(teacher_taps, cakd.teacher_tokens, "teacher")
        if tokens.dim() != 3:
            raise UsageError(
                f"loss.cakd.teacher_tokens: tap {cakd.teacher_tokens!r} has shape {tuple(tokens.shape)}; "
                "point it at a transformer block, whose output is (B, tokens, D)"
            )
        _, prefix = patch_grid(tokens.shape[1])
        return feature, attention, tokens[:, prefix:]

    def _networks(
        self, channels: int, heads: int, head_dim: int, count: int, dim: int
    ) -> dict[str, nn.Module]:
        """Eq. 1, 5 and 8: the two projectors and the discriminator for (student channels, heads, head width,
        tokens, token width)."""
        return {
            "pca": PCAProjector(channels, heads=heads, head_dim=head_dim),
            "gl": GLProjector(channels, dim, patch_grid(count)[0], self.cfg.dropout),
            "discriminator": discriminator(count, dim, self.cfg.discriminator_width).requires_grad_(False),
        }

    def check(self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]) -> None:
        """Raise UsageError when the taps of a real batch cannot be matched (a tap of the wrong kind,
        different batch sizes, a teacher without patch tokens, attention and token taps on different token
        grids, or shapes other than those the projectors were built for); on the first call, size and build
        the projectors and the discriminator."""
        feature, attention, tokens = self._inputs(student_taps, teacher_taps)
        batches = {feature.shape[0], attention.q.shape[0], tokens.shape[0]}
        if len(batches) != 1:
            raise UsageError(
                f"loss.cakd: student feature, teacher attention and teacher tokens have batch sizes "
                f"{feature.shape[0]}, {attention.q.shape[0]}, {tokens.shape[0]}; tap one forward pass each"
            )
        patches = patch_grid(attention.q.shape[2])[0] ** 2
        if tokens.shape[1] == 0 or patches == 0:
            raise UsageError("loss.cakd: the teacher taps hold no patch tokens; tap a ViT's blocks")
        if patches != tokens.shape[1]:
            raise UsageError(
                f"loss.cakd: the teacher attention tap has {patches} patch tokens and the token tap "
                f"{tokens.shape[1]}; tap the same block (its .attn and the block itself)"
            )
        found = (feature.shape[1], attention.q.shape[1], attention.q.shape[3], *tokens.shape[1:])
        built = self.build_once(
            found,
            lambda: self._networks(*found),
            feature.device,
            "loss.cakd: the projectors were built for (student channels, heads, head width, tokens, "
            "token width) =",
        )
        if built:
            parameters = self.discriminator.parameters()
            self.disc_optimizer = torch.optim.Adam(parameters, lr=self.cfg.discriminator_lr)

    def _draw_views(self, batch: int, device: torch.device) -> torch.Tensor:
        """Eq. 7's draws: (4, B) bool, whether colour jitter, crop, rotation or patch masking applies to each
        sample: with probability view_prob exactly one of the four, chosen uniformly, else none."""
        transformed = torch.rand(batch, device=device) < self.cfg.view_prob
        which = torch.randint(VIEWS, (batch,), device=device)
        return (torch.arange(VIEWS, device=device)[:, None] == which) & transformed

    def student_view(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 7, the multi-view generator: in training, each sample is transformed with probability
        view_prob by one of colour jitter, a random crop, a random rotation and patch masking; every sample
        in eval mode, and those not drawn, are returned unchanged. The teacher keeps seeing ``images``.
        Strengths: the module constants."""
        if not self.training or self.cfg.view_prob == 0:
            return images
        batch, device = images.shape[0], images.device
        jitter, crop, rotate, mask = self._draw_views(batch, device)

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return low + (high - low) * torch.rand(batch, *shape, device=device)

        side = torch.where(crop, uniform(MIN_CROP, 1.0), torch.ones(batch, device=device))
        centre = (1 - side)[:, None] * uniform(-1.0, 1.0, 2)
        angle = torch.where(rotate, uniform(-1.0, 1.0) * math.radians(MAX_ROTATION), torch.zeros_like(side))
        moved = (crop | rotate).view(-1, 1, 1, 1)
        out = torch.where(moved, crop_and_rotate(images, side, centre, angle), images)
        factors = [torch.where(jitter, uniform(1 - JITTER, 1 + JITTER), 1.0) for _ in range(3)]
        out = torch.where(jitter.view(-1, 1, 1, 1), jitter_colours(out, *factors), out)
        keep = torch.rand(batch, MASK_GRID, MASK_GRID, device=device) >= MASK_RATIO
        return torch.where(mask.view(-1, 1, 1, 1), mask_patches(out, keep), out)

    def projections(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> tuple[QKV, QKV, torch.Tensor, torch.Tensor]:
        """(student Q/K/V (eq. 1), teacher Q/K/V with every token (detached), GL-projected student tokens
        (eq. 5), teacher patch tokens (detached)); the projectors must be built."""
        self.require_built("projectors")
        feature, attention, tokens = self._inputs(student_taps, teacher_taps)
        grid = (self.gl.side, self.gl.side)
        feature = resize_to(feature, grid, self.impl)
        return self.pca(feature), QKV(*(x.detach() for x in attention)), self.gl(feature), tokens.detach()

    def term(self, batch: Batch) -> Term:
        cakd = self.cfg
        student, attention, projected, tokens = self.projections(batch.student_taps, batch.teacher_taps)
        swap = swap_masks(student, cakd.replace_prob) if self.training and cakd.replace_prob > 0 else None
        fooled = self.discriminator(projected.float())
        parts = {
            "pca": cakd.pca_weight * pca_loss(student, attention, swap),
            "gl": cakd.gl_weight * F.mse_loss(projected.float(), tokens.float()),
            "adv": cakd.adversarial_weight * generator_loss(fooled, cakd.adversarial),
        }
        if self.training:
            self._stash = (tokens, projected.detach())
        return sum(parts.values()), parts

    def after_step(self) -> None:
        """Algorithm 1: after the optimizer step with 0-based index ``step``, one Adam step of the
        discriminator on eq. 8 over the features of the last training forward when
        step % discriminator_every == 0."""
        step = self.steps
        self.steps += 1
        if step % self.cfg.discriminator_every or self._stash is None:
            return
        teacher, student = (x.float() for x in self._stash)

        def loss_of(net: Callable[..., torch.Tensor]) -> torch.Tensor:
            return discriminator_loss(net(teacher), net(student))

        self.last_disc_loss = step_aside(self.discriminator, self.disc_optimizer, loss_of)

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
    logits="none",
    teacher_cache=TeacherCache(reads=("features", "attention")),
)
