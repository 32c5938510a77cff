"""What the run schema and the method files are built from, below both: a tap (:class:`TapConfig`, the
``taps`` entries of ``teacher`` and ``student``) and a method's declaration of itself (:class:`Method`,
``METHOD`` in ``kdfast/methods/<name>.py``, with :class:`TeacherCache`). The config loader
(:mod:`kdfast.config`), the method registry (:mod:`kdfast.methods.registry`) and every method file import
these from here; this module imports only the standard library.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class TapConfig:
    """A named intermediate output: ``path`` is a module path (``model.get_submodule(path)``).

    ``feature`` records the module's output (a CNN map); ``attention`` records Q, K, V per head from the
    module's qkv projection (a ``qkv`` Linear, or an ``nn.MultiheadAttention``) without forming Q K^T.
    """

    path: str = ""
    kind: Literal["feature", "attention"] = "feature"
    heads: int | None = None


@dataclass(frozen=True)
class TeacherCache:
    """What a method's loss reads of the frozen teacher, for the teacher-output cache
    (:mod:`kdfast.teacher_cache`): ``reads`` names the outputs, of "logits", "features" (feature taps) and
    "attention" (the Q, K, V of attention taps); the cache stores the logits and every teacher tap of the run
    and hands them to the loss in the shapes the live teacher gives. ``fp16``: the method's tolerance allows
    the taps to be stored in float16 (relative error 2^-11; logits always stay float32: they are small).
    ``reason``: why the method cannot read cached outputs, when ``reads`` is empty; the run says it."""

    reads: tuple[str, ...] = ()
    fp16: bool = True
    reason: str = ""

    @property
    def usable(self) -> bool:
        return bool(self.reads)


LOGITS_ONLY = TeacherCache(reads=("logits",))


@dataclass(frozen=True)
class Method:
    """What a method file declares about itself.

    ``schema``: the dataclass of its config section ``loss.<name>``; it has a ``weight`` field (default 1.0)
    that multiplies the method's whole term. ``validate(section, student_taps, teacher_taps, where)``: the
    checks that need the run (tap names and kinds, files), raising one ConfigError line that names keys
    under ``where`` (``loss.<name>``); the loader calls it before any work and the loss module's
    constructor calls it too (:func:`declaring`). ``loss``: the
    :class:`~kdfast.methods.base.DistillationLoss` subclass, built as ``loss(section, student_taps,
    teacher_taps, kernels_impl=..., label_smoothing=...)``. ``paper``: the
    citation. ``supervised``: the method computes the supervised term itself (its own CE or task loss), so
    the run adds no ``loss.ce`` term (:class:`kdfast.methods.compose.CompositeLoss`). ``logits``: what the
    method reads of the student's output: "one" (B, K) tensor (the default), the (class, distillation)
    "pair" of a two-head student (TITN), or "none" (a feature method); a "pair" method combines only with
    "none" methods, since its student gives no one tensor (:class:`kdfast.config.LossConfig`).
    ``teacher_cache``: what it reads of the teacher, so whether a run may read the teacher's outputs from the
    teacher-output cache instead of running the teacher (:class:`TeacherCache`); a method that does not
    declare it cannot.
    """

    name: str
    schema: type
    validate: Callable[[Any, Mapping[str, Any], Mapping[str, Any], str], None]
    loss: type
    paper: str
    supervised: bool = False
    logits: Literal["one", "pair", "none"] = "one"
    teacher_cache: TeacherCache = TeacherCache(reason="it does not declare what it reads of the teacher")
