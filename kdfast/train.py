"""``python -m kdfast.train``: train (or load) the teacher, train a CE-only baseline student, distill the
student with the configured methods (``loss.method``), and write checkpoints, metrics, pictures and a
results table.

The whole loop is :func:`train_stage`; the three stages differ only in the ``step`` function that maps a
batch to ``(loss, parts)``: :func:`ce_step` for the teacher and the baseline, :func:`distill_step` for the
student (the weighted terms of the configured methods plus the supervised CE: the
:class:`~kdfast.methods.compose.CompositeLoss` built from ``cfg.loss`` through the method registry).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from kdfast.atomic import atomic_write
from kdfast.checkpoint import STUDENT_FORMAT, TEACHER_FORMAT, load_checkpoint, save_checkpoint
from kdfast.config import Config, ModelConfig, ScheduleConfig, StageConfig, dump_config, load_config
from kdfast.data import batch_mix, build_datasets
from kdfast.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown_distributed
from kdfast.errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_OK, TrainingDiverged, UsageError
from kdfast.evaluate import evaluate
from kdfast.methods.base import DistillationLoss
from kdfast.methods.compose import CompositeLoss
from kdfast.models import build_model
from kdfast.plots import plot_attention_grid, plot_training_curves
from kdfast.results import run_results, seeds_results, stage_metrics, write_results
from kdfast.taps import Taps

STAGES = ("teacher", "baseline", "distill")
STAGE_FILES = {"teacher": "teacher.pt", "baseline": "baseline.pt", "distill": "student.pt"}
Step = Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]
ROW_FIELDS = (
    "stage",
    "epoch",
    "step",
    "split",
    "scope",
    "loss",
    "lr",
    "top1",
    "top5",
    "parts",
    "images_per_s",
)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad arguments as one UsageError line instead of usage text + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of ``python -m kdfast.train``; runtime flags may equally come through ``--set``."""
    parser = _ArgumentParser(prog="kdfast.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config (default: the embedded digits run)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set data.batch_size=32 (repeatable)",
    )
    parser.add_argument("--out", help="output folder (default: the config's 'out')")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR (reads DIR/config.yaml)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), help="torch.compile the training step")
    parser.add_argument(
        "--seeds",
        type=_seed_list,
        metavar="S,S,...",
        help="repeat the whole run once per seed in OUT/seed<S>/ and report mean +- std (e.g. 0,1,2)",
    )
    return parser.parse_args(argv)


def _seed_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes comma-separated integers such as 0,1,2, got {text!r}"
        ) from None


def load_run_config(args: argparse.Namespace) -> Config:
    """The validated config: ``--config`` (``DIR/config.yaml`` on ``--resume``) plus ``--set`` overrides."""
    overrides = list(args.set)
    if args.compile is not None:
        overrides.append(f"runtime.compile={ {'auto': 'auto', 'on': 'true', 'off': 'false'}[args.compile] }")
    if args.seeds is not None:
        overrides.append(f"seeds={args.seeds}")
    if args.resume is not None:
        if args.config is not None or args.out is not None:
            raise UsageError(
                "--resume DIR takes its config and output folder from DIR: drop --config / --out"
            )
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise UsageError(f"--resume {args.resume}: no config.yaml there; give the output folder of a run")
        cfg = load_config(saved, overrides)
        cfg.out = str(args.resume)
        return cfg
    cfg = load_config(args.config, overrides)
    if args.out is not None:
        cfg.out = args.out
    return cfg


@dataclass
class Runtime:
    """Resolved ``cfg.runtime``: what ``auto`` means on this machine."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    compile: bool
    progress: bool
    dist: DistInfo

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def resolve_runtime(cfg: Config) -> Runtime:
    """bf16 autocast, channels_last and torch.compile default on for CUDA and off for CPU."""
    rt = cfg.runtime
    if rt.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("runtime.device=cuda but no CUDA GPU is visible: set runtime.device=cpu or auto")
    device_type = (
        "cuda" if rt.device == "cuda" or (rt.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    dist = init_distributed(device_type)
    device = torch.device(device_type, dist.local_rank) if device_type == "cuda" else torch.device("cpu")
    cuda = device_type == "cuda"
    amp = {
        "auto": torch.bfloat16 if cuda else None,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "fp32": None,
    }[rt.amp]
    return Runtime(
        device=device,
        amp_dtype=amp,
        channels_last=cuda if rt.channels_last == "auto" else bool(rt.channels_last),
        compile=cuda if rt.compile == "auto" else bool(rt.compile),
        progress=rt.progress and dist.is_main,
        dist=dist,
    )


class MetricsLog:
    """``metrics.jsonl`` rows (and TensorBoard scalars when available); only rank 0 writes."""

    def __init__(self, path: Path, enabled: bool, tensorboard: str | bool) -> None:
        self.path = path
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard is True:
                    raise UsageError(
                        "runtime.tensorboard=true needs the tensorboard package: "
                        "pip install tensorboard, or set runtime.tensorboard=auto"
                    ) from None
            else:
                self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, **fields: Any) -> None:
        """One row {"stage", "epoch", "step", "split", "scope", "loss", "lr", "top1", "top5", "parts",
        "images_per_s"}; ``scope`` is "step" (every log_every steps) or "epoch"; absent fields are null."""
        if not self.enabled:
            return
        row = {key: None for key in ROW_FIELDS} | {"parts": {}} | fields
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            prefix = f"{row['stage']}/{row['split']}"
            for key in ("loss", "lr", "top1", "top5", "images_per_s"):
                if row.get(key) is not None:
                    self.writer.add_scalar(f"{prefix}/{key}", row[key], row["step"])
            for key, value in row.get("parts", {}).items():
                self.writer.add_scalar(f"{prefix}/{key}", value, row["step"])

    def keep_only(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Drop rows a resumed run will write again (those after the last saved state)."""
        if not self.enabled or not self.path.exists():
            return
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in rows if keep(r)))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Run:
    """Everything the stages share."""

    cfg: Config
    out: Path
    rt: Runtime
    train_ds: Dataset
    val_ds: Dataset
    info: Any  # kdfast.data.DataInfo
    log: MetricsLog
    resume: bool

    @property
    def num_classes(self) -> int:
        return len(self.info.classes)


def ce_step(model: nn.Module, label_smoothing: float) -> Step:
    """The teacher / baseline objective: CE(y, p) alone, on integer labels or CutMix / Mixup soft targets."""

    def step(images: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = F.cross_entropy(model(images).float(), targets, label_smoothing=label_smoothing)
        return loss, {"ce": loss.detach()}

    return step


def distill_step(student: nn.Module, teacher: nn.Module, loss_fn: DistillationLoss) -> Step:
    """The distillation objective: the frozen teacher's logits and taps under no_grad, the student's (on
    ``loss_fn.student_view`` of the batch) with grad, combined by ``loss_fn``. ``student`` and ``teacher``
    are Taps modules returning ``(logits, {tap: tensor | QKV})``."""

    def step(images: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            teacher_logits, teacher_taps = teacher(images)
        student_logits, student_taps = student(loss_fn.student_view(images))
        loss, parts = loss_fn(student_logits, teacher_logits, targets, student_taps, teacher_taps)
        return loss, {k: v.detach() for k, v in parts.items()}

    return step


def lr_factor(
    schedule: ScheduleConfig, epochs: int, steps_per_epoch: int, base_lr: float
) -> Callable[[int], float]:
    """Per-step multiplier of the base lr: linear warmup over ``warmup_epochs``, then cosine decay to
    ``min_lr`` (SGDR without restarts), step decay by ``gamma`` every ``step_size`` epochs, decay by ``gamma``
    at each of the ``milestones`` epochs (as ``MultiStepLR`` stepped once per epoch), or constant."""
    total = max(1, epochs * steps_per_epoch)
    warmup = int(round(schedule.warmup_epochs * steps_per_epoch))
    floor = schedule.min_lr / base_lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule.name == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule.name == "step":
            return schedule.gamma ** ((step // steps_per_epoch) // schedule.step_size)
        if schedule.name == "multistep":
            return schedule.gamma ** bisect.bisect_right(schedule.milestones, step // steps_per_epoch)
        return 1.0

    return factor


def param_groups(model: nn.Module, extra: DistillationLoss) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: every trainable parameter of ``model`` and of the loss module
    ``extra``, those that ``extra.no_weight_decay()`` names (MTD's task weights) in a second group with weight
    decay 0 (present only when it has any)."""
    exempt = extra.no_weight_decay()
    named = [(name, p) for name, p in extra.named_parameters() if p.requires_grad]
    decayed = [p for p in model.parameters() if p.requires_grad]
    decayed += [p for name, p in named if name not in exempt]
    free = [p for name, p in named if name in exempt]
    return [{"params": decayed}, *([{"params": free, "weight_decay": 0.0}] if free else [])]


def make_optimizer(
    params: list[nn.Parameter] | list[dict[str, Any]], stage: StageConfig, device: torch.device
) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD over ``params`` (parameters, or groups as :func:`param_groups` gives them), fused
    kernels on CUDA and the multi-tensor (foreach) path elsewhere."""
    opt = stage.optimizer
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if opt.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=opt.lr,
            momentum=opt.momentum,
            nesterov=opt.nesterov,
            weight_decay=opt.weight_decay,
            **fast,
        )
    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    return cls(params, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay, **fast)


def _rng_state() -> dict[str, Any]:
    # Plain tensors and tuples only, so the state file loads with weights_only=True.
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _gather_rng(dist: DistInfo) -> list[dict[str, Any]]:
    """Every rank's RNG state (each rank draws its own augmentations), in rank order."""
    state = _rng_state()
    if not dist.enabled:
        return [state]
    states: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(states, state)
    return states


def _train_loader(run: Run, generator: torch.Generator) -> DataLoader:
    """The data order is a function of (seed, epoch): the generator is re-seeded before every epoch, or
    ``DistributedSampler.set_epoch`` does the same across ranks."""
    cfg, dist = run.cfg, run.rt.dist
    drop_last = len(run.train_ds) // dist.world_size > cfg.data.batch_size
    if dist.enabled:
        sampler = DistributedSampler(
            run.train_ds,
            num_replicas=dist.world_size,
            rank=dist.rank,
            shuffle=True,
            seed=cfg.seed,
            drop_last=True,
        )
    else:
        sampler = RandomSampler(run.train_ds, generator=generator)
    return DataLoader(
        run.train_ds,
        batch_size=cfg.data.batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=cfg.data.num_workers,
        pin_memory=run.rt.device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
    )


def _val_loader(run: Run) -> DataLoader:
    """Rank r sees samples r, r + world, ...: disjoint shards without the padding DistributedSampler adds,
    so the all-reduced accuracy is exactly that of the whole validation set."""
    dist = run.rt.dist
    dataset = (
        Subset(run.val_ds, range(dist.rank, len(run.val_ds), dist.world_size)) if dist.enabled else run.val_ds
    )
    return DataLoader(
        dataset,
        batch_size=run.cfg.data.eval_batch_size,
        shuffle=False,
        num_workers=run.cfg.data.num_workers,
        pin_memory=run.rt.device.type == "cuda",
    )


def _batches(loader: DataLoader, run: Run, mix: Callable | None) -> Iterator[tuple[Tensor, Tensor]]:
    for images, labels in loader:
        targets: Tensor = labels
        if mix is not None:
            images, targets = mix(images, labels)
        images = images.to(run.rt.device, non_blocking=True)
        if run.rt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        yield images, targets.to(run.rt.device, non_blocking=True)


def validate_model(model: nn.Module, run: Run) -> dict[str, float]:
    """Top-1 / top-5 / CE of ``model`` on the validation split, over all ranks."""
    model.eval()
    rt = run.rt
    return evaluate(
        model,
        _val_loader(run),
        rt.device,
        dist=rt.dist,
        amp_dtype=rt.amp_dtype,
        channels_last=rt.channels_last,
    )


def train_stage(
    stage: str,
    model: nn.Module,
    step_fn: Step,
    stage_cfg: StageConfig,
    run: Run,
    extra: DistillationLoss | None = None,
) -> dict[str, float]:
    """Train ``model`` for ``stage_cfg.epochs`` epochs on ``step_fn(images, targets) -> (loss, parts)``.

    ``model`` is the plain module whose weights are saved; ``step_fn`` may run it through DDP. ``extra``
    is the distillation loss module: its trainable parameters are optimized and saved alongside, and its
    ``start_epoch`` and ``after_step`` hooks run at the start of every epoch and after every optimizer
    step. Every epoch ends with validation, a metrics row and an atomic state file ``state_<stage>.pt``; a
    run started with ``--resume`` continues from it. Returns the final validation metrics.
    """
    cfg, rt, log = run.cfg, run.rt, run.log
    extra = extra if extra is not None else DistillationLoss()
    state_path = run.out / f"state_{stage}.pt"
    loss_params = [p for p in extra.parameters() if p.requires_grad] if rt.dist.enabled else []
    params = [p for m in (model, extra) for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(param_groups(model, extra), stage_cfg, rt.device)
    generator = torch.Generator()
    loader = _train_loader(run, generator)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise UsageError(
            f"{len(run.train_ds)} training images do not fill one batch on each of "
            f"{rt.dist.world_size} process(es): lower data.batch_size"
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(stage_cfg.schedule, stage_cfg.epochs, steps_per_epoch, stage_cfg.optimizer.lr)
    )
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    epoch0, step, metrics = 0, 0, {}
    if run.resume and state_path.exists():
        state = torch.load(state_path, map_location=rt.device, weights_only=True)
        model.load_state_dict(state["model"])
        extra.load_state_dict(state["extra"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch0, step, metrics = state["epoch"], state["step"], state["metrics"]
        rngs = state["rng"]
        _set_rng_state(rngs[rt.dist.rank] if len(rngs) == rt.dist.world_size else rngs[0])
    else:
        torch.manual_seed(cfg.seed + rt.dist.rank)
        random.seed(cfg.seed + rt.dist.rank)
    log.keep_only(lambda row: row["stage"] != stage or row["epoch"] <= epoch0)
    run_step = torch.compile(step_fn) if rt.compile else step_fn
    mix = batch_mix(cfg.data.augment, run.num_classes)
    clip = cfg.runtime.grad_clip
    for epoch in range(epoch0, stage_cfg.epochs):
        model.train()
        extra.train()
        extra.start_epoch(epoch, stage_cfg.epochs)
        generator.manual_seed(cfg.seed * 100_003 + epoch)
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        sums: dict[str, Tensor] = {}
        seen, started = 0, time.perf_counter()
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"{stage} {epoch + 1}/{stage_cfg.epochs}",
            disable=not rt.progress,
            leave=False,
            dynamic_ncols=True,
        )
        for images, targets in _batches(loader, run, mix):
            with rt.autocast():
                loss, parts = run_step(images, targets)
            value = loss.item()
            if not math.isfinite(value):
                bar.close()
                last = state_path if state_path.exists() else "none (this stage had not finished an epoch)"
                raise TrainingDiverged(
                    f"loss became {value} at stage {stage} epoch {epoch + 1} step {step + 1}; "
                    f"last good checkpoint: {last}"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            # DDP averages the student's gradients; the loss module (projectors, task weights) is not
            # wrapped, so its gradients are averaged here or its copies would drift apart across ranks.
            for p in loss_params:
                if p.grad is not None:
                    p.grad.div_(rt.dist.world_size)
                    all_reduce_sum(p.grad, rt.dist)
            if clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            extra.after_step()
            step += 1
            seen += images.shape[0]
            for key, part in {"loss": loss.detach(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + part.float()
            speed = seen * rt.dist.world_size / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{value:.4f}", img_s=f"{speed:.0f}")
            bar.update()
            if step % cfg.runtime.log_every == 0:
                log.write(
                    stage=stage,
                    epoch=epoch + 1,
                    step=step,
                    split="train",
                    scope="step",
                    loss=value,
                    lr=scheduler.get_last_lr()[0],
                    parts={k: float(v) for k, v in parts.items()},
                    images_per_s=speed,
                )
        bar.close()
        speed = seen * rt.dist.world_size / (time.perf_counter() - started)
        batches = steps_per_epoch * rt.dist.world_size
        means = {k: float(all_reduce_sum(v.reshape(1).double(), rt.dist)) / batches for k, v in sums.items()}
        validation = validate_model(model, run)
        lr = scheduler.get_last_lr()[0]
        train_loss = means.pop("loss")
        log.write(
            stage=stage,
            epoch=epoch + 1,
            step=step,
            split="train",
            scope="epoch",
            loss=train_loss,
            lr=lr,
            parts=means,
            images_per_s=speed,
        )
        log.write(
            stage=stage,
            epoch=epoch + 1,
            step=step,
            split="val",
            scope="epoch",
            loss=validation["loss"],
            lr=lr,
            top1=validation["top1"],
            top5=validation["top5"],
        )
        metrics = stage_metrics(
            metrics,
            validation,
            epoch=epoch + 1,
            train_loss=train_loss,
            images_per_s=speed,
            seconds=time.perf_counter() - started,
        )
        rngs = _gather_rng(rt.dist)
        if rt.dist.is_main:
            state = {
                "stage": stage,
                "epoch": epoch + 1,
                "step": step,
                "model": model.state_dict(),
                "extra": extra.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rngs,
                "metrics": metrics,
            }
            atomic_write(state_path, functools.partial(torch.save, state))
        barrier(rt.dist)
        if rt.dist.is_main and rt.progress:
            tqdm.write(
                f"{stage} epoch {epoch + 1}/{stage_cfg.epochs}: train loss {train_loss:.4f}  "
                f"val top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  {speed:.0f} img/s"
            )
    if not metrics:
        metrics = {**validate_model(model, run), "train_loss": None, "epochs": 0}
    return metrics


def arch_record(model_cfg: ModelConfig, num_classes: int) -> dict[str, Any]:
    """The checkpoint's ``arch``: source, name and kwargs with ``num_classes`` inside."""
    arch = asdict(model_cfg.arch)
    arch["kwargs"] = {**arch["kwargs"], "num_classes": num_classes}
    return arch


def _build(model_cfg: ModelConfig, run: Run, weights: str | None = None) -> nn.Module:

    torch.manual_seed(run.cfg.seed)  # the baseline and the distilled student start from the same weights
    model = build_model(asdict(model_cfg.arch), num_classes=run.num_classes, weights=weights)
    model = model.to(run.rt.device)
    if run.rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _ddp(module: nn.Module, run: Run) -> nn.Module:
    if not run.rt.dist.enabled:
        return module
    ids = [run.rt.device.index] if run.rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def _save_stage(stage: str, model: nn.Module, model_cfg: ModelConfig, metrics: dict, run: Run) -> None:

    if not run.rt.dist.is_main:
        return
    info = run.info
    save_checkpoint(
        run.out / STAGE_FILES[stage],
        model,
        arch=arch_record(model_cfg, run.num_classes),
        input={"size": [3, info.image_size, info.image_size], "mean": list(info.mean), "std": list(info.std)},
        classes=list(info.classes),
        data=info.record,
        metrics=metrics,
        config=run.cfg.to_dict(),
        format=TEACHER_FORMAT if stage == "teacher" else STUDENT_FORMAT,
    )


def _finished(stage: str, model: nn.Module, run: Run) -> dict | None:
    """On ``--resume``, a stage whose checkpoint exists is done: load its weights and recorded metrics."""

    path = run.out / STAGE_FILES[stage]
    if not (run.resume and path.exists()):
        return None
    ckpt = load_checkpoint(path, expect=TEACHER_FORMAT if stage == "teacher" else STUDENT_FORMAT)
    model.load_state_dict(ckpt["state_dict"])
    return ckpt["metrics"]


def run_stage(
    stage: str,
    model: nn.Module,
    step_fn: Step,
    model_cfg: ModelConfig,
    run: Run,
    extra: DistillationLoss | None = None,
) -> dict:
    """Skip a stage finished before ``--resume``; otherwise train it and write its checkpoint."""
    done = _finished(stage, model, run)
    if done is not None:
        return done
    metrics = train_stage(stage, model, step_fn, model_cfg.train, run, extra)
    _save_stage(stage, model, model_cfg, metrics, run)
    barrier(run.rt.dist)
    return metrics


def _attention_picture(student: nn.Module, teacher: nn.Module, loss_fn: nn.Module, run: Run) -> None:

    images, labels = next(iter(DataLoader(run.val_ds, batch_size=8, shuffle=False)))
    with torch.no_grad():
        _, teacher_taps = teacher(images.to(run.rt.device))
        _, student_taps = student(images.to(run.rt.device))
        maps = loss_fn.maps(student_taps, teacher_taps)
    if maps:
        student_maps, teacher_maps = maps[0]
        plot_attention_grid(
            images,
            run.info.mean,
            run.info.std,
            teacher_maps.float().cpu(),
            student_maps.float().cpu(),
            run.out / "attention.png",
            titles=("teacher", "distilled student"),
            labels=[run.info.classes[i] for i in labels.tolist()],
        )


def run_training(cfg: Config, resume: bool) -> dict[str, Any]:
    """The three stages (teacher, baseline, distill) and the outputs; returns the run's ``results.json``."""

    rt = resolve_runtime(cfg)
    out = Path(cfg.out)
    if rt.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            for stale in ["metrics.jsonl", *(f"state_{s}.pt" for s in STAGES)]:
                (out / stale).unlink(missing_ok=True)
            dump_config(cfg, out / "config.yaml")
    barrier(rt.dist)
    train_ds, val_ds, info = build_datasets(cfg.data, cfg.seed)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise UsageError(
            f"data.name={cfg.data.name}: the training or validation split is empty; "
            "check data.root and data.val_fraction"
        )
    log = MetricsLog(out / "metrics.jsonl", rt.dist.is_main, cfg.runtime.tensorboard)
    run = Run(cfg, out, rt, train_ds, val_ds, info, log, resume)

    teacher = _build(cfg.teacher, run, weights=cfg.teacher.weights)
    student = _build(cfg.student, run)
    teacher_taps = Taps(teacher, cfg.teacher.taps)
    student_taps = Taps(student, cfg.student.taps)
    loss_fn = CompositeLoss(
        cfg.loss,
        cfg.student.taps,
        cfg.teacher.taps,
        kernels_impl=cfg.runtime.kernels,
        label_smoothing=cfg.student.train.label_smoothing,
    )
    loss_fn = loss_fn.to(rt.device)
    # before any training, so a student the method cannot use fails now (the baseline is another instance)
    loss_fn.prepare_student(student)
    probe = next(iter(_val_loader(run)))[0][: cfg.data.batch_size].to(rt.device)
    teacher.eval()
    student.eval()
    with torch.no_grad():
        loss_fn.check(student_taps(probe)[1], teacher_taps(probe)[1])

    if cfg.teacher.weights is None:
        teacher_metrics = run_stage(
            "teacher",
            teacher,
            ce_step(_ddp(teacher, run), cfg.teacher.train.label_smoothing),
            cfg.teacher,
            run,
        )
    else:
        teacher_metrics = validate_model(teacher, run)
    teacher.eval().requires_grad_(False)
    results = {
        "teacher": {
            "arch": cfg.teacher.arch.name,
            "params": sum(p.numel() for p in teacher.parameters()),
            **teacher_metrics,
        }
    }

    if cfg.baseline:
        baseline = _build(cfg.student, run)
        metrics = run_stage(
            "baseline",
            baseline,
            ce_step(_ddp(baseline, run), cfg.student.train.label_smoothing),
            cfg.student,
            run,
        )
        results["baseline"] = {
            "arch": cfg.student.arch.name,
            "params": sum(p.numel() for p in baseline.parameters()),
            **metrics,
        }
        del baseline

    metrics = run_stage(
        "distill",
        student,
        distill_step(_ddp(student_taps, run), teacher_taps, loss_fn),
        cfg.student,
        run,
        extra=loss_fn,
    )
    results["student"] = {
        "arch": cfg.student.arch.name,
        "params": sum(p.numel() for p in student.parameters()),
        **metrics,
    }

    results = run_results(results, data=cfg.data.name, methods=cfg.loss.method)
    if rt.dist.is_main:
        student.eval()
        table = write_results(out, results)
        plot_training_curves(out / "metrics.jsonl", out / "curves.png")
        _attention_picture(student_taps, teacher_taps, loss_fn, run)
        print(table)
    log.close()
    return results


def run_seeds(cfg: Config, resume: bool) -> dict[str, Any]:
    """The whole run once per seed of ``cfg.seeds``, in ``out/seed<N>/`` (each one a run of its own, resumed
    where it stopped), then the mean and standard deviation over seeds in ``out/results.json`` and
    ``out/results.md``. The data split stays the one of ``cfg.seed`` (``data.split_seed``), so the seeds
    change the initialization, the data order and the augmentation, and a fixed teacher never saw a seed's
    validation images."""
    out = Path(cfg.out)
    is_main = int(os.environ.get("RANK", "0")) == 0  # as torchrun numbers the processes
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            dump_config(cfg, out / "config.yaml")
    split_seed = cfg.data.split_seed if cfg.data.split_seed is not None else cfg.seed
    data = dataclasses.replace(cfg.data, split_seed=split_seed)
    runs = {}
    for seed in cfg.seeds:
        folder = out / f"seed{seed}"
        one = dataclasses.replace(cfg, seed=seed, seeds=None, out=str(folder), data=data)
        runs[seed] = run_training(one, resume=resume and (folder / "config.yaml").is_file())
    results = seeds_results(runs)
    if is_main:
        print(write_results(out, results))
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m kdfast.train``: exit 0 when done, 1 when training diverged, 2 on bad usage or input."""
    try:
        args = parse_args(argv)
        cfg = load_run_config(args)
        (run_seeds if cfg.seeds else run_training)(cfg, resume=args.resume is not None)
    except UsageError as exc:
        print(f"kdfast.train: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as exc:
        print(f"kdfast.train: {exc}", file=sys.stderr)
        return EXIT_GATE_FAILED
    finally:
        shutdown_distributed()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
