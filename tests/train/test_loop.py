"""End-to-end ``python -m kdfast.train`` on a tiny digits run, the compiled step against eager, and the
divergence stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.runs import TINY, recompute_metrics, train


@pytest.mark.slow
def test_tiny_run_writes_a_student_that_reproduces_its_accuracy(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(out, TINY)
    assert result.returncode == 0, result.stderr
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "teacher.pt",
        "baseline.pt",
        "student.pt",
        "results.json",
        "results.md",
        "curves.png",
        "attention.png",
    ):
        assert (out / name).is_file(), name

    ckpt = torch.load(out / "student.pt", weights_only=True)
    assert ckpt["format"] == "kdfast.student/1"
    assert ckpt["arch"] == {"source": "kdfast", "name": "edge_cnn", "kwargs": {"num_classes": 10}}
    assert ckpt["input"]["size"] == [3, 16, 16]
    assert ckpt["config"]["data"]["max_train_samples"] == 64
    model, top1, top5, loss = recompute_metrics(ckpt, expect_images=48)
    assert ckpt["metrics"]["top1"] == pytest.approx(top1, abs=1e-6)
    assert ckpt["metrics"]["top5"] == pytest.approx(top5, abs=1e-6)
    assert ckpt["metrics"]["loss"] == pytest.approx(loss, rel=1e-5)

    results = json.loads((out / "results.json").read_text())
    assert results["top1_shown"] == "last" and results["method"] == ["kd", "agkd"]
    assert list(results["models"]) == ["teacher", "baseline", "student"]
    student = results["models"]["student"]
    assert student["top1"] == ckpt["metrics"]["top1"]
    assert student["params"] == sum(p.numel() for p in model.parameters())
    table = (out / "results.md").read_text()
    assert f"| distilled student (KD + AGKD) | edge_cnn | {student['params']:,} | {top1:.2f} |" in table
    student_row = next(line for line in table.splitlines() if line.startswith("| distilled student (KD"))
    assert student_row in result.stdout

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val_rows = [r for r in rows if r["split"] == "val"]
    assert [r["stage"] for r in val_rows] == ["teacher", "baseline", "distill"]
    assert val_rows[-1]["top1"] == pytest.approx(top1, abs=1e-6)
    # one epoch: the best epoch is the last; the throughput is that epoch's logged one
    assert (student["best_top1"], student["best_epoch"]) == (student["top1"], 1)
    distill_epoch = next(r for r in rows if r["stage"] == "distill" and r["scope"] == "epoch")
    assert student["images_per_s"] == pytest.approx(distill_epoch["images_per_s"])
    assert student["wall_s"] > 0
    distill_train = next(r for r in rows if r["stage"] == "distill" and r["split"] == "train")
    assert set(distill_train["parts"]) == {"ce", "kd", "agkd"}
    assert ckpt["config"]["loss"]["method"] == ["kd", "agkd"] and ckpt["config"]["loss"]["ce"] == 0.5
    teacher = torch.load(out / "teacher.pt", weights_only=True)
    assert teacher["format"] == "kdfast.teacher/1"


@pytest.mark.parametrize("name", ["cosine", "step"])
def test_schedule_after_warmup_matches_torch_schedulers(name: str) -> None:
    from kdfast.config import ScheduleConfig
    from kdfast.train import lr_factor

    base, epochs, steps = 0.1, 6, 5
    schedule = ScheduleConfig(name=name, warmup_epochs=1, min_lr=0.01, step_size=2, gamma=0.5)
    factor = lr_factor(schedule, epochs, steps, base)
    assert [factor(s) for s in range(steps)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    if name == "cosine":
        reference = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=(epochs - 1) * steps, eta_min=0.01
        )
        offset = steps  # the cosine starts where the warmup ends
    else:
        reference = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2 * steps, gamma=0.5)
        offset = 0  # step decay counts epochs from the start of the run
    expected = []
    for _ in range(epochs * steps):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    ours = [base * factor(s) for s in range(steps, epochs * steps)]
    assert ours == pytest.approx(expected[steps - offset : epochs * steps - offset], rel=1e-9)


@pytest.mark.slow
def test_compiled_distill_step_matches_eager() -> None:
    from kdfast.config import load_config
    from kdfast.methods.compose import CompositeLoss
    from kdfast.models import build_model
    from kdfast.taps import Taps
    from kdfast.train import distill_step

    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    teacher = build_model(
        {"source": "kdfast", "name": "hybrid_teacher_small", "kwargs": {"image_size": 16}}, 10
    )
    student = build_model({"source": "kdfast", "name": "edge_cnn"}, 10)
    teacher.eval().requires_grad_(False)
    student.eval()  # no dropout, BatchNorm on running statistics: both runs see the same function
    loss_fn = CompositeLoss(cfg.loss, cfg.student.taps, cfg.teacher.taps, kernels_impl="reference")
    step = distill_step(Taps(student, cfg.student.taps), Taps(teacher, cfg.teacher.taps), loss_fn)
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))

    eager_loss, eager_parts = step(images, labels)
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad(set_to_none=True)
    # as a run compiles it: the teacher (under inference_mode) and the student's part as two graphs
    compiled = distill_step(Taps(student, cfg.student.taps), Taps(teacher, cfg.teacher.taps), loss_fn, True)
    compiled_loss, compiled_parts = compiled(images, labels)
    compiled_loss.backward()

    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-4, abs=1e-5)
    for key in eager_parts:
        assert compiled_parts[key].item() == pytest.approx(eager_parts[key].item(), rel=1e-4, abs=1e-5)
    for eager, param in zip(eager_grads, student.parameters(), strict=True):
        torch.testing.assert_close(param.grad, eager, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_nan_loss_exits_1_and_keeps_the_last_good_state(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Epoch 1 trains normally; step decay by 1e38 then makes the epoch-2 lr ~1e35 and the logits overflow.
    result = train(
        out,
        [
            *TINY,
            "baseline=false",
            "student.train.epochs=2",
            "student.train.schedule.name=step",
            "student.train.schedule.step_size=1",
            "student.train.schedule.gamma=1e38",
            "runtime.grad_clip=null",
        ],
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "at stage distill epoch 2" in lines[0]
    assert "last good state" in lines[0] and "state_distill.pt" in lines[0]
    assert "lower student.train.optimizer.lr" in lines[0] and "set runtime.grad_clip" in lines[0]
    assert f"--resume {out}" in lines[0]
    state = torch.load(out / "state_distill.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not (out / "student.pt").exists()
