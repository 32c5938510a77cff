"""The checks a run passes before its output folder is touched: the data (its size, a split that gives every
validated class training images, every image file decoded up to :data:`DECODED_IMAGES` per split), the
image size against the models, one probe training step of every stage (forward and backward through the
whole loss, then undone), and on ``--resume`` every file the run would read back and every ``--set`` it
would record (:func:`check_resume_changes`). Each failure is one :class:`UsageError` line that names the key
or the file and what to change; none of these functions writes a file.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.layers import PatchEmbed
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.models.vision_transformer import VisionTransformer

from kdfast.checkpoint import read_torch_file
from kdfast.data import ImageDataset, check_decodes
from kdfast.errors import CheckpointError, UsageError, shown

Step = Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]  # a batch -> (loss, parts to log)
# Image files decoded per split before a run writes: all of a split this size or smaller (decoding one small
# JPEG takes well under a millisecond, an ImageNet photo a few), a seeded random sample of a larger one.
DECODED_IMAGES = 2048
# What --set may change on --resume (a trailing ".*": every key below it); docs/reliability.md, "Resume".
# The epochs continue a stage; the learning rate and runtime.grad_clip / runtime.amp are what a diverged run
# is told to change; the rest says how the run runs, not what it trains.
RESUME_SETTINGS = (
    "teacher.train.epochs",
    "student.train.epochs",
    "teacher.train.optimizer.lr",
    "student.train.optimizer.lr",
    "runtime.*",
    "data.num_workers",
    "data.eval_batch_size",
    "seeds",
    "out",
)
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


def check_split(
    train_labels: Sequence[int],
    val_labels: Sequence[int],
    classes: Sequence[str],
    max_train_samples: int | None,
) -> list[str]:
    """Every class of the validation split must have training images: a class the model never trains on is
    only ever wrong (three classes of one image each split 2 / 1: top-1 0%, top-5 100%). A UsageError when
    the data itself leaves a class out; a warning (returned) when ``data.max_train_samples`` may be why."""
    missing = sorted(set(val_labels) - set(train_labels))
    if not missing:
        return []
    names = ", ".join(shown(classes[i]) for i in missing[:5]) + (
        f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    )
    what = (
        f"{len(missing)} of the {len(set(val_labels))} classes of the validation split have no training "
        f"image ({names}): the model cannot learn them and every validation image of them counts as an error"
    )
    if max_train_samples is not None:
        return [f"{what}; data.max_train_samples={max_train_samples} may leave them out"]
    raise UsageError(
        f"{what}: add images of them (a split needs at least 2 per class, one for each side) or lower "
        "data.val_fraction"
    )


def check_images(train_ds: ImageDataset, val_ds: ImageDataset, seed: int) -> int:
    """Decode every image file of both splits (a seeded sample of :data:`DECODED_IMAGES` of a larger one):
    a truncated or broken file is named now, before the run folder exists, not when an epoch reaches it.
    Returns how many files were decoded."""
    return sum(check_decodes(ds, DECODED_IMAGES, seed) for ds in (train_ds, val_ds))


@dataclass(frozen=True)
class Trained:
    """What a stage of a run being resumed has trained: its ``epochs``, whether it ``finished`` (its
    checkpoint exists) and whether it is ``resumable`` (its state file exists, so it can train further)."""

    epochs: int
    finished: bool
    resumable: bool


def _settable_on_resume(key: str) -> bool:
    return any(key == s or s.endswith(".*") and key.startswith(s[:-1]) for s in RESUME_SETTINGS)


def check_resume_changes(
    changed: Sequence[str], trained: Mapping[str, Trained], epochs: Mapping[str, int], folder: Path
) -> None:
    """The resume rules (docs/reliability.md, "Resume"): ``changed`` (``key=value``, what ``--set`` changes in
    ``folder/config.yaml``) may hold only :data:`RESUME_SETTINGS`; ``epochs`` (per stage, as the config now
    asks) may continue a stage of ``trained`` or stop it early, never shorten what it trained, and never train
    the teacher further once the distillation began (its student learned from the shorter-trained teacher).
    UsageError otherwise, so that config.yaml keeps describing what was trained."""
    for change in changed:
        if not _settable_on_resume(change.split("=", 1)[0]):
            raise UsageError(
                f"--resume {folder}: --set {shown(change, bare=True)} would change what this run trained; "
                "on --resume only the epochs, the learning rate, runtime.* and data.num_workers / "
                "data.eval_batch_size may change: start a new run with --out for this one"
            )
    for stage, done in trained.items():
        role = "teacher" if stage == "teacher" else "student"
        if epochs[stage] < done.epochs:
            raise UsageError(
                f"--resume {folder}: the {stage} stage has trained {done.epochs} epochs, more than "
                f"{role}.train.epochs={epochs[stage]}: keep it at {done.epochs} or more, or start a new run "
                "with --out"
            )
        if epochs[stage] > done.epochs and not done.resumable:
            raise UsageError(
                f"--resume {folder}: continuing the {stage} stage to {role}.train.epochs={epochs[stage]} "
                f"needs state_{stage}.pt, which is gone: start a new run with --out"
            )
    teacher = trained.get("teacher")
    if teacher is not None and epochs["teacher"] > teacher.epochs and "distill" in trained:
        raise UsageError(
            f"--resume {folder}: teacher.train.epochs={epochs['teacher']} would train the teacher further "
            f"after the student was distilled from its {teacher.epochs}-epoch self: start a new run"
            f" with --out (teacher.weights={folder / 'teacher.pt'} starts from this teacher)"
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
