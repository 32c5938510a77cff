"""The export targets (docs/export.md), measured: the default student (``python -m kdfast.train``) and timm
resnet18, mobilenetv3_small_100 and deit_tiny trained on digits with plain cross-entropy, each exported by
``python -m export.trt`` with its defaults, then one summary table.

    .venv/bin/python bench/export_targets.py --default runs/default/student.pt --out runs/export-targets \
        -- --backends ort openvino --baselines eager

Students already trained under ``--out`` are reused; their exports are redone. ``--qad`` also runs
``python -m kdfast.train --qad`` on every student, exports each QAD student and prints a second table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# this checkout's packages and the tests' digits trainer, whatever is installed
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from digits_students import save_student, train_on_digits  # noqa: E402

from export.trt import main as export_main  # noqa: E402
from kdfast.models import build_model  # noqa: E402

# name -> (arch, epochs, AdamW learning rate)
STUDENTS = {
    "resnet18": ({"source": "timm", "name": "resnet18", "kwargs": {}}, 4, 3e-3),
    "mobilenetv3_small_100": ({"source": "timm", "name": "mobilenetv3_small_100", "kwargs": {}}, 8, 3e-3),
    # 8x8 patches: 16 tokens at 32x32 (deit_tiny's own 16x16 patches would leave 4). At 3e-3 it learned
    # nothing in 6 epochs (9-14% top-1); at 5e-4, 86%.
    "deit_tiny": (
        {"source": "timm", "name": "deit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8}},
        6,
        5e-4,
    ),
}

# The fp32 rows the table compares, by column: the eager reference first.
RUNTIMES = {"eager": "pytorch-eager", "ort": "onnxruntime", "openvino": "openvino"}


def _student(out: Path, name: str) -> Path:
    arch, epochs, lr = STUDENTS[name]
    path = out / name / "student.pt"
    if not path.exists():
        print(f"training {name} for {epochs} epochs on digits", file=sys.stderr, flush=True)
        model = train_on_digits(build_model(arch, num_classes=10), epochs=epochs, lr=lr)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_student(path, model, arch, max_val=None, max_train=None)
    return path


def _summary(name: str, report: dict, params: int) -> list[str]:
    rows = {(r["backend"], r["precision"], r["variant"]): r for r in report["rows"]}
    fp32 = {k: rows.get((b, "fp32", None)) for k, b in RUNTIMES.items()}
    int8 = rows.get(("onnxruntime", "int8", None))
    int8_info = report["int8"].get("int8", {})
    layers = [x for x in int8_info.get("layers", []) if x["op"] != "logits"]
    p50 = {k: r["latency"]["end_to_end"][0]["p50_ms"] for k, r in fp32.items() if r and r["latency"]}
    ratios = [f"{p50[k]:.3f} ({p50[k] / p50['eager']:.2f}x)" if k in p50 else "-" for k in RUNTIMES]
    parity = (int8 or {}).get("parity") or {}
    rules = report["files"].get("int8", {}).get("tensorrt_violations")
    return [
        name,
        f"{params:,}",
        f"{100 * fp32['eager']['accuracy']:.2f}",
        "-" if not parity else f"{100 * parity['top1_agreement']:.2f}",
        "-" if not parity else f"{100 * (parity['accuracy_ref'] - parity['accuracy']):.2f}",
        f"{len(int8_info.get('keep_float', []))} of {len(layers)}",
        "-" if rules is None else ("pass" if not rules else f"{len(rules)} violations"),
        f"{p50['eager']:.3f}",
        *ratios[1:],
        str(report["exit_code"]),
    ]


def _qad_rows(students: dict[str, Path], args: argparse.Namespace) -> list[str]:
    """Each student through ``python -m kdfast.train --qad`` (default settings) and its QAD student through
    ``python -m export.trt``: post-training INT8 against QAD, both measured by the QAD run on the whole
    validation split, and how the QAD student's INT8 files verify."""
    from kdfast.train import main as train_main

    header = [
        "student", "source fp32 top-1 %", "PTQ INT8 top-1 % (drop, agreement)", "QAD INT8 top-1 % (drop, "
        "agreement)", "QAD s", "export: ORT int8 agreement %", "export: OpenVINO int8 agreement %", "exit",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, path in students.items():
        folder = args.out / name.split(" ")[0] / "qad"
        print(f"QAD of {name}", file=sys.stderr, flush=True)
        if train_main(["--qad", str(path), "--out", str(folder), "--overwrite"]) != 0:
            raise SystemExit(f"QAD of {name} failed")
        summary = json.loads((folder / "qad.json").read_text())
        out = folder / "export"
        export_main(["--model", str(folder / "student.pt"), "--out", str(out), "--overwrite",
                     "--threads", str(args.threads)] + args.export_args)  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        agreement = {
            r["backend"]: f"{100 * r['parity']['top1_agreement']:.2f}"
            for r in report["rows"]
            if r["precision"] == "int8" and r["variant"] is None and r.get("parity")
        }
        ptq, qad = summary["ptq_int8"], summary["qad_int8"]
        lines.append(
            f"| {name} | {summary['source_fp32_top1']:.2f} | {ptq['top1']:.2f} ({ptq['drop']:+.2f}, "
            f"{ptq['agreement_with_source']:.2f}) | {qad['top1']:.2f} ({qad['drop']:+.2f}, "
            f"{qad['agreement_with_source']:.2f}) | {summary['seconds']:.0f} | "
            f"{agreement.get('onnxruntime', '-')} | {agreement.get('openvino', '-')} | "
            f"{report['exit_code']} |"
        )
    return lines


def run(args: argparse.Namespace) -> None:
    students = {"default (edge_cnn, AGKD)": args.default} if args.default else {}
    students |= {name: _student(args.out, name) for name in STUDENTS}
    header = [
        "student", "params", "fp32 top-1 %", "INT8 agreement %", "INT8 drop (points)", "layers kept float",
        "TensorRT rules", "eager p50 b1 ms", "ORT fp32 p50 b1 ms (/ eager)",
        "OpenVINO fp32 p50 b1 ms (/ eager)", "exit",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, path in students.items():
        out = args.out / name.split(" ")[0] / "export"
        print(f"exporting {name}", file=sys.stderr, flush=True)
        flags = ["--out", str(out), "--overwrite", "--threads", str(args.threads), *args.export_args]
        export_main(["--model", str(path), *flags])
        report = json.loads((out / "report.json").read_text())
        params = sum(t.numel() for t in torch.load(path, weights_only=True)["state_dict"].values())
        lines.append("| " + " | ".join(_summary(name, report, params)) + " |")
        machine = report["machine"]
    print("\n".join(lines))
    if args.qad:
        print("\n".join(["", *_qad_rows(students, args)]))
    print(
        f"\n{machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, {args.threads} threads, "
        f"load average {machine['load_average_start']} -> {machine['load_average_end']} (last export), "
        f"{machine['timestamp']}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--default", type=Path, help="the default run's student.pt (python -m kdfast.train)")
    parser.add_argument("--out", type=Path, default=Path("runs/export-targets"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--qad", action="store_true", help="also QAD every student and export the result")
    parser.add_argument("export_args", nargs="*", help="more flags for export.trt, after --")
    run(parser.parse_args())
