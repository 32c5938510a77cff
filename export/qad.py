"""Post-training quantization against quantization-aware distillation, both on the INT8 file the export
writes: ``python -m export.qad --model QAD_STUDENT.pt [--out DIR]``, and the section of the export report of
a QAD student (``python -m export.trt --model QAD_STUDENT.pt``).

A QAD student (``python -m kdfast.train --qad SOURCE.pt``) records its source student in ``metrics.qad``.
:func:`compare` quantizes both students as ``python -m export.trt`` writes ``student.int8.onnx`` (the TensorRT
layout, MinMax calibration on the training images QAD calibrated on, no layer kept float) and runs both files
with ONNX Runtime on the whole validation split: top-1, the drop against the source in fp32, and top-1
agreement with it. :func:`write` puts the table, ``ptq_vs_qad.json`` and the bar chart ``ptq_vs_qad.png``
beside the student. Of kdfast this module reads only the checkpoint (:mod:`kdfast.checkpoint`).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.backends import batched, torch_runner
from export.onnx_export import export_onnx
from export.ort_backend import make_session, runner
from export.quantize import quantize_file
from kdfast.atomic import atomic_path, atomic_write
from kdfast.checkpoint import (
    build_from_checkpoint,
    file_sha256,
    load_checkpoint,
    load_split,
    rebuilding_data,
)
from kdfast.errors import EXIT_BAD_INPUT, EXIT_OK, UsageError

BATCH = 8  # the batch both INT8 files are run at (any batch gives the same logits)


def int8_logits(model: nn.Module, ckpt: dict, calibration: np.ndarray, images: np.ndarray) -> np.ndarray:
    """``model`` exported and quantized as ``python -m export.trt`` writes ``student.int8.onnx`` (MinMax on
    ``calibration``, no layer kept float), run with ONNX Runtime on ``images``."""
    model = copy.deepcopy(model).cpu().eval()
    with tempfile.TemporaryDirectory(prefix="kdfast-qad-") as work:
        fp32 = export_onnx(
            model,
            torch.from_numpy(calibration[:2]),
            Path(work) / "fp32.onnx",
            max_batch=BATCH,
            metadata={"arch": ckpt["arch"]},
        )
        int8 = quantize_file(fp32, Path(work) / "int8.onnx", calibration)
        session = make_session(int8, threads=torch.get_num_threads())
        return batched(runner(session), images, BATCH)


def _quality(logits: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    predicted = logits.argmax(1)
    return {
        "top1": 100.0 * float(np.mean(predicted == labels)),
        "agreement_with_source": 100.0 * float(np.mean(predicted == reference.argmax(1))),
    }


def source_of(ckpt: dict) -> Path:
    """The source student a QAD student was distilled from, as it was then; one UsageError line when the
    checkpoint is not a QAD student or its source is gone or changed."""
    qad = ckpt["metrics"].get("qad")
    if not isinstance(qad, dict) or "source" not in qad:
        raise UsageError(
            "the checkpoint is not a QAD student (no metrics.qad): give the student.pt of kdfast.train --qad"
        )
    source = Path(qad["source"])
    if not source.is_file() or file_sha256(source) != qad.get("source_sha256"):
        raise UsageError(
            f"the source student of this QAD student, {source}, is gone or has changed since QAD; "
            "post-training INT8 of the source cannot be measured"
        )
    return source


def compare(ckpt: dict, calibration_images: int | None = None) -> dict:
    """PTQ of the source student against INT8 of the QAD student ``ckpt`` (both files run with ONNX Runtime
    on the validation split) beside both students in fp32; ``calibration_images`` defaults to those QAD
    calibrated on."""
    source_path = source_of(ckpt)
    source = build_from_checkpoint(load_checkpoint(source_path))
    model = build_from_checkpoint(ckpt)
    count = calibration_images or ckpt["metrics"]["qad"]["settings"]["calibration_images"]
    with rebuilding_data("PTQ against QAD is measured on the student's validation split"):
        val, labels = (t.numpy() for t in load_split(ckpt, "val"))
        calibration = load_split(ckpt, "train", count)[0].numpy()
    reference = batched(torch_runner(source), val, BATCH)
    own = batched(torch_runner(model), val, BATCH)
    source_top1 = _quality(reference, labels, reference)["top1"]
    ptq = _quality(int8_logits(source, ckpt, calibration, val), labels, reference)
    qad_logits = int8_logits(model, ckpt, calibration, val)
    qad = _quality(qad_logits, labels, reference)
    qad["agreement_with_own_fp32"] = 100.0 * float(np.mean(qad_logits.argmax(1) == own.argmax(1)))
    return {
        "source": str(source_path),
        "validation_images": len(val),
        "calibration_images": len(calibration),
        "source_fp32_top1": source_top1,
        "ptq_int8": {**ptq, "drop": source_top1 - ptq["top1"]},
        "qad_fp32": _quality(own, labels, reference),
        "qad_int8": {**qad, "drop": source_top1 - qad["top1"]},
    }


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


def verdict(summary: dict) -> str:
    """One sentence: whether QAD's accuracy drop on the INT8 file is smaller than post-training INT8's."""
    better = summary["qad_int8"]["drop"] < summary["ptq_int8"]["drop"]
    than = "smaller than" if better else "not smaller than"
    return f"QAD's accuracy drop is **{than}** post-training INT8's."


def write(folder: Path, summary: dict) -> list[Path]:
    """``ptq_vs_qad.json``, ``.md`` and ``.png`` in ``folder``, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "ptq_vs_qad.json", json.dumps(summary, indent=2))
    md = [
        f"# Post-training INT8 against QAD: {summary['source']}",
        "",
        f"INT8 as `python -m export.trt` writes `student.int8.onnx` (MinMax calibration on "
        f"{summary['calibration_images']} training images, no layer kept float), run with ONNX Runtime on "
        f"{summary['validation_images']} validation images. {verdict(summary)}",
        "",
        qad_table(summary),
        "",
        "![post-training INT8 against QAD](ptq_vs_qad.png)",
        "",
    ]
    atomic_write(folder / "ptq_vs_qad.md", "\n".join(md))
    _plot(folder / "ptq_vs_qad.png", summary)
    return [folder / f"ptq_vs_qad.{ext}" for ext in ("json", "md", "png")]


def _plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = ["source fp32", "PTQ INT8", "QAD fp32", "QAD INT8"]
    values = [
        summary["source_fp32_top1"],
        summary["ptq_int8"]["top1"],
        summary["qad_fp32"]["top1"],
        summary["qad_int8"]["top1"],
    ]
    bars = ax.bar(names, values, color=["#777777", "#d95f02", "#7570b3", "#1b9e77"])
    ax.bar_label(bars, fmt="%.2f")
    low = min(values)
    ax.set_ylim(max(0.0, low - max(2.0, 0.2 * (100 - low))), 100.5)
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("post-training INT8 against QAD (ONNX Runtime)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m export.qad``: exit 0 when written, 2 on bad input (one line)."""
    parser = argparse.ArgumentParser(prog="python -m export.qad", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the student.pt that kdfast.train --qad wrote")
    parser.add_argument("--out", help="where ptq_vs_qad.{json,md,png} go (default: beside the model)")
    parser.add_argument(
        "--calib-samples", type=int, help="training images to calibrate on (default: those QAD calibrated on)"
    )
    args = parser.parse_args(argv)
    try:
        if args.calib_samples is not None and args.calib_samples < 2:
            raise UsageError(f"--calib-samples {args.calib_samples}: calibrate on 2 or more images")
        path = Path(args.model)
        ckpt = load_checkpoint(path)
        summary = compare(ckpt, args.calib_samples)
        written = write(Path(args.out) if args.out else path.parent, summary)
    except UsageError as exc:
        print(f"export.qad: error: --model {args.model}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(qad_table(summary))
    print(verdict(summary).replace("**", ""))
    print("written: " + ", ".join(str(p) for p in written))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
