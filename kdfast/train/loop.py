"""The training run behind ``python -m kdfast.train``: train (or load) the teacher, train a CE-only baseline
student, distill the student with the configured methods (``loss.method``), and write checkpoints, metrics,
pictures and a results table.

The whole loop is :func:`train_stage`; the three stages differ only in the ``step`` function that maps a
batch to ``(loss, parts)``: :func:`ce_step` for the teacher and the baseline, :func:`distill_step` for the
student (the weighted terms of the configured methods plus the supervised CE: the
:class:`~kdfast.methods.compose.CompositeLoss` built from ``cfg.loss`` through the method registry).
:func:`run_training` builds everything and runs :mod:`kdfast.train.preflight`'s checks before the output
folder (:mod:`kdfast.train.rundir`) is created or touched.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from kdfast import teacher_cache
from kdfast.atomic import append_line, atomic_write
from kdfast.checkpoint import STUDENT_FORMAT, TEACHER_FORMAT, has_test_split, load_checkpoint, save_checkpoint
from kdfast.config import (
    ArchSpec,
    Config,
    ModelConfig,
    QadConfig,
    ResumeRecord,
    ScheduleConfig,
    StageConfig,
    config_from_dict,
    config_text,
    load_config,
    read_loss,
)
from kdfast.data import batch_mix, build_datasets, dataset_from_record
from kdfast.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown_distributed
from kdfast.errors import (
    CheckpointError,
    TrainingDiverged,
    TrainingInterrupted,
    UsageError,
    WriteError,
    stop_signal,
)
from kdfast.evaluate import evaluate
from kdfast.methods.base import DistillationLoss
from kdfast.methods.compose import CompositeLoss
from kdfast.methods.registry import method
from kdfast.models import build_model
from kdfast.plots import plot_training_curves
from kdfast.quant import FakeQuant, freeze_batchnorm
from kdfast.results import run_results, seeds_results, stage_metrics, write_results
from kdfast.taps import Taps
from kdfast.teacher_cache import CachePlan, TeacherCache
from kdfast.train import pictures, preflight, rundir
from kdfast.train.preflight import Step

STAGES = ("teacher", "baseline", "distill")
# runtime.channels_last: auto on a CPU: the families whose CE training step ran >= 1.1x faster in
# channels_last on the development CPU (median of alternating rounds, bench/test_train_step.py::
# test_channels_last_cpu; the figure in docs/benchmarks.md, "Performance"): depthwise-separable convolutions
# (edge_cnn, MobileNetV2, EfficientNet) and the CIFAR wide ResNets. The others stay NCHW: within the noise, or
# slower (torchvision's ResNet-18).
CPU_CHANNELS_LAST = frozenset(
    {"edge_cnn", "MobileNetV2", "efficientnet_b0", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"}
)
TORCH_THREADS = torch.get_num_threads()  # torch's own default (one per physical core), before any run sets it
STAGE_FILES = {"teacher": "teacher.pt", "baseline": "baseline.pt", "distill": "student.pt"}
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


def load_run_config(args: argparse.Namespace) -> Config:
    """The validated config: ``--config`` (``DIR/config.yaml`` on ``--resume``) plus ``--set`` overrides."""
    overrides = list(args.set)
    if args.compile is not None:
        overrides.append(f"runtime.compile={ {'auto': 'auto', 'on': 'true', 'off': 'false'}[args.compile] }")
    if args.seeds is not None:
        overrides.append(f"seeds={args.seeds}")
    if args.resume is not None:
        folder = Path(args.resume)
        if not (folder / "config.yaml").is_file():
            what = "does not exist" if not folder.exists() else "holds no config.yaml"
            raise UsageError(f"--resume {folder} {what}: give the output folder of a run")
        cfg = load_config(folder / "config.yaml", overrides)
        if (load_config(folder / "config.yaml").seeds is None) != (cfg.seeds is None):
            raise UsageError(
                f"--resume {folder}: seeds cannot turn a single run into a run over seeds or back: "
                "start a new run with --out instead"
            )
        cfg.out = str(folder)
        return cfg
    cfg = load_config(args.config, overrides)
    if args.out is not None:
        if not args.out.strip():
            raise UsageError("--out is empty: name the output folder (e.g. --out runs/my-run)")
        cfg.out = args.out
    return cfg


@dataclass
class Runtime:
    """Resolved ``cfg.runtime``: what ``auto`` means on this machine."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: (
        bool  # every model and the input batches (``runtime.channels_last``: true, or auto on CUDA)
    )
    compile: bool
    progress: bool
    threads: int
    dist: DistInfo
    cpu_auto_layout: bool = False  # runtime.channels_last: auto on a CPU: per model (model_channels_last)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def model_channels_last(self, arch: ArchSpec) -> bool:
        """A model's layout: the run's ``channels_last``, and on a CPU with ``auto`` the measured choice for
        its architecture (:data:`CPU_CHANNELS_LAST`)."""
        return self.channels_last or (self.cpu_auto_layout and arch.name in CPU_CHANNELS_LAST)


def auto_threads(world_size: int) -> int:
    """``runtime.threads: auto``: one torch thread per core that other processes leave idle, shared among the
    processes of this run, at least 1 and at most torch's own default (one per physical core). On a loaded
    2-core machine two threads contend with the other jobs, and the run took several times as long as with
    one (docs/reliability.md, "Threads"); on an idle machine every core is used."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = math.floor(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    return max(1, min(TORCH_THREADS, (cores - busy) // world_size))


def resolve_runtime(cfg: Config) -> Runtime:
    """bf16 autocast, channels_last and torch.compile default on for CUDA and off for CPU (channels_last on a
    CPU per model, :meth:`Runtime.model_channels_last`); the number of CPU threads (:func:`auto_threads`, or
    ``runtime.threads``). A compiling run keeps Inductor's compiled graphs in the cache folder
    (:func:`kdfast.teacher_cache.cache_root`), unless ``TORCHINDUCTOR_CACHE_DIR`` names another, so a second
    run of the same models compiles from that cache."""
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
    threads = auto_threads(dist.world_size) if rt.threads == "auto" else rt.threads
    torch.set_num_threads(threads)
    compile_step = cuda if rt.compile == "auto" else bool(rt.compile)
    if compile_step:
        os.environ.setdefault(
            "TORCHINDUCTOR_CACHE_DIR", str(teacher_cache.cache_root(rt.cache_dir) / "inductor")
        )
    return Runtime(
        device=device,
        amp_dtype=amp,
        channels_last=cuda if rt.channels_last == "auto" else bool(rt.channels_last),
        compile=compile_step,
        progress=rt.progress and dist.is_main,
        threads=threads,
        dist=dist,
        cpu_auto_layout=rt.channels_last == "auto" and not cuda,
    )


def tensorboard_writer(setting: str | bool) -> type | None:
    """TensorBoard's SummaryWriter when ``runtime.tensorboard`` wants it and it is installed; a UsageError
    when it is required (true) but missing."""
    if setting is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if setting is True:
            raise UsageError(
                "runtime.tensorboard=true needs the tensorboard package: pip install tensorboard, or set "
                "runtime.tensorboard=auto"
            ) from None
        return None
    return SummaryWriter


class MetricsLog:
    """``metrics.jsonl`` rows (and TensorBoard scalars when available); only rank 0 writes."""

    def __init__(self, path: Path, enabled: bool, writer: type | None) -> None:
        """``writer``: TensorBoard's SummaryWriter (:func:`tensorboard_writer`) or None."""
        self.path = path
        self.enabled = enabled
        self.writer = writer(str(path.parent / "tensorboard")) if enabled and writer is not None else None

    def write(self, **fields: Any) -> None:
        """One row {"stage", "epoch", "step", "split", "scope", "loss", "lr", "top1", "top5", "parts",
        "images_per_s"}; ``scope`` is "step" (every log_every steps) or "epoch"; absent fields are null."""
        if not self.enabled:
            return
        row = {key: None for key in ROW_FIELDS} | {"parts": {}} | fields
        append_line(self.path, json.dumps(row))
        if self.writer is not None:
            prefix = f"{row['stage']}/{row['split']}"
            for key in ("loss", "lr", "top1", "top5", "images_per_s"):
                if row.get(key) is not None:
                    self.writer.add_scalar(f"{prefix}/{key}", row[key], row["step"])
            for key, value in row.get("parts", {}).items():
                self.writer.add_scalar(f"{prefix}/{key}", value, row["step"])

    def keep_only(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Drop rows a resumed run will write again (those after the last saved state) and a last line that a
        kill cut short (:func:`kdfast.train.preflight.read_metrics`)."""
        if not self.enabled or not self.path.exists():
            return
        rows = preflight.read_metrics(self.path)
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
    resume: bool
    stages: list[str] = field(default_factory=list)  # the stages this run trains, in order
    log: MetricsLog | None = None  # created once the checks passed and the output folder is claimed
    position: str = "before the first training step"  # where Ctrl-C found the run
    resume_dir: Path | None = None  # what --resume takes to continue: the output folder, or its seeds folder
    held_out_ds: Dataset | None = None  # training images a loss reads (SoKD search) and no stage trains on
    cache_plan: CachePlan = field(default_factory=lambda: CachePlan("off", 0))  # the teacher-output cache
    report: dict[str, Any] = field(default_factory=dict)  # results.json's "runtime": compilation, the cache
    test_ds: Dataset | None = None  # the official test split, where the data set keeps one (test_metrics)

    @property
    def num_classes(self) -> int:
        return len(self.info.classes)


def ce_step(model: nn.Module, label_smoothing: float, compile: bool = False) -> Step:
    """The teacher / baseline objective: CE(y, p) alone, on integer labels or CutMix / Mixup soft targets;
    one ``torch.compile`` graph when ``compile``."""

    def step(images: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        loss = F.cross_entropy(model(images).float(), targets, label_smoothing=label_smoothing)
        return loss, {"ce": loss.detach()}

    return torch.compile(step) if compile else step


def teacher_forward(teacher: nn.Module, compile: bool = False) -> Callable[[Tensor], teacher_cache.Outputs]:
    """The frozen teacher (a Taps module): ``images -> (logits, {tap: tensor | QKV})`` under
    ``torch.inference_mode`` (no autograd graph, no version counters), its own ``torch.compile`` graph when
    ``compile``. The outputs are cloned out of inference mode: autograd refuses to save an inference tensor
    for the student's backward (an MSE to a teacher feature saves it)."""
    forward = torch.compile(teacher) if compile else teacher

    def run(images: Tensor) -> teacher_cache.Outputs:
        with torch.inference_mode():
            outputs = forward(images)
        return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, outputs)

    return run


def distill_step(
    student: nn.Module, teacher: nn.Module, loss_fn: DistillationLoss, compile: bool = False
) -> Step:
    """The distillation objective: the student's logits and taps (on ``loss_fn.student_view`` of the batch)
    with grad against the frozen teacher's, combined by ``loss_fn``. ``student`` and ``teacher`` are Taps
    modules returning ``(logits, {tap: tensor | QKV})``; the teacher runs in :func:`teacher_forward`, unless
    the step is given the teacher's ``(logits, taps)`` of the batch (from the teacher-output cache). With
    ``compile`` the teacher and the student's part are two ``torch.compile`` graphs: the teacher's has no
    autograd, and the student's does not change with where the teacher's outputs come from."""
    frozen = teacher_forward(teacher, compile)

    def student_loss(
        images: Tensor, targets: Tensor, teacher_logits: Tensor, teacher_taps: dict[str, Any]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        student_logits, student_taps = student(loss_fn.student_view(images))
        loss, parts = loss_fn(student_logits, teacher_logits, targets, student_taps, teacher_taps)
        return loss, {k: v.detach() for k, v in parts.items()}

    student_step = torch.compile(student_loss) if compile else student_loss

    def step(images: Tensor, targets: Tensor, *teacher_outputs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        teacher_logits, teacher_taps = teacher_outputs or frozen(images)
        return student_step(images, targets, teacher_logits, teacher_taps)

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


def _train_loader(run: Run, generator: torch.Generator, cache: TeacherCache | None = None) -> DataLoader:
    """The data order is a function of (seed, epoch): the generator is re-seeded before every epoch, or
    ``DistributedSampler.set_epoch`` does the same across ranks. With the teacher ``cache`` the loader gives
    the cached views (items ``(view, label, row)``), one view of each image per epoch drawn with the same
    generator (:class:`kdfast.teacher_cache.ViewSampler`)."""
    cfg, dist = run.cfg, run.rt.dist
    drop_last = len(run.train_ds) // dist.world_size > cfg.data.batch_size
    dataset = run.train_ds
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
    if cache is not None:
        dataset = cache.dataset(run.train_ds)
        sampler = teacher_cache.ViewSampler(sampler, cache.views, generator)
    return DataLoader(
        dataset,
        batch_size=cfg.data.batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=cfg.data.num_workers,
        pin_memory=run.rt.device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
    )


def _val_loader(run: Run, dataset: Dataset | None = None) -> DataLoader:
    """Rank r sees samples r, r + world, ...: disjoint shards without the padding DistributedSampler adds,
    so the all-reduced accuracy is exactly that of the whole validation set (or of ``dataset``)."""
    dist = run.rt.dist
    dataset = run.val_ds if dataset is None else dataset
    dataset = Subset(dataset, range(dist.rank, len(dataset), dist.world_size)) if dist.enabled else dataset
    return DataLoader(
        dataset,
        batch_size=run.cfg.data.eval_batch_size,
        shuffle=False,
        num_workers=run.cfg.data.num_workers,
        pin_memory=run.rt.device.type == "cuda",
    )


def _batches(
    loader: DataLoader, run: Run, mix: Callable | None, cache: TeacherCache | None = None
) -> Iterator[tuple[Any, ...]]:
    """``(images, targets)`` on the device; with the teacher ``cache``, ``(images, targets, teacher_logits,
    teacher_taps)``: the teacher's outputs of the batch's views, read from the cache."""
    for images, labels, *rows in loader:
        targets: Tensor = labels
        if mix is not None:
            images, targets = mix(images, labels)
        images = images.to(run.rt.device, non_blocking=True)
        if run.rt.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        teacher = cache.outputs(rows[0], run.rt.device) if cache is not None else ()
        yield images, targets.to(run.rt.device, non_blocking=True), *teacher


def hold_out(dataset: Dataset, share: float, seed: int) -> tuple[Subset, Subset]:
    """(the rest, the held-out ``share``) of ``dataset``, a fixed draw of ``seed`` (at least one image held
    out): the images a loss module's search reads (``DistillationLoss.held_out_share``) and no stage trains
    on."""
    count = max(1, round(len(dataset) * share))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(order[count:])), Subset(dataset, sorted(order[:count]))


def held_out_taps(run: Run, student: Taps, teacher: Taps) -> Callable[[], tuple[dict, dict]]:
    """``taps()``: both models' taps, without gradient, on the next batch of ``run.held_out_ds``, which it
    cycles through in a fresh order each pass (``DistillationLoss.use_held_out`` takes it)."""
    size = min(run.cfg.data.batch_size, len(run.held_out_ds))
    loader = DataLoader(
        run.held_out_ds,
        batch_size=size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(run.cfg.seed),
        num_workers=run.cfg.data.num_workers,
        persistent_workers=run.cfg.data.num_workers > 0,
    )
    batches = itertools.chain.from_iterable(itertools.repeat(loader))

    def taps() -> tuple[dict, dict]:
        images = next(batches)[0].to(run.rt.device, non_blocking=True)
        with torch.no_grad(), run.rt.autocast():
            return student(images)[1], teacher(images)[1]

    return taps


def validate_model(model: nn.Module, run: Run, dataset: Dataset | None = None) -> dict[str, float]:
    """Top-1 / top-5 / CE of ``model`` on the validation split (or ``dataset``), over all ranks."""
    model.eval()
    rt = run.rt
    return evaluate(
        model,
        _val_loader(run, dataset),
        rt.device,
        dist=rt.dist,
        amp_dtype=rt.amp_dtype,
        channels_last=rt.channels_last,
    )


def test_metrics(model: nn.Module, run: Run) -> dict[str, float]:
    """``test_top1``, ``test_top5``, ``test_loss`` of ``model`` as saved, on the official test split; empty
    for a data set without one. Measured once per model, after its training: nothing is chosen on it."""
    if run.test_ds is None:
        return {}
    return {f"test_{key}": value for key, value in validate_model(model, run, run.test_ds).items()}


def train_stage(
    stage: str,
    model: nn.Module,
    step_fn: Step,
    stage_cfg: StageConfig,
    run: Run,
    extra: DistillationLoss | None = None,
    cache: TeacherCache | None = None,
    prepare_epoch: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` for ``stage_cfg.epochs`` epochs on ``step_fn(images, targets, *teacher) -> (loss,
    parts)``.

    ``model`` is the plain module whose weights are saved; ``step_fn`` may run it through DDP. ``extra``
    is the distillation loss module: its trainable parameters are optimized and saved alongside, and its
    ``start_epoch`` and ``after_step`` hooks run at the start of every epoch and after every optimizer
    step. With the teacher-output ``cache`` the batches are its views and ``step_fn`` is given the teacher's
    outputs of them. ``prepare_epoch()`` runs once the model is in training mode at the start of every epoch
    (the QAD stage recalibrates its activation ranges there). Every epoch ends with validation, a metrics row
    and an atomic state file ``state_<stage>.pt``; a run started with ``--resume`` continues from it. Returns
    the final validation metrics.

    No step waits for the device: the loss's finiteness is checked on the device, and the loss and its parts
    are read back only every ``runtime.log_every`` steps and at the end of the epoch (the progress bar shows
    the last value read), so the host keeps queueing the next steps. A loss that was not finite is named
    with its step at the next read back, before any state is written.
    """
    cfg, rt, log = run.cfg, run.rt, run.log
    extra = extra if extra is not None else DistillationLoss()
    state_path = run.out / f"state_{stage}.pt"
    loss_params = [p for p in extra.parameters() if p.requires_grad] if rt.dist.enabled else []
    params = [p for m in (model, extra) for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(param_groups(model, extra), stage_cfg, rt.device)
    generator = torch.Generator()
    loader = _train_loader(run, generator, cache)
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
        state = preflight.read_state(state_path)
        model.load_state_dict(state["model"])
        extra.load_state_dict(state["extra"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _follow_config(optimizer, scheduler, stage_cfg.optimizer.lr)
        if state["scaler"]:  # empty when saved from a run without fp16 (runtime.amp may change on resume)
            scaler.load_state_dict(state["scaler"])
        epoch0, step, metrics = state["epoch"], state["step"], state["metrics"]
        rngs = state["rng"]
        _set_rng_state(rngs[rt.dist.rank] if len(rngs) == rt.dist.world_size else rngs[0])
        say(run, f"  resumed after epoch {epoch0}/{stage_cfg.epochs} (step {step}) from {state_path}")
    else:
        torch.manual_seed(cfg.seed + rt.dist.rank)
        random.seed(cfg.seed + rt.dist.rank)
    log.keep_only(lambda row: row["stage"] != stage or row["epoch"] <= epoch0)
    mix = batch_mix(cfg.data.augment, run.num_classes)
    clip = cfg.runtime.grad_clip
    first_step: tuple[float, dict[str, int]] | None = (
        None  # (seconds, compile cache counts) of a compiled run
    )
    for epoch in range(epoch0, stage_cfg.epochs):
        model.train()
        extra.train()
        extra.start_epoch(epoch, stage_cfg.epochs)
        if prepare_epoch is not None:
            prepare_epoch()
        generator.manual_seed(cfg.seed * 100_003 + epoch)
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)
        sums: dict[str, Tensor] = {}
        # the first step of the epoch whose loss was not finite (-1: none yet) and that loss, on the device
        bad_step = torch.full((), -1, dtype=torch.long, device=rt.device)
        bad_loss = torch.zeros((), device=rt.device)
        seen, started = 0, time.perf_counter()
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"{stage} {epoch + 1}/{stage_cfg.epochs}",
            disable=None if rt.progress else True,  # None: a bar on a terminal, none in a log file
            leave=False,
            dynamic_ncols=True,
        )
        for images, targets, *teacher in _batches(loader, run, mix, cache):
            run.position = f"stage {stage} epoch {epoch + 1}/{stage_cfg.epochs} step {step + 1}"
            step_started, counts = time.perf_counter(), _compile_counts()
            with rt.autocast():
                loss, parts = step_fn(images, targets, *teacher)
            diverged_now = (bad_step < 0) & ~torch.isfinite(loss.detach())
            bad_step = torch.where(diverged_now, step, bad_step)
            bad_loss = torch.where(diverged_now, loss.detach().float(), bad_loss)
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
            if rt.compile and first_step is None:  # compilation runs on the host, inside the first step
                first_step = time.perf_counter() - step_started, _compile_counts(since=counts)
            step += 1
            seen += images.shape[0]
            for key, part in {"loss": loss.detach(), **parts}.items():
                sums[key] = sums.get(key, 0.0) + part.float()
            bar.update()
            if step % cfg.runtime.log_every == 0:
                # the one host sync of these log_every steps
                first_bad, worst, value, *logged = _read_back(bad_step, bad_loss, loss, *parts.values())
                if first_bad >= 0:
                    bar.close()
                    raise TrainingDiverged(
                        _diverged(worst, stage, int(first_bad), steps_per_epoch, state_path, run)
                    )
                speed = seen * rt.dist.world_size / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{value:.4f}", img_s=f"{speed:.0f}")
                log.write(
                    stage=stage,
                    epoch=epoch + 1,
                    step=step,
                    split="train",
                    scope="step",
                    loss=value,
                    lr=scheduler.get_last_lr()[0],
                    parts=dict(zip(parts, logged, strict=True)),
                    images_per_s=speed,
                )
        bar.close()
        batches = steps_per_epoch * rt.dist.world_size
        keys = list(sums)
        totals = all_reduce_sum(torch.stack([sums[k].double() for k in keys]), rt.dist)
        first_bad, worst, *summed = _read_back(bad_step, bad_loss, *totals)
        if first_bad >= 0:
            raise TrainingDiverged(_diverged(worst, stage, int(first_bad), steps_per_epoch, state_path, run))
        seconds = time.perf_counter() - started
        speed = seen * rt.dist.world_size / seconds
        if first_step is not None and stage not in run.report.setdefault("compile", {}):
            run.report["compile"][stage] = _compile_report(first_step, seconds, steps_per_epoch)
            say(run, f"  {stage}: {run.report['compile'][stage]['line']}")
        means = {k: total / batches for k, total in zip(keys, summed, strict=True)}
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
        say(
            run,
            f"  {stage} epoch {epoch + 1}/{stage_cfg.epochs}: train loss {train_loss:.4f}  "
            f"val top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  {speed:.0f} img/s",
        )
    if not metrics:
        metrics = {**validate_model(model, run), "train_loss": None, "epochs": 0}
    return metrics


def _follow_config(
    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float
) -> None:
    """After a resume point is loaded: the steps to come follow the schedule of the config as it is now, from
    the step reached. The saved scheduler holds the learning rate the stage started with, and ``--resume``
    may have changed it or the epoch count (config.yaml's ``resumed``); unchanged, every value is the one
    the saved run would have used (``LambdaLR`` computes ``base_lr * factor(step)`` alike)."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)


def _read_back(*values: Tensor) -> list[float]:
    """Scalars from the device in one transfer: the loop's only host sync."""
    return torch.stack([v.detach().double().reshape(()) for v in values]).tolist()


# torch's compile-cache counters: Inductor's FX graph cache, AOTAutograd's cache of forward + backward graphs
_CACHE_COUNTERS = {
    "fx_graph_hits": ("inductor", "fxgraph_cache_hit"),
    "fx_graph_misses": ("inductor", "fxgraph_cache_miss"),
    "autograd_hits": ("aot_autograd", "autograd_cache_hit"),
    "autograd_misses": ("aot_autograd", "autograd_cache_miss"),
}


def _compile_counts(since: dict[str, int] | None = None) -> dict[str, int]:
    """torch.compile's cache hits and misses so far (:data:`_CACHE_COUNTERS`), or since ``since``."""
    from torch._dynamo.utils import counters

    now = {key: int(counters[group][name]) for key, (group, name) in _CACHE_COUNTERS.items()}
    return now if since is None else {key: now[key] - since[key] for key in now}


def _compile_report(first_step: tuple[float, dict[str, int]], epoch_s: float, steps: int) -> dict[str, Any]:
    """What compilation cost a stage: its first step's seconds less a later step's (the epoch's mean over the
    other steps), and whether the graphs came from the compile caches: "warm" when every graph was a cache
    hit, "cold" when any was compiled."""
    seconds, counts = first_step
    step_s = (epoch_s - seconds) / max(1, steps - 1)
    misses = counts["fx_graph_misses"] + counts["autograd_misses"]
    hits = counts["fx_graph_hits"] + counts["autograd_hits"]
    state = "cold" if misses else "warm" if hits else "no compile cache"
    compile_s = max(0.0, seconds - step_s)
    return {
        "compile_s": round(compile_s, 2),
        "first_step_s": round(seconds, 2),
        "step_s": round(step_s, 4),
        "state": state,
        **counts,
        "line": f"compiled in {compile_s:.1f} s ({state}: Inductor FX graph cache "
        f"{counts['fx_graph_hits']} hit(s), {counts['fx_graph_misses']} miss(es))",
    }


def say(run: Run, line: str) -> None:
    """One progress line on stdout from rank 0, also when ``runtime.progress`` hides the bars."""
    if run.rt.dist.is_main:
        tqdm.write(line)


def _diverged(value: float, stage: str, step: int, steps_per_epoch: int, state_path: Path, run: Run) -> str:
    """The NaN / inf message: where (``step`` counted from 0 over the stage), what is kept, and what to change
    before ``--resume``."""
    epoch = step // steps_per_epoch
    role = "teacher" if stage == "teacher" else "student"
    lr = getattr(run.cfg, role).train.optimizer.lr
    lr_key = "qad.lr" if stage == "qad" else f"{role}.train.optimizer.lr"
    clip = run.cfg.runtime.grad_clip
    kept = (
        f"the last good state {state_path} is kept"
        if state_path.exists()
        else "this stage had not finished an epoch, so it restarts"
    )
    advice = [f"lower {lr_key} (now {lr:g})"]
    advice.append("set runtime.grad_clip=1.0" if clip is None else f"lower runtime.grad_clip (now {clip:g})")
    if run.rt.amp_dtype is not None:
        advice.append("set runtime.amp=fp32")
    return (
        f"loss became {value} at stage {stage} epoch {epoch + 1} step {step + 1}; {kept}: "
        f"{', '.join(advice)}, then continue with --resume {run.resume_dir}"
    )


def arch_record(model_cfg: ModelConfig, num_classes: int) -> dict[str, Any]:
    """The checkpoint's ``arch``: source, name and kwargs with ``num_classes`` inside."""
    arch = asdict(model_cfg.arch)
    arch["kwargs"] = {**arch["kwargs"], "num_classes": num_classes}
    return arch


def _build(model_cfg: ModelConfig, run: Run, weights: str | None = None) -> nn.Module:

    torch.manual_seed(run.cfg.seed)  # the baseline and the distilled student start from the same weights
    model = build_model(asdict(model_cfg.arch), num_classes=run.num_classes, weights=weights)
    model = model.to(run.rt.device)
    if run.rt.model_channels_last(model_cfg.arch):
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


def _finished_checkpoint(stage: str, run: Run, epochs: int) -> dict | None:
    """On ``--resume``, the checkpoint of a stage finished before: it exists and holds the ``epochs`` the
    config asks for. A stage trained for fewer (``--set <role>.train.epochs`` raised on resume) is not
    finished: it continues from its state file."""
    path = run.out / STAGE_FILES[stage]
    if not (run.resume and path.exists()):
        return None
    ckpt = load_checkpoint(path, expect=TEACHER_FORMAT if stage == "teacher" else STUDENT_FORMAT)
    return ckpt if ckpt["metrics"].get("epochs", epochs) >= epochs else None


def _finished(stage: str, model: nn.Module, run: Run, epochs: int) -> dict | None:
    """On ``--resume``, a stage finished before (:func:`_finished_checkpoint`) is done: load its weights and
    recorded metrics."""
    ckpt = _finished_checkpoint(stage, run, epochs)
    if ckpt is None:
        return None
    model.load_state_dict(ckpt["state_dict"])
    return ckpt["metrics"]


def _stage_title(stage: str, run: Run) -> str:
    """``[2/3] baseline student (CE only)``: the stage's number in this run and what it trains."""
    stages = run.stages
    names = {
        "teacher": "teacher",
        "baseline": "baseline student (CE only)",
        "distill": f"distillation ({' + '.join(m.upper() for m in run.cfg.loss.method)})",
    }
    return f"[{stages.index(stage) + 1}/{len(stages)}] {names[stage]}"


def run_stage(
    stage: str,
    model: nn.Module,
    step_fn: Step,
    model_cfg: ModelConfig,
    run: Run,
    extra: DistillationLoss | None = None,
    cache: TeacherCache | None = None,
) -> dict:
    """Skip a stage finished before ``--resume``; otherwise train it (on the teacher ``cache``'s views and
    outputs, when given) and write its checkpoint."""
    done = _finished(stage, model, run, model_cfg.train.epochs)
    if done is not None:
        say(
            run,
            f"{_stage_title(stage, run)}: finished before ({run.out / STAGE_FILES[stage]}, "
            f"val top-1 {done['top1']:.2f}%)",
        )
        return done
    params = sum(p.numel() for p in model.parameters())
    say(
        run,
        f"{_stage_title(stage, run)}: {model_cfg.arch.name} ({params:,} parameters), "
        f"{model_cfg.train.epochs} epoch(s) on {len(run.train_ds)} images",
    )
    metrics = train_stage(stage, model, step_fn, model_cfg.train, run, extra, cache)
    metrics = {**metrics, **test_metrics(model, run)}
    if "test_top1" in metrics:
        say(run, f"  {stage}: test top-1 {metrics['test_top1']:.2f}% (the official test split, once)")
    _save_stage(stage, model, model_cfg, metrics, run)
    barrier(run.rt.dist)
    return metrics


def _probe_batch(run: Run) -> tuple[Tensor, Tensor]:
    """The first training batch as the loop would see it (its size, augmentation, CutMix / Mixup targets),
    drawn with every random generator put back afterwards."""
    size = min(run.cfg.data.batch_size, len(run.train_ds) // run.rt.dist.world_size)
    loader = DataLoader(Subset(run.train_ds, range(size)), batch_size=size)
    with preflight.undone([]):
        return next(_batches(loader, run, batch_mix(run.cfg.data.augment, run.num_classes)))


def _probe(
    run: Run,
    teacher: nn.Module,
    student: nn.Module,
    teacher_taps: Taps,
    student_taps: Taps,
    loss_fn: CompositeLoss,
) -> None:
    """The checks that need the models: input size, the taps and loss shapes on a real batch (which also
    sizes the loss's sub-networks), and one undone training step of every stage of this run."""
    cfg, rt = run.cfg, run.rt
    for role, model in (("teacher", teacher), ("student", student)):
        preflight.check_input_size(model, cfg.data.image_size, role, getattr(cfg, role).arch.name)
    images, targets = _probe_batch(run)
    if "teacher" in run.stages:
        step = ce_step(teacher, cfg.teacher.train.label_smoothing)
        preflight.probe_step("teacher", step, [teacher], images, targets, rt.autocast)
    if "baseline" in run.stages:  # the plain student, before the loss may change its output (TITN)
        step = ce_step(student, cfg.student.train.label_smoothing)
        preflight.probe_step("baseline", step, [student], images, targets, rt.autocast)
    loss_fn.prepare_student(student)
    teacher.eval()
    student.eval()
    with torch.no_grad():
        loss_fn.check(student_taps(images)[1], teacher_taps(images)[1])
    preflight.probe_distillation(
        lambda loss: distill_step(student_taps, teacher_taps, loss),
        loss_fn,
        [student, loss_fn],
        images,
        targets,
        rt.autocast,
    )


def _stages(cfg: Config) -> list[str]:
    """The stages this run trains, in order: the teacher unless its weights are given, the baseline if set."""
    trained = (cfg.teacher.weights is None, cfg.baseline, True)
    return [stage for stage, on in zip(STAGES, trained, strict=True) if on]


def _resume_files(
    cfg: Config, out: Path
) -> tuple[dict[str, tuple[Path, dict, str]], dict[str, preflight.Trained]]:
    """Every file ``--resume`` reads back, read and checked to be kdfast's before anything else is built: the
    metrics, each finished stage's checkpoint and each state file. Returns, per stage, the file whose weights
    the stage will load, its state dict key ("state_dict" or "model") and the loaded dict; and per stage with
    a file, what it has trained (:class:`kdfast.train.preflight.Trained`)."""
    preflight.read_metrics(out / "metrics.jsonl")
    files, trained = {}, {}
    for stage in _stages(cfg):
        checkpoint, state_path = out / STAGE_FILES[stage], out / f"state_{stage}.pt"
        try:
            if state_path.exists():
                files[stage] = (state_path, preflight.read_state(state_path), "model")
                trained[stage] = preflight.Trained(files[stage][1]["epoch"], finished=False, resumable=True)
            if checkpoint.exists():
                expect = TEACHER_FORMAT if stage == "teacher" else STUDENT_FORMAT
                files[stage] = (checkpoint, load_checkpoint(checkpoint, expect=expect), "state_dict")
                epochs = files[stage][1]["metrics"].get("epochs", 0)
                trained[stage] = preflight.Trained(epochs, finished=True, resumable=state_path.exists())
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}: move it away to redo the {stage} stage from its start") from None
    return files, trained


def _check_resume_fits(
    files: dict[str, tuple[Path, dict, str]], teacher: nn.Module, student: nn.Module, loss_fn: CompositeLoss
) -> None:
    """The weights ``--resume`` will load fit this run's models and loss (a config changed by ``--set`` may
    have changed them)."""
    models = {"teacher": teacher, "baseline": student, "distill": student}
    for stage, (path, saved, key) in files.items():
        preflight.check_fits(path, saved[key], models[stage], f"{stage} model")
        if stage == "distill" and key == "model":
            preflight.check_fits(path, saved["extra"], loss_fn, "loss module")


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key=value`` for every leaf of the mapping ``new`` that differs from ``old`` (what --set changed)."""
    if isinstance(new, dict):
        old = old if isinstance(old, dict) else {}
        return [
            c for key, value in new.items() for c in _changed_keys(old.get(key), value, f"{prefix}{key}.")
        ]
    return [] if old == new else [f"{prefix[:-1]}={new}"]


def _resume_changes(cfg: Config, trained: dict[str, preflight.Trained]) -> list[str]:
    """What ``--set`` changes in the config a run was started (or last resumed) with, each change checked
    against the resume rules (:func:`kdfast.train.preflight.check_resume_changes`) before anything is
    written."""
    saved = Path(cfg.out) / "config.yaml"
    # typed, so that a key this kdfast added since the run started reads as its default, not as a change
    changed = _changed_keys(config_from_dict(yaml.safe_load(saved.read_text())).to_dict(), cfg.to_dict())
    epochs = {"teacher": cfg.teacher.train.epochs, "baseline": cfg.student.train.epochs}
    epochs["distill"] = cfg.student.train.epochs
    preflight.check_resume_changes(changed, trained, epochs, saved.parent)
    return changed


def _claim_folder(
    requested: Path,
    cfg: Config,
    resume: bool,
    overwrite: bool,
    say_line: Callable[[str], None],
    changed: list[str] | None = None,
    after: dict[str, int] | None = None,
) -> Path:
    """Rank 0's first write of a run, once every check passed: the output folder (:mod:`kdfast.train.rundir`:
    a fresh numbered one beside an earlier run, the earlier run removed with ``overwrite``) and its
    ``config.yaml``. On ``--resume`` it is rewritten only when ``--set`` changed it (``changed``, checked by
    :func:`_resume_changes`), and then records the change with the epochs each stage had finished
    (``after``) in ``resumed``, so that it describes what was trained. A folder this call created is removed
    again when its config.yaml cannot be written. Returns the folder."""
    out, replaced, existed = requested, bool(rundir.run_files(requested)) and overwrite, requested.exists()
    if not resume:
        out = rundir.claim(rundir.plan(requested, overwrite), requested, overwrite)
    cfg.out = str(out)
    if resume:
        say_line(f"resuming the run in {out}")
    elif replaced:
        say_line(f"writing to {out} (--overwrite: the earlier run there was removed)")
    elif out != requested:
        say_line(
            f"{requested} holds an earlier run, kept as it is; this run writes to {out} "
            "(--overwrite would replace the earlier one)"
        )
    else:
        say_line(f"writing to {out}")
    saved = out / "config.yaml"
    if resume:
        if not changed:
            return out
        recorded = [c for c in changed if not c.startswith("out=")]  # where the folder is now, not a setting
        if recorded:
            cfg.resumed.append(ResumeRecord(after=dict(after or {}), changed=recorded))
        say_line(f"  {saved} now records {', '.join(changed)}")
    try:
        atomic_write(saved, config_text(cfg))
    except WriteError:
        if not resume and (out != requested or not existed):
            with contextlib.suppress(OSError):
                out.rmdir()  # the folder this run created, left empty
        raise
    return out


def claim_run(
    run: Run,
    overwrite: bool,
    writer: type | None,
    parent: Callable[[bool], Path] | None,
    changed: list[str] | None = None,
    trained: dict[str, preflight.Trained] | None = None,
    claim: Callable[[Path], Path] | None = None,
) -> None:
    """Claim the run's output folder on rank 0 (:func:`_claim_folder`, with the ``--resume`` changes
    ``changed`` and the epochs ``trained`` had finished; or ``claim(requested)`` for a run that records its
    settings otherwise: QAD's ``qad.yaml``; inside ``parent(is_main)`` for a seed of a run over seeds), share
    it with every rank and open the metrics log."""
    rt = run.rt
    out = run.out if parent is None else parent(rt.dist.is_main) / run.out.name
    if rt.dist.is_main:
        if claim is not None:
            out = claim(out)
        else:
            after = {stage: done.epochs for stage, done in (trained or {}).items()}
            say_ = functools.partial(say, run)
            out = _claim_folder(out, run.cfg, run.resume, overwrite, say_, changed or [], after)
    if rt.dist.enabled:
        shared = [str(out)]
        torch_dist.broadcast_object_list(shared, src=0)
        out = Path(shared[0])
    run.out, run.cfg.out = out, str(out)
    run.resume_dir = out if parent is None else out.parent
    barrier(rt.dist)
    run.log = MetricsLog(out / "metrics.jsonl", rt.dist.is_main, writer)


def run_training(
    cfg: Config,
    resume: bool,
    overwrite: bool = False,
    parent: Callable[[bool], Path] | None = None,
) -> dict[str, Any]:
    """Build everything and check it (:mod:`kdfast.train.preflight`), claim the output folder, then run the
    stages (teacher, baseline, distill) and write the outputs; returns the run's ``results.json``. Nothing is
    written before every check passed. A seed of a run over seeds gives ``parent``: called on every rank once
    the checks passed, it returns the (claimed) seeds folder this run's folder goes into."""
    started = time.perf_counter()
    rt = resolve_runtime(cfg)
    # config.yaml records the thread count chosen for "auto": float sums, and so the results, depend on it,
    # and --resume continues with the same count
    cfg.runtime.threads = rt.threads
    rundir.check_writable(Path(cfg.out), "--resume" if resume else "--out")
    writer = tensorboard_writer(cfg.runtime.tensorboard)
    resumed, trained = _resume_files(cfg, Path(cfg.out)) if resume else ({}, {})
    changed = _resume_changes(cfg, trained) if resume else []
    train_ds, val_ds, info = build_datasets(cfg.data, cfg.seed)
    preflight.check_data(
        train_ds, val_ds, info.classes, cfg.data.batch_size, rt.dist.world_size, cfg.data.name
    )
    warnings = preflight.check_split(
        train_ds.targets, val_ds.targets, info.classes, cfg.data.max_train_samples
    )
    preflight.check_images(train_ds, val_ds, cfg.seed)
    run = Run(cfg, Path(cfg.out), rt, train_ds, val_ds, info, resume)
    if has_test_split(info.record):
        run.test_ds = dataset_from_record(info.record, "test")
    run.stages = _stages(cfg)

    teacher = _build(cfg.teacher, run, weights=cfg.teacher.weights)
    student = _build(cfg.student, run)
    teacher_taps = Taps(teacher, cfg.teacher.taps, "teacher.taps")
    student_taps = Taps(student, cfg.student.taps, "student.taps")
    loss_fn = CompositeLoss(
        cfg.loss,
        cfg.student.taps,
        cfg.teacher.taps,
        kernels_impl=cfg.runtime.kernels,
        label_smoothing=cfg.student.train.label_smoothing,
    )
    loss_fn = loss_fn.to(rt.device)
    if loss_fn.held_out_share():  # drawn as the train/val split is, so that seeds share it
        split_seed = cfg.data.split_seed if cfg.data.split_seed is not None else cfg.seed
        run.train_ds, run.held_out_ds = hold_out(train_ds, loss_fn.held_out_share(), split_seed)
    _probe(run, teacher, student, teacher_taps, student_taps, loss_fn)
    _check_resume_fits(resumed, teacher, student, loss_fn)
    del resumed
    run.cache_plan = teacher_cache.decide(
        cfg.runtime.teacher_cache,
        cfg.runtime.teacher_cache_views,
        cfg.loss.method,
        cfg.data.augment,
        rt.dist.world_size,
        run.train_ds,  # without the images a loss holds out (SoKD's search)
    )
    say(
        run,
        f"checked the config, the data ({len(train_ds)} training / {len(val_ds)} validation images, "
        f"{len(info.classes)} classes), the models and a probe step of each stage in "
        f"{time.perf_counter() - started:.1f} s; {rt.threads} CPU thread(s)",
    )
    for warning in warnings:
        say(run, f"warning: {warning}")
    claim_run(run, overwrite, writer, parent, changed, trained)
    try:
        rows = _train_stages(run, teacher, student, teacher_taps, student_taps, loss_fn)
        results = run_results(rows, data=cfg.data.name, methods=cfg.loss.method)
        results["runtime"] = _runtime_results(run)
        run.position = "writing the results (every stage had finished)"
        if rt.dist.is_main:
            _write_outputs(results, run, student_taps, teacher_taps, loss_fn)
    except KeyboardInterrupt as exc:
        what, code = stop_signal(exc)
        stopped = "interrupted" if what == "Ctrl-C" else f"stopped by {what}"
        raise TrainingInterrupted(
            f"{stopped} at {run.position}; every finished epoch is kept: continue with "
            f"python -m kdfast.train --resume {run.resume_dir}",
            code,
        ) from None
    except UsageError as exc:  # a file that cannot be written, an image that cannot be read, mid-run
        raise UsageError(f"{_kept(exc)}; every finished epoch is kept: {_continue(run.resume_dir)}") from None
    finally:
        run.log.close()
    return results


def _kept(exc: UsageError) -> str:
    """A UsageError raised mid-run as one line: a DataLoader worker re-raises it with its traceback inside,
    whose last line is the error itself."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last.split(": ", 1)[1] if len(lines) > 1 and last.startswith("kdfast.") else " ".join(lines)


def _history(folder: Path) -> list[ResumeRecord]:
    """The ``resumed`` records of the run in ``folder`` (its config.yaml)."""
    return config_from_dict(yaml.safe_load((folder / "config.yaml").read_text())).resumed


def _continue(resume_dir: Path | None) -> str:
    return f"once that is fixed, continue with python -m kdfast.train --resume {resume_dir}"


def _runtime_results(run: Run) -> dict[str, Any]:
    """results.json's ``runtime``: threads, each model's layout, each compiled stage's compile time (cold or
    warm), and which teacher mode the distillation ran in (the cache's mode, views, folder, hit or build)."""
    rt, cfg = run.rt, run.cfg
    plan = run.cache_plan
    cache = run.report.get("teacher_cache") or {"mode": plan.mode, "reason": plan.reason or None}
    return {
        "device": str(rt.device),
        "threads": rt.threads,
        "compile": rt.compile,
        "channels_last": {
            role: rt.model_channels_last(getattr(cfg, role).arch) for role in ("teacher", "student")
        },
        "compile_s": {
            stage: {k: v for k, v in r.items() if k != "line"}
            for stage, r in run.report.get("compile", {}).items()
        },
        "teacher_cache": cache,
    }


def _write_outputs(
    results: dict[str, Any], run: Run, student: Taps, teacher: Taps, loss_fn: CompositeLoss
) -> None:
    """results.json, results.md (with the attention-on-background table), curves.png, attention.png; the
    results table on stdout."""
    out, cfg = run.out, run.cfg
    student.eval()
    if (out / "metrics.jsonl").is_file():  # a run of 0 epochs logs no rows: no curves to draw
        plot_training_curves(out / "metrics.jsonl", out / "curves.png")
    images, labels = next(iter(DataLoader(run.val_ds, batch_size=pictures.SHARE_IMAGES, shuffle=False)))
    shares = pictures.attention_picture(
        student, teacher, loss_fn, images.to(run.rt.device), labels, run.info, cfg, out / "attention.png"
    )
    notes = pictures.background_table(shares, len(images)) if shares else ""
    print(write_results(out, results, notes))
    say(run, f"outputs in {out}")


def _train_stages(
    run: Run,
    teacher: nn.Module,
    student: nn.Module,
    teacher_taps: Taps,
    student_taps: Taps,
    loss_fn: CompositeLoss,
) -> dict[str, dict]:
    """The stages of the run in order; the results table rows."""
    cfg = run.cfg
    if cfg.teacher.weights is None:
        teacher_metrics = run_stage(
            "teacher",
            teacher,
            ce_step(_ddp(teacher, run), cfg.teacher.train.label_smoothing, run.rt.compile),
            cfg.teacher,
            run,
        )
    else:
        teacher_metrics = {**validate_model(teacher, run), **test_metrics(teacher, run)}
        say(run, f"teacher: loaded from {cfg.teacher.weights}, val top-1 {teacher_metrics['top1']:.2f}%")
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
            ce_step(_ddp(baseline, run), cfg.student.train.label_smoothing, run.rt.compile),
            cfg.student,
            run,
        )
        results["baseline"] = {
            "arch": cfg.student.arch.name,
            "params": sum(p.numel() for p in baseline.parameters()),
            **metrics,
        }
        del baseline

    finished = _finished_checkpoint("distill", run, cfg.student.train.epochs)
    cache = None if finished else _teacher_cache(run, teacher, teacher_taps)
    if run.held_out_ds is not None:
        loss_fn.use_held_out(held_out_taps(run, student_taps, teacher_taps))
    metrics = run_stage(
        "distill",
        student,
        distill_step(_ddp(student_taps, run), teacher_taps, loss_fn, run.rt.compile),
        cfg.student,
        run,
        extra=loss_fn,
        cache=cache,
    )
    results["student"] = {
        "arch": cfg.student.arch.name,
        "params": sum(p.numel() for p in student.parameters()),
        **metrics,
    }
    return results


def qad_loss(qad: QadConfig) -> CompositeLoss:
    """QAD's objective, a run objective like any other (through the registry): ``loss.kd`` at
    ``qad.temperature``, tau^2 KL(p_T^tau || p_S^tau) (Hinton et al. 2015, eq. 1 of
    :func:`kdfast.methods.kd.kd_loss`), plus ``qad.ce_weight`` times the CE with the labels."""
    return CompositeLoss(
        read_loss({"method": "kd", "ce": qad.ce_weight, "kd": {"temperature": qad.temperature}})
    )


def qad_stage(
    run: Run, student: nn.Module, teacher: nn.Module, qad: QadConfig, calibration: Tensor
) -> dict[str, float]:
    """The QAD stage: ``student`` transformed by :class:`kdfast.quant.FakeQuant` (weights and activations on
    their int8 grids, exactly where its TensorRT INT8 file quantizes them, straight-through gradients) and
    trained by :func:`train_stage` with :func:`distill_step` against the frozen fp32 ``teacher``
    (:func:`qad_loss`). At the start of every epoch the activation ranges are recalibrated on
    ``calibration`` (MinMax through the float model, as ONNX Runtime's calibrator) and BatchNorm is frozen,
    so the export folds the statistics the fake quantization saw. On return the fake quantization is taken
    off and the weights are left on their per-channel int8 grid (so the INT8 file holds exactly these
    weights). Returns the last epoch's fake-INT8 validation metrics."""
    fq = FakeQuant(student)
    batches = [calibration[i : i + 8].to(run.rt.device) for i in range(0, len(calibration), 8)]

    def prepare_epoch() -> None:
        fq.calibrate(batches)
        freeze_batchnorm(student)

    loss_fn = qad_loss(qad).to(run.rt.device)
    step = distill_step(_ddp(Taps(student, {}), run), Taps(teacher, {}), loss_fn, run.rt.compile)
    try:
        return train_stage(
            "qad", student, step, run.cfg.student.train, run, extra=loss_fn, prepare_epoch=prepare_epoch
        )
    finally:
        fq.remove(bake=True)


def _teacher_cache(run: Run, teacher: nn.Module, teacher_taps: Taps) -> TeacherCache | None:
    """The distillation stage's teacher-output cache as the run's plan says (opened, or built now that the
    teacher is final), or None when the teacher runs at every step; says which. With ``auto``, a cache that
    does not fit on its disk falls back to the live teacher."""
    plan, cfg, rt = run.cache_plan, run.cfg, run.rt
    say(run, f"  {plan.describe()}")
    if not plan.on:
        return None
    key = teacher_cache.cache_key(
        teacher=teacher,
        arch=asdict(cfg.teacher.arch),
        taps=cfg.teacher.taps,
        dataset=run.train_ds,
        plan=plan,
        seed=cfg.seed,
        fp16=_taps_fp16(cfg),
        device=rt.device,
        amp=rt.amp_dtype,
    )
    try:
        cache = teacher_cache.load_or_build(
            teacher_cache.cache_root(cfg.runtime.cache_dir),
            key,
            run.train_ds,
            teacher_forward(teacher_taps, rt.compile),
            batch_size=cfg.data.batch_size,
            fp16=_taps_fp16(cfg),
            device=rt.device,
            autocast=rt.autocast,
            num_workers=cfg.data.num_workers,
            progress=rt.progress,
            say=functools.partial(say, run),
        )
    except teacher_cache.CacheSpaceError as exc:
        if cfg.runtime.teacher_cache is True:
            raise
        run.cache_plan = CachePlan("off", 0, str(exc))
        say(run, f"  {run.cache_plan.describe()}")
        return None
    run.report["teacher_cache"] = cache.report(plan)
    return cache


def _taps_fp16(cfg: Config) -> bool:
    """The teacher taps are cached in float16 when every method of the run tolerates it."""
    return all(method(name).teacher_cache.fp16 for name in cfg.loss.method)


def run_seeds(cfg: Config, resume: bool, overwrite: bool = False) -> dict[str, Any]:
    """The whole run once per seed of ``cfg.seeds``, in ``out/seed<N>/`` (each one a run of its own, checked
    before it writes, resumed where it stopped), then the mean and standard deviation over seeds in
    ``out/results.json`` and ``out/results.md``. The data split stays the one of ``cfg.seed``
    (``data.split_seed``), so the seeds change the initialization, the data order and the augmentation, and a
    fixed teacher never saw a seed's validation images.

    ``out`` itself follows the rules of a single run (:mod:`kdfast.train.rundir`): it is claimed (a fresh
    numbered folder beside an earlier run, or the earlier run removed with ``overwrite``) only once the first
    seed's run has passed every check, and with it ``out/config.yaml`` is written."""
    requested = Path(cfg.out)
    rundir.check_writable(requested, "--resume" if resume else "--out")
    split_seed = cfg.data.split_seed if cfg.data.split_seed is not None else cfg.seed
    data = dataclasses.replace(cfg.data, split_seed=split_seed)
    claimed: list[Path] = []
    changed = _resume_changes(cfg, {}) if resume else []  # each seed checks its own epochs

    def parent(is_main: bool) -> Path:
        """The seeds folder, claimed on rank 0 once the first seed's run passed its checks."""
        if not claimed:
            claimed.append(
                _claim_folder(requested, cfg, resume, overwrite, tqdm.write, changed)
                if is_main
                else requested
            )
        return claimed[0]

    top, runs = requested, {}
    for seed in cfg.seeds:
        folder = top / f"seed{seed}"
        started = resume and (folder / "config.yaml").is_file()
        # a seed's resume history is its own: the epochs each change took effect after differ per seed
        history = _history(folder) if started else []
        one = dataclasses.replace(cfg, seed=seed, seeds=None, out=str(folder), data=data, resumed=history)
        try:
            runs[seed] = run_training(one, resume=started, parent=parent)
        except KeyboardInterrupt as exc:  # in a seed's checks, before it wrote anything
            if not runs:
                raise
            what, code = stop_signal(exc)
            raise TrainingInterrupted(
                f"stopped by {what} before seed {seed} started; the seeds before it are kept: continue with "
                f"python -m kdfast.train --resume {top}",
                code,
            ) from None
        top = Path(one.out).parent
    results = seeds_results(runs)
    if int(os.environ.get("RANK", "0")) == 0:  # as torchrun numbers the processes
        try:
            print(write_results(top, results))
        except WriteError as exc:
            raise UsageError(f"{exc}; every seed's run is kept: {_continue(top)}") from None
        tqdm.write(f"outputs of the {len(runs)} seeds in {top}")
    return results


def train_command(args: argparse.Namespace) -> dict[str, Any]:
    """What ``python -m kdfast.train`` does once its arguments are parsed (:func:`kdfast.train.main` maps the
    errors to exit codes)."""
    try:
        cfg = load_run_config(args)
        if cfg.seeds:
            return run_seeds(cfg, resume=args.resume is not None, overwrite=args.overwrite)
        return run_training(cfg, resume=args.resume is not None, overwrite=args.overwrite)
    finally:
        shutdown_distributed()
