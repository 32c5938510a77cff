"""report.json, report.md and a latency-vs-accuracy chart; the same table is printed by the command."""

from __future__ import annotations

import json
from pathlib import Path

from kdfast.atomic import atomic_path, atomic_write

_COLUMNS = (
    "backend",
    "precision",
    "size",
    "max abs err",
    "top-1 agree",
    "accuracy",
    "p50 b1 ms",
    "p99 b1 ms",
    "thr bN img/s",
    "gates",
)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _gates_cell(row: dict) -> str:
    gates = row.get("gates") or []
    if row.get("error"):
        return f"ERROR: {row['error']}"
    if not gates:
        return "reference"
    failed = [g for g in gates if g["passed"] is False]
    if not failed:
        return "pass"
    return "FAIL: " + "; ".join(f"{g['gate']} = {g['value']:.4g} vs {g['threshold']:.4g}" for g in failed)


def precision_label(row: dict) -> str:
    """The precision, with the variant when one precision has several files (the two INT8 ONNX files)."""
    return f"{row['precision']} ({row['variant']})" if row.get("variant") else row["precision"]


def _cells(row: dict) -> list[str]:
    parity, lat = row.get("parity") or {}, row.get("latency") or {}
    size = row.get("size_bytes")
    return [
        row["backend"],
        precision_label(row),
        "-" if size is None else f"{size / 1e6:.2f} MB",
        _fmt(parity.get("max_abs"), ".2e"),
        _fmt(None if "top1_agreement" not in parity else 100 * parity["top1_agreement"], ".2f"),
        _fmt(None if row.get("accuracy") is None else 100 * row["accuracy"], ".2f"),
        _fmt(lat.get("p50_ms"), ".3f"),
        _fmt(lat.get("p99_ms"), ".3f"),
        _fmt(lat.get("throughput_ips"), ".1f"),
        _gates_cell(row),
    ]


def table(rows: list[dict]) -> str:
    """The results as a Markdown table (readable as plain text too)."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def write_chart(rows: list[dict], path: Path) -> Path:
    """Scatter of batch-1 p50 latency against accuracy, one labelled point per backend and precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 4.5))
    points = [
        r
        for r in rows
        if (r.get("latency") or {}).get("p50_ms") is not None and r.get("accuracy") is not None
    ]
    # Backends often tie on accuracy, so points are told apart by marker and a legend outside the axes
    # rather than by labels that would pile up on each other.
    markers = "osD^vP*Xh<>"
    for i, row in enumerate(points):
        lat, acc = row["latency"]["p50_ms"], 100 * row["accuracy"]
        ax.scatter(
            lat, acc, marker=markers[i % len(markers)], s=60, label=f"{row['backend']} {precision_label(row)}"
        )
    if points:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.margins(x=0.1, y=0.15)
    ax.set_xscale("log")
    # plain numbers on the log axis: matplotlib's default labels minor ticks as 3x10^-1 and they collide
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("batch-1 p50 latency (ms, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("latency vs accuracy per backend")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def write_reports(report: dict, out: Path) -> dict[str, Path]:
    """Write report.json, report.md and latency_accuracy.png under ``out``; returns their paths."""
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "latency_accuracy.png"}
    atomic_write(paths["json"], json.dumps(report, indent=2, default=str))
    failed = [
        f"- {r['backend']} {precision_label(r)}: {_gates_cell(r)}"
        for r in report["rows"]
        if _gates_cell(r).startswith(("FAIL", "ERROR"))
    ]
    notes = [f"- {n}" for n in report.get("notes", [])]
    md = [
        f"# Export report: {report['model']}",
        "",
        f"Status: **{report['status']}**",
        "",
        table(report["rows"]),
        "",
        *(["## Failed gates", "", *failed, ""] if failed else []),
        *(["## Notes", "", *notes, ""] if notes else []),
        "## Settings",
        "",
        "```json",
        json.dumps(report["settings"], indent=1),
        "```",
        "",
        "## Machine and versions",
        "",
        "```json",
        json.dumps(report["machine"], indent=1),
        "```",
        "",
        f"![latency vs accuracy]({paths['png'].name})",
        "",
    ]
    atomic_write(paths["md"], "\n".join(md))
    write_chart(report["rows"], paths["png"])
    return paths
