"""The checks a run passes before its output folder is touched: the data, the image size against the models,
one probe training step of every stage (forward and backward through the whole loss, then undone), and on
``--resume`` every file the run would read back. Each failure is one :class:`UsageError` line that names the
key or the file and what to change; none of these functions writes a file.

The probe is undone exactly (:func:`undone`): parameters, buffers (BatchNorm statistics), gradients, train /
eval modes and every random generator are restored, so a run that passes the checks trains bit for bit as it
would have without them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.layers import PatchEmbed
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.models.vision_transformer import VisionTransformer

from kdfast.checkpoint import read_torch_file
from kdfast.errors import CheckpointError, UsageError

Step = Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]  # a batch -> (loss, parts to log)
STATE_KEYS = (
    "stage",
    "epoch",
    "step",
    "model",
    "extra",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "metrics",
)


def check_data(
    train_ds: Dataset, val_ds: Dataset, classes: Sequence[str], batch_size: int, world_size: int, name: str
) -> None:
    """A run needs at least 2 classes, a validation image, and 2 training images per process (a batch of one
    cannot train BatchNorm and teaches nothing); DDP needs one full batch per process."""
    source = f"data.name={name}"
    if len(classes) < 2:
        raise UsageError(
            f"{source}: the data has {len(classes)} class ({', '.join(classes)}); classification needs at "
            "least 2: add a class folder per class"
        )
    if len(val_ds) == 0:
        raise UsageError(f"{source}: the validation split is empty; add images or raise data.val_fraction")
    if len(train_ds) < 2 * world_size:
        raise UsageError(
            f"{source}: the training split holds {len(train_ds)} image(s); a run needs at least 2 per "
            "process (add images, raise data.max_train_samples or lower data.val_fraction)"
        )
    if world_size > 1 and len(train_ds) // world_size < batch_size:
        raise UsageError(
            f"{len(train_ds)} training images do not fill one batch on each of {world_size} processes: "
            "lower data.batch_size"
        )


def built_input_size(model: nn.Module) -> tuple[int, int, str] | None:
    """(height, width, kwarg) of the first layer of ``model`` that accepts only the input size it was built
    for (torchvision's VisionTransformer: ``image_size``; timm's strict PatchEmbed: ``img_size``), or None."""
    for module in model.modules():
        if isinstance(module, VisionTransformer):
            return module.image_size, module.image_size, "image_size"
        if isinstance(module, PatchEmbed) and module.strict_img_size and module.img_size is not None:
            return *module.img_size, "img_size"
    return None


def check_input_size(model: nn.Module, image_size: int, role: str, arch: str) -> None:
    """UsageError when ``data.image_size`` is not the size a fixed-size layer of the ``role`` model takes."""
    built = built_input_size(model)
    if built is not None and built[:2] != (image_size, image_size):
        height, width, kwarg = built
        raise UsageError(
            f"data.image_size={image_size} does not fit the {role} ({arch}), built for {height}x{width} "
            f"inputs: set data.image_size={height}, or build the {role} for it ({role}.arch.kwargs.{kwarg}="
            f"{image_size})"
        )


def _rng_states() -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _set_rng_states(states: tuple[Any, ...]) -> None:
    cpu, cuda, python, numpy = states
    torch.set_rng_state(cpu)
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)
    np.random.set_state(numpy)


@contextlib.contextmanager
def undone(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run the body, then put ``modules`` and the random generators back exactly as they were: every entry of
    each state dict (parameters, buffers and extra state such as a side network's optimizer), every gradient,
    every module's train / eval mode, and the torch (CPU and CUDA), Python and NumPy generators."""
    states = [
        {
            k: v.detach().clone() if isinstance(v, Tensor) else copy.deepcopy(v)
            for k, v in m.state_dict().items()
        }
        for m in modules
    ]
    grads = [{p: None if p.grad is None else p.grad.clone() for p in m.parameters()} for m in modules]
    modes = [{sub: sub.training for sub in m.modules()} for m in modules]
    rng = _rng_states()
    try:
        yield
    finally:
        for module, state in zip(modules, states, strict=True):
            module.load_state_dict(state)  # in place: the parameters stay the same objects
        for saved in grads:
            for param, grad in saved.items():
                param.grad = grad
        for saved in modes:
            for sub, training in saved.items():
                sub.training = training
        _set_rng_states(rng)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _hint(exc: BaseException) -> str:
    if "out of memory" in str(exc).lower() or "not enough memory" in str(exc).lower():
        return "lower data.batch_size or data.image_size"
    return "check the models, their taps and the loss settings against each other"


def _step_failure(
    step: Step, modules: Sequence[nn.Module], images: Tensor, targets: Tensor, autocast: Any
) -> str | None:
    """Run one training step (forward and backward, modules in training mode) and undo it; what went wrong,
    in words, or None. A UsageError keeps its own words; anything else a model or a loss raises is named
    with its type and first line."""
    with undone(modules):
        for module in modules:
            module.train()
        try:
            with autocast():
                loss, _ = step(images, targets)
            loss.backward()
        except UsageError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - whatever a model or a loss raises, said in one line
            return f"{_first_line(exc)}: {_hint(exc)}"
        if not torch.isfinite(loss.detach()).all():
            return (
                f"the loss is {loss.item()} before any training: check data.mean and data.std (a std of 0 "
                "divides by zero) and the loss settings"
            )
    return None


def probe_step(
    stage: str, step: Step, modules: Sequence[nn.Module], images: Tensor, targets: Tensor, autocast: Any
) -> None:
    """One training step of ``stage`` on a real batch, forward and backward, then undone (:func:`undone`).
    A failure, or a loss that is already NaN or infinite, is one UsageError line naming the stage."""
    failure = _step_failure(step, modules, images, targets, autocast)
    if failure is not None:
        raise UsageError(
            f"the {stage} stage fails on a probe batch of {images.shape[0]} training images: {failure}"
        )


def probe_distillation(
    make_step: Callable[[nn.Module], Step],
    loss_fn: nn.Module,
    modules: Sequence[nn.Module],
    images: Tensor,
    targets: Tensor,
    autocast: Any,
) -> None:
    """:func:`probe_step` of the distillation stage, ``make_step(loss)`` building its step around a loss
    module. When the whole loss fails, each method of ``loss.method`` is tried alone so that the line can name
    the one that cannot run on these models."""
    if _step_failure(make_step(loss_fn), modules, images, targets, autocast) is None:
        return
    for name, member in getattr(loss_fn, "members", {}).items():
        failure = _step_failure(make_step(member), modules, images, targets, autocast)
        if failure is not None:
            raise UsageError(f"loss.method {name!r} cannot run on this student and teacher: {failure}")
    probe_step("distillation", make_step(loss_fn), modules, images, targets, autocast)


def read_state(path: Path) -> dict[str, Any]:
    """A ``state_<stage>.pt`` resume point, loaded with ``weights_only=True`` and checked to be one: a dict
    with every key the loop writes, its stage named in the file name, a whole epoch count."""
    state = read_torch_file(path, "state file")
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise CheckpointError(f"state file {path} is not a kdfast resume state (no {missing[0]!r} entry)")
    if f"state_{state['stage']}.pt" != path.name or not isinstance(state["epoch"], int) or state["epoch"] < 1:
        raise CheckpointError(
            f"state file {path} records stage {state['stage']!r} epoch {state['epoch']!r}, not its own"
        )
    return state


def check_fits(path: Path, saved: Mapping[str, Tensor], module: nn.Module, what: str) -> None:
    """CheckpointError unless the state dict ``saved`` (read from ``path``) has exactly ``module``'s keys and
    shapes: a state from another architecture or another loss configuration."""
    own = module.state_dict()
    for key, value in own.items():
        if key not in saved:
            problem = f"lacks {key!r}"
        elif not isinstance(saved[key], Tensor) or saved[key].shape != value.shape:
            problem = f"has another shape at {key!r}"
        else:
            continue
        raise CheckpointError(
            f"{path} {problem} of the {what}: it was written for another config; resume with the config it "
            "was written with, or move it away to redo that stage"
        )
    extra = next((k for k in saved if k not in own), None)
    if extra is not None:
        raise CheckpointError(
            f"{path} has {extra!r}, which the {what} lacks: it was written for another config; resume with "
            "the config it was written with, or move it away to redo that stage"
        )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``. A last line cut short by a kill (no newline at its end) is dropped;
    any other line that is not a JSON object is a UsageError naming it."""
    if not path.exists():
        return []
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a kdfast metrics file (not text): move it away to resume") from None
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the last line has no newline: a write cut short by a kill
                continue
            row = None
        if not isinstance(row, dict) or not {"stage", "epoch", "split"} <= row.keys():
            raise UsageError(
                f"{path} line {number} is not a kdfast metrics row: move the file away to resume without "
                "its history"
            )
        rows.append(row)
    return rows
