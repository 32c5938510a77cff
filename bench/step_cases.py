"""The training steps the step benchmarks time (``test_train_step.py``, ``test_train_torchdistill.py``): the
embedded default pair (hybrid_teacher_small -> edge_cnn, random weights) on one batch of real digits images
(the training split at 32x32, no augmentation), each case with its own copy of the student and its own
optimizer, and teacher-output caches of the split as a run builds them (``kdfast.teacher_cache``).

Each kdfast case lays its student out as a run does (``runtime.channels_last: auto``: channels_last on a GPU,
and on a CPU for the families measured faster so, edge_cnn among them; ``Runtime.model_channels_last``);
``layout="NCHW"`` keeps it contiguous. A step is what the loop runs per batch: forward, backward, gradient
clipping at ``runtime.grad_clip``'s default and the optimizer step; a "cached" step also reads the batch's
rows from the cache.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from kdfast.config import AugmentConfig, Config, DataConfig, load_config
from kdfast.data import build_datasets
from kdfast.distributed import DistInfo
from kdfast.methods.compose import CompositeLoss
from kdfast.models import build_model
from kdfast.taps import Taps
from kdfast.teacher_cache import CachePlan, TeacherCache, cache_key, load_or_build
from kdfast.train import ce_step, distill_step, make_optimizer, teacher_forward
from kdfast.train.loop import Runtime

BATCH, SIZE = 64, 32
GRAD_CLIP = 5.0  # runtime.grad_clip's default
RECIPES = {"kd": "kd_digits", "default": None}  # configs/kd_digits.yaml (CE + KD), the default (KD + AGKD)


def trained_step(
    step: Callable, params: list[torch.nn.Parameter], cfg: Config, device: torch.device, *batch
) -> Callable[[], None]:
    """One loop step of ``step`` on ``batch``: forward, backward, clipping, the optimizer step."""
    optimizer = make_optimizer(params, cfg.student.train, device)

    def run() -> None:
        loss, _ = step(*batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()

    return run


class DefaultPair:
    """The default pair on one real batch on ``device``; ``cache_root`` holds its teacher-output caches."""

    def __init__(self, cache_root: Path, device: torch.device) -> None:
        self.cache_root, self.device = cache_root, device
        self.cfg = load_config(None, ["data.augment.crop_padding=0"])
        torch.manual_seed(0)
        self.teacher = build_model(asdict(self.cfg.teacher.arch), num_classes=10).to(device)
        self.teacher.eval().requires_grad_(False)
        self.student = build_model(asdict(self.cfg.student.arch), num_classes=10).to(device).train()
        self.dataset = build_datasets(DataConfig(image_size=SIZE, augment=AugmentConfig()), seed=0)[0]
        self.rows = np.arange(BATCH)
        self.images = torch.stack([self.dataset[i][0] for i in range(BATCH)]).to(device)
        self.labels = torch.tensor(self.dataset.targets[:BATCH]).to(device)
        cuda = device.type == "cuda"
        self.runtime = Runtime(
            device, None, cuda, False, False, torch.get_num_threads(), DistInfo(), not cuda
        )

    def new_student(self, layout: str = "run") -> torch.nn.Module:
        """A copy of the student, in the layout a run gives it (``"run"``) or contiguous (``"NCHW"``)."""
        student = copy.deepcopy(self.student)
        if layout == "run" and self.runtime.model_channels_last(self.cfg.student.arch):
            student = student.to(memory_format=torch.channels_last)
        return student

    def recipe(self, name: str) -> Config:
        return load_config(RECIPES[name]) if RECIPES[name] else self.cfg

    def cache(self, taps: dict) -> TeacherCache:
        """The cache of the teacher's logits and ``taps`` over the split, as a run with these taps has it."""
        key = cache_key(
            teacher=self.teacher,
            arch=asdict(self.cfg.teacher.arch),
            taps=taps,
            dataset=self.dataset,
            plan=CachePlan("deterministic", 1),
            seed=0,
            fp16=True,
            device=self.device,
            amp=None,
        )
        forward = teacher_forward(Taps(self.teacher, taps))
        return load_or_build(
            self.cache_root, key, self.dataset, forward, batch_size=BATCH, fp16=True, device=self.device
        )

    def ce(self, compile: bool = False) -> Callable[[], None]:
        student = self.new_student()
        step = ce_step(student, 0.0, compile)
        return trained_step(step, list(student.parameters()), self.cfg, self.device, self.images, self.labels)

    def distill_parts(
        self, recipe: str, layout: str = "run"
    ) -> tuple[torch.nn.Module, Taps, Taps, CompositeLoss]:
        """A fresh student (in ``layout``), both Taps and the recipe's loss module, sized on the batch."""
        cfg = self.recipe(recipe)
        student = self.new_student(layout)
        student_taps = Taps(student, cfg.student.taps)
        teacher_taps = Taps(self.teacher, cfg.teacher.taps)
        loss_fn = CompositeLoss(cfg.loss, cfg.student.taps, cfg.teacher.taps, kernels_impl="auto").to(
            self.device
        )
        with torch.no_grad():
            loss_fn.check(student_taps(self.images)[1], teacher_taps(self.images)[1])
        return student, student_taps, teacher_taps, loss_fn

    def distill(
        self, recipe: str, *, cached: bool, compile: bool = False, layout: str = "run"
    ) -> Callable[[], None]:
        """A distillation step of ``recipe`` ("kd" or "default"), the teacher live or read from the cache."""
        cfg = self.recipe(recipe)
        student, student_taps, teacher_taps, loss_fn = self.distill_parts(recipe, layout)
        step = distill_step(student_taps, teacher_taps, loss_fn, compile)
        params = [*student.parameters(), *loss_fn.parameters()]
        if cached:
            cache, rows, device = self.cache(cfg.teacher.taps), self.rows, self.device

            def cached_step(images: torch.Tensor, labels: torch.Tensor) -> tuple:
                return step(images, labels, *cache.outputs(rows, device))

            return trained_step(cached_step, params, cfg, self.device, self.images, self.labels)
        return trained_step(step, params, cfg, self.device, self.images, self.labels)

    def teacher_forward(self, compile: bool = False) -> Callable[[], object]:
        forward = teacher_forward(Taps(self.teacher, self.cfg.teacher.taps), compile)
        return lambda: forward(self.images)
