"""The output folder of a run: which folders hold a run, and where a new run goes so that no earlier run is
ever replaced by accident.

A folder holds a run when it holds any file a run writes (:data:`RUN_FILES`, ``state_<stage>.pt``, the
``tensorboard`` folder, a run over seeds' ``seed<N>`` folders), finished or not. A new run never writes into
such a folder: it takes the first numbered folder beside it that does not exist yet (``runs/default`` ->
``runs/default-2`` -> ``runs/default-3``), unless ``--overwrite`` asks to replace the earlier run, whose files
are then removed. Nothing here creates or removes anything before :func:`claim` is called, after every check
of the run has passed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kdfast.atomic import check_length, deepest_existing
from kdfast.errors import UsageError

RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "teacher.pt",
    "baseline.pt",
    "student.pt",
    "results.json",
    "results.md",
    "curves.png",
    "attention.png",
    "tensorboard",
    "qad.yaml",
    "qad.json",
    "qad.md",
    "qad.png",
)


def run_files(folder: Path) -> list[Path]:
    """A run's files in ``folder`` (with the tensorboard and ``seed<N>`` folders), in a fixed order."""
    if not folder.is_dir():
        return []
    named = [folder / name for name in RUN_FILES if (folder / name).exists()]
    seeds = [p for p in sorted(folder.glob("seed*")) if p.is_dir() and p.name[4:].isdigit()]
    return named + sorted(folder.glob("state_*.pt")) + seeds


def _numbered(folder: Path, n: int) -> Path:
    return folder.with_name(f"{folder.name}-{n}")


def check_writable(folder: Path, flag: str) -> None:
    """UsageError unless ``folder`` is a folder, or can be created, that this process may write into;
    ``flag`` names where the folder came from (``--out``, ``--resume``). Nothing is created."""
    check_length(folder, flag)
    existing = deepest_existing(folder)
    if existing == folder.absolute() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file, not a folder: choose another output folder")
    if not existing.is_dir():
        raise UsageError(f"{flag} {folder}: {existing} is a file, not a folder: choose another output folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: {existing} is not writable: choose another output folder")


def plan(requested: Path, overwrite: bool) -> Path:
    """Where a new run will write: ``requested`` when it holds no run (or ``overwrite``), else the first
    numbered folder beside it that does not exist yet. Creates nothing."""
    if overwrite or not run_files(requested):
        return requested
    n = 2
    while _numbered(requested, n).exists():
        n += 1
    return _numbered(requested, n)


def claim(planned: Path, requested: Path, overwrite: bool) -> Path:
    """Create the folder :func:`plan` chose and return it. With ``overwrite``, the earlier run's files in it
    are removed first. A numbered folder is created exclusively: one that appeared in the meantime (another
    run started at the same moment) is passed over for the next number. A folder that cannot be created is
    one UsageError line."""
    try:
        return _create(planned, requested, overwrite)
    except OSError as exc:
        raise UsageError(
            f"cannot create the output folder {planned}: {exc.strerror or exc}: choose another --out"
        ) from None


def _create(planned: Path, requested: Path, overwrite: bool) -> Path:
    if overwrite or planned == requested:
        planned.mkdir(parents=True, exist_ok=True)
        for path in run_files(planned) if overwrite else []:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        return planned
    n = int(planned.name.rsplit("-", 1)[1])
    while True:
        folder = _numbered(requested, n)
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            n += 1
