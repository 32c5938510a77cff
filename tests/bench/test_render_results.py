"""bench/render_results.py on small pytest-benchmark JSON and JSON-lines files built here, every figure
checked against the arithmetic done by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "render_results.py"
GPU = {"device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0"}


def _bench(group: str, impl: str, case: str, median: float, **info) -> dict:
    stats = {"min": median, "max": median, "mean": median, "stddev": 0.0, "median": median, "rounds": 3}
    return {
        "group": group,
        "name": f"test_x[{impl}-{case}]",
        "fullname": f"bench/test_x.py::test_x[{impl}-{case}]",
        "params": {"impl": impl},
        "stats": stats,
        "extra_info": {"impl": impl, "case": case, **GPU, **info},
    }


def _render(tmp_path: Path, *files: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    out, png = tmp_path / "RESULTS.md", tmp_path / "results.png"
    command = [sys.executable, str(SCRIPT), *map(str, files), "--out", str(out), "--png", str(png), *extra]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _rows(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]


def test_render_writes_tables_ratios_memory_launches_bandwidth_and_summary(tmp_path):
    hybrid = "ssim_cosine fwd+bwd B128 C1 14x14"
    amap = "attention_map fwd+bwd"
    benchmarks = [
        _bench(hybrid, "reference", "B128 C1 14x14 fp32", 0.004, peak_extra_mib=30.0),
        _bench(hybrid, "compiled_reference", "B128 C1 14x14 fp32", 0.0015),
        _bench(hybrid, "pytorch_msssim", "B128 C1 14x14 fp32", 0.005),
        _bench(
            hybrid,
            "triton",
            "B128 C1 14x14 fp32",
            0.0004,
            kernel_ms=0.05,
            launches_fwd=2,
            launches_bwd=1,
            peak_extra_mib=0.5,
            peak_extra_with_grads_mib=1.5,
        ),
        _bench(amap, "reference", "C1280", 0.004, bytes=4_020_000),
        _bench(amap, "triton", "C1280", 0.001, bytes=4_020_000, kernel_ms=0.002),
    ]
    data = {
        "machine_info": {"node": "gpu-node-7", "machine": "x86_64", "python_version": "3.11.9"},
        "datetime": "2026-11-22T03:00:00.000000+00:00",
        "benchmarks": benchmarks,
    }
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(data))
    # The training step arrives as JSON lines (KDFAST_BENCH_JSONL), one benchmark per line.
    train = tmp_path / "train.jsonl"
    group = "train_step agkd 224 b128"
    lines = [
        _bench(group, impl, f"{piece} B128", median, piece=piece, images_per_s=round(128 / median, 1))
        for impl, piece, median in [
            ("eager", "teacher_forward", 0.040),
            ("eager", "ce_step", 0.050),
            ("eager", "distill_step", 0.100),
            ("compiled", "distill_step", 0.080),
        ]
    ]
    train.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = _render(tmp_path, src, train)
    assert done.returncode == 0, done.stderr
    md = (tmp_path / "RESULTS.md").read_text()
    for line in (
        "- machine: gpu-node-7 (n/a)",
        "- GPU: NVIDIA H100 80GB HBM3",
        "- torch 2.11.0, triton 3.6.0, python 3.11.9",
        "- date: 2026-11-22T03:00:00.000000+00:00",
        f"## {hybrid}",
        f"## {amap}",
        f"## {group}",
    ):
        assert line in md.splitlines(), line
    rows = _rows(md)
    # 4 / 0.4 ms = 10x eager; 1.5 / 0.4 = 3.75x compiled; 5 / 0.4 = 12.5x pytorch-msssim.
    assert (
        "| B128 C1 14x14 fp32 | triton | 0.400 | 0.050 | 2 / 1 | 10.00x | 3.75x | 12.50x | 0.5 | 1.5 |"
        in rows
    ), rows
    # 4.02 MB in 1 ms of wall time is 4 GB/s; in 2 us of kernel time 2010 GB/s, 60% of an H100's 3350 GB/s.
    assert "| C1280 | triton | 1.000 | 0.002 | 4.00x | 4 | 60 |" in rows, rows
    assert "| distill_step B128 | compiled | 80.000 | 1.25x | 1600.0 |" in rows, rows
    summary = md.split("## Summary against the targets")[1].split("\n## ")[0]
    assert "| hybrid loss fwd+bwd B128 C1 14x14 fp32: Triton vs pytorch-msssim | 12.50x | >= 10x |" in summary
    assert (
        "| hybrid loss fwd+bwd B128 C1 14x14 fp32: Triton vs compiled reference | 3.75x | >= 3x |" in summary
    )
    assert "| hybrid loss B128 C1 14x14 fp32: launches fwd / bwd | 2 / 1 | <= 2 / 2 |" in summary
    assert "| attention map fwd+bwd C1280: HBM bandwidth in kernel time | 60% of peak | >= 60% |" in summary
    # Overhead = 100 - 40 - 50 = 10 ms, 10% of the eager step; compiled vs eager 100 / 80.
    overhead = f"| {group} distillation overhead eager (step - teacher forward - CE step) |"
    assert f"{overhead} 10.0 ms (10.0% of the step) | - |" in summary
    assert f"| {group} distill step compiled vs eager | 1.25x | >= 1.5x |" in summary
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_rejects_a_file_that_is_not_benchmark_json(tmp_path):
    src = tmp_path / "bench.json"
    src.write_text("not json")
    done = _render(tmp_path, src)
    assert done.returncode == 2 and "not readable benchmark JSON" in done.stderr
    assert not (tmp_path / "RESULTS.md").exists()


def test_render_keeps_the_cases_before_a_line_cut_short(tmp_path):
    # A benchmark step killed at its timeout may leave half a line after the cases that finished.
    src = tmp_path / "kernels.jsonl"
    whole = json.dumps(_bench("attention_kl fwd B64 H12 N197 D64", "triton", "B64 N197", 0.002))
    src.write_text(whole + "\n" + whole[: len(whole) // 2])
    done = _render(tmp_path, src)
    assert done.returncode == 0, done.stderr
    assert "| B64 N197 | triton | 2.000 |" in (tmp_path / "RESULTS.md").read_text()
