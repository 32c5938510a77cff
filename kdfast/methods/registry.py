"""The method registry: every module ``kdfast/methods/<name>.py`` that declares ``METHOD = Method(...)`` is
the distillation method ``<name>``; the config loader types and checks ``loss.<name>`` with its schema and
validator, and the training loop builds its loss module.

Modules are found with ``pkgutil.iter_modules`` on first use, so no list of methods is kept anywhere; the
helper modules of the package (``base``, ``features``, ``logits``, ``compose``, this one) declare no
``METHOD``. What a method declares (:class:`~kdfast.spec.Method`, :class:`~kdfast.spec.TeacherCache`) is
defined in :mod:`kdfast.spec`, below this module and the config loader.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from kdfast.errors import ConfigError
from kdfast.schema import closest
from kdfast.spec import LOGITS_ONLY, Method, TeacherCache

# what a method file declares itself with, importable from here beside the lookups
__all__ = ["LOGITS_ONLY", "Method", "TeacherCache", "declaring", "discover", "method", "methods"]


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
