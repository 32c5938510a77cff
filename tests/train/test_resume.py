"""A run stopped by kill -9 (at several seeded points, one after the other) or by Ctrl-C continues with
``--resume`` and ends exactly where the uninterrupted run ends (CPU): the same results, the same validation
rows and the same student weights, bit for bit. A metrics line cut short by a kill is dropped on resume."""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from support.runs import TINY, set_args, train

from kdfast.results import TIMING_KEYS

# Three baseline and distillation epochs, a metrics row per step (14 step rows: the kill points), one thread
# in every process so that every float sum is done in the same order.
RESUMABLE = [*TINY, "student.train.epochs=3", "runtime.log_every=1", "runtime.threads=1"]
NEW_RUN = [sys.executable, "-m", "kdfast.train", *set_args(RESUMABLE), "--out"]


def _rows(out: Path) -> list[dict]:
    """The whole rows of metrics.jsonl (a last line cut short by a kill is left out)."""
    path = out / "metrics.jsonl"
    lines = path.read_text().split("\n") if path.exists() else []
    return [json.loads(line) for line in lines[:-1] if line.strip()]


def _position(row: dict) -> tuple:
    return row["stage"], row["epoch"], row["step"], row["split"], row["scope"]


def _val_rows(out: Path) -> list[dict]:
    keys = ("stage", "epoch", "step", "loss", "top1", "top5")
    return [{k: r[k] for k in keys} for r in _rows(out) if r["split"] == "val"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "a"
    result = train(out, RESUMABLE)
    assert result.returncode == 0, result.stderr
    return out


def _stop_at(command: list[str], out: Path, target: tuple, sig: int) -> subprocess.CompletedProcess:
    """Start ``command`` and send ``sig`` as soon as ``out/metrics.jsonl`` holds the row at ``target``."""
    # A shell's background job inherits SIGINT ignored, and Python then installs no Ctrl-C handler: the
    # run gets the disposition a terminal gives it.
    proc = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 600
    while proc.poll() is None and target not in {_position(r) for r in _rows(out)}:
        assert time.monotonic() < deadline, "the run never reached the kill point"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(command, proc.returncode, "", err)


def _assert_same_run(b: Path, a: Path) -> None:
    assert _untimed(b / "results.json") == _untimed(a / "results.json")
    assert _val_rows(b) == _val_rows(a)
    student_a = torch.load(a / "student.pt", weights_only=True)["state_dict"]
    student_b = torch.load(b / "student.pt", weights_only=True)["state_dict"]
    for key, tensor in student_a.items():
        assert torch.equal(student_b[key], tensor), key


def _untimed(results_json: Path) -> dict:
    """results.json without the wall times and throughputs, which differ from run to run."""
    results = json.loads(results_json.read_text())
    for row in results["models"].values():
        for key in TIMING_KEYS:
            row.pop(key, None)
    return results


@pytest.mark.slow
def test_killed_at_seeded_points_resumes_to_the_same_results(uninterrupted: Path, tmp_path: Path) -> None:
    steps = [_position(r) for r in _rows(uninterrupted) if r["scope"] == "step"]
    assert len(steps) == 14
    kill_points = sorted(random.Random(15).sample(range(1, len(steps)), 3))
    b = tmp_path / "b"
    command = [*NEW_RUN, str(b)]
    for index in kill_points:
        killed = _stop_at(command, b, steps[index], signal.SIGKILL)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        with (b / "metrics.jsonl").open("a") as f:
            f.write('{"stage": "distill", "epo')  # as if the kill had landed inside a write
        command = [sys.executable, "-m", "kdfast.train", "--resume", str(b)]
    teacher_written = (b / "teacher.pt").stat().st_mtime_ns

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resum" in resumed.stdout
    assert (b / "teacher.pt").stat().st_mtime_ns == teacher_written, "the finished teacher stage was redone"
    _assert_same_run(b, uninterrupted)
    assert all(line.endswith("}") for line in (b / "metrics.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_ctrl_c_mid_epoch_exits_130_says_how_to_resume_and_resumes(
    uninterrupted: Path, tmp_path: Path
) -> None:
    b = tmp_path / "b"
    baseline_step = next(_position(r) for r in _rows(uninterrupted) if r["stage"] == "baseline")
    stopped = _stop_at([*NEW_RUN, str(b)], b, baseline_step, signal.SIGINT)

    assert stopped.returncode == 130, stopped.stderr
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stopped.stderr, stopped.stderr
    assert "interrupted at stage baseline" in lines[0] and f"--resume {b}" in lines[0]
    resumed = subprocess.run(
        [sys.executable, "-m", "kdfast.train", "--resume", str(b)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(b, uninterrupted)


@pytest.mark.slow
def test_resume_with_more_epochs_continues_and_config_yaml_records_what_changed_and_when(
    tmp_path: Path,
) -> None:
    """``--resume --set student.train.epochs=3`` on a finished 1-epoch run trains the two student stages on
    to 3 epochs (with the learning rate it also sets), and config.yaml and student.pt's config say so: the
    new values and, under ``resumed``, that they took effect after epoch 1 of every stage. The steps after
    the resume follow the schedule of the new length from the step reached: SGDR's cosine (warm-up 1 epoch,
    2 steps an epoch), computed here in float64."""
    out = tmp_path / "run"
    first = train(out, [*TINY, "runtime.log_every=1", "runtime.threads=1"])
    assert first.returncode == 0, first.stderr
    teacher_written = (out / "teacher.pt").stat().st_mtime_ns

    resumed = subprocess.run(
        [sys.executable, "-m", "kdfast.train", "--resume", str(out)]
        + set_args(["student.train.epochs=3", "student.train.optimizer.lr=0.002"]),
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after epoch 1/3" in resumed.stdout
    assert (out / "teacher.pt").stat().st_mtime_ns == teacher_written
    student = torch.load(out / "student.pt", weights_only=True)
    assert student["metrics"]["epochs"] == 3
    history = [{"after": {"teacher": 1, "baseline": 1, "distill": 1}}]
    history[0]["changed"] = ["student.train.epochs=3", "student.train.optimizer.lr=0.002"]
    for config in (yaml.safe_load((out / "config.yaml").read_text()), student["config"]):
        assert config["student"]["train"]["epochs"] == 3
        assert config["student"]["train"]["optimizer"]["lr"] == 0.002
        assert config["resumed"] == history
    rows = [r for r in _rows(out) if (r["stage"], r["scope"]) == ("distill", "step")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows[2:]:
        expected = 0.002 * 0.5 * (1.0 + math.cos(math.pi * (row["step"] - 2) / 4))
        assert row["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15), row
    assert len([r for r in _rows(out) if r["split"] == "val" and r["stage"] == "baseline"]) == 3
