"""Render benchmark results as Markdown tables (one per group), a summary against the targets and a PNG chart.

    python bench/render_results.py RESULTS... [--env ENV.json] [--out bench/RESULTS.md]
        [--png bench/results.png] [--peak-bandwidth-gbs N] [--title TEXT]

RESULTS are pytest-benchmark JSON files (``--benchmark-json``) or the JSON-lines files ``bench/conftest.py``
appends to (``KDFAST_BENCH_JSONL``). Each benchmark names its implementation and its case in ``extra_info``
(``impl``, ``case``); within a group, each case is compared with that case's baselines: the eager reference
(impl ``reference`` or ``eager``), ``torch.compile`` of the reference (``compiled_reference``) and
pytorch-msssim + ``F.cosine_similarity`` (``pytorch_msssim``); each ratio is baseline time / this time. CUDA
runs also carry kernel-only time and device launches per direction (``torch.profiler``) and the memory one
call adds beyond its inputs and outputs, without and with the gradients it returns. ``extra_info["bytes"]``
(bytes that must cross memory) gives GB/s and, with the GPU's peak bandwidth (``--peak-bandwidth-gbs``, or
known from the GPU's name), the fraction of peak reached in kernel time.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kdfast.atomic import atomic_path, atomic_write

# Baselines each row is compared with: column title -> the impl names that are that baseline.
BASELINES = {
    "x eager": ("reference", "eager"),
    "x compiled ref": ("compiled_reference",),
    "x pytorch-msssim": ("pytorch_msssim",),
}
# HBM peak (GB/s) from NVIDIA's data sheets, matched against torch.cuda.get_device_name.
PEAK_BANDWIDTH_GBS = {
    "H200": 4800.0,
    "H100 PCIe": 2000.0,
    "H100": 3350.0,
    "A100-SXM4-80GB": 2039.0,
    "A100 80GB PCIe": 1935.0,
    "A100": 1555.0,
}


@dataclass
class Row:
    group: str
    case: str
    impl: str
    median_s: float
    info: dict = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)

    def get(self, key: str):
        return self.info.get(key)

    def gbs(self, seconds: float | None) -> float | None:
        nbytes = self.get("bytes")
        return None if nbytes is None or not seconds else nbytes / seconds / 1e9

    def peak_share(self, peak_gbs: float | None) -> float | None:
        """Percent of the peak bandwidth reached in kernel-only time (None without either)."""
        kernel_ms = self.get("kernel_ms")
        achieved = self.gbs(kernel_ms / 1e3) if kernel_ms else None
        return None if achieved is None or not peak_gbs else 100 * achieved / peak_gbs


def _impl_and_case(bench: dict) -> tuple[str, str]:
    info, params = bench.get("extra_info", {}), bench.get("params") or {}
    impl = str(info.get("impl", params.get("impl", bench["name"])))
    case = info.get("case", info.get("shape"))
    if case is None:
        rest = {k: v for k, v in params.items() if k != "impl"}
        case = ",".join(f"{k}={v}" for k, v in rest.items()) or "-"
    return impl, str(case)


def read_benchmarks(path: Path) -> tuple[dict, list[dict]]:
    """(pytest-benchmark metadata or {}, benchmark records) of a JSON or JSON-lines file."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {}, _json_lines(text.splitlines())
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise ValueError("no 'benchmarks' list")
    return data, data["benchmarks"]


def _json_lines(lines: list[str]) -> list[dict]:
    """One record per line; a last line cut short after complete ones (a step killed at its timeout while
    writing) is left out."""
    records = []
    lines = [line for line in lines if line.strip()]
    for k, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if k < len(lines) - 1 or not records:
                raise
    return records


def load_rows(benchmarks: list[dict]) -> list[Row]:
    """Rows of every benchmark, each with its ratio to every baseline of its (group, case)."""
    rows = []
    for bench in benchmarks:
        impl, case = _impl_and_case(bench)
        rows.append(
            Row(
                group=bench.get("group") or "ungrouped",
                case=case,
                impl=impl,
                median_s=float(bench["stats"]["median"]),
                info=dict(bench.get("extra_info", {})),
            )
        )
    for title, impls in BASELINES.items():
        base = {(r.group, r.case): r.median_s for r in rows if r.impl in impls}
        for r in rows:
            if (r.group, r.case) in base:
                r.ratios[title] = base[r.group, r.case] / r.median_s
    return rows


def peak_bandwidth(device_name: str | None) -> float | None:
    """The HBM peak of a GPU named like ``NVIDIA H100 80GB HBM3``, None when unknown."""
    for key, gbs in PEAK_BANDWIDTH_GBS.items():
        if device_name and key in device_name:
            return gbs
    return None


def header(meta: dict, env: dict, rows: list[Row], title: str) -> list[str]:
    """Where and when the numbers were taken: machine, GPU and driver, library versions, date."""
    machine = meta.get("machine_info", {})

    def first(key: str) -> str:
        return next((str(r.info[key]) for r in rows if key in r.info), "n/a")

    cpu = machine.get("cpu", {}).get("brand_raw", machine.get("processor", "n/a"))
    gpu = env.get("gpu") or first("device_name")
    driver = f", driver {env['driver']}" if env.get("driver") else ""
    torch_version = env.get("torch") or first("torch")
    return [
        f"# {title}",
        "",
        f"- machine: {env.get('host') or machine.get('node', 'n/a')} ({env.get('cpu') or cpu})",
        f"- GPU: {gpu}{driver}",
        f"- torch {torch_version}, triton {env.get('triton') or first('triton')},"
        f" python {env.get('python') or machine.get('python_version', 'n/a')}",
        f"- date: {env.get('date') or meta.get('datetime', 'n/a')}",
        "",
    ]


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


# Column title -> how a row fills it; a column every row of a group leaves empty is left out of its table.
def _columns(peak_gbs: float | None) -> dict:
    columns = {
        "case": lambda r: r.case,
        "impl": lambda r: r.impl,
        "median (ms)": lambda r: f"{r.median_s * 1e3:.3f}",
        "kernel (ms)": lambda r: _fmt(r.get("kernel_ms"), ".3f"),
        "launches fwd / bwd": lambda r: (
            None
            if r.get("launches_fwd") is None
            else f"{r.get('launches_fwd'):g} / {_fmt(r.get('launches_bwd'), 'g')}"
        ),
        **{title: (lambda r, t=title: _fmt(r.ratios.get(t), ".2f", "x")) for title in BASELINES},
        "extra (MiB)": lambda r: _fmt(r.get("peak_extra_mib"), ".1f"),
        "extra with grads (MiB)": lambda r: _fmt(r.get("peak_extra_with_grads_mib"), ".1f"),
        "GB/s": lambda r: _fmt(r.gbs(r.median_s), ".0f"),
        "images/s": lambda r: _fmt(r.get("images_per_s"), ".1f"),
    }
    if peak_gbs:
        columns["% of peak (kernel time)"] = lambda r: _fmt(r.peak_share(peak_gbs), ".0f")
    return columns


def tables(rows: list[Row], peak_gbs: float | None) -> list[str]:
    """One table per group, its rows sorted by case and impl."""
    lines = []
    columns = _columns(peak_gbs)
    for group in sorted({r.group for r in rows}):
        mine = sorted((r for r in rows if r.group == group), key=lambda r: (r.case, r.impl))
        cells = {title: [fill(r) for r in mine] for title, fill in columns.items()}
        shown = [t for t, values in cells.items() if any(v not in (None, "-") for v in values)]
        lines += [f"## {group}", "", "| " + " | ".join(shown) + " |", "|" + " --- |" * len(shown)]
        for k in range(len(mine)):
            lines.append("| " + " | ".join(str(cells[t][k]) for t in shown) + " |")
        lines.append("")
    return lines


def _find(rows: list[Row], group: str, impl: str, case: str | None = None) -> Row | None:
    return next(
        (r for r in rows if r.group == group and r.impl == impl and (case is None or r.case == case)), None
    )


def summary(rows: list[Row], peak_gbs: float | None) -> list[tuple[str, str, str]]:
    """(what, measured, target) for each target the benchmarks answer and this run measured."""
    out = []

    def ratio(label: str, row: Row | None, baseline: str, target: str) -> None:
        if row is not None and baseline in row.ratios:
            out.append((label, f"{row.ratios[baseline]:.2f}x", target))

    hybrid = [r for r in rows if r.group.startswith("ssim_cosine fwd+bwd") and r.impl == "triton"]
    for r in hybrid:
        ratio(f"hybrid loss fwd+bwd {r.case}: Triton vs pytorch-msssim", r, "x pytorch-msssim", ">= 10x")
        ratio(f"hybrid loss fwd+bwd {r.case}: Triton vs compiled reference", r, "x compiled ref", ">= 3x")
        if r.get("launches_fwd") is not None:
            out.append(
                (
                    f"hybrid loss {r.case}: launches fwd / bwd",
                    f"{r.get('launches_fwd'):g} / {r.get('launches_bwd'):g}",
                    "<= 2 / 2",
                )
            )
    kl_targets = {197: (">= 10x", ">= 5x"), 1024: (">= 25x", ">= 10x")}
    for r in (r for r in rows if r.group.startswith("attention_kl") and r.impl == "triton"):
        mode = r.group.split()[1]
        n = next((int(w[1:]) for w in r.case.split() if w.startswith("N")), None)
        goal = kl_targets.get(n, ("-", "-"))[mode == "fwd+bwd"]
        ratio(f"attention KL {mode} {r.case}: Triton vs eager", r, "x eager", goal)
        if mode == "fwd+bwd" and r.get("peak_extra_mib") is not None:
            eager = _find(rows, r.group, "reference", r.case)
            if eager is not None and eager.get("peak_extra_mib"):
                share = 100 * r.get("peak_extra_mib") / eager.get("peak_extra_mib")
                out.append((f"attention KL {r.case}: extra memory vs eager's", f"{share:.2f}%", "< 1%"))
            out.append(
                (
                    f"attention KL {r.case}: extra memory",
                    f"{r.get('peak_extra_mib'):.1f} MiB",
                    "< 1 GB at N=4096",
                )
            )
    for r in (r for r in rows if r.group == "attention_map fwd+bwd" and r.impl == "triton"):
        if r.peak_share(peak_gbs) is not None:
            label = f"attention map fwd+bwd {r.case}: HBM bandwidth in kernel time"
            out.append((label, f"{r.peak_share(peak_gbs):.0f}% of peak", ">= 60%"))
    for group in sorted({r.group for r in rows if r.group.startswith("train_step")}):
        pieces = {(r.get("piece"), r.impl): r for r in rows if r.group == group}
        for impl in ("eager", "compiled"):
            step = pieces.get(("distill_step", impl))
            if step is None:
                continue
            out.append((f"{group} distill step {impl}", f"{step.get('images_per_s')} images/s", "-"))
            teacher, ce = pieces.get(("teacher_forward", impl)), pieces.get(("ce_step", impl))
            if teacher is not None and ce is not None:
                overhead = step.median_s - teacher.median_s - ce.median_s
                out.append(
                    (
                        f"{group} distillation overhead {impl} (step - teacher forward - CE step)",
                        f"{overhead * 1e3:.1f} ms ({100 * overhead / step.median_s:.1f}% of the step)",
                        "-",
                    )
                )
        eager, compiled = pieces.get(("distill_step", "eager")), pieces.get(("distill_step", "compiled"))
        if eager is not None and compiled is not None:
            out.append(
                (
                    f"{group} distill step compiled vs eager",
                    f"{eager.median_s / compiled.median_s:.2f}x",
                    ">= 1.5x",
                )
            )
    return out


def summary_table(items: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| measured | value | target |", "| --- | --- | --- |"]
    return lines + [f"| {what} | {value} | {target} |" for what, value, target in items]


def markdown(
    meta: dict, env: dict, rows: list[Row], peak_gbs: float | None, title: str, notes: list[str]
) -> str:
    lines = header(meta, env, rows, title)
    lines += notes + ([""] if notes else [])
    items = summary(rows, peak_gbs)
    if items:
        lines += ["## Summary against the targets", ""] + summary_table(items) + [""]
    return "\n".join(lines + tables(rows, peak_gbs))


def plot(rows: list[Row], path: Path) -> None:
    """Bar chart of speedups over the eager reference, one panel per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r.group for r in rows if "x eager" in r.ratios})
    fig, axes = plt.subplots(len(groups) or 1, 1, figsize=(10, 3 * max(len(groups), 1)), squeeze=False)
    for ax, group in zip(axes[:, 0], groups, strict=False):
        mine = [r for r in rows if r.group == group and "x eager" in r.ratios]
        cases = sorted({r.case for r in mine})
        impls = sorted({r.impl for r in mine})
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            speed = {r.case: r.ratios["x eager"] for r in mine if r.impl == impl}
            xs = [n + k * width for n, c in enumerate(cases) if c in speed]
            ax.bar(xs, [speed[c] for c in cases if c in speed], width, label=impl)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks([n + 0.4 - width / 2 for n in range(len(cases))], cases, fontsize=7)
        ax.set_ylabel("speedup vs eager")
        ax.set_title(group)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def render(
    paths: list[Path],
    out: Path,
    png: Path,
    *,
    env: dict | None = None,
    peak_gbs: float | None = None,
    title: str = "Benchmark results",
    notes: list[str] | None = None,
) -> list[tuple[str, str, str]]:
    """Write ``out`` and ``png`` from the result files that exist; returns the summary items."""
    meta, benchmarks = {}, []
    for path in paths:
        if path.exists():
            file_meta, records = read_benchmarks(path)
            meta = meta or file_meta
            benchmarks += records
    rows = load_rows(benchmarks)
    env = env or {}
    peak_gbs = peak_gbs or peak_bandwidth(env.get("gpu") or next((r.get("device_name") for r in rows), None))
    atomic_write(out, markdown(meta, env, rows, peak_gbs, title, notes or []))
    plot(rows, png)
    return summary(rows, peak_gbs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "results", type=Path, nargs="+", help="pytest-benchmark JSON or KDFAST_BENCH_JSONL files"
    )
    parser.add_argument("--env", type=Path, default=None, help="environment JSON written by bench/gpu.sh")
    parser.add_argument("--out", type=Path, default=Path("bench/RESULTS.md"))
    parser.add_argument("--png", type=Path, default=Path("bench/results.png"))
    parser.add_argument("--peak-bandwidth-gbs", type=float, default=None)
    parser.add_argument("--title", default="Benchmark results")
    args = parser.parse_args(argv)
    try:
        env = json.loads(args.env.read_text()) if args.env else {}
        missing = [str(p) for p in args.results if not p.exists()]
        if missing:
            raise OSError(f"no such file: {', '.join(missing)}")
        items = render(
            args.results, args.out, args.png, env=env, peak_gbs=args.peak_bandwidth_gbs, title=args.title
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"error: the results are not readable benchmark JSON ({exc})", file=sys.stderr)
        return 2
    print(f"wrote {args.out} and {args.png} ({len(items)} summary figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
