"""One door to every model: ``build_model({source, name, kwargs})`` for timm, torchvision and kdfast names.

Nothing here downloads: pretrained weights come from local files only, loaded with
``torch.load(weights_only=True)`` so that loading a file never runs code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from torch import nn

from kdfast.checkpoint import read_torch_file
from kdfast.config import ArchSpec
from kdfast.errors import CheckpointError, ConfigError, UsageError
from kdfast.schema import closest

_KDFAST_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None) -> Any:
    """Register a kdfast model builder (``source: kdfast, name: ...``) under its function name, or under
    ``name`` when given: ``@register_model`` or ``@register_model(name="ShuffleV2")``."""

    def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _KDFAST_MODELS[name or builder.__name__] = builder
        return builder

    return register if fn is None else register(fn)


def kdfast_models() -> list[str]:
    """The registered kdfast model names."""
    return sorted(_KDFAST_MODELS)


def _unknown(source: str, name: str, names: Iterable[str]) -> ConfigError:
    return ConfigError(f"unknown {source} model {name!r}: {closest(name, names, 'name', listed=0)}")


def _builder(source: str, name: str) -> Callable[..., nn.Module]:
    if source == "kdfast":
        if name not in _KDFAST_MODELS:
            raise _unknown("kdfast", name, _KDFAST_MODELS)
        return _KDFAST_MODELS[name]
    if source == "timm":
        if not timm.is_model(name):
            raise _unknown("timm", name, timm.list_models())
        return lambda **kwargs: timm.create_model(name, **kwargs)
    if source == "torchvision":
        names = torchvision.models.list_models()
        if name not in names:
            raise _unknown("torchvision", name, names)
        return lambda **kwargs: torchvision.models.get_model(name, **kwargs)
    raise ConfigError(f"arch.source must be one of 'timm', 'torchvision', 'kdfast', got {source!r}")


def _refuse_downloads(source: str, name: str, kwargs: Mapping[str, Any]) -> None:
    if source == "timm" and kwargs.get("pretrained"):
        asked = "pretrained=true"
    elif source == "torchvision" and kwargs.get("weights") is not None:
        asked = f"weights={kwargs['weights']}"
    else:
        return
    raise UsageError(
        f"pretrained weights for {source} {name} ({asked}) would need a download; download the file "
        "elsewhere and pass its path as weights: <file> (teacher.weights / student.weights)"
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: a raw state dict, a kdfast checkpoint dict (its ``state_dict``), or a
    RepDistiller / mdistiller checkpoint (its ``model``: the teachers of ``cifar_teachers.tar``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        obj = read_torch_file(path, "weights file")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}: give a state dict or kdfast checkpoint saved by torch.save") from None
    if isinstance(obj, Mapping) and str(obj.get("format", "")).startswith("kdfast."):
        obj = obj.get("state_dict")
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (a mapping of names to tensors)")
    return dict(obj)


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` strictly; the first missing, unexpected or mis-shaped key -> CheckpointError."""
    own = model.state_dict()
    for key, value in state_dict.items():
        if key not in own:
            raise CheckpointError(f"{source}: unexpected key {key!r} (the file is for another architecture)")
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: shape mismatch at {key!r}: "
                f"file {tuple(value.shape)}, model {tuple(own[key].shape)}"
            )
    missing = [key for key in own if key not in state_dict]
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r} (and {len(missing) - 1} more)")
    model.load_state_dict(state_dict)


def build_model(
    arch: Mapping[str, Any] | ArchSpec, num_classes: int | None = None, weights: str | None = None
) -> nn.Module:
    """Build ``{source: timm | torchvision | kdfast, name, kwargs}``; ``num_classes`` goes into the kwargs
    unless they give it; ``weights`` is a local file (raw state dict or kdfast checkpoint) loaded strictly."""
    if isinstance(arch, ArchSpec):
        source, name, kwargs = arch.source, arch.name, dict(arch.kwargs)
    else:
        source, name, kwargs = (
            arch.get("source", "kdfast"),
            arch.get("name", ""),
            dict(arch.get("kwargs") or {}),
        )
    builder = _builder(source, name)
    _refuse_downloads(source, name, kwargs)
    if num_classes is not None:
        kwargs.setdefault("num_classes", num_classes)
    try:
        model = builder(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"arch.kwargs for {source} {name} do not fit: {exc}") from None
    if weights is not None:
        load_weights(model, read_state_dict(weights), str(weights))
    return model
