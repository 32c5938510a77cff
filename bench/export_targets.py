"""The export targets (docs/export.md), measured: the default student (``python -m kdfast.train``) and timm
resnet18, mobilenetv3_small_100 and deit_tiny trained on digits with plain cross-entropy, each exported by
``python -m export.trt`` with its defaults, then one summary table: per runtime the INT8 file the report
ships at the largest batch, its throughput over the fp32 file on the same runtime (paired rounds) and its
gates.

    .venv/bin/python bench/export_targets.py --default runs/default/student.pt --out runs/export-targets \
        --students resnet18 mobilenetv3_small_100 --repeat 2 -- --backends ort openvino --threads 1

``--repeat 2`` exports each student twice in a row and prints every x-eager figure of both runs side by
side with their difference (the target: within 25%). Students already trained under ``--out`` are reused;
their exports are redone. ``--qad`` also runs ``python -m kdfast.train --qad`` on every student, exports each
QAD student and prints a second table.
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
from support.students import save_student, train_on_digits  # noqa: E402

from export.report import at_batch, fastest, precision_label, verified  # noqa: E402
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

# The runtimes whose INT8 speed the table reports.
RUNTIMES = ("onnxruntime", "openvino")


def _student(out: Path, name: str) -> Path:
    arch, epochs, lr = STUDENTS[name]
    path = out / name / "student.pt"
    if not path.exists():
        print(f"training {name} for {epochs} epochs on digits", file=sys.stderr, flush=True)
        model = train_on_digits(build_model(arch, num_classes=10), epochs=epochs, lr=lr)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_student(path, model, arch, max_val=None, max_train=None)
    return path


def _int8_cell(report: dict, runtime: str) -> str:
    """The INT8 row ``runtime`` ships at the largest batch (of its verified INT8 rows, the one the report's
    What to ship rule picks, fp32 included as the alternative), its x fp32 and gates."""
    last = report["protocol"]["batch_sizes"][-1]
    rows = [r for r in report["rows"] if r["backend"] == runtime and r["precision"] in ("fp32", "int8")]
    timed = [(r, at_batch(r, last)) for r in rows if verified(r) and at_batch(r, last)]
    int8 = [r for r in rows if r["precision"] == "int8" and at_batch(r, last)]
    if not timed or not int8:
        return "-"
    best = max(int8, key=lambda r: (at_batch(r, last).get("vs_fp32") or {}).get("median", 0.0))
    ratio, parity = at_batch(best, last).get("vs_fp32"), best["parity"] or {}
    shipped = fastest(timed)[0]
    drop = 100 * (parity["accuracy_ref"] - parity["accuracy"])
    return (
        f"{ratio['median']:.2f}x [{ratio['q25']:.2f}-{ratio['q75']:.2f}] {precision_label(best)}, "
        f"{100 * parity['top1_agreement']:.2f}% / {drop:.2f} pt"
        + ("" if verified(best) else " FAILS its gates")
        + ("" if shipped is best else f" (ships {precision_label(shipped)})")
    )


def _summary(name: str, report: dict, params: int) -> list[str]:
    rows = {(r["backend"], r["precision"], r["variant"]): r for r in report["rows"]}
    eager = rows[("pytorch-eager", "fp32", None)]
    rules = report["files"].get("int8", {}).get("tensorrt_violations")
    return [
        name,
        f"{params:,}",
        f"{100 * eager['accuracy']:.2f}",
        f"{eager['latency']['end_to_end'][0]['p50_ms']:.3f}" if eager["latency"] else "-",
        *(_int8_cell(report, runtime) for runtime in RUNTIMES),
        "-" if rules is None else ("pass" if not rules else f"{len(rules)} violations"),
        str(report["exit_code"]),
    ]


def _stability(name: str, reports: list[dict]) -> list[str]:
    """Every x-eager figure of each run, per row and batch size, and the largest relative difference."""
    lines = []
    for rows in zip(*(r["rows"] for r in reports), strict=True):
        for batch in reports[0]["protocol"]["batch_sizes"]:
            ratios = [(at_batch(r, batch) or {}).get("vs_eager") for r in rows]
            if any(x is None for x in ratios) or rows[0]["backend"] == "pytorch-eager":
                continue
            medians = [x["median"] for x in ratios]
            spread = max(medians) / min(medians) - 1
            lines.append(
                f"| {name} | {rows[0]['backend']} {precision_label(rows[0])} | {batch} | "
                + " | ".join(f"{m:.2f}x" for m in medians)
                + f" | {100 * spread:.1f}% |"
            )
    return lines


def _qad_rows(students: dict[str, Path], args: argparse.Namespace) -> list[str]:
    """Each student through ``python -m kdfast.train --qad`` (default settings) and its QAD student through
    ``python -m export.trt``: post-training INT8 against QAD, both measured by the export (:mod:`export.qad`)
    on the whole validation split, and how the QAD student's INT8 files verify."""
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
        export_main(["--model", str(folder / "student.pt"), "--out", str(out), "--overwrite"]
                    + args.export_args)  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        agreement = {
            r["backend"]: f"{100 * r['parity']['top1_agreement']:.2f}"
            for r in report["rows"]
            if r["precision"] == "int8" and r["variant"] is None and r.get("parity")
        }
        comparison = report["qad"]  # export.qad's, in the report of a QAD student
        ptq, qad = comparison["ptq_int8"], comparison["qad_int8"]
        lines.append(
            f"| {name} | {comparison['source_fp32_top1']:.2f} | {ptq['top1']:.2f} ({ptq['drop']:+.2f}, "
            f"{ptq['agreement_with_source']:.2f}) | {qad['top1']:.2f} ({qad['drop']:+.2f}, "
            f"{qad['agreement_with_source']:.2f}) | {summary['seconds']:.0f} | "
            f"{agreement.get('onnxruntime', '-')} | {agreement.get('openvino', '-')} | "
            f"{report['exit_code']} |"
        )
    return lines


def run(args: argparse.Namespace) -> None:
    students = {"default (edge_cnn, AGKD)": args.default} if args.default else {}
    students |= {name: _student(args.out, name) for name in args.students}
    header = [
        "student", "params", "fp32 top-1 %", "eager p50 b1 ms",
        *(f"{r} INT8 x fp32 at bN (file, agreement / drop)" for r in RUNTIMES), "TensorRT rules", "exit",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    columns = " | ".join(f"run {i + 1}" for i in range(args.repeat))
    runs = [f"| student | row | batch | {columns} | spread |"]
    runs.append("|" + "---|" * (4 + args.repeat))
    for name, path in students.items():
        reports = []
        for i in range(args.repeat):
            out = args.out / name.split(" ")[0] / ("export" if i == 0 else f"export-{i + 1}")
            print(f"exporting {name} (run {i + 1} of {args.repeat})", file=sys.stderr, flush=True)
            export_main(["--model", str(path), "--out", str(out), "--overwrite", *args.export_args])
            reports.append(json.loads((out / "report.json").read_text()))
            machine = reports[-1]["machine"]
            print(
                f"load average {machine['load_average_start']} before, {machine['load_average_during']} "
                f"during, {machine['load_average_end']} after",
                file=sys.stderr,
                flush=True,
            )
        params = sum(t.numel() for t in torch.load(path, weights_only=True)["state_dict"].values())
        lines.append("| " + " | ".join(_summary(name, reports[0], params)) + " |")
        runs += _stability(name, reports)
    print("\n".join(lines))
    if args.repeat > 1:
        print("\n".join(["", "x eager (median of per-round ratios) of each run:", "", *runs]))
    if args.qad:
        print("\n".join(["", *_qad_rows(students, args)]))
    print(
        f"\n{machine['cpu_model']}, {machine['usable_cpus']} usable CPUs, {machine['threads']} threads, "
        f"load average {machine['load_average_start']} -> {machine['load_average_end']} (last export), "
        f"{machine['timestamp']}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--default", type=Path, help="the default run's student.pt (python -m kdfast.train)")
    parser.add_argument("--out", type=Path, default=Path("runs/export-targets"))
    parser.add_argument("--students", nargs="*", choices=list(STUDENTS), default=list(STUDENTS))
    parser.add_argument("--repeat", type=int, default=1, help="exports of each student in a row")
    parser.add_argument("--qad", action="store_true", help="also QAD every student and export the result")
    parser.add_argument("export_args", nargs="*", help="more flags for export.trt, after --")
    run(parser.parse_args())
