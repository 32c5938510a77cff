"""A killed run continues with ``--resume`` and ends exactly where the uninterrupted run ends (CPU)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import TINY, set_args, train

from kdfast.results import TIMING_KEYS

# Three baseline epochs so the run is still inside that stage when the epoch-1 state appears.
RESUMABLE = [*TINY, "student.train.epochs=3"]


def _val_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: r[k] for k in ("stage", "epoch", "step", "loss", "top1", "top5")}
        for r in rows
        if r["split"] == "val"
    ]


def _untimed(results_json: Path) -> dict:
    """results.json without the wall times and throughputs, which differ from run to run."""
    results = json.loads(results_json.read_text())
    for row in results["models"].values():
        for key in TIMING_KEYS:
            row.pop(key, None)
    return results


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_final_metrics(tmp_path: Path) -> None:
    a = tmp_path / "a"
    assert train(a, RESUMABLE).returncode == 0

    b = tmp_path / "b"
    command = [sys.executable, "-m", "kdfast.train", "--out", str(b), *set_args(RESUMABLE)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = b / "state_baseline.pt"
    deadline = time.monotonic() + 500
    while not state.exists():
        assert proc.poll() is None, f"run B ended before it could be killed: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "run B never wrote its first baseline state"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = torch.load(state, weights_only=True)["epoch"]
    assert 1 <= killed_at < 3
    assert not (b / "baseline.pt").exists() and not (b / "student.pt").exists()
    teacher_written = (b / "teacher.pt").stat().st_mtime_ns

    resumed = subprocess.run(
        [sys.executable, "-m", "kdfast.train", "--resume", str(b)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (b / "teacher.pt").stat().st_mtime_ns == teacher_written, "the finished teacher stage was redone"
    assert _untimed(b / "results.json") == _untimed(a / "results.json")
    assert _val_rows(b) == _val_rows(a)
    student_a = torch.load(a / "student.pt", weights_only=True)["state_dict"]
    student_b = torch.load(b / "student.pt", weights_only=True)["state_dict"]
    for key, tensor in student_a.items():
        assert torch.equal(student_b[key], tensor), key
