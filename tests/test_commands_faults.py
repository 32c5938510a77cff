"""Both commands on a real machine's faults: a full disk (a small tmpfs mounted for the test, filled to
leave a chosen amount free, so the disk runs out at different points of a run), SIGTERM (what `timeout`,
`kill` and a job scheduler send), and an image that cannot be decoded found only once training reached it.
Each ends in one line naming the cause and what to do, exit 2 (143 for SIGTERM), nothing half-written, and a
run that continues with ``--resume``. The same faults injected at the OS boundary, in more places, are the
``WRITE_FAULTS`` table of ``test_commands_fuzz.py``."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support.runs import TINY, set_args

from kdfast.train import main as train_main
from kdfast.train import preflight

TRAIN = [sys.executable, "-m", "kdfast.train", *set_args(TINY)]


@contextlib.contextmanager
def small_disk(folder: Path, megabytes: int) -> Iterator[Path]:
    """A tmpfs of ``megabytes`` at ``folder`` (root may mount one; skipped with the reason elsewhere)."""
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or 'mount failed'}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path, leave_kb: int) -> Path:
    """A file that takes all of ``disk`` but ``leave_kb`` KiB (what another process may have written)."""
    free = shutil.disk_usage(disk).free // 1024
    filler = disk / "filler"
    with filler.open("wb") as f:
        f.write(b"\0" * max(0, free - leave_kb) * 1024)
    return filler


def _one_line(result: subprocess.CompletedProcess, code: int) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


# Free space left on the disk, and the file a tiny run cannot write with it (the teacher's state holds 4.7 MB,
# the teacher 1.5 MB, each later state 1 MB, each student 0.35 MB): the first state file, a later one.
TRAIN_POINTS = {"first-state": (2_000, "state_teacher.pt"), "later-state": (7_000, "state_baseline.pt")}


@pytest.mark.slow
@pytest.mark.parametrize("point", TRAIN_POINTS)
def test_train_on_a_full_disk_is_one_line_exit_2_and_resumes_once_there_is_space(
    point: str, tmp_path: Path
) -> None:
    leave_kb, first_unwritten = TRAIN_POINTS[point]
    with small_disk(tmp_path / "disk", 16) as disk:
        filler = fill(disk, leave_kb)
        out = disk / "run"
        line = _one_line(subprocess.run([*TRAIN, "--out", str(out)], capture_output=True, text=True), 2)
        assert line.startswith(f"kdfast.train: error: cannot write {out / first_unwritten}: no space left")
        assert "(ENOSPC)" in line and f"continue with python -m kdfast.train --resume {out}" in line
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "a temporary file was left"
        for written in out.glob("*.pt"):  # every file that is there is whole
            torch.load(written, weights_only=True)
        kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt")}

        filler.unlink()
        resumed = subprocess.run(
            [sys.executable, "-m", "kdfast.train", "--resume", str(out)], capture_output=True, text=True
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.pt") if p.name in kept} == kept
        assert json.loads((out / "results.json").read_text())["models"]["student"]["epochs"] == 1


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    lines = path.read_text().split("\n") if path.exists() else []
    return [json.loads(line) for line in lines[:-1] if line.strip()]


@pytest.mark.slow
def test_sigterm_stops_a_run_like_ctrl_c_with_exit_143_and_it_resumes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [*TRAIN, "--set", "student.train.epochs=3", "--set", "runtime.log_every=1", "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while proc.poll() is None and not any(r["stage"] == "baseline" for r in _rows(out)):
        assert time.monotonic() < deadline, "the run never reached the baseline stage"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)

    line = _one_line(subprocess.CompletedProcess(command, proc.returncode, "", err), 143)
    assert line.startswith("kdfast.train: stopped by SIGTERM at stage baseline epoch"), line
    assert f"--resume {out}" in line
    resumed = subprocess.run(
        [sys.executable, "-m", "kdfast.train", "--resume", str(out)], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["models"]["student"]["epochs"] == 3


@pytest.mark.slow
def test_an_image_found_broken_mid_run_is_named_and_the_run_resumes_once_it_is_replaced(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks decode a sample of a large data set; a broken file outside it stops the run when an epoch
    reaches it, in one line naming the file, and every finished epoch is kept."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "fox"]):
        (tmp_path / "photos" / name).mkdir(parents=True)
        for i in range(24):
            pixels = np.clip(rng.normal(60 * (c + 1), 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "photos" / name / f"{i}.jpg")
    broken = tmp_path / "photos" / "fox" / "5.jpg"
    whole = broken.read_bytes()
    broken.write_bytes(whole[: len(whole) // 2])
    monkeypatch.setattr(preflight, "DECODED_IMAGES", 0)  # as if the data set were too large to decode all
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave this test process's threads alone
    sets = ["data.name=imagefolder", f"data.root={tmp_path / 'photos'}", "data.max_train_samples=null"]
    sets += ["data.max_val_samples=null", "data.batch_size=8", "baseline=false"]
    out = tmp_path / "run"

    assert train_main([*set_args([*TINY, *sets]), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"image {broken} cannot be decoded" in lines[0], lines
    assert f"continue with python -m kdfast.train --resume {out}" in lines[0]

    broken.write_bytes(whole)
    assert train_main(["--resume", str(out)]) == 0
    assert (out / "student.pt").is_file()


EXPORT = [sys.executable, "-m", "export.trt", "--backends", "ort", "--precision", "fp32", "--baselines"]
EXPORT += ["--max-batch", "2", "--threads", "1", "--iters", "3", "--min-time-s", "0", "--warmup-s", "0"]


def _export_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The one line export.trt says about how it ended (the others are its progress, each with its time)."""
    said = [line for line in result.stderr.strip().splitlines() if not line.startswith("[")]
    assert result.returncode == code, result.stderr[-3000:]
    assert len(said) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return said[0]


def _weights_kb(student: Path) -> int:
    """The student's float weights in KiB: about the size of its fp32 ONNX file."""
    state = torch.load(student, weights_only=True)["state_dict"]
    return sum(t.numel() * t.element_size() for t in state.values() if t.is_floating_point()) // 1024


# Free space left beside the weights' size (none: the fp32 ONNX file cannot be written; 20 KiB more: it can,
# the charts cannot), and the file the export stops at.
EXPORT_POINTS = {"onnx": (0, "student.fp32.onnx"), "chart": (20, "latency_accuracy.png")}


@pytest.mark.slow
@pytest.mark.parametrize("point", EXPORT_POINTS)
def test_export_on_a_full_disk_is_one_line_exit_2_and_the_earlier_export_stays(
    point: str, tmp_path: Path, trained_student
) -> None:
    """A 3 MB tmpfs as --out's file system, holding an earlier export replaced with --overwrite: the export
    stops at the file it cannot write, names it, exits 2, and leaves the folder as it was (no staging
    folder, the earlier export's files byte for byte)."""
    student = trained_student[0]
    more_kb, unwritten = EXPORT_POINTS[point]
    with small_disk(tmp_path / "disk", 3) as disk:
        out = disk / "export"
        out.mkdir()
        (out / "report.json").write_text('{"status": "passed", "manifest": [{"file": "student.fp32.onnx"}]}')
        (out / "student.fp32.onnx").write_bytes(b"an earlier export's file")
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        leave_kb = 100 if more_kb == 0 else _weights_kb(student) + more_kb
        fill(disk, leave_kb)
        command = [*EXPORT, "--model", str(student), "--out", str(out), "--overwrite"]
        line = _export_line(subprocess.run(command, capture_output=True, text=True), 2)
        assert line.startswith(f"export.trt: cannot write {out / unwritten}: no space left"), line
        assert "(ENOSPC)" in line and "an earlier export there is unchanged" in line
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.slow
def test_sigterm_stops_an_export_like_ctrl_c_with_exit_143_and_leaves_no_staging_folder(
    tmp_path: Path, trained_student
) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    command = [*EXPORT, "--model", str(trained_student[0]), "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    said = []
    for line in proc.stderr:  # SIGTERM once the export writes into its staging folder
        said.append(line)
        if "ONNX fp32" in line:
            break
    assert list(out.glob(".export-staging-*")), "the export has no staging folder yet"
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    proc.wait(timeout=300)

    last = _export_line(subprocess.CompletedProcess(command, proc.returncode, "", rest), 143)
    assert last == (
        "export.trt: stopped by SIGTERM; this run's files were removed and an earlier export there is "
        "unchanged"
    ), "".join(said) + rest
    assert {p.name for p in out.iterdir()} == {"notes.txt"}
