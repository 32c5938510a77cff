"""``python -m kdfast.train`` rejects bad input before any work: exit 2, one line naming what to change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.runs import TINY, set_args


def run_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdfast.train", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def assert_usage_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kdfast.train: error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["data.batch_sise=3"], ["'data.batch_sise'", "'batch_size'"]),
        (["data.batch_size=many"], ["'data.batch_size'", "int"]),
        (["data.name=imagefolder"], ["data.root"]),
        (["teacher.weights=no/such/teacher.pt"], ["teacher.weights", "no/such/teacher.pt"]),
        (["runtime.compile=sometimes"], ["'runtime.compile'"]),
    ],
    ids=["unknown-key", "wrong-type", "imagefolder-without-root", "missing-weights", "bad-choice"],
)
def test_config_errors_exit_2_with_one_line(tmp_path: Path, overrides: list[str], needles: list[str]) -> None:
    assert_usage_error(
        run_train(*set_args(overrides), "--out", str(tmp_path / "run"), cwd=tmp_path), *needles
    )
    assert not (tmp_path / "run").exists(), "a config error must stop the run before it writes anything"


def test_empty_data_folder_exits_2(tmp_path: Path) -> None:
    empty = tmp_path / "images"
    empty.mkdir()
    result = run_train(
        *set_args([*TINY, "data.name=imagefolder", f"data.root={empty}"]),
        "--out",
        str(tmp_path / "run"),
        cwd=tmp_path,
    )
    assert_usage_error(result, str(empty))


def test_bad_tap_path_names_close_module_paths(tmp_path: Path) -> None:
    result = run_train(
        *set_args([*TINY, "student.taps.mid.path=blocks.22"]), "--out", str(tmp_path / "run"), cwd=tmp_path
    )
    assert_usage_error(result, "'blocks.22'", "'blocks.2'")
    assert not (tmp_path / "run" / "teacher.pt").exists()


def test_bad_arguments_and_resume_without_a_run_exit_2(tmp_path: Path) -> None:
    assert_usage_error(run_train("--compile", "maybe", cwd=tmp_path), "--compile")
    assert_usage_error(run_train("--resume", str(tmp_path), cwd=tmp_path), "config.yaml")


def test_output_closed_by_its_reader_is_one_line_and_exit_130() -> None:
    """``python -m kdfast.train | head -1``: the closed pipe stops the run with one line on stderr, no
    traceback and no second error from the interpreter at exit."""
    child = (
        "import sys, kdfast.train, kdfast.train.loop as loop\n"
        "def epochs(args):\n"
        "    for i in range(10**6):\n"
        "        print('epoch', i, flush=True)\n"
        "loop.train_command = epochs\n"
        "sys.exit(kdfast.train.main([]))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().startswith("epoch 0")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err
    assert len(err.strip().splitlines()) == 1 and "--resume" in err and "Traceback" not in err, err
