"""OFA-KD: one-for-all distillation between heterogeneous architectures (Hao, Guo, Han, Tang, Hu, Wang & Xu,
NeurIPS 2023, "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation",
arXiv:2310.19444), as its official code (github.com/Hao840/OFAKD, ``distillers/ofa.py``) computes it.

Numbering used in the docstrings (Sec. 3):
  (1) branch projectors: each chosen student stage gets a branch into the logit space, so only the
      teacher's logits are needed and no feature of the teacher is matched (a ViT teacher and a CNN student
      meet in the logit space). A CNN stage: depthwise-separable stride-2 blocks (3x3 depthwise + 1x1
      pointwise + BN + ReLU, twice) down to the last stage's grid, channels doubling, the last block to the
      projector width (a 1x1 conv when no block is needed), global average pooling, a linear classifier. A
      ViT stage: patch merging (2x2 tokens -> 1) down to a 7x7 grid, transformer blocks (more for shallower
      stages), the class token (or the token mean), a linear classifier
  (2) the OFA loss with the modulating exponent eps (the paper's gamma) for the target class y of a sample,
      with p = softmax(z / T) of teacher (t) and student (s):
        L_OFA = -((1 + p_t^y)^eps - 1) log p_s^y - sum_{c != y} (p_t^c)^eps log p_s^c
      the official code's (p_t + onehot(y))^eps - onehot(y) as the weight of -log p_s, batch mean
  (3) the term: sum over the stages of (2) on each branch's logits, plus ``final_weight`` times (2) on the
      student's own logits (the official gt + kd + ofa losses, with kd-loss-weight and ofa-loss-weight 1)
How (2) relates to the paper's form: the paper writes the target term as -(1 + p_t^y)^eps log p_s^y, the
cross-entropy with the label included; the official code subtracts the one-hot, because the run adds the
cross-entropy -log p_s^y itself (here ``loss.ce``, 1 in the official runs), so on the final logits ``loss.ce``
= 1 plus (2) is the paper's target term exactly. The code also raises the non-target teacher probabilities to
eps; this module follows the code, which produced the published numbers (whether the paper's equation raises
them too was not checked against its PDF). With eps = 1, (2) is the cross-entropy between p_t and p_s: KD at
temperature T without the T^2 factor (KL plus the teacher's entropy, a constant). The temperature divides both
logits, as in the code (default 1). eps: 1 in the official CIFAR-100 runs, 1.5 for ImageNet ResNet-18 (its
README).

kdfast's generalization: the branches are sized from the tapped shapes at the probe forward
(:meth:`OFALoss.check`) instead of per-architecture tables. The number of stride-2 blocks of a CNN branch
is round(log2(H / H_min)), H_min the smallest height among the tapped stages (the official 4 - stage when
the four stages of a ResNet are tapped); a ViT branch gets max(n - i, 1) transformer blocks for the i-th of
n tapped stages (the official max(4 - stage, 1)). The projector width defaults to the widest tapped stage; the
official one is max(student, teacher) embedding width (``width`` sets it). The branches live in the loss
module: they train with the student and never reach ``student.pt``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import PatchMerging
from timm.models.vision_transformer import Block
from torch import nn

from kdfast.config import TapConfig
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.base import Batch, DistillationLoss, Term, hard_labels, require_tap
from kdfast.methods.features import patch_grid, tap_tensor
from kdfast.methods.registry import LOGITS_ONLY, Method
from kdfast.schema import positive

FINAL_PATCH_GRID = 7  # eq. 1, ViT branch: patch merging stops at a 7 x 7 grid (the official constant)
BRANCH_HEADS = 4  # eq. 1, ViT branch: the official blocks have 4 heads
FINAL_PART = "logits"  # the part of eq. 3 on the student's own logits


def ofa_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    eps: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Eq. 2 for (B, K) logits and (B,) integer targets: mean_b -sum_c ((p_t + onehot(y))^eps - onehot(y))_c
    log p_s,c, p = softmax(z / temperature), in float32 at least (log p_s as a log-softmax: finite where the
    official log(softmax) underflows to -inf). Gradients reach whichever logits require them."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    p_t = F.softmax(teacher_logits.to(dtype) / temperature, dim=1)
    onehot = F.one_hot(targets.long(), p_t.shape[1]).to(dtype)
    weight = (p_t + onehot).pow(eps) - onehot
    return -(weight * log_p_s).sum(dim=1).mean()


def init_branch(module: nn.Module) -> None:
    """The official initialization of the branches: convolutions kaiming-normal (fan out, ReLU), BatchNorm
    1 and 0, linear layers truncated-normal (std 0.02) with zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def separable_block(c_in: int, c_out: int) -> nn.Sequential:
    """Eq. 1, CNN branch: 3x3 depthwise (stride 2) + 1x1 + BN + ReLU, then 3x3 depthwise + 1x1 to ``c_out``
    + BN + ReLU: the grid halves."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_in, 1, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU(),
        nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    )


def cnn_branch(channels: int, height: int, final_height: int, width: int, classes: int) -> nn.Sequential:
    """Eq. 1 for a (channels, height, .) CNN stage: round(log2(height / final_height)) separable blocks
    (channels doubling, the last to ``width``; a 1x1 conv to ``width`` when there are none), global average
    pooling, a linear layer to ``classes``."""
    blocks = max(round(math.log2(height / final_height)), 0)
    layers: list[nn.Module] = []
    c = channels
    for i in range(blocks):
        out = width if i == blocks - 1 else 2 * c
        layers.append(separable_block(c, out))
        c = out
    if blocks == 0:
        layers.append(nn.Conv2d(c, width, 1))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(width, classes))


class TokenBranch(nn.Module):
    """Eq. 1 for a ViT stage of ``tokens`` tokens (a square patch grid after any class/prefix tokens) of
    width ``dim``: a linear map to ``width`` (when it differs), patch merging (2x2 -> 1, GELU after each as
    the official code, none after the last of several) of the patch tokens down to FINAL_PATCH_GRID, the
    prefix tokens kept aside; ``blocks`` transformer blocks over all tokens; the first prefix token (or the
    mean of the tokens when there is none); a linear layer to ``classes``."""

    def __init__(self, tokens: int, dim: int, width: int, blocks: int, classes: int) -> None:
        super().__init__()
        self.side, self.prefix = patch_grid(tokens)
        merges = max(int(math.log2(self.side / FINAL_PATCH_GRID)), 0)
        self.embed = nn.Identity() if dim == width else nn.Linear(dim, width)
        merging: list[nn.Module] = []
        for i in range(merges):
            merging += [PatchMerging(width, width), nn.GELU() if i == 0 or i < merges - 1 else nn.Identity()]
        self.merge = nn.Sequential(*merging)
        heads = next(h for h in (BRANCH_HEADS, 2, 1) if width % h == 0)
        self.blocks = nn.Sequential(*(Block(width, heads) for _ in range(blocks)))
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        prefix, patches = x[:, : self.prefix], x[:, self.prefix :]
        grid = patches.reshape(x.shape[0], self.side, self.side, x.shape[2])
        patches = self.merge(grid).flatten(1, 2)
        x = self.blocks(torch.cat([prefix, patches], dim=1))
        return self.head(x[:, 0] if self.prefix else x.mean(1))


@dataclass
class OFAConfig:
    """``loss.ofa``: weight * (sum over the student feature taps ``stages`` (shallowest first) of eq. 2 on
    their branch logits + ``final_weight`` * eq. 2 on the student's logits), at modulating exponent ``eps``
    and ``temperature``; ``width``: the branches' width (null: the widest tapped stage)."""

    weight: float = 1.0
    stages: list[str] = field(default_factory=list)
    eps: float = 1.0
    temperature: float = 1.0
    final_weight: float = 1.0
    width: int | None = None


def validate(
    cfg: OFAConfig,
    student_taps: Mapping[str, TapConfig],
    teacher_taps: Mapping[str, TapConfig],
    where: str = "loss.ofa",
) -> None:
    """At least one stage, each a distinct student feature tap (none named like the final part); eps and the
    temperature > 0; final_weight >= 0; a positive width when set."""
    if not cfg.stages:
        raise ConfigError(f"{where}.stages is empty: name the student feature taps that get a branch")
    for i, name in enumerate(cfg.stages):
        require_tap(student_taps, name, role="student", where=f"{where}.stages[{i}]", kind="feature")
        if name == FINAL_PART or name in cfg.stages[:i]:
            raise ConfigError(
                f"config key '{where}.stages[{i}]': {name!r} is "
                f"{'the name of the final-logits part' if name == FINAL_PART else 'listed twice'}; "
                "name each stage's tap once, not 'logits'"
            )
    positive(cfg.eps, f"{where}.eps")
    positive(cfg.temperature, f"{where}.temperature")
    positive(cfg.final_weight, f"{where}.final_weight", allow_zero=True)
    if cfg.width is not None:
        positive(cfg.width, f"{where}.width")


class OFALoss(DistillationLoss):
    """Eq. 3 between the branch logits (and the student's logits) and the teacher's logits (detached).
    ``forward`` returns (term, parts): one part per stage, named by its tap, and "logits" (times
    ``final_weight``), summing to the term. Targets are the batch's labels; CutMix's soft targets name the
    class with the larger share, as the official code takes the argmax of mixed labels.

    The branches need the number of classes, which no tap shows: :meth:`prepare_student` hooks the student's
    output, the probe forward the loop runs before :meth:`check` records its width, and :meth:`check` removes
    the hook and builds the branches from the tapped shapes.
    """

    cfg: OFAConfig
    branches: nn.ModuleList

    def setup(self, student_taps: Mapping[str, TapConfig], teacher_taps: Mapping[str, TapConfig]) -> None:
        self.classes: int | None = None
        self._classes_hook: torch.utils.hooks.RemovableHandle | None = None

    def prepare_student(self, student: nn.Module) -> None:
        """Hook the student's output to learn the number of classes at the next forward (the probe)."""
        self._classes_hook = student.register_forward_hook(self._record_classes)

    def _record_classes(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            got = type(output).__name__ if not isinstance(output, torch.Tensor) else tuple(output.shape)
            raise UsageError(
                f"method ofa needs the student's logits as one (B, classes) tensor, got {got} (a two-head "
                "student such as TITN's): drop ofa from loss.method"
            )
        self.classes = output.shape[1]

    def check(self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]) -> None:
        """UsageError when a stage tap is neither a (B, C, H, W) map nor (B, tokens, D) ViT tokens, or its
        shape is not the one its branch was built for; on the first call, build one branch per stage (eq. 1)
        for the number of classes the hooked probe forward recorded."""
        if self._classes_hook is not None:
            self._classes_hook.remove()
            self._classes_hook = None
        if self.classes is None:
            raise UsageError(
                "OFALoss: call prepare_student(student) and run the student on a batch before check(); the "
                "branches need the number of classes"
            )
        features = [tap_tensor(student_taps, name, "student") for name in self.cfg.stages]
        for name, feature in zip(self.cfg.stages, features, strict=True):
            if feature.dim() not in (3, 4):
                raise UsageError(
                    f"loss.ofa stage {name!r} has shape {tuple(feature.shape)}: a stage must be a "
                    "(B, C, H, W) map or (B, tokens, D) ViT tokens"
                )
        shapes = [tuple(f.shape[1:]) for f in features]
        self.build_once(
            shapes,
            lambda: {"branches": self._branches(shapes)},
            features[0].device,
            "loss.ofa: the branches were built for stage shapes",
        )

    def _branches(self, shapes: list[tuple[int, ...]]) -> nn.ModuleList:
        """Eq. 1: one branch per stage shape, (C, H, W) maps through :func:`cnn_branch`, (tokens, D) through
        :class:`TokenBranch`, initialized as the official code does (:func:`init_branch`)."""
        width = self.cfg.width or max(s[0] if len(s) == 3 else s[1] for s in shapes)
        final_height = min((s[1] for s in shapes if len(s) == 3), default=1)
        n = len(shapes)
        branches = nn.ModuleList(
            cnn_branch(s[0], s[1], final_height, width, self.classes)
            if len(s) == 3
            else TokenBranch(s[0], s[1], width, max(n - i, 1), self.classes)
            for i, s in enumerate(shapes, start=1)
        )
        init_branch(branches)
        return branches

    def term(self, batch: Batch) -> Term:
        self.require_built("branches")
        ofa = self.cfg
        labels = hard_labels(batch.targets)
        teacher = batch.teacher_logits.detach()

        def loss_of(logits: torch.Tensor) -> torch.Tensor:
            return ofa_loss(logits, teacher, labels, eps=ofa.eps, temperature=ofa.temperature)

        parts = {
            name: loss_of(branch(tap_tensor(batch.student_taps, name, "student")))
            for name, branch in zip(ofa.stages, self.branches, strict=True)
        }
        parts[FINAL_PART] = ofa.final_weight * loss_of(batch.student_logits)
        return sum(parts.values()), parts


METHOD = Method(
    name="ofa",
    schema=OFAConfig,
    validate=validate,
    loss=OFALoss,
    paper="Hao, Guo, Han, Tang, Hu, Wang & Xu 2023, One-for-All: Bridge the Gap Between Heterogeneous "
    "Architectures in Knowledge Distillation (NeurIPS, arXiv:2310.19444)",
    teacher_cache=LOGITS_ONLY,
)
