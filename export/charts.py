"""The report's pictures: latency against accuracy, latency and throughput against batch size, and INT8
damage (SQNR) per layer."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend is chosen before pyplot is imported
import matplotlib.ticker  # noqa: E402

from kdfast.atomic import atomic_path  # noqa: E402

_MARKERS = "osD^vP*Xh<>"


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def _plain_log_axis(axis: matplotlib.axis.Axis) -> None:
    """Plain numbers on a log axis: matplotlib's default labels minor ticks as 3x10^-1 and they collide."""
    axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _color(i: int) -> tuple[float, ...]:
    """The i-th series' colour: 20 distinct ones (a run with every runtime has more than 10 series)."""
    return plt.get_cmap("tab20")(i % 20)


def latency_accuracy_chart(points: list[tuple[str, float, float]], path: Path) -> Path:
    """(label, batch-1 p50 ms, top-1 accuracy %) per backend and precision, one marker each."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    # Backends often tie on accuracy, so points are told apart by marker and a legend outside the axes
    # rather than by labels that would pile up on each other.
    for i, (label, latency, accuracy) in enumerate(points):
        ax.scatter(latency, accuracy, marker=_MARKERS[i % len(_MARKERS)], color=_color(i), s=60, label=label)
    if points:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
        ax.set_xscale("log")
        _plain_log_axis(ax.xaxis)
    ax.margins(x=0.1, y=0.15)
    ax.set_xlabel("batch-1 p50 latency (ms, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("latency vs accuracy per backend")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def latency_batch_chart(curves: dict[str, list[tuple[int, float, float]]], path: Path) -> Path:
    """Per backend and precision, (batch, p50 ms, images/s) at each batch size: two panels side by side."""
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (label, points) in enumerate(curves.items()):
        batches = [p[0] for p in points]
        style = {"marker": _MARKERS[i % len(_MARKERS)], "color": _color(i), "label": label}
        lat.plot(batches, [p[1] for p in points], **style)
        thr.plot(batches, [p[2] for p in points], **style)
    for ax, ylabel in ((lat, "p50 latency per call (ms, log)"), (thr, "throughput (images/s, log)")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        if curves:
            ax.set_yscale("log")
            _plain_log_axis(ax.yaxis)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    lat.set_title("latency vs batch")
    thr.set_title("throughput vs batch")
    if curves:
        thr.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, path)


def int8_layers_chart(files: dict[str, list[dict]], path: Path) -> Path:
    """Per INT8 file, the SQNR of each weighted layer's output (graph order, then the logits) with every
    layer INT8 and as written; layers kept in float are marked."""
    fig, axes = plt.subplots(len(files), 1, figsize=(11, 3.6 * len(files)), squeeze=False)
    for ax, (name, layers) in zip(axes[:, 0], files.items(), strict=True):
        x = range(len(layers))
        for key, label, style in (
            ("sqnr_all_int8_db", "every layer INT8", "o-"),
            ("sqnr_db", "as written", "s-"),
        ):
            ax.plot(
                x,
                [float("nan") if layer[key] is None else layer[key] for layer in layers],
                style,
                ms=3,
                label=label,
            )
        kept = [i for i, layer in enumerate(layers) if layer.get("float")]
        for i in kept:
            ax.axvline(i, color="tab:red", alpha=0.25, lw=4)
        if kept:
            ax.plot([], [], color="tab:red", alpha=0.4, lw=4, label="kept in float")
        step = max(1, len(layers) // 24)
        ax.set_xticks(
            list(x)[::step], [layer["layer"] for layer in layers][::step], rotation=60, ha="right", fontsize=6
        )
        ax.set_ylabel("SQNR vs float (dB)")
        ax.set_title(f"{name}: quantization damage per layer (higher is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def speedup_chart(panels: dict[int, dict[str, list[float]]], path: Path) -> Path:
    """Per batch size (one panel each), the per-round ratios eager / row of every timed row as a box (median,
    quartiles, whiskers at 1.5 IQR) with each round as a dot: the spread behind every x-eager figure."""
    height = 0.45 * max((len(r) for r in panels.values()), default=1) + 2
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), height), squeeze=False)
    for ax, (batch, ratios) in zip(axes[0], panels.items(), strict=False):
        labels = list(ratios)
        if labels:
            ax.boxplot([ratios[k] for k in labels], vert=False, tick_labels=labels, widths=0.6)
            for i, k in enumerate(labels, start=1):
                ax.plot(ratios[k], [i] * len(ratios[k]), "o", ms=3, alpha=0.5, color="tab:blue")
            ax.set_xscale("log")
            _plain_log_axis(ax.xaxis)
        ax.axvline(1.0, color="gray", lw=1, ls="--")
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("x faster than PyTorch eager, per round (log)")
        ax.set_title(f"batch {batch}: one dot per round")
        ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)
