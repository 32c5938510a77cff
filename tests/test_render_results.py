"""bench/render_results.py on a small pytest-benchmark JSON file built here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "render_results.py"


def _bench(group: str, impl: str, case: str, median: float, case_key: str = "case", **info) -> dict:
    stats = {
        "min": median,
        "max": median,
        "mean": median,
        "stddev": 0.0,
        "median": median,
        "rounds": 3,
        "iterations": 1,
        "iqr": 0.0,
        "q1": median,
        "q3": median,
        "ops": 1 / median,
        "total": 3 * median,
    }
    return {
        "group": group,
        "name": f"test_x[{impl}-{case}]",
        "fullname": f"bench/test_x.py::test_x[{impl}-{case}]",
        "params": {"impl": impl},
        "param": f"{impl}-{case}",
        "options": {"timer": "perf_counter"},
        "extra_info": {"impl": impl, case_key: case, **info},
        "stats": stats,
    }


def test_render_writes_tables_speedups_bandwidth_and_chart(tmp_path):
    gpu = {"device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0"}
    data = {
        "machine_info": {
            "node": "gpu-node-7",
            "machine": "x86_64",
            "python_version": "3.11.9",
            "cpu": {"brand_raw": "AMD EPYC 9654"},
        },
        "commit_info": {"id": "abc123"},
        "datetime": "2026-11-22T03:00:00.000000+00:00",
        "version": "5.1.0",
        "benchmarks": [
            _bench(
                "attention_map fwd+bwd",
                "reference",
                "C1280",
                0.004,
                bytes=8_000_000,
                peak_extra_mib=300.0,
                **gpu,
            ),
            _bench(
                "attention_map fwd+bwd", "triton", "C1280", 0.001, bytes=8_000_000, peak_extra_mib=12.5, **gpu
            ),
            _bench("attention_map fwd+bwd", "compiled_reference", "C1280", 0.0025, bytes=8_000_000, **gpu),
            _bench("attention_map fwd+bwd", "triton", "C112", 0.002, bytes=1_000_000, **gpu),
            _bench("train step", "eager", "edge_cnn", 0.10, **gpu),
            _bench("train step", "compiled", "edge_cnn", 0.04, **gpu),
            _bench("attention_kl fwd", "eager", "B64 N197", 0.003, case_key="shape"),
            _bench("attention_kl fwd", "triton", "B64 N197", 0.0006, case_key="shape"),
        ],
    }
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(data))
    out, png = tmp_path / "RESULTS.md", tmp_path / "results.png"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(src),
            "--out",
            str(out),
            "--png",
            str(png),
            "--peak-bandwidth-gbs",
            "10",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    md = out.read_text()
    for line in (
        "- machine: gpu-node-7 (AMD EPYC 9654, x86_64)",
        "- GPU: NVIDIA H100 80GB HBM3",
        "- torch 2.11.0, triton 3.6.0, python 3.11.9",
        "- date: 2026-11-22T03:00:00.000000+00:00",
        "## attention_map fwd+bwd",
        "## train step",
    ):
        assert line in md.splitlines(), line
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    # speedup = 4 ms / 1 ms; 8 MB in 1 ms is 8 GB/s, 80 % of the 10 GB/s peak.
    assert "| C1280 | triton | 1.000 | 4.00x | 12.5 | 8 | 80 |" in rows
    assert "| C1280 | compiled_reference | 2.500 | 1.60x | - | 3 | 32 |" in rows
    assert "| C1280 | reference | 4.000 | 1.00x | 300.0 | 2 | 20 |" in rows
    assert "| C112 | triton | 2.000 | - | - | 0 | 5 |" in rows
    assert "| edge_cnn | compiled | 40.000 | 2.50x | - | - |" in md
    assert "| B64 N197 | triton | 0.600 | 5.00x | - | - |" in md
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_rejects_a_file_that_is_not_benchmark_json(tmp_path):
    src = tmp_path / "bench.json"
    src.write_text("not json")
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            str(src),
            "--out",
            str(tmp_path / "r.md"),
            "--png",
            str(tmp_path / "r.png"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and "not a readable pytest-benchmark JSON" in done.stderr
