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

from kdfast.errors import UsageError, shown, shown_path

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
    existing = _deepest_existing(folder)
    _check_length(folder, existing, flag)
    if existing == folder.absolute() and not folder.is_dir():
        raise UsageError(f"{flag} {folder} is a file, not a folder: choose another output folder")
    if not existing.is_dir():
        raise UsageError(f"{flag} {folder}: {existing} is a file, not a folder: choose another output folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {folder}: {existing} is not writable: choose another output folder")


def _deepest_existing(folder: Path) -> Path:
    """The deepest existing folder (or file) on the way to ``folder``, found from the root down, so that a
    name too long to look up ends the walk instead of raising."""
    absolute = folder.absolute()
    existing = Path(absolute.anchor)
    for part in absolute.parts[1:]:
        try:
            if not (existing / part).exists():
                break
        except OSError:  # ENAMETOOLONG: the name cannot exist
            break
        existing = existing / part
    return existing


# Room for the longest name a run writes inside its folder, as a temporary file (kdfast.atomic):
# ".state_baseline.pt.<8 random characters>.tmp", and a numbered folder's "-<n>".
_LONGEST_INSIDE = 64


def _check_length(folder: Path, existing: Path, flag: str) -> None:
    """UsageError when a name in ``folder`` or the whole path of a file in it is longer than the file system
    under ``existing`` takes: said before anything is created, with the cause."""
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096  # Linux's limits
    for part in folder.parts:
        if len(os.fsencode(part)) > name_max - 8:
            raise UsageError(
                f"{flag} {shown_path(folder)}: the name {shown(part)} is "
                f"{len(os.fsencode(part))} bytes; the file system takes at most {name_max} (less the "
                "'-<n>' of a numbered folder): choose a shorter output folder"
            )
    length = len(os.fsencode(folder.absolute()))
    if length + _LONGEST_INSIDE > path_max:
        raise UsageError(
            f"{flag} {shown_path(folder)}: the path is {length} bytes, "
            f"too long for the files a run writes inside (at most {path_max} in all): choose a shorter "
            "output folder"
        )


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
