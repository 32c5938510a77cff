"""``python -m kdfast.train --qad STUDENT.pt``: quantization-aware distillation of a trained student, the QAD
stage of the training loop (:func:`kdfast.train.loop.qad_stage`) run on its own from a checkpoint.

This module holds what is particular to running that stage from a ``student.pt``: the ``qad`` settings
(:class:`kdfast.config.QadConfig`, ``--set qad.KEY=VALUE``, and ``runtime.KEY=VALUE`` as in any run), the
models and data the checkpoint gives, the folder and its settings file ``qad.yaml`` (what ``--resume DIR``
continues from), and what the run writes: ``DIR/student.pt`` with weights on their per-channel int8 grid and
``metrics.qad``, ``qad.json`` / ``qad.md`` / ``qad.png`` (the source in fp32, fake-INT8 accuracy per epoch,
the QAD student in fp32). The training itself, with its state per epoch (``state_qad.pt``), resume, DDP,
AMP and compilation, is the one loop's. Post-training INT8 against QAD on the INT8 file the export writes is
measured by the export (:mod:`export.qad`).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from kdfast.atomic import atomic_path, atomic_write
from kdfast.checkpoint import (
    STUDENT_FORMAT,
    TEACHER_FORMAT,
    build_from_checkpoint,
    file_sha256,
    load_checkpoint,
    load_split,
    rebuilding_data,
    save_checkpoint,
)
from kdfast.config import (
    ArchSpec,
    Config,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    QadConfig,
    RuntimeConfig,
    StageConfig,
    read_qad,
    set_override,
)
from kdfast.data import DataInfo, dataset_from_record
from kdfast.distributed import shutdown_distributed
from kdfast.errors import TrainingInterrupted, UsageError
from kdfast.quant import uncovered_weighted_ops
from kdfast.schema import build
from kdfast.train import QAD_SETTINGS as SETTINGS_FILE
from kdfast.train import loop, preflight, rundir

# The QAD run's runtime unless --set runtime.* says otherwise: float32 (the fake quantization reproduces
# float32 arithmetic on int8 grids; bf16 would move values across rounding boundaries), no gradient clipping
# (fine-tuning at a small lr, as before the stage joined the loop).
QAD_RUNTIME = {"amp": "fp32", "grad_clip": None}


def parse_settings(pairs: list[str], compile: str | None = None) -> tuple[QadConfig, RuntimeConfig]:
    """``qad.KEY=VALUE`` and ``runtime.KEY=VALUE`` pairs (values read as YAML, as every ``--set``) over the
    defaults, and ``--compile``; anything else is one UsageError."""
    raw: dict[str, Any] = {}
    for pair in pairs:
        if not pair.partition("=")[0].strip().startswith(("qad.", "runtime.")):
            keys = ", ".join(f.name for f in fields(QadConfig))
            raise UsageError(
                f"--set {pair}: with --qad only qad.<key>=<value> applies (and runtime.<key>=<value>), "
                f"qad keys: {keys}"
            )
        set_override(raw, pair)
    if compile is not None:
        set_override(raw, f"runtime.compile={ {'auto': 'auto', 'on': 'true', 'off': 'false'}[compile] }")
    runtime = build(RuntimeConfig, {**QAD_RUNTIME, **raw.get("runtime", {})}, "runtime")
    return read_qad(raw.get("qad")), runtime


def _read_resume(folder: Path) -> tuple[Path, QadConfig, RuntimeConfig]:
    """(student, settings, runtime) of the QAD run in ``folder``, each fault one UsageError line."""
    try:
        saved = yaml.safe_load((folder / SETTINGS_FILE).read_text())
        student, digest, raw = Path(saved["student"]), saved["student_sha256"], saved["qad"]
        raw_runtime = saved.get("runtime", QAD_RUNTIME)
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(
            f"--resume {folder}: {SETTINGS_FILE} is not the settings file a QAD run writes "
            f"({type(exc).__name__}: {detail}); start a new run with --qad STUDENT"
        ) from None
    cfg = read_qad(raw, f"{folder / SETTINGS_FILE}: qad")
    runtime = build(RuntimeConfig, raw_runtime, f"{folder / SETTINGS_FILE}: runtime")
    if not student.is_file() or file_sha256(student) != digest:
        raise UsageError(
            f"--resume {folder}: the student it started from, {student}, is gone or has changed since; "
            "start a new run with --qad STUDENT"
        )
    return student, cfg, runtime


def _models(student: Path, cfg: QadConfig) -> tuple[dict, nn.Module, nn.Module]:
    """(checkpoint, the student to fine-tune, its frozen fp32 teacher), each failure one UsageError line."""
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
    return ckpt, source, teacher.eval().requires_grad_(False)


def _run_config(ckpt: dict, cfg: QadConfig, runtime: RuntimeConfig, out: Path) -> Config:
    """The QAD run as a run config: the student's architecture, the stage's optimizer (AdamW at ``qad.lr``,
    cosine decay to 0 over the run), batch size, workers and seed from ``qad``, the given runtime."""
    stage = StageConfig(
        epochs=cfg.epochs, optimizer=OptimizerConfig(name="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    )
    return Config(
        seed=cfg.seed,
        out=str(out),
        data=DataConfig(batch_size=cfg.batch_size, num_workers=cfg.num_workers),
        student=ModelConfig(arch=ArchSpec(**ckpt["arch"]), train=stage),
        baseline=False,
        runtime=runtime,
    )


def qad_command(args: argparse.Namespace) -> dict:
    """A QAD run (``--qad STUDENT``) or its continuation (``--resume DIR`` on a folder holding one)."""
    try:
        if args.resume is not None:
            if args.set:
                raise UsageError("--resume of a QAD run takes its settings from qad.yaml: drop --set")
            folder = Path(args.resume)
            student, cfg, runtime = _read_resume(folder)
            return run_qad(student, cfg, runtime, folder, resume=True)
        if args.config is not None or args.seeds is not None:
            raise UsageError("--qad takes its model and data from the student: drop --config / --seeds")
        student = Path(args.qad)
        cfg, runtime = parse_settings(args.set, args.compile)
        requested = Path(args.out) if args.out else student.parent / "qad"
        return run_qad(student, cfg, runtime, requested, resume=False, overwrite=args.overwrite)
    finally:
        shutdown_distributed()


def run_qad(
    student: Path, cfg: QadConfig, runtime: RuntimeConfig, out: Path, resume: bool, overwrite: bool = False
) -> dict:
    """Read and check everything, claim ``out`` (a fresh numbered folder beside an earlier run, unless
    ``resume``), run the QAD stage and write the outputs; returns the summary (``qad.json``)."""
    started = time.perf_counter()
    rundir.check_writable(out, "--resume" if resume else "--out")
    ckpt, model, teacher = _models(student, cfg)
    run_cfg = _run_config(ckpt, cfg, runtime, out)
    rt = loop.resolve_runtime(run_cfg)
    try:
        with rebuilding_data("QAD trains on it"):
            train_ds = dataset_from_record(ckpt["data"], "train", augment=cfg.augment)
            val_ds = dataset_from_record(ckpt["data"], "val")
            calibration, _ = load_split(ckpt, "train", cfg.calibration_images)
    except UsageError as e:
        raise UsageError(f"--qad {student}: {e}") from None
    if len(train_ds) < 2:
        raise UsageError(
            f"--qad {student}: the training split has {len(train_ds)} image; QAD needs 2 or more"
        )
    size = ckpt["input"]["size"][-1]
    info = DataInfo(ckpt["classes"], size, ckpt["input"]["mean"], ckpt["input"]["std"], ckpt["data"])
    run = loop.Run(run_cfg, out, rt, train_ds, val_ds, info, resume, stages=["qad"])

    def claim(requested: Path) -> Path:
        if resume:
            print(f"kdfast.train: resuming the QAD run in {requested}", flush=True)
            return requested
        folder = rundir.claim(rundir.plan(requested, overwrite), requested, overwrite)
        if folder != requested:
            print(
                f"kdfast.train: {requested} holds an earlier run; this QAD run writes to {folder}", flush=True
            )
        settings = {
            "student": str(student.resolve()),
            "student_sha256": file_sha256(student),
            "qad": asdict(cfg),
            "runtime": asdict(runtime),
        }
        atomic_write(folder / SETTINGS_FILE, yaml.safe_dump(settings))
        return folder

    loop.claim_run(run, overwrite, None, None, claim=claim)
    model, teacher = model.to(rt.device), teacher.to(rt.device)
    source_top1 = loop.validate_model(model, run)["top1"]
    loop.say(
        run, f"QAD of {student}: {cfg.epochs} epoch(s) on {len(train_ds)} images, taught by {cfg.teacher}"
    )
    try:
        fake = loop.qad_stage(run, model, teacher, cfg, calibration)
    except KeyboardInterrupt:
        raise TrainingInterrupted(
            f"QAD interrupted at {run.position}; every finished epoch is kept: "
            f"continue with --resume {run.out}"
        ) from None
    finally:
        run.log.close()
    qad_fp32 = loop.validate_model(model, run)
    if not rt.dist.is_main:
        return {}
    summary = {
        "source": str(student.resolve()),
        "source_sha256": file_sha256(student),
        "validation_images": len(val_ds),
        "source_fp32_top1": source_top1,
        "fake_int8": {"top1": fake["top1"], "top5": fake["top5"]},
        "qad_fp32": {"top1": qad_fp32["top1"], "top5": qad_fp32["top5"]},
        "epochs": _epochs(run.out / "metrics.jsonl"),
        "settings": asdict(cfg),
        "seconds": time.perf_counter() - started,
    }
    save_checkpoint(
        run.out / "student.pt",
        model,
        arch=ckpt["arch"],
        input=ckpt["input"],
        classes=ckpt["classes"],
        data=ckpt["data"],
        metrics={
            **{k: v for k, v in ckpt["metrics"].items() if k != "qad"},
            "top1": summary["qad_fp32"]["top1"],
            "qad": {k: v for k, v in summary.items() if k != "epochs"},
        },
        config={**ckpt["config"], "qad": asdict(cfg), "qad_source": summary["source"]},
    )
    _write_report(run.out, summary)
    print(training_table(summary))
    print(
        f"QAD student: {run.out / 'student.pt'} (post-training INT8 against QAD on the INT8 file: "
        f"python -m export.qad --model {run.out / 'student.pt'}; export it: "
        f"python -m export.trt --model {run.out / 'student.pt'})"
    )
    return summary


def _epochs(metrics: Path) -> list[dict[str, Any]]:
    """Per QAD epoch, from the loop's ``metrics.jsonl``: the train loss and the fake-INT8 validation top-1."""
    rows = [r for r in preflight.read_metrics(metrics) if r["stage"] == "qad" and r["scope"] == "epoch"]
    train = {r["epoch"]: r["loss"] for r in rows if r["split"] == "train"}
    return [
        {"epoch": r["epoch"], "train_loss": train[r["epoch"]], "fake_int8_top1": r["top1"]}
        for r in rows
        if r["split"] == "val"
    ]


def training_table(summary: dict) -> str:
    """What the QAD run measured in PyTorch on the validation split, as a Markdown table: the source in fp32,
    the fake-quantized student after the last epoch, the QAD student in fp32 (int8 weights, float
    activations)."""
    rows = [
        ("source student, fp32", summary["source_fp32_top1"]),
        ("QAD student, fake INT8 (PyTorch)", summary["fake_int8"]["top1"]),
        ("QAD student, fp32 (int8 weights)", summary["qad_fp32"]["top1"]),
    ]
    lines = [
        "| model | top-1 % | drop vs source fp32 (points) |",
        "| --- | ---: | ---: |",
        *[f"| {name} | {top1:.2f} | {summary['source_fp32_top1'] - top1:+.2f} |" for name, top1 in rows],
    ]
    return "\n".join(lines)


def _write_report(folder: Path, summary: dict) -> None:
    atomic_write(folder / "qad.json", json.dumps(summary, indent=2))
    md = [
        f"# QAD: {summary['source']}",
        "",
        f"Measured in PyTorch on {summary['validation_images']} validation images; the fake quantization "
        "is the TensorRT INT8 layout, its activation ranges calibrated on "
        f"{summary['settings']['calibration_images']} training images (MinMax). Post-training INT8 against "
        "QAD, both on the INT8 file the export writes and run with ONNX Runtime: "
        "`python -m export.qad --model student.pt` (also in the export report).",
        "",
        training_table(summary),
        "",
        "| epoch | train loss | fake-INT8 top-1 % |",
        "| ---: | ---: | ---: |",
        *[f"| {e['epoch']} | {e['train_loss']:.4f} | {e['fake_int8_top1']:.2f} |" for e in summary["epochs"]],
        "",
        "![fake-INT8 accuracy during QAD](qad.png)",
        "",
    ]
    atomic_write(folder / "qad.md", "\n".join(md))
    _plot(folder / "qad.png", summary)


def _plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [e["epoch"] for e in summary["epochs"]]
    ax.plot(epochs, [e["fake_int8_top1"] for e in summary["epochs"]], "o-", label="fake-INT8 top-1 %")
    ax.axhline(summary["source_fp32_top1"], color="#777777", lw=1, label="source fp32 top-1 %")
    ax.axhline(summary["qad_fp32"]["top1"], color="#7570b3", lw=1, ls="--", label="QAD fp32 top-1 %")
    ax.set_xticks(epochs)
    ax.set_xlabel("QAD epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("during QAD (PyTorch fake quantization)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
