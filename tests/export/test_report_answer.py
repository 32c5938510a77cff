"""What report.md opens with: per runtime and batch size the fastest verified file, its speedup over the fp32
file of the same runtime from paired rounds, its accuracy drop and the file to ship; then every timed row
ranked. The ratios against hand-computed cases, the choice against ties and failed gates, and, end to end,
a planted slow backend ranked last."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from support.exports import FAST

from export import ort_backend
from export.backends import BACKENDS, Backend, Loaded
from export.report import add_speedups, fastest
from export.trt import main


def _row(backend: str, precision: str, rounds: dict[int, list[float]], *, passed: bool = True) -> dict:
    return {
        "backend": backend,
        "precision": precision,
        "variant": None,
        "gates": [{"gate": "top-1 agreement", "passed": passed}],
        "error": None,
        "latency": {
            "end_to_end": [
                {"batch": b, "p50_ms": sorted(r)[len(r) // 2], "round_p50_ms": r} for b, r in rounds.items()
            ],
            "compute_only": None,
        },
    }


def test_speedups_are_medians_of_per_round_ratios():
    eager = _row("pytorch-eager", "fp32", {1: [2, 4, 6, 8]})
    fp32 = _row("onnxruntime", "fp32", {1: [1, 1, 2, 2]})
    int8 = _row("onnxruntime", "int8", {1: [0.5, 0.5, 1, 1]})
    add_speedups([eager, fp32, int8])
    (s_fp32,), (s_int8,) = fp32["latency"]["end_to_end"], int8["latency"]["end_to_end"]
    # eager / fp32 per round: 2, 4, 3, 4 -> median 3.5, quartiles 2.75 and 4 (numpy's linear interpolation)
    assert s_fp32["vs_eager"] == {"median": 3.5, "q25": 2.75, "q75": 4.0, "rounds": 4}
    # fp32 / int8: 2 in every round; eager / int8: 4, 8, 6, 8 -> sorted 4, 6, 8, 8: median 7, q25 5.5, q75 8
    assert s_int8["vs_fp32"] == {"median": 2.0, "q25": 2.0, "q75": 2.0, "rounds": 4}
    assert s_int8["vs_eager"] == {"median": 7.0, "q25": 5.5, "q75": 8.0, "rounds": 4}
    assert s_fp32["vs_fp32"]["median"] == 1.0


def test_a_file_that_ties_with_fp32_is_not_the_faster_file():
    fp32 = _row("onnxruntime", "fp32", {8: [1.0, 1.0, 1.0, 1.0]})
    fp16 = _row("onnxruntime", "fp16", {8: [0.95, 1.02, 0.97, 1.05]})  # faster in half the rounds only
    int8 = _row("onnxruntime", "int8", {8: [0.8, 0.7, 0.9, 0.75]})
    add_speedups([fp32, fp16, int8])
    pairs = [(r, r["latency"]["end_to_end"][0]) for r in (fp32, fp16)]
    assert fastest(pairs)[0] is fp32
    assert fastest([*pairs, (int8, int8["latency"]["end_to_end"][0])])[0] is int8


class _Slow:
    """ONNX Runtime's fp32 session of the file plus a sleep: a backend planted to be the slowest."""

    def __init__(self, path: Path, threads: int):
        self.run_ort, _ = ort_backend.load(path, threads=threads)

    def __call__(self, x):
        time.sleep(0.01)
        return self.run_ort(x)


@pytest.fixture
def planted(monkeypatch):
    backend = Backend(
        key="slow",
        label="slow-onnxruntime",
        precisions=("fp32",),
        unavailable_reason=lambda: None,
        convert=lambda src, precision: src.onnx[precision],
        load=lambda path, threads: Loaded(_Slow(path, threads)),
    )
    monkeypatch.setitem(BACKENDS, "slow", backend)
    return backend


def test_a_planted_slow_backend_is_ranked_last(trained_student, tmp_path, planted):
    out = tmp_path / "out"
    argv = ["--model", str(trained_student[0]), "--out", str(out), "--backends", "ort", "slow"]
    code = main([*argv, *FAST, "--precision", "fp32", "--baselines", "eager", "--rounds", "4"])
    report = json.loads((out / "report.json").read_text())
    assert code == 0, report["status"]
    rows = {r["backend"]: r for r in report["rows"]}
    for s in rows["slow-onnxruntime"]["latency"]["end_to_end"]:
        assert s["vs_eager"]["median"] < 1.0 and s["vs_eager"]["rounds"] == 4
        fast = next(t for t in rows["onnxruntime"]["latency"]["end_to_end"] if t["batch"] == s["batch"])
        assert fast["vs_eager"]["median"] > s["vs_eager"]["median"]
    md = (out / "report.md").read_text().splitlines()
    headings = [line for line in md if line.startswith("## ")]
    assert headings[0] == "## What to ship"
    assert md.index("## What to ship") < md.index("## Every row")
    start = md.index(next(line for line in md if line.startswith("Every timed row, fastest first")))
    table = md[start + 4 : md.index("", start + 4)]
    ranked = [line.split(" | ")[1] for line in table]
    assert len(ranked) == len(report["rows"])
    assert ranked[-1] == "slow-onnxruntime fp32", ranked
    assert ranked[0] == "onnxruntime fp32", ranked
    # What to ship names the file of each runtime and its accuracy drop.
    answer = [line for line in md[: md.index("## Every row")] if line.startswith("| onnxruntime | ")]
    assert [line.split(" | ")[1] for line in answer] == ["1", "2"]
    assert all("`student.fp32.onnx`" in line and "1.00x" in line for line in answer)
    assert (out / "speedup_rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
