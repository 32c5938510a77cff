"""Training throughput of the distillation step: what the teacher costs (live, or read from the teacher-output
cache) against a CE-only student step, eager against ``torch.compile`` (teacher and student compiled apart),
and channels_last against NCHW per model family on a CPU.

CPU cases (``*_cpu``): the embedded default pair (hybrid_teacher_small -> edge_cnn) at batch 64, 32x32, fp32,
on one batch of real digits images (the training split, no augmentation), torch pinned to 1 thread
(``alternating.CPU_THREADS``); every case of a test runs once per round, the order rotated each round, and
each ratio is taken per round (``bench/alternating.py``), so a drift in the shared machine's load reaches both
sides of a pair. A "cached" case reads the teacher's logits and taps of the batch from a teacher-output cache
built over that split (``kdfast.teacher_cache``) instead of running the teacher; a step is forward, backward,
gradient clipping and the optimizer step, as the loop runs it.

GPU: the paper pair (hybrid_vgg19_vitb16 -> timm efficientnet_b0) at batch 128, 224x224, bf16, with the taps
of ``configs/agkd_vgg19_vitb16_to_effb0.yaml``, piece by piece through ``bench_op`` (``bench/gpu.sh``); a dry
run (``KDFAST_BENCH_DRY=1``, ``bash bench/gpu.sh --dry-run``) runs the same pair on CPU at batch 2, 32x32,
fp32. Weights are random there: speed does not depend on them. The distillation overhead is distill_step -
teacher_forward - ce_step (``bench/render_results.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import shapes
import torch
from alternating import alternate, pin_threads, table
from conftest import BENCH_DEVICE, requires_bench_device
from step_cases import BATCH, SIZE, DefaultPair, trained_step

from kdfast.atomic import atomic_path
from kdfast.config import CONFIG_DIR, load_config
from kdfast.methods.compose import CompositeLoss
from kdfast.models import build_model
from kdfast.taps import Taps
from kdfast.train import ce_step, distill_step, make_optimizer, teacher_forward
from kdfast.train.loop import CPU_CHANNELS_LAST

CPU = torch.device("cpu")
# The full step first: under bench/gpu.sh's time budget its compiled figure matters most.
PIECES = ("distill_step", "teacher_forward", "ce_step")
IMPLS = ("eager", "compiled")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> DefaultPair:
    pin_threads()
    return DefaultPair(tmp_path_factory.mktemp("teacher_cache"), CPU)


def test_cached_distill_step_vs_ce_step_cpu(benchmark, pair: DefaultPair) -> None:
    """Target: the cached KD step at most 1.15x the CE-only step (a speed-up >= 0.87: CE time / its time)."""
    cases = {
        "ce_step": pair.ce(),
        "kd_step": pair.distill("kd", cached=False),
        "kd_step_cached": pair.distill("kd", cached=True),
        "default_step": pair.distill("default", cached=False),
        "default_step_cached": pair.distill("default", cached=True),
    }
    results = alternate(
        benchmark,
        cases,
        baseline="ce_step",
        images=BATCH,
        group="train_step cached cpu",
        case=f"B{BATCH} 3x{SIZE}x{SIZE} fp32",
    )
    print("\n" + table(results))


def test_compiled_vs_eager_cpu(benchmark, pair: DefaultPair) -> None:
    """Each piece eager against compiled (teacher and student compiled apart), alternating per round."""
    cases = {
        "distill_step eager": pair.distill("default", cached=False),
        "distill_step compiled": pair.distill("default", cached=False, compile=True),
        "teacher_forward eager": pair.teacher_forward(),
        "teacher_forward compiled": pair.teacher_forward(compile=True),
        "ce_step eager": pair.ce(),
        "ce_step compiled": pair.ce(compile=True),
    }
    results = alternate(
        benchmark,
        cases,
        baseline={name: name.split()[0] + " eager" for name in cases},
        images=BATCH,
        warmup=3,
        group="train_step compiled cpu",
        case=f"B{BATCH} 3x{SIZE}x{SIZE} fp32",
    )
    print("\n" + table(results))


# One model per family (the others of a family share its layers): kdfast's own, the CIFAR zoo, timm and
# torchvision ImageNet models at CIFAR size. ``kdfast.train.loop.CPU_CHANNELS_LAST`` holds the choice.
FAMILIES = {
    "edge_cnn (kdfast: depthwise-separable)": {"source": "kdfast", "name": "edge_cnn"},
    "hybrid_teacher_small (kdfast: VGG + ViT)": {"source": "kdfast", "name": "hybrid_teacher_small"},
    "resnet8x4 (CIFAR ResNet)": {"source": "kdfast", "name": "resnet8x4"},
    "wrn_16_2 (CIFAR WRN)": {"source": "kdfast", "name": "wrn_16_2"},
    "vgg8 (CIFAR VGG)": {"source": "kdfast", "name": "vgg8"},
    "MobileNetV2 (CIFAR)": {"source": "kdfast", "name": "MobileNetV2"},
    "ShuffleV2 (CIFAR)": {"source": "kdfast", "name": "ShuffleV2"},
    "tnt_distilled_digits (kdfast: TNT)": {"source": "kdfast", "name": "tnt_distilled_digits"},
    "resnet18 (torchvision)": {"source": "torchvision", "name": "resnet18"},
    "efficientnet_b0 (timm)": {"source": "timm", "name": "efficientnet_b0"},
}


def _layout_case(arch: dict, channels_last: bool, images: torch.Tensor, labels: torch.Tensor):
    cfg = load_config(None, [])
    torch.manual_seed(0)
    model = build_model(arch, num_classes=10).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    return trained_step(ce_step(model, 0.0), list(model.parameters()), cfg, CPU, images, labels)


def test_channels_last_cpu(benchmark, pair: DefaultPair) -> None:
    """CE training step NCHW against channels_last, per family, alternating; the ratios as a PNG when
    ``KDFAST_BENCH_PNG`` names one."""
    cases, batch = {}, 32
    images, labels = pair.images[:batch], pair.labels[:batch]
    for family, arch in FAMILIES.items():
        cases[f"{family} NCHW"] = _layout_case(arch, False, images, labels)
        cases[f"{family} channels_last"] = _layout_case(arch, True, images, labels)
    results = alternate(
        benchmark,
        cases,
        baseline={name: name.rsplit(" ", 1)[0] + " NCHW" for name in cases},
        images=batch,
        rounds=9,
        group="train_step channels_last cpu",
        case=f"CE step B{batch} 3x{SIZE}x{SIZE} fp32",
    )
    print("\n" + table(results))
    if os.environ.get("KDFAST_BENCH_PNG"):
        _layout_picture(results, Path(os.environ["KDFAST_BENCH_PNG"]), benchmark.extra_info)


def _layout_picture(results: dict, path: Path, info: dict) -> None:
    """channels_last speed-up per family (NCHW time / channels_last time: median, min-max of the rounds), the
    families ``runtime.channels_last: auto`` puts in channels_last on a CPU in green."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name.rsplit(" ", 1)[0] for name in results if name.endswith("channels_last")]
    stats = [results[f"{name} channels_last"] for name in names]
    medians = np.array([s["ratio"] for s in stats])
    low = [m - s["ratio_min"] for m, s in zip(medians, stats, strict=True)]
    high = [s["ratio_max"] - m for m, s in zip(medians, stats, strict=True)]
    chosen = [FAMILIES[name]["name"] in CPU_CHANNELS_LAST for name in names]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.8))
    ax.barh(
        names, medians, xerr=[low, high], color=["tab:green" if c else "tab:gray" for c in chosen], capsize=3
    )
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of a CE training step in channels_last (NCHW time / channels_last time)")
    ax.set_title(
        "channels_last on CPU training: green = runtime.channels_last auto picks it\n"
        f"batch 32, 32x32, fp32, {info['threads']} torch thread, load {info['load_before']:.1f}-"
        f"{info['load_after']:.1f}, {info['rounds']} alternating rounds (bar: median, whiskers: min-max)",
        fontsize=9,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _make_case(
    piece: str,
    impl: str,
    config: str,
    device: torch.device,
    batch: int,
    size: int,
    amp: torch.dtype | None,
    overrides: tuple[str, ...] = (),
) -> Callable[[], None]:
    """One timed call of ``piece`` on the GPU pair: a teacher forward, or forward, backward and optimizer step
    (compiled: teacher and student apart, as a run compiles them)."""
    # The paper config reads ImageFolder data; a random batch stands in, so its data.root check is skipped.
    cfg = load_config(CONFIG_DIR / config, ["data.name=digits", *overrides])
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    teacher = build_model(asdict(cfg.teacher.arch), num_classes=10).to(device).eval().requires_grad_(False)
    student = build_model(asdict(cfg.student.arch), num_classes=10).to(device).train()
    if cuda:
        teacher, student = (m.to(memory_format=torch.channels_last) for m in (teacher, student))
    images = torch.randn(batch, 3, size, size, device=device)
    if cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    torch._dynamo.reset()  # every case compiles afresh, below dynamo's recompile limit
    compile = impl == "compiled"
    teacher_taps = Taps(teacher, cfg.teacher.taps)

    if piece == "teacher_forward":
        forward = teacher_forward(teacher_taps, compile)

        def run_teacher() -> None:
            with autocast:
                forward(images)

        return run_teacher

    if piece == "ce_step":
        step = ce_step(student, 0.0, compile)
    else:
        loss_fn = CompositeLoss(cfg.loss, cfg.student.taps, cfg.teacher.taps, kernels_impl="auto").to(device)
        step = distill_step(Taps(student, cfg.student.taps), teacher_taps, loss_fn, compile)
    optimizer = make_optimizer(list(student.parameters()), cfg.student.train, device)

    def run_step() -> None:
        with autocast:
            loss, _ = step(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run_step


@requires_bench_device
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("piece", PIECES)
def test_train_step_agkd_paper_pair(bench_op, piece: str, impl: str) -> None:
    if shapes.DRY_RUN:
        batch, size, amp, rounds, warmup = 2, 32, None, 2, 1
    else:
        batch, size, amp, rounds, warmup = shapes.PAPER_PAIR_BATCH, 224, torch.bfloat16, 20, 5
    overrides = (f"teacher.arch.kwargs.image_size={size}",)
    fn = _make_case(piece, impl, "agkd_vgg19_vitb16_to_effb0.yaml", BENCH_DEVICE, batch, size, amp, overrides)
    precision = "bf16" if amp is not None else "fp32"
    bench_op(
        fn,
        BENCH_DEVICE,
        images=batch,
        rounds=rounds,
        warmup=warmup,
        group=f"train_step agkd {size} b{batch}",
        piece=piece,
        impl=impl,
        case=f"{piece} B{batch} 3x{size}x{size} {precision}",
    )
