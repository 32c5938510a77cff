"""Training throughput: the AGKD distillation step eager vs ``torch.compile``, and the pieces of its overhead
over plain training (the frozen teacher's forward alone; a CE-only student step; the full distill step).

CPU: the embedded default pair (hybrid_teacher_small -> edge_cnn) at batch 64, 32x32, fp32.
GPU: the paper pair (hybrid_vgg19_vitb16 -> timm efficientnet_b0) at batch 128, 224x224, bf16, with the taps
of ``configs/agkd_vgg19_vitb16_to_effb0.yaml``; a dry run (``KDFAST_BENCH_DRY=1``, ``bash bench/gpu.sh
--dry-run``) runs the same pair on CPU at batch 2, 32x32, fp32. Weights are random: speed does not depend on
them. The distillation overhead is distill_step - teacher_forward - ce_step (``bench/render_results.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict

import pytest
import shapes
import torch
from conftest import BENCH_DEVICE, requires_bench_device

from kdfast.config import CONFIG_DIR, load_config
from kdfast.methods.compose import CompositeLoss
from kdfast.models import build_model
from kdfast.taps import Taps
from kdfast.train import ce_step, distill_step, make_optimizer

# The full step first: under bench/gpu.sh's time budget its compiled figure matters most.
PIECES = ("distill_step", "teacher_forward", "ce_step")
IMPLS = ("eager", "compiled")


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
    """One timed call of ``piece``: a no_grad teacher forward, or forward, backward and optimizer step."""
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

    if piece == "teacher_forward":
        forward = torch.compile(teacher) if impl == "compiled" else teacher

        def run_teacher() -> None:
            with torch.no_grad(), autocast:
                forward(images)

        return run_teacher

    if piece == "ce_step":
        step = ce_step(student, label_smoothing=0.0)
    else:
        loss_fn = CompositeLoss(cfg.loss, cfg.student.taps, cfg.teacher.taps, kernels_impl="auto").to(device)
        step = distill_step(Taps(student, cfg.student.taps), Taps(teacher, cfg.teacher.taps), loss_fn)
    step = torch.compile(step) if impl == "compiled" else step
    optimizer = make_optimizer(list(student.parameters()), cfg.student.train, device)

    def run_step() -> None:
        with autocast:
            loss, _ = step(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run_step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("piece", PIECES)
def test_train_step_default_cpu(bench_op, piece: str, impl: str) -> None:
    batch, size = 64, 32
    fn = _make_case(piece, impl, "default.yaml", torch.device("cpu"), batch, size, amp=None)
    bench_op(
        fn,
        "cpu",
        images=batch,
        rounds=25,
        warmup=3,
        group="train_step default cpu",
        piece=piece,
        impl=impl,
        case=f"{piece} B{batch} 3x{size}x{size} fp32",
    )


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
