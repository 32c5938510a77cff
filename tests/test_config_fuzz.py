"""Property-based fuzzing of the config loader and validator: for every key of the run schema and of every
registered method's section (found by walking the dataclasses), a value of the wrong type, a negative
number, NaN or an infinity is refused with one ConfigError line that names the key.

What counts as wrong is written here independently of the loader (:func:`acceptable`): the type the
dataclass field declares, and the rule that every number a config holds is finite and >= 0. No training
runs: the loader (``config_from_dict``) and the validators are called directly.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import pytest
import yaml

pytest.importorskip("hypothesis", reason="the dev extra installs hypothesis (pip install -e '.[dev]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kdfast.config import CONFIG_DIR, DEFAULT_CONFIG, Config, config_from_dict, read_config_file, validate
from kdfast.errors import ConfigError
from kdfast.methods.registry import method, methods

Path_ = tuple[str | int, ...]


def _optional_arms(tp: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return tuple(a for a in typing.get_args(tp) if a is not type(None))
    return (tp,)


def leaves(cls: type, raw: Any, prefix: Path_ = ()) -> list[tuple[Path_, Any]]:
    """(path, type hint) of every scalar or list-of-scalars key of the dataclass ``cls``, descending into
    nested dataclasses, into each mapping entry and the first list item ``raw`` (the base config) holds."""
    found = []
    hints = typing.get_type_hints(cls)
    raw = raw if isinstance(raw, dict) else {}
    for f in dataclasses.fields(cls):
        tp, path, value = hints[f.name], (*prefix, f.name), raw.get(f.name)
        arms = _optional_arms(tp)
        inner = arms[0] if len(arms) == 1 else None
        origin, args = typing.get_origin(inner), typing.get_args(inner)
        if dataclasses.is_dataclass(inner) and (inner is tp or value is not None):
            found += leaves(inner, value, path)  # a section, or an optional one that the base config sets
        elif origin is dict and dataclasses.is_dataclass(args[1]):
            for key, item in (value or {}).items():
                found += leaves(args[1], item, (*path, key))
        elif origin is list and dataclasses.is_dataclass(args[0]):
            if value:
                found += leaves(args[0], value[0], (*path, 0))
        else:
            found.append((path, tp))
    return found


def key_name(path: Path_) -> str:
    """The dotted key an error names: ``loss.agkd.pairs[0].student``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{part}"
    return text


def acceptable(tp: Any, value: Any) -> bool:
    """Whether ``value`` has the declared type ``tp`` (numbers finite and >= 0; a str field takes numbers,
    a float field takes ints and numeric strings, as YAML writes them): this test's own statement of the
    schema, not the loader's code."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(acceptable(arm, value) for arm in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is Literal:
        return any(value == c and type(value) is type(c) for c in typing.get_args(tp))
    if origin is list:
        return isinstance(value, list) and all(acceptable(typing.get_args(tp)[0], v) for v in value)
    if origin is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    if isinstance(value, bool):
        return tp is bool
    if tp is bool:
        return False
    if tp is str:
        return isinstance(value, (str, int, float))
    if tp is int:
        return isinstance(value, int) and value >= 0
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return False
        return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
    raise AssertionError(f"the test does not know the type {tp}")


SCALARS = st.one_of(
    st.integers(max_value=-1),
    st.integers(min_value=0, max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -1e-9, 0.5, 2.0]),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.sampled_from(["auto", "1e-3", "-2", "nan", "yes", "", "digits"]),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=4),
    st.dictionaries(st.text(max_size=6), SCALARS, max_size=3),
)


def _set(raw: dict, path: Path_, value: Any) -> dict:
    raw = copy.deepcopy(raw)
    node = raw
    for part in path[:-1]:
        if isinstance(part, str) and node.get(part) is None:
            node[part] = {}
        node = node[part]
    node[path[-1]] = value
    return raw


def _base_config(name: str) -> dict:
    """A config in configs/ that uses method ``name`` (default.yaml for its own methods), read over its
    ``base`` chain."""
    for path in [DEFAULT_CONFIG, *sorted(CONFIG_DIR.glob("*.yaml"))]:
        raw = read_config_file(Path(path))
        used = raw.get("loss", {}).get("method", [])
        if name in ([used] if isinstance(used, str) else used):
            return raw
    raise AssertionError(f"no config in configs/ uses method {name!r}: add one (docs/methods.md)")


def check_run(raw: dict) -> None:
    """The loader and every check of ``load_config`` (the files a config names are checked too)."""
    validate(config_from_dict(raw))


def check_loss(raw: dict) -> None:
    """The loader and the method validators alone: a method's example config may name data or weight files
    that only exist on the machine it was written for."""
    cfg = config_from_dict(raw)
    for name in cfg.loss.method:
        method(name).validate(cfg.loss.sections[name], cfg.student.taps, cfg.teacher.taps, f"loss.{name}")


DEFAULT = yaml.safe_load(DEFAULT_CONFIG.read_text())
RUN_KEYS = [(path, tp, DEFAULT, check_run) for path, tp in leaves(Config, DEFAULT) if path[0] != "loss"]
RUN_KEYS += [
    (("loss", "method"), list[str] | str, DEFAULT, check_run),
    (("loss", "ce"), float | None, DEFAULT, check_run),
]
METHOD_KEYS = [
    (("loss", name, *path), tp, base, check_loss)
    for name, entry in methods().items()
    for base in [_base_config(name)]
    for path, tp in leaves(entry.schema, base.get("loss", {}).get(name))
]
ALL_KEYS = RUN_KEYS + METHOD_KEYS


def _refused(path: Path_, tp: Any, base: dict, check: Any, value: Any) -> None:
    with pytest.raises(ConfigError) as refusal:
        check(_set(base, path, value))
    message = str(refusal.value)
    assert len(message.splitlines()) == 1, message
    assert key_name(path) in message or key_name(path[:-1]) in message, (key_name(path), message)


def test_the_walk_reaches_every_section() -> None:
    names = {key_name(path) for path, *_ in ALL_KEYS}
    for key in (
        "runtime.log_every",
        "data.augment.cutmix",
        "teacher.taps.vit.heads",
        "loss.agkd.pairs[0].student",
    ):
        assert key in names
    assert {key_name(path).split(".")[1] for path, *_ in METHOD_KEYS} == set(methods())


def test_every_base_config_is_valid() -> None:
    check_run(DEFAULT)
    for name in methods():
        check_loss(_base_config(name))


@pytest.mark.parametrize(("path", "tp", "base", "check"), ALL_KEYS, ids=[key_name(k[0]) for k in ALL_KEYS])
def test_every_key_refuses_a_value_of_another_type(path: Path_, tp: Any, base: dict, check: Any) -> None:
    wrong = [1] if typing.get_origin(_optional_arms(tp)[0]) is dict else {"not": "this"}
    _refused(path, tp, base, check, wrong)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_values_outside_the_declared_type_are_refused_with_the_key(data: st.DataObject) -> None:
    path, tp, base, check = data.draw(st.sampled_from(ALL_KEYS), label="key")
    value = data.draw(VALUES.filter(lambda v: not acceptable(tp, v)), label="value")
    _refused(path, tp, base, check, value)
