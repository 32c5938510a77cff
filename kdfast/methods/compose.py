"""The run's objective as one loss module: the weighted terms of every method in ``loss.method`` plus the
supervised cross-entropy, built through the registry.

    L = ce * CE(y, p_S) + sum over m in loss.method of weight_m * L_m

The CE term is added unless a used method computes the supervised term itself (``Method.supervised``:
MTD weighs it among its tasks, TITN puts it on its class head); :class:`kdfast.config.LossConfig` holds
that rule and the weights. One method is the case of a list of one, so the loop always drives this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from kdfast.config import LossConfig, TapConfig
from kdfast.methods.base import Batch, DistillationLoss, Term, supervised_ce
from kdfast.methods.registry import method


class CompositeLoss(DistillationLoss):
    """sum_m weight_m * L_m (+ ce * CE) over the methods of ``cfg``, each built by its registered loss class
    (which validates its section against the taps).

    ``forward`` returns (loss, parts): "ce" (the weighted CE term, when the run adds it) and, per method m,
    "m" (weight_m * L_m) sum to the loss; "m/<part>" are m's own parts as m reports them (before its weight).
    The hooks reach every member in ``loss.method`` order (``student_view`` and ``teacher_view`` chain the
    members' views, so every member reads the taps every other member refined), ``check`` checks every
    member, ``maps`` concatenates their maps. The members are submodules, so their parameters and state
    (projectors, task weights, side optimizers) are optimized and checkpointed with the student.
    """

    cfg: LossConfig

    def setup(self, student_taps: Mapping[str, TapConfig], teacher_taps: Mapping[str, TapConfig]) -> None:
        cfg = self.cfg
        self.ce = cfg.ce_weight()
        self.weights = {name: cfg.sections[name].weight for name in cfg.method}
        self.members = nn.ModuleDict(
            {
                name: method(name).loss(
                    cfg.sections[name],
                    student_taps,
                    teacher_taps,
                    kernels_impl=self.impl,
                    label_smoothing=self.label_smoothing,
                )
                for name in cfg.method
            }
        )

    def term(self, batch: Batch) -> Term:
        """Every member's term on this batch, whose teacher taps every member's :meth:`teacher_view` saw."""
        terms: dict[str, torch.Tensor] = {}
        details: dict[str, torch.Tensor] = {}
        if self.ce is not None:
            terms["ce"] = self.ce * supervised_ce(batch.student_logits, batch.targets, self.label_smoothing)
        for name, member in self.members.items():
            term, parts = member.term(batch)
            terms[name] = self.weights[name] * term
            details.update({f"{name}/{key}": value for key, value in parts.items()})
        return sum(terms.values()), {**terms, **details}

    def check(self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]) -> None:
        """Every member's check, in order (CAKD and SoKD size their sub-networks here)."""
        for member in self.members.values():
            member.check(student_taps, teacher_taps)

    def maps(
        self, student_taps: Mapping[str, Any], teacher_taps: Mapping[str, Any]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The members' (student, teacher) maps, one list in ``loss.method`` order."""
        return [pair for member in self.members.values() for pair in member.maps(student_taps, teacher_taps)]

    def prepare_student(self, student: nn.Module) -> None:
        for member in self.members.values():
            member.prepare_student(student)

    def student_view(self, images: torch.Tensor) -> torch.Tensor:
        """Each member's view applied in turn (only CAKD changes the input today)."""
        for member in self.members.values():
            images = member.student_view(images)
        return images

    def teacher_view(self, teacher_taps: Mapping[str, Any]) -> Mapping[str, Any]:
        """Each member's view of the teacher taps applied in turn (only SoKD refines one today)."""
        for member in self.members.values():
            teacher_taps = member.teacher_view(teacher_taps)
        return teacher_taps

    def after_step(self) -> None:
        for member in self.members.values():
            member.after_step()

    def start_epoch(self, epoch: int, epochs: int) -> None:
        for member in self.members.values():
            member.start_epoch(epoch, epochs)

    def held_out_share(self) -> float:
        """The largest share any member needs held out (one held-out split serves them all)."""
        return max(member.held_out_share() for member in self.members.values())

    def use_held_out(self, taps: Callable[[], tuple[Mapping[str, Any], Mapping[str, Any]]]) -> None:
        for member in self.members.values():
            member.use_held_out(taps)

    def no_weight_decay(self) -> set[str]:
        """Every member's exempt parameters, named as in this module's ``named_parameters()``."""
        return {
            f"members.{name}.{key}"
            for name, member in self.members.items()
            for key in member.no_weight_decay()
        }
