"""Render a pytest-benchmark JSON file as Markdown tables (one per group) and a PNG chart of speedups.

    python bench/render_results.py BENCH.json [--out bench/RESULTS.md] [--png bench/results.png]
        [--peak-bandwidth-gbs N]

Each benchmark names its implementation and its case in ``extra_info`` (``impl``, and ``case`` or
``shape``; else its pytest params stand in); within a group, benchmarks of the same case are compared
with the eager reference of that case (impl ``reference`` or ``eager``). ``extra_info["bytes"]`` (bytes
that must cross memory) gives achieved GB/s and, with ``--peak-bandwidth-gbs``, the fraction of peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from kdfast.atomic import atomic_path, atomic_write

BASELINES = ("reference", "eager")


@dataclass
class Row:
    group: str
    case: str
    impl: str
    median_s: float
    peak_extra_mib: float | None
    bytes: int | None
    speedup: float | None = None

    @property
    def gbs(self) -> float | None:
        return None if self.bytes is None else self.bytes / self.median_s / 1e9


def _impl_and_case(bench: dict) -> tuple[str, str]:
    info, params = bench.get("extra_info", {}), bench.get("params") or {}
    impl = str(info.get("impl", params.get("impl", bench["name"])))
    case = info.get("case", info.get("shape"))
    if case is None:
        rest = {k: v for k, v in params.items() if k != "impl"}
        case = ",".join(f"{k}={v}" for k, v in rest.items()) or "-"
    return impl, str(case)


def load_rows(data: dict) -> list[Row]:
    """Rows of every benchmark, each with its speedup over the eager reference of its (group, case)."""
    rows = []
    for bench in data.get("benchmarks", []):
        impl, case = _impl_and_case(bench)
        info = bench.get("extra_info", {})
        rows.append(
            Row(
                group=bench.get("group") or "ungrouped",
                case=case,
                impl=impl,
                median_s=float(bench["stats"]["median"]),
                peak_extra_mib=info.get("peak_extra_mib"),
                bytes=info.get("bytes"),
            )
        )
    baseline = {(r.group, r.case): r.median_s for r in rows if r.impl in BASELINES}
    for r in rows:
        base = baseline.get((r.group, r.case))
        r.speedup = None if base is None else base / r.median_s
    return rows


def header(data: dict) -> list[str]:
    """Where and when the numbers were taken: machine, GPU, library versions, date."""
    machine = data.get("machine_info", {})
    infos = [b.get("extra_info", {}) for b in data.get("benchmarks", [])]

    def first(key: str) -> str:
        return next((str(i[key]) for i in infos if key in i), "n/a")

    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "n/a"))
    return [
        "# Benchmark results",
        "",
        f"- machine: {machine.get('node', 'n/a')} ({cpu}, {machine.get('machine', 'n/a')})",
        f"- GPU: {first('device_name')}",
        f"- torch {first('torch')}, triton {first('triton')}, python {machine.get('python_version', 'n/a')}",
        f"- date: {data.get('datetime', 'n/a')}",
        "",
    ]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(data: dict, rows: list[Row], peak_gbs: float | None = None) -> str:
    """One table per group: impl, median, speedup vs eager reference, peak extra memory, GB/s."""
    lines = header(data)
    columns = ["case", "impl", "median (ms)", "speedup vs reference", "peak extra (MiB)", "GB/s"]
    if peak_gbs:
        columns.append("% of peak")
    for group in sorted({r.group for r in rows}):
        lines += [f"## {group}", "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        for r in sorted((r for r in rows if r.group == group), key=lambda r: (r.case, r.impl)):
            cells = [
                r.case,
                r.impl,
                f"{r.median_s * 1e3:.3f}",
                _fmt(r.speedup, ".2f") + ("x" if r.speedup is not None else ""),
                _fmt(r.peak_extra_mib, ".1f"),
                _fmt(r.gbs, ".0f"),
            ]
            if peak_gbs:
                cells.append(_fmt(None if r.gbs is None else 100 * r.gbs / peak_gbs, ".0f"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    """Bar chart of speedups over the eager reference, one panel per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r.group for r in rows if r.speedup is not None})
    fig, axes = plt.subplots(len(groups) or 1, 1, figsize=(10, 3 * max(len(groups), 1)), squeeze=False)
    for ax, group in zip(axes[:, 0], groups, strict=False):
        mine = [r for r in rows if r.group == group and r.speedup is not None]
        cases = sorted({r.case for r in mine})
        impls = sorted({r.impl for r in mine})
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            speed = {r.case: r.speedup for r in mine if r.impl == impl}
            xs = [n + k * width for n, c in enumerate(cases) if c in speed]
            ax.bar(xs, [speed[c] for c in cases if c in speed], width, label=impl)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks([n + 0.4 - width / 2 for n in range(len(cases))], cases, fontsize=7)
        ax.set_ylabel("speedup vs reference")
        ax.set_title(group)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", type=Path, default=Path("bench/RESULTS.md"))
    parser.add_argument("--png", type=Path, default=Path("bench/results.png"))
    parser.add_argument("--peak-bandwidth-gbs", type=float, default=None)
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.json.read_text())
        rows = load_rows(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: {args.json} is not a readable pytest-benchmark JSON file ({exc})", file=sys.stderr)
        return 2
    atomic_write(args.out, markdown(data, rows, args.peak_bandwidth_gbs))
    plot(rows, args.png)
    print(f"wrote {args.out} and {args.png} ({len(rows)} benchmarks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
