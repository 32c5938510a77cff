"""What every distillation method shares: the :class:`DistillationLoss` interface the training loop drives,
the supervised cross-entropy, the linear warm-up of a method's term (:func:`warmup_factor`), the one-step
trainer of side networks (:func:`step_aside`), and the (student tap, teacher tap) pairs of the feature methods
with the tap checks of the validators (:class:`FeaturePair`, :func:`require_tap`, :func:`require_pairs`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kdfast.config import TapConfig
from kdfast.errors import ConfigError, UsageError
from kdfast.methods import registry
from kdfast.schema import closest

NO_TAPS: Mapping[str, TapConfig] = MappingProxyType({})


def supervised_ce(
    student_logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """CE(y, p_S) for integer labels (B,) or soft target probabilities (B, K) (CutMix), batch mean."""
    targets = targets.float() if targets.is_floating_point() else targets
    return F.cross_entropy(student_logits.float(), targets, label_smoothing=label_smoothing)


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Integer labels (B,) as they are; CutMix / Mixup soft targets (B, K) as the class with the larger share,
    the label a method that needs one class per sample reads (DKD, OFA, as their code takes the argmax)."""
    return targets.argmax(dim=1) if targets.is_floating_point() else targets


def warmup_factor(epoch: int, warmup: int) -> float:
    """The linear warm-up of a distillation term in mdistiller's trainer (DKD, ReviewKD): the term is
    multiplied by min(e / warmup, 1) in the e-th training epoch counted from 1, so by min((epoch + 1) /
    warmup, 1) for the kdfast ``epoch`` counted from 0; 1 without warm-up (``warmup`` 0)."""
    return 1.0 if warmup == 0 else min((epoch + 1) / warmup, 1.0)


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


def require_tap(
    taps: Mapping[str, TapConfig], name: str, *, role: str, where: str, kind: str | None = None
) -> None:
    """ConfigError unless ``name`` is one of the ``role`` model's taps (of ``kind``, when given); ``where``
    is the config key that names it. The validators of the methods check their tap names with this."""
    if name not in taps:
        raise ConfigError(f"{where} names no {role} tap {name!r}: {closest(name, taps, what=f'{role} taps')}")
    if kind is not None and taps[name].kind != kind:
        raise ConfigError(f"{where}: {role} tap {name!r} must have kind {kind!r}")


@dataclass
class FeaturePair:
    """One (student feature tap, teacher feature tap) pair of a feature method (FitNet, AT, ReviewKD)."""

    student: str = ""
    teacher: str = ""


def require_pairs(
    pairs: Sequence[FeaturePair],
    student_taps: Mapping[str, TapConfig],
    teacher_taps: Mapping[str, TapConfig],
    where: str,
) -> None:
    """ConfigError unless ``pairs`` (the config key ``where``) is not empty and each pair names a student and
    a teacher tap of kind feature."""
    if not pairs:
        raise ConfigError(f"{where} is empty: name at least one {{student: TAP, teacher: TAP}} pair")
    for i, pair in enumerate(pairs):
        at = f"{where}[{i}]"
        require_tap(student_taps, pair.student, role="student", where=f"{at}.student", kind="feature")
        require_tap(teacher_taps, pair.teacher, role="teacher", where=f"{at}.teacher", kind="feature")


class Batch(NamedTuple):
    """What one training batch gives a loss: both models' logits, the targets (integer labels (B,) or soft
    CutMix / Mixup targets (B, K)) and both models' taps ({name: tensor or Q, K, V})."""

    student_logits: Any  # (B, K), or TITN's (class, distillation) pair
    teacher_logits: torch.Tensor
    targets: torch.Tensor
    student_taps: Mapping[str, Any]
    teacher_taps: Mapping[str, Any]


Term = tuple[torch.Tensor, dict[str, torch.Tensor]]  # a method's term and its named parts to log


class DistillationLoss(nn.Module):
    """What the training loop asks of a distillation method: a loss module.

    ``forward(student_logits, teacher_logits, targets, student_taps, teacher_taps) -> (term, parts)``: the
    method's term, before its config ``weight``, and a mapping of named tensors to log (the pieces of the
    term, task weights); :class:`kdfast.methods.compose.CompositeLoss` weighs and sums the terms of a run.
    ``forward`` hands the batch, its teacher taps through :meth:`teacher_view`, to :meth:`term`, the one
    method a method file writes. ``check(student_taps, teacher_taps)`` raises UsageError on the taps of a real
    batch whose shapes cannot be matched (and may size sub-networks); ``maps(student_taps, teacher_taps)``
    gives (student, teacher) attention maps (B, h, w) for pictures. Trainable parameters (projectors, task
    weights) are optimized and checkpointed with the student and dropped at inference; those
    ``no_weight_decay()`` names get no weight decay.

    The constructor is every method's: ``(section, student_taps, teacher_taps, *, kernels_impl,
    label_smoothing)``. It runs the validator the registry holds for the method whose loss this class is (the
    one the config loader runs, so a section is checked by one function), keeps the section as ``self.cfg``,
    ``kernels_impl`` as ``self.impl`` (which kernels run) and ``label_smoothing`` (the stage's, for a method
    that computes the supervised term), then calls :meth:`setup` for the method's own state. A class that no
    method declares (this one, the composite) validates nothing. The defaults below check nothing, draw
    nothing and do nothing at the hooks.
    """

    def __init__(
        self,
        cfg: Any = None,
        student_taps: Mapping[str, TapConfig] = NO_TAPS,
        teacher_taps: Mapping[str, TapConfig] = NO_TAPS,
        *,
        kernels_impl: str = "auto",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        declared = registry.declaring(type(self))
        if declared is not None:
            declared.validate(cfg, student_taps, teacher_taps, f"loss.{declared.name}")
        self.cfg = cfg
        self.impl = kernels_impl
        self.label_smoothing = label_smoothing
        self._sized_from: Any = None
        self.setup(student_taps, teacher_taps)

    def setup(self, student_taps: Mapping[str, TapConfig], teacher_taps: Mapping[str, TapConfig]) -> None:
        """The method's own state (parameters, buffers, sub-networks to size in :meth:`check`), made once the
        section ``self.cfg`` is validated; the tap configs are those of the run. Nothing here."""

    def forward(
        self,
        student_logits: Any,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        student_taps: Mapping[str, Any],
        teacher_taps: Mapping[str, Any],
    ) -> Term:
        teacher_taps = self.teacher_view(teacher_taps)
        return self.term(Batch(student_logits, teacher_logits, targets, student_taps, teacher_taps))

    def term(self, batch: Batch) -> Term:
        """The method's term and its parts for one batch: what a method file implements."""
        raise NotImplementedError(f"{type(self).__name__} computes no term: define term(batch)")

    def check(self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]) -> None:
        """Raise UsageError when the taps of a real batch cannot be matched (nothing to check here)."""

    def build_once(
        self, found: Any, build: Callable[[], Mapping[str, nn.Module]], device: torch.device, built_for: str
    ) -> bool:
        """Sub-networks sized from the first real batch in :meth:`check` (FitNet's regressors, ReviewKD's
        ABFs, OFA's branches, CRD's heads, CAKD's projectors, SoKD's adapter and head): on the first call
        each ``name: module`` of ``build()`` becomes ``self.<name>``, the whole loss module moves to
        ``device``, and ``found`` (what the taps gave) is remembered; on every call a UsageError
        "<built_for> <remembered>, but these taps give <found>" when the taps give something else. True on the
        call that built (a caller then makes what needs the built parameters: a side optimizer, Z^)."""
        built = self._sized_from is None
        if built:
            for name, module in build().items():
                setattr(self, name, module)
            self._sized_from = found
            self.to(device)
        if found != self._sized_from:
            raise UsageError(f"{built_for} {self._sized_from}, but these taps give {found}")
        return built

    def require_built(self, what: str) -> None:
        """UsageError unless :meth:`check` has built the sub-networks, named ``what``, on a real batch."""
        if self._sized_from is None:
            name = type(self).__name__
            raise UsageError(f"{name}: call check() on a real batch first; it sizes the {what}")

    def maps(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(student, teacher) attention maps (B, h, w) to draw; none here."""
        return []

    def prepare_student(self, student: nn.Module) -> None:
        """Called once before the distillation stage (TITN switches on the distillation head here)."""

    def student_view(self, images: torch.Tensor) -> torch.Tensor:
        """The student's input for this batch; the teacher always sees ``images`` (CAKD's multi-view)."""
        return images

    def teacher_view(self, teacher_taps: Mapping[str, Any]) -> Mapping[str, Any]:
        """The teacher taps every method of the run reads for this batch (SoKD refines its teacher feature
        here, so that the method it plugs into distills the refined one); the taps as they are here."""
        return teacher_taps

    def after_step(self) -> None:
        """Called after each optimizer step of the student (CAKD trains its discriminator here)."""

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called at the start of each training epoch, counted from 0, of a stage of ``epochs`` epochs (SoKD
        ends its search phase here)."""

    def held_out_share(self) -> float:
        """The share of the training images the run must hold out for this loss (SoKD's search reads only
        those); 0 here: the loss trains on the whole training split."""
        return 0.0

    def use_held_out(self, taps: Callable[[], tuple[Mapping[str, Any], Mapping[str, Any]]]) -> None:
        """Given before the distillation stage when :meth:`held_out_share` is positive: ``taps()`` returns
        the (student, teacher) taps of the next batch of the held-out images, both models run without
        gradient. Not used here."""

    def no_weight_decay(self) -> set[str]:
        """Names (as in ``named_parameters()``) of this module's parameters that the optimizer must not decay,
        as timm's models declare theirs: MTD's task weights, which weight decay would pull towards 0 and so
        towards ever larger task coefficients 1 / (2 w^2). None here."""
        return set()
