"""The method registry: every module ``kdfast/methods/<name>.py`` that declares ``METHOD = Method(...)`` is
the distillation method ``<name>``; the config loader types and checks ``loss.<name>`` with its schema and
validator, and the training loop builds its loss module.

Modules are found with ``pkgutil.iter_modules`` on first use, so no list of methods is kept anywhere; the
helper modules of the package (``base``, ``features``, ``logits``, ``compose``, this one) declare no
``METHOD``. This module imports only the standard library and :mod:`kdfast.schema`, so :mod:`kdfast.config`
can read it while the method modules import :mod:`kdfast.config`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from kdfast.errors import ConfigError
from kdfast.schema import closest


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


def discover(path: str | Path, package: str) -> dict[str, Method]:
    """Import every module of the package at ``path`` (import name ``package``) and collect the ``METHOD``
    each declares, by name. A ``METHOD`` named other than its file, or a schema without ``weight``, is a
    programming error (TypeError), reported at the first config load."""
    found: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules([str(path)]), key=lambda i: i.name):
        module = importlib.import_module(f"{package}.{info.name}")
        declared = getattr(module, "METHOD", None)
        if declared is None:
            continue
        if not isinstance(declared, Method) or declared.name != info.name:
            raise TypeError(f"{package}.{info.name}.METHOD must be Method(name={info.name!r}, ...)")
        if "weight" not in {f.name for f in dataclasses.fields(declared.schema)}:
            raise TypeError(f"{package}.{info.name}: schema {declared.schema.__name__} needs a weight field")
        found[declared.name] = declared
    return found


@functools.cache
def methods() -> Mapping[str, Method]:
    """Every registered method by name (the modules of ``kdfast.methods``, discovered once)."""
    return MappingProxyType(discover(Path(__file__).parent, __package__))


def method(name: str, where: str = "loss.method") -> Method:
    """The registered method ``name``; a ConfigError naming ``where`` and the closest names otherwise."""
    registered = methods()
    if name not in registered:
        raise ConfigError(
            f"config key '{where}' names no method {name!r}: {closest(name, registered, what='methods')}"
        )
    return registered[name]


def declaring(loss_class: type) -> Method | None:
    """The registered method whose ``loss`` is ``loss_class`` or one of its bases (a subclass keeps its
    method's validation); None for a loss class no method declares (the interface itself, the composite)."""
    for declared in methods().values():
        if issubclass(loss_class, declared.loss):
            return declared
    return None
