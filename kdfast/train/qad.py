"""``python -m kdfast.train --qad STUDENT.pt``: quantization-aware distillation of a trained student.

The student is fine-tuned with its weights and activations fake-quantized exactly where and how its
TensorRT INT8 file will quantize them (:mod:`kdfast.quant`), taught by the fp32 student it started from
(``qad.teacher: student``, the default) or by a teacher checkpoint (``qad.teacher: PATH``): the loss is
``T^2 KL(softmax(z_t / T) || softmax(z_s / T))`` plus ``qad.ce_weight`` times the cross-entropy with the
labels. Activation ranges are recalibrated (MinMax, on the images ``python -m export.trt`` calibrates on by
default) at the start of every epoch; BatchNorm statistics stay frozen, so the export folds the same ones.

The result, ``DIR/student.pt``, holds weights already on their per-channel int8 grid (so its INT8 file
holds exactly these weights and only the activations are quantized on export). Before and after, the
command quantizes the source student and the QAD student the way ``python -m export.trt`` writes
``student.int8.onnx`` (MinMax, no layer kept float) and measures both on the validation split with ONNX
Runtime: ``qad.md``/``qad.json``/``qad.png`` show post-training quantization against QAD, and the export
report of the QAD student repeats the comparison.

Every epoch ends with ``state_qad.pt``; ``--resume DIR`` continues a QAD run from it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from kdfast.atomic import atomic_path, atomic_write
from kdfast.checkpoint import (
    STUDENT_FORMAT,
    TEACHER_FORMAT,
    build_from_checkpoint,
    load_checkpoint,
    load_split,
    read_torch_file,
    save_checkpoint,
)
from kdfast.config import set_override
from kdfast.errors import TrainingDiverged, TrainingInterrupted, UsageError
from kdfast.quant import FakeQuant, freeze_batchnorm, uncovered_weighted_ops
from kdfast.schema import build, positive
from kdfast.train import QAD_SETTINGS as SETTINGS_FILE
from kdfast.train import rundir

STATE_FILE = "state_qad.pt"


@dataclass
class QadConfig:
    """``--set qad.<key>=<value>``: the QAD fine-tuning."""

    epochs: int = 3
    lr: float = 1e-4  # AdamW, cosine decay to 0 over the run
    weight_decay: float = 0.0
    batch_size: int = 64
    temperature: float = 1.0
    ce_weight: float = 0.0
    teacher: str = "student"  # the fp32 source student, or the path of a teacher.pt
    calibration_images: int = 128  # export.trt's --calib-samples default: the same images
    augment: bool = True  # the training augmentation recorded in the student's data record
    num_workers: int = 0
    seed: int = 0

    def check(self, where: str = "qad") -> None:
        """What the types cannot say (the schema already refuses negative and non-finite numbers)."""
        for name in ("epochs", "batch_size", "calibration_images", "lr", "temperature"):
            positive(getattr(self, name), f"{where}.{name}")


def read_settings(raw: Any, where: str = "qad") -> QadConfig:
    """The QAD settings from a mapping (``--set qad.*`` or a run's ``qad.yaml``), typed and checked by the
    run schema's machinery; each fault one ConfigError line."""
    cfg = build(QadConfig, raw, where)
    cfg.check(where)
    return cfg


def parse_settings(pairs: list[str]) -> QadConfig:
    """``qad.KEY=VALUE`` pairs (values read as YAML, as every ``--set``) over the defaults; anything else is
    one UsageError."""
    raw: dict[str, Any] = {}
    for pair in pairs:
        if not pair.partition("=")[0].strip().startswith("qad."):
            keys = ", ".join(f.name for f in fields(QadConfig))
            raise UsageError(f"--set {pair}: with --qad only qad.<key>=<value> applies, keys: {keys}")
        set_override(raw, pair)
    return read_settings(raw.get("qad"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class _Inputs:
    ckpt: dict
    source: nn.Module
    teacher: nn.Module
    train: Any
    val: torch.Tensor
    val_labels: torch.Tensor
    calibration: torch.Tensor


def _load_inputs(student: Path, cfg: QadConfig) -> _Inputs:
    """Everything QAD reads, each failure one UsageError line, before any folder is touched."""
    from kdfast.data import dataset_from_record

    if not student.is_file():
        raise UsageError(f"--qad {student}: no such file; pass the student.pt that kdfast.train wrote")
    ckpt = load_checkpoint(student)
    source = build_from_checkpoint(ckpt)
    uncovered = uncovered_weighted_ops(source)
    if uncovered:
        raise UsageError(
            f"--qad {student}: weights outside nn.Conv/nn.Linear modules ({', '.join(uncovered[:3])}) would "
            "be quantized by the export but cannot be simulated; QAD covers students built from those modules"
        )
    if cfg.teacher == "student":
        teacher = copy.deepcopy(source)
    else:
        teacher_ckpt = load_checkpoint(Path(cfg.teacher), expect=None)
        if teacher_ckpt["format"] not in (STUDENT_FORMAT, TEACHER_FORMAT):
            raise UsageError(f"qad.teacher {cfg.teacher} is a {teacher_ckpt['format']!r}, not a kdfast model")
        if teacher_ckpt["classes"] != ckpt["classes"]:
            raise UsageError(f"qad.teacher {cfg.teacher} has other classes than the student")
        teacher = build_from_checkpoint(teacher_ckpt)
    try:
        train = dataset_from_record(ckpt["data"], "train", augment=cfg.augment)
        val, val_labels = load_split(ckpt, "val")
        calibration, _ = load_split(ckpt, "train", cfg.calibration_images)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - a data set that cannot be rebuilt, whatever the reason
        raise UsageError(
            f"--qad {student}: cannot rebuild the student's data ({type(e).__name__}: {e}); QAD trains on it"
        ) from None
    if len(train) < 2:
        raise UsageError(f"--qad {student}: the training split has {len(train)} image; QAD needs 2 or more")
    return _Inputs(ckpt, source, teacher.eval().requires_grad_(False), train, val, val_labels, calibration)


@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """``model``'s float32 logits on CPU for ``images``, computed on the model's device in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat(
        [model(images[i : i + batch].to(device)).float().cpu() for i in range(0, len(images), batch)]
    )


def _int8_logits(model: nn.Module, ckpt: dict, calibration: torch.Tensor, images: torch.Tensor) -> np.ndarray:
    """``model`` exported and quantized as ``python -m export.trt`` writes ``student.int8.onnx`` (MinMax on
    ``calibration``, no layer kept float), run with ONNX Runtime on ``images``."""
    from export.backends import batched
    from export.onnx_export import export_onnx
    from export.ort_backend import make_session, runner
    from export.quantize import quantize_file

    model = copy.deepcopy(model).cpu().eval()
    with tempfile.TemporaryDirectory(prefix="kdfast-qad-") as work:
        fp32 = export_onnx(
            model,
            calibration[:2],
            Path(work) / "fp32.onnx",
            max_batch=8,
            metadata={"arch": ckpt["arch"]},
        )
        int8 = quantize_file(fp32, Path(work) / "int8.onnx", calibration.numpy())
        session = make_session(int8, threads=torch.get_num_threads())
        return batched(runner(session), images.numpy(), 8)


def _quality(logits: np.ndarray | torch.Tensor, labels: torch.Tensor, reference: torch.Tensor) -> dict:
    predicted = np.asarray(logits).argmax(1)
    return {
        "top1": 100.0 * float(np.mean(predicted == labels.numpy())),
        "agreement_with_source": 100.0 * float(np.mean(predicted == reference.argmax(1).numpy())),
    }


def _distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, cfg: QadConfig):
    t = cfg.temperature
    kd = F.kl_div(
        F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), reduction="batchmean", log_target=True
    )
    loss = kd * t * t
    if cfg.ce_weight:
        loss = loss + cfg.ce_weight * F.cross_entropy(student, labels)
    return loss


def _plan_folder(args: argparse.Namespace, student: Path) -> Path:
    requested = Path(args.out) if args.out else student.parent / "qad"
    rundir.check_writable(requested, "--out")
    return requested


def _read_resume(folder: Path) -> tuple[Path, QadConfig, dict | None]:
    """(student, settings, state after the last finished epoch or None) of the QAD run in ``folder``, each
    fault one UsageError line."""
    try:
        saved = yaml.safe_load((folder / SETTINGS_FILE).read_text())
        student, digest, raw = Path(saved["student"]), saved["student_sha256"], saved["qad"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(
            f"--resume {folder}: {SETTINGS_FILE} is not the settings file a QAD run writes "
            f"({type(exc).__name__}: {detail}); start a new run with --qad STUDENT"
        ) from None
    cfg = read_settings(raw, f"{folder / SETTINGS_FILE}: qad")
    if not student.is_file() or _sha256(student) != digest:
        raise UsageError(
            f"--resume {folder}: the student it started from, {student}, is gone or has changed since; "
            "start a new run with --qad STUDENT"
        )
    state_path = folder / STATE_FILE
    if not state_path.exists():
        return student, cfg, None
    state = read_torch_file(state_path, "QAD state")
    if not (isinstance(state, dict) and {"model", "optimizer", "history", "ptq"} <= set(state)):
        raise UsageError(f"--resume {folder}: {state_path} is not a QAD state; delete it to start over")
    return student, cfg, state


def qad_command(args: argparse.Namespace) -> dict:
    """A QAD run (``--qad STUDENT``) or its continuation (``--resume DIR`` on a folder holding one)."""
    if args.resume is not None:
        folder = Path(args.resume)
        if args.set:
            raise UsageError("--resume of a QAD run takes its settings from qad.yaml: drop --set")
        student, cfg, state = _read_resume(folder)
    else:
        if args.config is not None or args.seeds is not None or args.compile is not None:
            raise UsageError(
                "--qad takes its model and data from the student: drop --config / --seeds / --compile"
            )
        student, cfg, state = Path(args.qad), parse_settings(args.set), None
    inputs = _load_inputs(student, cfg)
    if args.resume is None:
        requested = _plan_folder(args, student)
        planned = rundir.plan(requested, args.overwrite)
        folder = rundir.claim(planned, requested, args.overwrite)
        if folder != requested:
            print(
                f"kdfast.train: {requested} holds an earlier run; this QAD run writes to {folder}", flush=True
            )
        atomic_write(
            folder / SETTINGS_FILE,
            yaml.safe_dump({"student": str(student), "student_sha256": _sha256(student), "qad": asdict(cfg)}),
        )
    return _run(folder, student, cfg, inputs, state)


def _run(folder: Path, student: Path, cfg: QadConfig, inputs: _Inputs, state: dict | None) -> dict:
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inputs.source.to(device)
    inputs.teacher.to(device)
    reference = _logits(inputs.source, inputs.val)
    if state is None:
        print(
            f"QAD: post-training INT8 of the source student ({len(inputs.val)} validation images)", flush=True
        )
        ptq = _quality(
            _int8_logits(inputs.source, inputs.ckpt, inputs.calibration, inputs.val),
            inputs.val_labels,
            reference,
        )
        history: list[dict] = []
    else:
        ptq, history = state["ptq"], state["history"]
    model = copy.deepcopy(inputs.source)
    fq = FakeQuant(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        inputs.train,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(inputs.train) > cfg.batch_size,
        num_workers=cfg.num_workers,
        generator=generator,
    )
    total = cfg.epochs * len(loader)
    calibration = [inputs.calibration[i : i + 8].to(device) for i in range(0, len(inputs.calibration), 8)]
    metrics_path = folder / "metrics.jsonl"
    for epoch in range(len(history), cfg.epochs):
        generator.manual_seed(cfg.seed + epoch)  # the same order on --resume
        fq.calibrate(calibration)
        model.train()
        freeze_batchnorm(model)
        losses = []
        bar = tqdm(loader, desc=f"QAD epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        try:
            for step, (x, y) in enumerate(bar):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                t = (epoch * len(loader) + step) / total
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * t))
                with torch.no_grad():
                    target = inputs.teacher(x)
                loss = _distill_loss(model(x), target, y, cfg)
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"QAD loss is {loss.item()} at epoch {epoch + 1}; lower qad.lr (state of the last "
                        f"finished epoch kept in {folder})"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                f"QAD interrupted in epoch {epoch + 1}; continue with --resume {folder}"
            ) from None
        fake = _quality(_logits(model, inputs.val), inputs.val_labels, reference)
        row = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)),
            **{f"fake_int8_{k}": v for k, v in fake.items()},
        }
        history.append(row)
        print(
            f"QAD epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}, fake-INT8 top-1 "
            f"{fake['top1']:.2f}%, agreement with the source {fake['agreement_with_source']:.2f}%",
            flush=True,
        )
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "history": history,
            "ptq": ptq,
        }
        atomic_write(folder / STATE_FILE, lambda f, state=state: torch.save(state, f))
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"stage": "qad", **row}) + "\n")
    fq.remove(bake=True)
    model.eval()
    fp32 = _quality(_logits(model, inputs.val), inputs.val_labels, reference)
    print("QAD: INT8 of the QAD student", flush=True)
    qad_int8_logits = _int8_logits(model, inputs.ckpt, inputs.calibration, inputs.val)
    qad = _quality(qad_int8_logits, inputs.val_labels, reference)
    qad["agreement_with_own_fp32"] = 100.0 * float(
        np.mean(qad_int8_logits.argmax(1) == _logits(model, inputs.val).argmax(1).numpy())
    )
    source_top1 = _quality(reference, inputs.val_labels, reference)["top1"]
    summary = {
        "source": str(student),
        "validation_images": len(inputs.val),
        "source_fp32_top1": source_top1,
        "ptq_int8": {**ptq, "drop": source_top1 - ptq["top1"]},
        "qad_fp32": fp32,
        "qad_int8": {**qad, "drop": source_top1 - qad["top1"]},
        "epochs": history,
        "settings": asdict(cfg),
        "seconds": time.perf_counter() - started,
    }
    ckpt = inputs.ckpt
    save_checkpoint(
        folder / "student.pt",
        model,
        arch=ckpt["arch"],
        input=ckpt["input"],
        classes=ckpt["classes"],
        data=ckpt["data"],
        metrics={
            **{k: v for k, v in ckpt["metrics"].items() if k != "qad"},
            "top1": fp32["top1"],
            "qad": {k: v for k, v in summary.items() if k != "epochs"},
        },
        config={**ckpt["config"], "qad": asdict(cfg), "qad_source": str(student)},
    )
    _write_report(folder, summary)
    print(qad_table(summary))
    print(
        f"QAD student: {folder / 'student.pt'} "
        f"(export it: python -m export.trt --model {folder / 'student.pt'})"
    )
    return summary


def qad_table(summary: dict) -> str:
    """The comparison as a Markdown table: the source in fp32, post-training INT8, QAD in fp32 and INT8."""
    ptq, qad = summary["ptq_int8"], summary["qad_int8"]
    rows = [
        ("source student, fp32", summary["source_fp32_top1"], "-", 100.0),
        ("post-training INT8 (PTQ)", ptq["top1"], f"{ptq['drop']:+.2f}", ptq["agreement_with_source"]),
        (
            "QAD student, fp32 (int8 weights)",
            summary["qad_fp32"]["top1"],
            "-",
            summary["qad_fp32"]["agreement_with_source"],
        ),
        ("QAD student, INT8", qad["top1"], f"{qad['drop']:+.2f}", qad["agreement_with_source"]),
    ]
    lines = [
        "| model | top-1 % | drop vs source fp32 (points) | top-1 agreement with source fp32 % |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {top1:.2f} | {drop} | {agree:.2f} |" for name, top1, drop, agree in rows],
    ]
    return "\n".join(lines)


def _write_report(folder: Path, summary: dict) -> None:
    atomic_write(folder / "qad.json", json.dumps(summary, indent=2))
    better = summary["qad_int8"]["drop"] < summary["ptq_int8"]["drop"]
    verdict = "smaller than" if better else "not smaller than"
    md = [
        f"# QAD: {summary['source']}",
        "",
        f"INT8 as `python -m export.trt` writes `student.int8.onnx` (MinMax calibration on "
        f"{summary['settings']['calibration_images']} training images, no layer kept float), run with ONNX "
        f"Runtime on {summary['validation_images']} validation images. QAD's accuracy drop is **{verdict}** "
        "post-training quantization's.",
        "",
        qad_table(summary),
        "",
        "| epoch | train loss | fake-INT8 top-1 % | fake-INT8 agreement with source % |",
        "| ---: | ---: | ---: | ---: |",
        *[
            f"| {e['epoch']} | {e['train_loss']:.4f} | {e['fake_int8_top1']:.2f} | "
            f"{e['fake_int8_agreement_with_source']:.2f} |"
            for e in summary["epochs"]
        ],
        "",
        "![QAD against post-training quantization](qad.png)",
        "",
    ]
    atomic_write(folder / "qad.md", "\n".join(md))
    _plot(folder / "qad.png", summary)


def _plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["source fp32", "PTQ INT8", "QAD fp32", "QAD INT8"]
    values = [
        summary["source_fp32_top1"],
        summary["ptq_int8"]["top1"],
        summary["qad_fp32"]["top1"],
        summary["qad_int8"]["top1"],
    ]
    bars = left.bar(names, values, color=["#777777", "#d95f02", "#7570b3", "#1b9e77"])
    left.bar_label(bars, fmt="%.2f")
    low = min(values)
    left.set_ylim(max(0.0, low - max(2.0, 0.2 * (100 - low))), 100.5)
    left.set_ylabel("validation top-1 (%)")
    left.set_title("accuracy: source, post-training INT8, QAD")
    epochs = [e["epoch"] for e in summary["epochs"]]
    right.plot(epochs, [e["fake_int8_top1"] for e in summary["epochs"]], "o-", label="fake-INT8 top-1 %")
    right.plot(
        epochs,
        [e["fake_int8_agreement_with_source"] for e in summary["epochs"]],
        "s--",
        label="agreement with source %",
    )
    right.axhline(summary["ptq_int8"]["top1"], color="#d95f02", lw=1, label="PTQ INT8 top-1 %")
    right.set_xticks(epochs)
    right.set_xlabel("QAD epoch")
    right.set_title("during QAD (PyTorch fake quantization)")
    right.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def is_qad_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a QAD run (what ``--resume`` continues with :func:`qad_command`)."""
    return (folder / SETTINGS_FILE).is_file()
