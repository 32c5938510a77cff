"""report.md (one page a person reads first: verdict and table, then details), report.json (everything) and
the charts; the same table is printed by the command."""

from __future__ import annotations

import json
from pathlib import Path

from export.charts import int8_layers_chart, latency_accuracy_chart, latency_batch_chart
from kdfast.atomic import atomic_write

_COLUMNS = (
    "backend",
    "precision",
    "size",
    "max abs err",
    "top-1 agree %",
    "accuracy %",
    "p50 b1 ms",
    "p99 b1 ms",
    "thr bN img/s",
    "load s",
    "peak MB",
    "gates",
)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def precision_label(row: dict) -> str:
    """The precision, with the variant when one precision has several files (the two INT8 ONNX files)."""
    return f"{row['precision']} ({row['variant']})" if row.get("variant") else row["precision"]


def series(row: dict, kind: str = "end_to_end") -> list[dict]:
    """The per-batch latency summaries of ``row`` (empty when it was not timed)."""
    return ((row.get("latency") or {}).get(kind)) or []


def _gates_cell(row: dict) -> str:
    if row.get("error"):
        return f"ERROR: {row['error']}"
    if row.get("unavailable"):
        return f"not run: {row['unavailable']}"
    gates = row.get("gates") or []
    if not gates:
        return "reference"
    failed = [g for g in gates if g["passed"] is False]
    if failed:
        return "FAIL: " + "; ".join(f"{g['gate']} = {g['value']:.4g} vs {g['threshold']:.4g}" for g in failed)
    unmeasured = [g["gate"] for g in gates if g["passed"] is None]
    if unmeasured:
        return "NOT MEASURED: " + ", ".join(unmeasured)
    return "pass"


def _sampled(summary: dict | None, key: str, spec: str) -> str:
    """A latency figure, marked with its sample count when the series has fewer than asked for."""
    if summary is None:
        return "-"
    text = format(summary[key], spec)
    return f"{text} (n={summary['samples']}!)" if summary["under_sampled"] else text


def _cells(row: dict) -> list[str]:
    parity = row.get("parity") or {}
    timed = series(row)
    b1, bn = (timed[0], timed[-1]) if timed else (None, None)
    size = row.get("size_bytes")
    return [
        row["backend"],
        precision_label(row),
        "-" if size is None else f"{size / 1e6:.2f} MB",
        _fmt(parity.get("max_abs"), ".2e"),
        _fmt(None if "top1_agreement" not in parity else 100 * parity["top1_agreement"], ".2f"),
        _fmt(None if row.get("accuracy") is None else 100 * row["accuracy"], ".2f"),
        _sampled(b1, "p50_ms", ".3f"),
        _sampled(b1, "p99_ms", ".3f"),
        _sampled(bn, "throughput_ips", ".1f"),
        _fmt(row.get("load_s"), ".2f"),
        _fmt(row.get("peak_rss_mb"), ".1f"),
        _gates_cell(row),
    ]


def _markdown(header: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def table(rows: list[dict]) -> str:
    """The results as a Markdown table (readable as plain text too)."""
    return "\n".join(_markdown(_COLUMNS, [_cells(r) for r in rows]))


def _latency_details(rows: list[dict]) -> list[str]:
    header = ("backend", "precision", "timing", "batch", "n", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "img/s")
    lines = []
    for row in rows:
        for kind in ("end_to_end", "compute_only"):
            for s in series(row, kind):
                flag = " (under-sampled)" if s["under_sampled"] else ""
                figures = [f"{s[k]:.3f}" for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms")]
                lines.append(
                    [row["backend"], precision_label(row), kind.replace("_", " "), str(s["batch"]),
                     f"{s['samples']}{flag}", *figures, f"{s['throughput_ips']:.1f}"]
                )  # fmt: skip
    return _markdown(header, lines) if lines else ["(nothing was timed)"]


def _files_section(files: dict) -> list[str]:
    rows = []
    for info in files.values():
        rules = info["tensorrt_violations"]
        if not info["for_tensorrt"]:
            check = f"not for TensorRT ({len(rules)} violations, expected)"
        else:
            check = "pass" if not rules else f"FAIL ({len(rules)}): {rules[0]}"
        rows.append(
            [f"`{Path(info['file']).name}`", str(info["nodes"]), f"{info['bytes'] / 1e6:.2f} MB", check]
        )
    return _markdown(("file", "nodes", "size", "TensorRT parser and Q/DQ rules (export/qdq_rules.py)"), rows)


def _runtime_section(rows: list[dict]) -> list[str]:
    """What each runtime says actually ran (e.g. OpenVINO's inference precision per compute op)."""
    return [
        f"- {r['backend']} {precision_label(r)}: " + "; ".join(f"{k} {v}" for k, v in r["runtime"].items())
        for r in rows
        if r.get("runtime")
    ]


def _int8_section(int8: dict) -> list[str]:
    lines = []
    for name, info in int8.items():
        file = Path(info["file"]).name
        if name == "int8":
            lines.append(
                f"- `{file}` is laid out for TensorRT. ONNX Runtime runs it correctly but slowly on CPU (its "
                "Q/DQ stay unfused); `--precision int8-ort` writes a U8S8 file for ONNX Runtime on CPU."
            )
        else:
            lines.append(
                f"- `{file}` is for ONNX Runtime on CPU only (uint8 activations: TensorRT refuses it)."
            )
        control = info["control"]
        layers = [layer for layer in info["layers"] if layer["op"] != "logits"]
        if control is None:
            why = info["control_not_run"]
            lines.append(f"  Accuracy control not run ({why}); every weighted layer is INT8.")
        else:
            first, last = control["initial"], control["final"]
            lines.append(
                f"  Calibration {info['calibration']}. Accuracy control on held-out validation images: "
                f"all-INT8 agreement {100 * first['agreement']:.2f}%, drop {first['accuracy_drop']:.2f} "
                "points; as written "
                f"{100 * last['agreement']:.2f}%, {last['accuracy_drop']:.2f} points, with "
                f"{len(info['keep_float'])} of {len(layers)} weighted layers kept in float"
                + (f" ({', '.join(info['keep_float'])})" if info["keep_float"] else "")
                + ("" if control["met"] else ": the gates were NOT met on the control images")
                + "."
            )
        worst = sorted(
            (x for x in layers if x.get("sqnr_all_int8_db") is not None), key=lambda x: x["sqnr_all_int8_db"]
        )[:3]
        if worst:
            lines.append(
                "  Lowest SQNR with every layer INT8: "
                + ", ".join(f"{x['layer']} {x['sqnr_all_int8_db']:.1f} dB" for x in worst)
                + " (per layer in report.json and `int8_layers.png`)."
            )
    return lines


def _qad_section(qad: dict) -> list[str]:
    """What ``kdfast.train --qad`` measured when it made this student: post-training INT8 of the student it
    started from against INT8 of this one, both as ``student.int8.onnx`` is written but without accuracy
    control."""
    from kdfast.train.qad import qad_table

    return [
        f"This student was fine-tuned by quantization-aware distillation from `{qad['source']}`; its weights "
        "lie on their int8 grid. Measured by that run on "
        f"{qad['validation_images']} validation images (MinMax, no layer kept float, ONNX Runtime):",
        "",
        qad_table(qad),
    ]


def write_reports(report: dict, out: Path) -> dict[str, Path]:
    """Write report.json, report.md and the charts under ``out``; returns their paths."""
    paths = {
        "json": out / "report.json",
        "md": out / "report.md",
        "latency_accuracy": out / "latency_accuracy.png",
        "latency_batch": out / "latency_batch.png",
    }
    if report["int8"]:
        paths["int8_layers"] = out / "int8_layers.png"
    atomic_write(paths["json"], json.dumps(report, indent=2, default=str))
    failed = [
        f"- {r['backend']} {precision_label(r)}: {_gates_cell(r)}"
        for r in report["rows"]
        if _gates_cell(r).startswith(("FAIL", "ERROR", "NOT MEASURED"))
    ]
    machine = report["machine"]
    protocol = report["protocol"]
    runtimes = _runtime_section(report["rows"])
    md = [
        f"# Export report: {report['model']}",
        "",
        f"**{report['status']}** (exit code {report['exit_code']})",
        "",
        *[f"> WARNING: {w}" for w in report["warnings"]],
        *([""] if report["warnings"] else []),
        table(report["rows"]),
        "",
        f"Latency: {protocol['boundary']}; batch 1 and batch {protocol['batch_sizes'][-1]} (bN) shown, every "
        "batch below. `(n=...!)`: fewer samples than asked for.",
        "",
        *(["## What failed", "", *failed, ""] if failed else []),
        *(["## ONNX files", "", *_files_section(report["files"]), ""] if report["files"] else []),
        *(["## What each runtime ran", "", *runtimes, ""] if runtimes else []),
        *(["## INT8", "", *_int8_section(report["int8"]), ""] if report["int8"] else []),
        *(
            ["## Quantization-aware distillation", "", *_qad_section(report.get("qad")), ""]
            if report.get("qad")
            else []
        ),
        *(
            ["## Not available here", "", *[f"- {k}: {v}" for k, v in report["unavailable"].items()], ""]
            if report["unavailable"]
            else []
        ),  # fmt: skip
        "## Machine",
        "",
        f"{machine['timestamp']}; {machine['cpu_model']} ({', '.join(machine['isa']) or 'ISA unknown'}); "
        f"{machine['usable_cpus']} usable of {machine['cpu_count']} CPUs, {machine['threads']} thread(s); "
        "load "
        f"average {machine['load_average_start']} at the start, {machine['load_average_end']} at the end; "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v),
        "",
        "## Latency per batch size",
        "",
        f"Warm-up: at least {protocol['warmup_iters']} calls and {protocol['warmup_s']} s; then at least "
        f"{protocol['iters']} calls and {protocol['min_s']} s per batch size"
        + (f", capped at {protocol['max_s']} s" if protocol["max_s"] else ", no cap")
        + ".",
        "",
        *_latency_details(report["rows"]),
        "",
        "## Notes",
        "",
        *[f"- {n}" for n in report["notes"]],
        "",
        f"![latency vs accuracy]({paths['latency_accuracy'].name})",
        f"![latency vs batch]({paths['latency_batch'].name})",
        *([f"![INT8 SQNR per layer]({paths['int8_layers'].name})"] if "int8_layers" in paths else []),
        "",
        "Settings and every figure: `report.json`.",
        "",
    ]
    atomic_write(paths["md"], "\n".join(md))
    timed = [r for r in report["rows"] if series(r)]
    latency_accuracy_chart(
        [
            (f"{r['backend']} {precision_label(r)}", series(r)[0]["p50_ms"], 100 * r["accuracy"])
            for r in timed
            if r.get("accuracy") is not None
        ],
        paths["latency_accuracy"],
    )
    latency_batch_chart(
        {
            f"{r['backend']} {precision_label(r)}": [
                (s["batch"], s["p50_ms"], s["throughput_ips"]) for s in series(r)
            ]
            for r in timed
        },
        paths["latency_batch"],
    )
    if "int8_layers" in paths:
        int8_layers_chart(
            {Path(i["file"]).name: i["layers"] for i in report["int8"].values()}, paths["int8_layers"]
        )
    return paths
