"""A non-editable install works from any folder: the project installed as a wheel into a fresh virtual
environment (reusing this environment's torch and the rest through a path file, so nothing is downloaded)
runs the embedded default for one epoch per stage from a folder outside the checkout, and the bundled
configs it reads are the installed copies, found by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.egg-info", "build", ".pytest_cache")
ONE_EPOCH = [
    "data.max_train_samples=64",
    "data.max_val_samples=48",
    "teacher.train.epochs=1",
    "student.train.epochs=1",
    "runtime.progress=false",
    "runtime.tensorboard=false",
]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv holding kdfast installed from a copy of the checkout (not editable)."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=SKIP)
    venv = base / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base)
    # Only this environment's site folder itself: its .pth files (the editable checkout) are not read.
    (Path(purelib.stdout.strip()) / "reuse.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    result = _run([*pip, str(source)], cwd=base)
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.rmtree(source)  # what runs next cannot read the copy it was built from
    return python


@pytest.mark.slow
def test_installed_package_imports_from_its_site_folder_and_ships_the_configs(installed: Path, tmp_path):
    probe = "import kdfast, kdfast.config as c; print(kdfast.__file__); print(c.DEFAULT_CONFIG.is_file());"
    probe += "print(c.config_path('configs/kd_digits.yaml'))"
    result = _run([str(installed), "-c", probe], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    module, default_exists, named = result.stdout.split()
    assert Path(module).is_relative_to(installed.parents[1]) and not Path(module).is_relative_to(ROOT)
    assert default_exists == "True"
    assert Path(named).is_file() and Path(named).is_relative_to(installed.parents[1])


@pytest.mark.slow
def test_installed_default_run_trains_from_another_folder(installed: Path, tmp_path):
    args = [str(installed), "-m", "kdfast.train", "--out", "run"]
    result = _run([*args, *[a for item in ONE_EPOCH for a in ("--set", item)]], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "student.pt").is_file()
    assert "distilled" in result.stdout
