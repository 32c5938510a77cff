"""The output folder of one export, which the export owns: nothing of an earlier export is touched until this
one has produced its files, a run that fails leaves no trace, and no file of an earlier export stays beside
the new report that does not cover it.

Files are written (atomically, :mod:`kdfast.atomic`) into a hidden staging folder inside ``--out``
(``.export-staging-<pid>-<random>``); one a killed run left behind is removed by the next export into that
folder. ``report.json`` lists every file the export wrote with its size and SHA-256 (``manifest``). A folder
holding an earlier export (its ``report.json``) is refused unless ``overwrite``; with it, the commit moves
the earlier export's files (those its manifest lists; for an export written before manifests, its reports,
charts, log and ``student.*`` files but kdfast.train's ``student.pt``) into ``--out/.previous-export/``
(replacing the one kept there before) and then each new file into ``--out`` (``os.replace``, one rename per
file), with SIGINT and SIGTERM held off until it is done. Other files in the folder (a user's notes) stay as
they were. If the run stops before the commit (an exception, Ctrl-C, SIGTERM), the staging folder is removed,
and so is ``--out`` itself when this run created it.

:func:`native_output` routes what the runtimes' native code prints (ExecuTorch's cpuinfo lines, OpenVINO's
and TensorRT's loggers) into the export's ``export.log``, so the terminal shows the command's own lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from kdfast.atomic import fsync_dir, write_faults_said
from kdfast.errors import UsageError, os_error_advice, shown_path

REPORT = "report.json"
LOG = "export.log"
PREVIOUS = ".previous-export"
STAGING_PREFIX = ".export-staging-"
# What an export written before report.json had a manifest wrote, besides its student.* artifacts.
_UNLISTED_OUTPUTS = (
    REPORT,
    "report.md",
    LOG,
    "latency_accuracy.png",
    "latency_batch.png",
    "int8_layers.png",
    "speedup_rounds.png",
)


def earlier_export(out: Path) -> list[Path]:
    """The files of the export in ``out`` (none when it holds no ``report.json``), in a fixed order."""
    report = out / REPORT
    if not report.is_file():
        return []
    try:
        manifest = json.loads(report.read_text()).get("manifest")
    except (ValueError, UnicodeDecodeError, AttributeError):  # not an export's report.json: not ours to list
        manifest = None
    if isinstance(manifest, list):
        listed = [out / entry["file"] for entry in manifest if isinstance(entry, dict) and "file" in entry]
        return sorted({*[p for p in listed if p.is_file()], report})
    return sorted(p for p in out.iterdir() if p.is_file() and (p.name in _UNLISTED_OUTPUTS or _artifact(p)))


def _artifact(path: Path) -> bool:
    # student.pt is kdfast.train's checkpoint (an --out beside it holds it), never a file an export writes
    return path.name.startswith("student.") and path.name != "student.pt"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stale_staging(out: Path) -> list[Path]:
    """Staging folders in ``out`` whose export is no longer running (killed with SIGKILL, a lost machine):
    those of a process that does not exist, and those of an export that did not name its process."""
    stale = []
    for folder in out.glob(f"{STAGING_PREFIX}*"):
        pid = folder.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if folder.is_dir() and not (pid.isdigit() and _alive(int(pid))):
            stale.append(folder)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class OutputFolder:
    """The output folder of one export (module docstring)."""

    def __init__(self, out: Path, overwrite: bool = False):
        self.out = out
        self.overwrite = overwrite
        self.staging: Path | None = None
        self._created: Path | None = None  # the outermost folder this run created
        self._committed = False

    def earlier(self) -> list[Path]:
        """The earlier export's files in the output folder (:func:`earlier_export`)."""
        return earlier_export(self.out) if self.out.is_dir() else []

    def check(self) -> None:
        """UsageError, before anything is written, when ``out`` holds an earlier export and ``overwrite`` was
        not given."""
        if not self.overwrite and self.earlier():
            raise UsageError(
                f"--out {shown_path(self.out)} holds an earlier export ({REPORT}): pass --overwrite to "
                f"replace it (its files move to {PREVIOUS}/ there), or choose another --out"
            )

    def __enter__(self) -> OutputFolder:
        self.check()
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._created = missing[-1] if missing else None
            for stale in _stale_staging(self.out):
                shutil.rmtree(stale, ignore_errors=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.out))
        except OSError as e:
            self._remove_created()
            raise UsageError(
                f"output folder {shown_path(self.out)} is not writable: {os_error_advice(e)}"
            ) from None
        return self

    def final(self, staged: Path) -> Path:
        """Where a file written in the staging folder will be once committed."""
        return self.out / staged.relative_to(self.staging)

    def staged(self) -> list[Path]:
        return sorted(p for p in self.staging.rglob("*") if p.is_file())

    def manifest(self) -> list[dict[str, object]]:
        """Every staged file but ``report.json`` (which holds this list), with its size and SHA-256."""
        return [
            {"file": str(p.relative_to(self.staging)), "bytes": p.stat().st_size, "sha256": sha256(p)}
            for p in self.staged()
            if p.relative_to(self.staging) != Path(REPORT)
        ]

    def commit(self) -> None:
        """Move the earlier export aside (``overwrite``) and every staged file into the output folder, with
        Ctrl-C and SIGTERM held until it is done. A rename that fails (the folder's permission changed
        meanwhile) undoes those before it and removes the folders it made, so the folder holds the earlier
        export again, and is raised as :class:`WriteError`."""
        blocked = {signal.SIGINT, signal.SIGTERM}
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        done: list[tuple[Path, Path]] = []
        made: list[Path] = []
        try:
            moves = self._aside(self.earlier()) + [(p, self.final(p)) for p in self.staged()]
            for source, target in moves:
                with write_faults_said(target):
                    missing = [d for d in (target.parent, *target.parent.parents) if not d.exists()]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    made += reversed(missing)
                    os.replace(source, target)
                done.append((source, target))
            fsync_dir(self.out)
            shutil.rmtree(self.staging, ignore_errors=True)
            self._committed = True
        except BaseException:
            for source, target in reversed(done):
                with contextlib.suppress(OSError):
                    os.replace(target, source)
            for folder in reversed(made):  # a folder the earlier export held again is not empty: it stays
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _aside(self, files: list[Path]) -> list[tuple[Path, Path]]:
        """The moves of the earlier export's files into ``.previous-export/``; the one kept there before goes
        into the staging folder first, removed with it once the commit is done (or moved back)."""
        if not files:
            return []
        kept = self.out / PREVIOUS
        older = [(kept, self.staging / PREVIOUS)] if kept.exists() else []
        return older + [(path, kept / path.relative_to(self.out)) for path in files]

    def _remove_created(self) -> None:
        if self._created is not None and self._created.exists():
            shutil.rmtree(self._created, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        if self._committed:
            return
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        self._remove_created()


@contextlib.contextmanager
def native_output(log: Path) -> Iterator[tuple[TextIO, TextIO]]:
    """While the body runs, what the runtimes print goes to ``log``: file descriptors 1 and 2 (native code)
    and Python's ``sys.stderr`` (ExecuTorch's bindings print their C++ log through it, and so do library
    warnings). Yields the stream the command's own progress goes to, the terminal's stderr as it was (or the
    stream a caller put in ``sys.stderr``, as pytest's capture does), and the text stream into ``log``.
    ``sys.stdout`` stays: the command prints its table there at the end."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(ValueError, OSError):
            stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    console, own_console = sys.stderr, False
    with contextlib.suppress(ValueError, OSError, AttributeError):
        if console.fileno() == 2:  # the terminal's stream: keep writing to it through a copy of fd 2
            console, own_console = os.fdopen(os.dup(saved[2]), "w", buffering=1, errors="replace"), True
    earlier_stderr = sys.stderr
    with open(log, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        with open(log, "a", buffering=1, errors="replace") as text:
            sys.stderr = text
            try:
                yield console, text
            finally:
                sys.stderr = earlier_stderr
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        if own_console:
            console.close()
