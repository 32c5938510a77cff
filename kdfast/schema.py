"""Typed config sections: a YAML mapping checked against a dataclass, one :class:`ConfigError` line per bad
value.

``build(cls, raw, where)`` turns a mapping into the dataclass ``cls``, checking every key against its fields
and every value against its type hint (nested dataclasses, lists, mappings, ``Literal`` choices, unions);
``where`` is the dotted key path that errors name (``loss.agkd.pairs[0].student``). The run schema
(``kdfast.config``), every method's section (``kdfast.methods``) and the export's (``export.config``) are
read this way, from a YAML file (``read_yaml``) and ``--set KEY=VALUE`` (``set_override``), so all config
errors look alike: an unknown key names the closest valid ones, a wrong type names the expected one. Every
number a config holds is finite and >= 0 (no setting of the run or of a method is negative, and a NaN or an
infinity is never a setting), checked here for every key at once; ``positive``, ``unit_interval`` and
``at_most`` are the further range checks the validators share.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from kdfast.errors import ConfigError, shown


def closest(
    key: str, valid: Iterable[str], what: str = "keys", *, cutoff: float = 0.5, listed: int | None = None
) -> str:
    """The end of an error line about a name ``key`` that is none of ``valid``: "did you mean ...?" with up
    to three close names (difflib's ratio >= ``cutoff``), else the valid ``what``: every one, sorted
    (``listed`` None), the first ``listed`` in their order (module paths), or, with ``listed`` 0 for a list
    too long to print (timm's models), that none is similar. The one suggestion helper of config keys,
    method and tap names, model names and module paths."""
    names = list(valid)
    if not names:
        return "none are defined"
    # a name far longer than any valid one is close to none (and difflib's time grows with its length)
    near = []
    if len(key) <= 4 * max(map(len, names)):
        near = difflib.get_close_matches(key, names, n=3, cutoff=cutoff)
    if near:
        return f"did you mean {' or '.join(repr(n) for n in near)}?"
    if listed == 0:
        return f"no similar {what} exists"
    if listed is None:
        return f"valid {what}: {', '.join(sorted(names))}"
    return f"valid {what} include {names[:listed]}"


def type_name(tp: Any) -> str:
    """How an error names the type hint ``tp`` ("int", "'mse' | 'ssim'", "a list of float", ...)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) if isinstance(a, str) else str(a).lower() for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the type hint ``tp`` and build dataclasses; raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, where)
            except ConfigError:
                if len([a for a in args if a is not type(None)]) == 1:
                    raise
        raise ConfigError(f"config key '{where}' must be {type_name(tp)}, got {shown(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        raise ConfigError(f"config key '{where}' must be one of {type_name(tp)}, got {shown(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{where}' must be {type_name(tp)}, got {shown(value)}")
        (item,) = typing.get_args(tp)
        return [convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping, got {shown(value)}")
        _, item = typing.get_args(tp)
        return {str(k): convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is Any:
        return value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a folder named 2024 reads as a number in YAML
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return _non_negative(float(value), where)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return _non_negative(float(value), where)
        except ValueError:
            pass
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return _non_negative(value, where) if tp in (int, float) else value
    raise ConfigError(f"config key '{where}' must be {type_name(tp)}, got {shown(value)}")


def _non_negative(value: float | int, where: str) -> float | int:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"config key '{where}' must be >= 0 and finite, got {value}")
    return value


def build(cls: type, raw: Any, where: str = "") -> Any:
    """The dataclass ``cls`` from the mapping ``raw`` (None: every default); ``where`` prefixes error keys."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{where or '<top>'}' must be a mapping, got {shown(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {shown(path)}: {closest(str(key), names)}")
        kwargs[key] = convert(value, hints[key], path)
    return cls(**kwargs)


def positive(value: float | int, where: str, allow_zero: bool = False) -> None:
    """ConfigError unless ``value`` is finite and > 0 (>= 0 with ``allow_zero``)."""
    if not math.isfinite(value) or not (value > 0 or (allow_zero and value == 0)):
        raise ConfigError(f"config key '{where}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def at_most(value: float | int, limit: float | int, where: str, why: str) -> None:
    """ConfigError unless ``value`` <= ``limit``; ``why`` says what a larger value would do."""
    if value > limit:
        raise ConfigError(f"config key '{where}' must be <= {limit}, got {value}: {why}")


def unit_interval(value: float, where: str) -> None:
    """ConfigError unless 0 <= ``value`` <= 1 (a probability or a mixing weight)."""
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"config key '{where}' must be in [0, 1], got {value}")


def set_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set a.b.c=value`` (value parsed as YAML) to the raw config mapping, as both commands
    take it."""
    if "=" not in assignment:
        raise ConfigError(f"--set takes KEY=VALUE (for example data.batch_size=32), got {shown(assignment)}")
    key, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"--set {shown(key, bare=True)}: the value {shown(text)} is not valid YAML "
            f"({exc.__class__.__name__})"
        ) from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {shown(key, bare=True)}: {shown(part)} holds a value, not a mapping")
        # a copy: a YAML alias (``train: *recipe``) makes two keys hold one mapping; change only this one
        node[part] = child = dict(child)
        node = child
    node[parts[-1]] = value


def read_yaml(path: Path, what: str = "run config", example: str = "configs/default.yaml") -> dict[str, Any]:
    """The mapping of the YAML config file ``path`` (``what`` it should be, as errors say, with an
    ``example``); a missing, non-text, invalid, empty or non-mapping file is one ConfigError line."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not text: give a YAML {what}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{at}") from None
    if raw is None:
        raise ConfigError(f"config file {path} is empty: give a YAML {what} (e.g. {example})")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return raw
