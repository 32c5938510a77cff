"""The ``student.pt`` contract (docs/contracts.md): writing, reading, validating and rebuilding a student.

A checkpoint is a ``torch.save`` of a plain dict that loads with ``torch.load(weights_only=True)``, so
loading one never runs code. Everything a user can get wrong on the reading side is one
:class:`~kdfast.errors.CheckpointError` line.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import pickle
import platform
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdfast.atomic import atomic_write
from kdfast.errors import CheckpointError, UsageError

STUDENT_FORMAT = "kdfast.student/1"
TEACHER_FORMAT = "kdfast.teacher/1"

# Field -> the type it must have after loading; `versions` is written by us, the rest by the caller.
_FIELDS: dict[str, type] = {
    "format": str,
    "arch": dict,
    "state_dict": dict,
    "input": dict,
    "classes": list,
    "data": dict,
    "metrics": dict,
    "config": dict,
    "versions": dict,
}


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """The versions a checkpoint (or a timing) records: kdfast, torch, torchvision, timm, Python."""
    return {
        "kdfast": _package_version("kdfast"),
        "torch": str(torch.__version__),
        "torchvision": _package_version("torchvision"),
        "timm": _package_version("timm"),
        "python": platform.python_version(),
    }


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` (``_orig_mod``) and DDP / DataParallel (``module``) wrappers, nested or not."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything ``weights_only=True`` could not load back, at save time rather than at load time."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where}: key {key!r} is a {type(key).__name__}; use str keys")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not (value is None or type(value) in (str, int, float, bool) or isinstance(value, Tensor)):
        raise CheckpointError(
            f"{where} is a {type(value).__name__}; checkpoints hold only dicts, lists, str, numbers, tensors"
        )


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    arch: dict,
    input: dict,
    classes: list[str],
    data: dict,
    metrics: dict,
    config: dict,
    format: str = STUDENT_FORMAT,
) -> None:
    """Write ``model`` and what is needed to rebuild, preprocess for and re-verify it, atomically.

    The state dict goes to CPU with compile / DDP wrappers stripped, so the keys match a freshly built
    ``build_model(arch)``. The file appears under ``path`` only once complete
    (:func:`kdfast.atomic.atomic_write`).
    """
    state_dict = {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
    record = {
        "format": format,
        "arch": dict(arch),
        "state_dict": state_dict,
        "input": dict(input),
        "classes": list(classes),
        "data": dict(data),
        "metrics": dict(metrics),
        "config": dict(config),
        "versions": versions(),
    }
    _check_plain({k: v for k, v in record.items() if k != "state_dict"}, "checkpoint")
    atomic_write(path, lambda f: torch.save(record, f))


def _validate(ckpt: Any, path: Path, expect: str | None) -> dict:
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"{path} is not a kdfast checkpoint (no 'format' field)")
    if expect is not None and ckpt["format"] != expect:
        raise CheckpointError(f"{path} has format {ckpt['format']!r}; expected {expect!r}")
    for name, kind in _FIELDS.items():
        if name not in ckpt:
            raise CheckpointError(f"{path} lacks the field {name!r}")
        if not isinstance(ckpt[name], kind):
            raise CheckpointError(
                f"{path}: field {name!r} is a {type(ckpt[name]).__name__}, expected {kind.__name__}"
            )
    arch = ckpt["arch"]
    if not (isinstance(arch.get("source"), str) and isinstance(arch.get("name"), str)):
        raise CheckpointError(f"{path}: 'arch' needs str 'source' and 'name', got {arch!r}")
    if not isinstance(arch.get("kwargs", {}), dict):
        raise CheckpointError(f"{path}: 'arch.kwargs' must be a dict")
    bad = next((k for k, v in ckpt["state_dict"].items() if not isinstance(v, Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: state_dict entry {bad!r} is not a tensor")
    size = ckpt["input"].get("size")
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(s, int) and s > 0 for s in size)):
        raise CheckpointError(f"{path}: 'input.size' must be [C, H, W] positive ints, got {size!r}")
    for stat in ("mean", "std"):
        values = ckpt["input"].get(stat)
        if not (
            isinstance(values, list)
            and len(values) == size[0]
            and all(isinstance(v, (int, float)) for v in values)
        ):
            raise CheckpointError(f"{path}: 'input.{stat}' must be {size[0]} numbers, got {values!r}")
    if not all(isinstance(c, str) for c in ckpt["classes"]):
        raise CheckpointError(f"{path}: 'classes' must be a list of str")
    return ckpt


def read_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, every failure one CheckpointError line naming the file:
    missing, empty, truncated, not a ``torch.save`` file, or a pickle that would load code (refused, never
    run). ``what`` names the file's role in the message ("checkpoint", "state file", "weights file")."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is not a readable torch checkpoint: it is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means "not a readable checkpoint"
        # torch words the refusal differently across versions; the offending global follows "GLOBAL".
        refused = re.search(r"GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if refused:
            raise CheckpointError(
                f"{what} {path} was refused: it would load {refused.group(1)}, which a plain kdfast "
                "file never contains (weights_only=True); it was not loaded"
            ) from None
        if "central directory" in str(e):
            raise CheckpointError(
                f"{what} {path} is not a readable torch checkpoint: it is truncated (a copy or a write did "
                "not finish)"
            ) from None
        raise CheckpointError(
            f"{what} {path} is not a readable torch checkpoint (not a file written by torch.save)"
        ) from None


def load_checkpoint(path: str | os.PathLike, *, expect: str | None = STUDENT_FORMAT) -> dict:
    """Read and validate a checkpoint with ``torch.load(weights_only=True)``; never executes pickled code.

    ``expect`` is the required ``format`` (None accepts any kdfast format).
    """
    return _validate(read_torch_file(path), Path(path), expect)


def _first_mismatch(model: nn.Module, state_dict: dict[str, Tensor]) -> str | None:
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            return f"missing weight {key!r}"
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            return (
                f"weight {key!r} has shape {tuple(state_dict[key].shape)}, "
                f"the architecture needs {tuple(tensor.shape)}"
            )
    extra = next((k for k in state_dict if k not in expected), None)
    return None if extra is None else f"unexpected weight {extra!r}"


def build_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> nn.Module:
    """``kdfast.models.build_model(ckpt["arch"])`` with its weights loaded strictly, in eval mode."""
    from kdfast.models import build_model

    arch = ckpt["arch"]
    num_classes = None if "num_classes" in arch.get("kwargs", {}) else len(ckpt["classes"])
    try:
        model = build_model(arch, num_classes=num_classes, weights=None)
    except Exception as e:  # noqa: BLE001 - unknown names surface as many exception types across sources
        raise CheckpointError(
            f"cannot build arch {arch.get('source')}:{arch.get('name')} from the checkpoint: {_first_line(e)}"
        ) from None
    mismatch = _first_mismatch(model, ckpt["state_dict"])
    if mismatch is not None:
        raise CheckpointError(f"weights do not fit {arch.get('source')}:{arch.get('name')}: {mismatch}")
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.to(device).eval()


def has_test_split(data: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's ``data`` record describes an official test split kept apart from validation
    (Fashion-MNIST's 10,000 test images), which ``load_split(ckpt, "test")`` rebuilds."""
    return data.get("test_source") is not None


def load_split(ckpt: dict, split: str = "val", limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Normalized float32 images (N, C, H, W) and int64 labels of the ``split`` ("train", "val", or "test"
    where :func:`has_test_split`) in ``ckpt["data"]``: all of it, or a seeded random choice of ``limit``
    items kept in split order (an image folder's split is sorted by class, so its first items would be its
    first classes only)."""
    import numpy as np

    from kdfast.data import dataset_from_record

    dataset = dataset_from_record(ckpt["data"], split)
    if len(dataset) == 0:
        raise CheckpointError(f"the {split} split described by the checkpoint is empty")
    indices = range(len(dataset))
    if limit is not None and limit < len(dataset):
        indices = sorted(np.random.default_rng(0).choice(len(dataset), size=limit, replace=False).tolist())
    images, labels = zip(*dataset.__getitems__(list(indices)), strict=True)
    return torch.stack(images).float(), torch.as_tensor(labels, dtype=torch.int64)


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file at ``path``, read in 1 MiB blocks: what tells a checkpoint from a later one
    written at the same path (a QAD student records its source's)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def rebuilding_data(fix: str) -> Iterator[None]:
    """Around the reading of a checkpoint's data (:func:`load_split`,
    :func:`kdfast.data.dataset_from_record`): a data set that cannot be rebuilt, whatever the reason (a folder
    moved, a file torn, a package missing), becomes one CheckpointError line that ends with ``fix``, what the
    reader can do instead; a UsageError (a problem already said in one line) passes unchanged."""
    try:
        yield
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - a data set that cannot be rebuilt, whatever the reason
        detail = f"{type(e).__name__}: {e}"
        raise CheckpointError(f"cannot rebuild the checkpoint's data ({detail}); {fix}") from None


def preprocessing(ckpt: dict) -> dict:
    """How an image must be prepared for the student in ``ckpt``: its data record's eval transform spelled
    out (:func:`kdfast.data.preprocessing_contract`), with the checkpoint's own mean and std."""
    from kdfast.data import preprocessing_contract

    return preprocessing_contract(
        {**ckpt["data"], "mean": ckpt["input"]["mean"], "std": ckpt["input"]["std"]}
    )
