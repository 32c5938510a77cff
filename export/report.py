"""report.md (one page a person reads first: verdict and table, then details), report.json (everything) and
the charts; the same table is printed by the command."""

from __future__ import annotations

import json
from pathlib import Path

from export.charts import int8_layers_chart, latency_accuracy_chart, latency_batch_chart, speedup_chart
from export.latency import paired_ratio, round_ratios
from export.ort_backend import DEQUANTIZED
from kdfast.atomic import atomic_write

EAGER = "pytorch-eager"
BASELINES = (EAGER, "torch.compile")  # rows that are not a runtime to ship

_COLUMNS = (
    "backend",
    "precision",
    "size",
    "max abs err",
    "top-1 agree %",
    "accuracy %",
    "p50 b1 ms",
    "p90 b1 ms",
    "p99 b1 ms",
    "thr bN img/s",
    "x eager b1",
    "x eager bN",
    "compile s",
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


def at_batch(row: dict, batch: int) -> dict | None:
    """The end-to-end summary of ``row`` at ``batch``, or None."""
    return next((s for s in series(row) if s["batch"] == batch), None)


def _paired(baseline: dict | None, summary: dict) -> dict | None:
    base = None if baseline is None else at_batch(baseline, summary["batch"])
    if base is None or len(base["round_p50_ms"]) != len(summary["round_p50_ms"]) or not base["round_p50_ms"]:
        return None
    return paired_ratio(base["round_p50_ms"], summary["round_p50_ms"])


def add_speedups(rows: list[dict]) -> None:
    """Give every end-to-end summary ``vs_eager`` and ``vs_fp32``: how many times faster than PyTorch eager
    and than the fp32 row of the same runtime (the fp32 ONNX file on an ONNX runtime), as the median and
    inter-quartile range of per-round ratios (:func:`export.latency.paired_ratio`); None where that row was
    not timed in the same rounds."""
    eager = next((r for r in rows if r["backend"] == EAGER and series(r)), None)
    fp32 = {r["backend"]: r for r in rows if r["precision"] == "fp32" and series(r)}
    for row in rows:
        for summary in series(row):
            summary["vs_eager"] = _paired(eager, summary)
            summary["vs_fp32"] = _paired(fp32.get(row["backend"]), summary)


def _x(ratio: dict | None) -> str:
    return "-" if ratio is None else f"{ratio['median']:.2f}x [{ratio['q25']:.2f}-{ratio['q75']:.2f}]"


def verified(row: dict) -> bool:
    """Every gate measured and passed, no error."""
    gates = row.get("gates") or []
    return bool(gates) and not row.get("error") and all(g["passed"] for g in gates)


def _speed(summary: dict, key: str) -> float:
    """A sort key, larger is faster: the paired ratio where every candidate has one, else 1 / p50."""
    ratio = summary.get(key)
    return ratio["median"] if ratio else 1.0 / summary["p50_ms"]


def fastest(timed: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """Of (row, summary) pairs of one runtime and batch size, the one to ship: the fastest by paired ratio
    over the runtime's fp32 row among those faster than it in at least three rounds of four (25th percentile
    of the per-round ratios above 1), else the fp32 row itself: a file that ties with fp32 within the noise
    (ONNX Runtime's fp16 file on a CPU without fp16 kernels) is not a faster file. Without an fp32 row timed
    in the same rounds, the lowest p50."""
    fp32 = [t for t in timed if t[0]["precision"] == "fp32"]
    if not fp32 or not all(s.get("vs_fp32") for _, s in timed):
        return max(timed, key=lambda t: _speed(t[1], ""))
    faster = [t for t in timed if t[1]["vs_fp32"]["q25"] > 1.0]
    return max(faster, key=lambda t: t[1]["vs_fp32"]["median"]) if faster else fp32[0]


def _label(row: dict) -> str:
    return f"{row['backend']} {precision_label(row)}"


def _drop(row: dict) -> str:
    parity = row.get("parity") or {}
    if parity.get("accuracy") is None or parity.get("accuracy_ref") is None:
        return "-"
    return f"{100 * (parity['accuracy_ref'] - parity['accuracy']):.2f}"


def _ship(row: dict) -> str:
    return " + ".join(f"`{name}`" for name in row.get("artifacts") or [Path(row["file"]).name])


def _tensorrt_file(files: dict) -> str:
    """The ONNX file to build a TensorRT engine from where TensorRT runs: the INT8 one if it passes
    TensorRT's rules, else the fp16 or fp32 one."""
    for precision in ("int8", "fp16", "fp32"):
        info = files.get(precision)
        if info and not info["tensorrt_violations"]:
            name = Path(info["file"]).name
            return f"`{name}` (passes TensorRT's parser and Q/DQ rules): build the engine there"
    return "-"


def _answer(report: dict) -> list[str]:
    """The first section: per runtime and batch size, the fastest row whose gates all passed, its speedup
    over the fp32 file on the same runtime (paired rounds), its accuracy drop, and the file to ship."""
    rows, sizes = report["rows"], report["protocol"]["batch_sizes"]
    header = (
        "runtime", "batch", "fastest verified", "x fp32 on this runtime", "img/s",
        "accuracy drop (points)", "ship",
    )  # fmt: skip
    lines = []
    for runtime in dict.fromkeys(r["backend"] for r in rows if r["backend"] not in BASELINES):
        mine = [r for r in rows if r["backend"] == runtime]
        unavailable = next((r["unavailable"] for r in mine if r.get("unavailable")), None)
        if unavailable:
            ship = _tensorrt_file(report["files"]) if runtime == "tensorrt" else "-"
            lines.append([runtime, "-", f"not run here: {unavailable}", "-", "-", "-", ship])
            continue
        candidates = [r for r in mine if verified(r) and series(r)]
        if not candidates:
            lines.append([runtime, "-", "nothing verified (see What failed)", "-", "-", "-", "-"])
            continue
        for b in sizes:
            timed = [(r, at_batch(r, b)) for r in candidates if at_batch(r, b)]
            row, best = fastest(timed)
            thr = f"{best['throughput_ips']:.1f}"
            lines.append(
                [runtime, str(b), precision_label(row), _x(best.get("vs_fp32")), thr, _drop(row), _ship(row)]
            )
    if not lines:
        return []
    return [
        "## What to ship",
        "",
        "Per runtime and batch size, the fastest file whose gates all passed (the fp32 file unless another "
        "is faster in three rounds of four). `x fp32`: how many times "
        "faster than the fp32 file on the same runtime, median [inter-quartile range] of the per-round "
        "ratios (every row of a batch size is timed in the same interleaved rounds). Accuracy drop: against "
        f"PyTorch, on {report.get('images', 'the')} held-out verification images (neither trained, "
        "calibrated nor controlled on).",
        "",
        *_markdown(header, lines),
        "",
        *_ranking(rows, sizes),
        *_caveats(rows),
    ]


def _ranking(rows: list[dict], sizes: list[int]) -> list[str]:
    """Every timed row, fastest first at the largest batch (by x eager where eager was timed)."""
    last = sizes[-1]
    timed = [r for r in rows if at_batch(r, last)]
    if not timed:
        return []
    key = "vs_eager" if all(at_batch(r, last).get("vs_eager") for r in timed) else ""
    ordered = sorted(timed, key=lambda r: -_speed(at_batch(r, last), key))
    header = ("rank", "row", f"x eager b{last}", f"p50 b{last} ms", "x eager b1", "gates")
    lines = [
        [str(i + 1), _label(r), _x(at_batch(r, last).get("vs_eager")), f"{at_batch(r, last)['p50_ms']:.3f}",
         _x((at_batch(r, sizes[0]) or {}).get("vs_eager")), _gates_cell(r)]
        for i, r in enumerate(ordered)
    ]  # fmt: skip
    return [f"Every timed row, fastest first at batch {last}:", "", *_markdown(header, lines), ""]


def _caveats(rows: list[dict]) -> list[str]:
    """Rows that look like a result and are not: ONNX Runtime fp16 on a CPU without fp16 kernels, the
    TensorRT INT8 layout on ONNX Runtime."""
    notes = []
    for row in rows:
        ops = row.get("runtime", {}).get("compute_ops") or {}
        if row["backend"] != "onnxruntime" or not ops:
            continue
        if row["precision"] == "fp16" and "float16" not in ops:
            notes.append(
                f"- onnxruntime fp16 is not fp16 arithmetic here: the session's optimized graph runs all "
                f"{sum(ops.values())} compute ops on float32 weights (the CPU execution provider has no fp16 "
                "kernels for them on this CPU, so ONNX Runtime casts the fp16 weights back to float32 when "
                "it loads the file and runs its fp32 kernels). Its latency is fp32's; the fp16 file is for "
                "TensorRT and GPUs (or a CPU whose ONNX Runtime has fp16 kernels)."
            )
        if row["precision"] == "int8" and not row.get("variant") and ops.get(DEQUANTIZED):
            notes.append(
                f"- onnxruntime int8 runs the TensorRT layout unfused ({ops[DEQUANTIZED]} compute ops in "
                "float on weights dequantized each call): its row verifies that file's numbers, it is not "
                "ONNX Runtime's INT8 speed (that is the u8s8 file's row)."
            )
    return [*notes, ""] if notes else []


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
    compile_s = row.get("compile_s")
    return [
        row["backend"],
        precision_label(row),
        "-" if size is None else f"{size / 1e6:.2f} MB",
        _fmt(parity.get("max_abs"), ".2e"),
        _fmt(None if "top1_agreement" not in parity else 100 * parity["top1_agreement"], ".2f"),
        _fmt(None if row.get("accuracy") is None else 100 * row["accuracy"], ".2f"),
        _sampled(b1, "p50_ms", ".3f"),
        _sampled(b1, "p90_ms", ".3f"),
        _sampled(b1, "p99_ms", ".3f"),
        _sampled(bn, "throughput_ips", ".1f"),
        _x(None if b1 is None else b1.get("vs_eager")),
        _x(None if bn is None else bn.get("vs_eager")),
        _fmt(compile_s, ".2f"),
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
    header = (
        "backend", "precision", "timing", "batch", "n", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "img/s",
        "x eager", "x fp32 same runtime",
    )  # fmt: skip
    lines = []
    for row in rows:
        for kind in ("end_to_end", "compute_only"):
            for s in series(row, kind):
                flag = " (under-sampled)" if s["under_sampled"] else ""
                figures = [f"{s[k]:.3f}" for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms")]
                lines.append(
                    [row["backend"], precision_label(row), kind.replace("_", " "), str(s["batch"]),
                     f"{s['samples']}{flag}", *figures, f"{s['throughput_ips']:.1f}", _x(s.get("vs_eager")),
                     _x(s.get("vs_fp32"))]
                )  # fmt: skip
    return _markdown(header, lines) if lines else ["(nothing was timed)"]


def _files_section(files: dict) -> list[str]:
    rows = []
    for info in files.values():
        rules = info["tensorrt_violations"]
        if not info["for_tensorrt"]:
            check = f"not for TensorRT ({len(rules)} violations)" if rules else "pass (not the TensorRT file)"
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


# What each INT8 file is and which runtime it is for (export.quantize.SCHEMES).
_LAYOUTS = {
    "int8": "(symmetric int8 Q/DQ on the inputs of weighted ops, full-range per-channel weights) is for "
    "TensorRT (its Q/DQ rules, export/qdq_rules.py) and OpenVINO (its low-precision transformations fuse "
    "each Q/DQ pair into an int8 convolution; on x86 without VNNI the IR takes the weights on a 7-bit grid, "
    "the row's weight_bits). ONNX Runtime runs it correctly but unfused and slowly on CPU (its ONNX Runtime "
    "row verifies the file's numbers).",
    "int8-ort": "(uint8 activations, 7-bit int8 weights, every DQ -> op -> Q fused into an integer kernel) "
    "is for ONNX Runtime on x86 CPUs: with 7-bit weights its fast U8S8 kernels are exact on every x86 CPU. "
    "TensorRT refuses it (uint8 activations); OpenVINO runs it too, and which of the two files it runs "
    "faster depends on the network (What to ship names it).",
}


def _int8_section(int8: dict) -> list[str]:
    lines = []
    for name, info in int8.items():
        file = Path(info["file"]).name
        lines.append(f"- `{file}` {_LAYOUTS.get(name, '')}")
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


def _qad_section(summary: dict) -> list[str]:
    """A QAD student's comparison (:func:`export.qad.compare`): post-training INT8 of the student it was
    distilled from against INT8 of this one, both as ``student.int8.onnx`` is written but without accuracy
    control."""
    from export import qad  # ONNX Runtime's quantizer loads only for a QAD student's report

    if "unmeasured" in summary:
        return [f"This student was fine-tuned by quantization-aware distillation; {summary['unmeasured']}."]
    return [
        f"This student was fine-tuned by quantization-aware distillation from `{summary['source']}`; its "
        f"weights lie on their int8 grid. Both INT8 files calibrated on {summary['calibration_images']} "
        f"training images (MinMax, no layer kept float), run with ONNX Runtime on "
        f"{summary['validation_images']} validation images. {qad.verdict(summary)}",
        "",
        qad.qad_table(summary),
    ]


def _speedup_chart(report: dict, path: Path) -> Path:
    """The per-round ratios behind every x-eager figure, at batch 1 and the largest batch."""
    sizes = report["protocol"]["batch_sizes"]
    eager = next((r for r in report["rows"] if r["backend"] == EAGER and series(r)), None)
    panels: dict[int, dict[str, list[float]]] = {}
    for b in dict.fromkeys((sizes[0], sizes[-1])):
        base = None if eager is None else at_batch(eager, b)
        panels[b] = {
            _label(r): round_ratios(base["round_p50_ms"], s["round_p50_ms"]).tolist()
            for r in report["rows"]
            if base is not None and (s := at_batch(r, b)) and s.get("vs_eager")
        }
    return speedup_chart(panels, path)


def write_reports(report: dict, out: Path) -> dict[str, Path]:
    """Write report.json, report.md and the charts under ``out``; returns their paths."""
    paths = {
        "json": out / "report.json",
        "md": out / "report.md",
        "latency_accuracy": out / "latency_accuracy.png",
        "latency_batch": out / "latency_batch.png",
        "speedup_rounds": out / "speedup_rounds.png",
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
        *_answer(report),
        "## Every row",
        "",
        table(report["rows"]),
        "",
        f"Latency: {protocol['boundary']}; batch 1 and batch {protocol['batch_sizes'][-1]} (bN) shown, every "
        "batch below. `x eager`: how many times faster than PyTorch eager, median [inter-quartile range] of "
        f"the ratios of {protocol['rounds']} paired rounds. `compile s`: loading plus the first call at each "
        "batch size (compilation, specialization), outside the timed rounds. `(n=...!)`: fewer samples than "
        "asked for.",
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
        f"average {machine['load_average_start']} before, {machine.get('load_average_during')} during the "
        f"timing (highest), {machine['load_average_end']} after; "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v),
        "",
        "## Latency per batch size",
        "",
        f"Every row of one batch size is timed in the same {protocol['rounds']} rounds, the order rotated "
        f"by one each round, after a warm-up of at least {protocol['warmup_iters']} calls and "
        f"{protocol['warmup_s']} s per row outside the rounds; over the rounds each row makes at least "
        f"{protocol['iters']} calls and {protocol['min_s']} s per batch size"
        + (f", capped at {protocol['max_s']} s" if protocol["max_s"] else ", no cap")
        + ". Percentiles are over every call; ratios are taken round by round (the medians of one round) and "
        "summarized by their median and inter-quartile range.",
        "",
        *_latency_details(report["rows"]),
        "",
        "## Notes",
        "",
        *[f"- {n}" for n in report["notes"]],
        "",
        f"![latency vs accuracy]({paths['latency_accuracy'].name})",
        f"![latency vs batch]({paths['latency_batch'].name})",
        f"![speedup over eager per round]({paths['speedup_rounds'].name})",
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
    _speedup_chart(report, paths["speedup_rounds"])
    if "int8_layers" in paths:
        int8_layers_chart(
            {Path(i["file"]).name: i["layers"] for i in report["int8"].values()}, paths["int8_layers"]
        )
    return paths
