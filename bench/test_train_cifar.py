"""One CIFAR-shaped distillation epoch of the benchmark pair ResNet32x4 -> ResNet8x4, eager against
``torch.compile``, for every method with a config for the pair (``configs/benchmarks/cifar100/<method>/
resnet32x4_resnet8x4.yaml``: KD today, DKD and the others as their configs land).

An epoch is 781 steps at batch 64 (50,000 training images, the last partial batch dropped) of 32x32 images
and 100 classes, bf16 autocast and channels_last as ``runtime: auto`` gives on a GPU: the frozen teacher's
forward, the student's forward, the method's loss, backward and the config's SGD step. The batches are 16
random ones resident on the GPU, cycled, so data loading is not timed. Weights are random: speed does not
depend on them. GPU only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import requires_cuda

from kdfast.config import CONFIG_DIR, load_config
from kdfast.methods.compose import CompositeLoss
from kdfast.models import build_model
from kdfast.taps import Taps
from kdfast.train import distill_step, make_optimizer

PAIR_CONFIGS = sorted(CONFIG_DIR.glob("benchmarks/cifar100/*/resnet32x4_resnet8x4.yaml"))
BATCH, SIZE, CLASSES, STEPS = 64, 32, 100, 50_000 // 64
IMPLS = ("eager", "compiled")


def _epoch(config: Path, impl: str, device: torch.device) -> Callable[[], None]:
    # The config reads CIFAR-100 and a teacher file; random batches and weights stand in, so both checks are
    # skipped (data.name digits needs no folder, teacher.weights null needs no file).
    cfg = load_config(config, ["data.name=digits", "teacher.weights=null"])
    torch.manual_seed(0)
    teacher = (
        build_model(asdict(cfg.teacher.arch), num_classes=CLASSES).to(device).eval().requires_grad_(False)
    )
    student = build_model(asdict(cfg.student.arch), num_classes=CLASSES).to(device).train()
    teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
    loss_fn = CompositeLoss(cfg.loss, cfg.student.taps, cfg.teacher.taps, kernels_impl="auto").to(device)
    loss_fn.prepare_student(student)
    step = distill_step(Taps(student, cfg.student.taps), Taps(teacher, cfg.teacher.taps), loss_fn)
    torch._dynamo.reset()
    step = torch.compile(step) if impl == "compiled" else step
    params = [p for m in (student, loss_fn) for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg.student.train, device)
    batches = [
        (
            torch.randn(BATCH, 3, SIZE, SIZE, device=device).contiguous(memory_format=torch.channels_last),
            torch.randint(0, CLASSES, (BATCH,), device=device),
        )
        for _ in range(16)
    ]

    def run_epoch() -> None:
        for i in range(STEPS):
            images, labels = batches[i % len(batches)]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = step(images, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return run_epoch


@requires_cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", PAIR_CONFIGS, ids=[p.parent.name for p in PAIR_CONFIGS])
def test_cifar_epoch_resnet32x4_resnet8x4(bench_op, benchmark, config: Path, impl: str) -> None:
    method = config.parent.name
    bench_op(
        _epoch(config, impl, torch.device("cuda")),
        "cuda",
        rounds=3,
        warmup=1,
        group=f"cifar epoch resnet32x4->resnet8x4 {method}",
        piece="epoch",
        impl=impl,
        case=f"{method} epoch {STEPS}x B{BATCH} 3x{SIZE}x{SIZE} bf16",
    )
    benchmark.extra_info["images_per_s"] = round(STEPS * BATCH / benchmark.stats.stats.median, 1)
