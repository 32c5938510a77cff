"""The one way kdfast writes a file: all of it or none of it, also across a crash or a power loss, and a
failure said in one line.

Every file the two commands write (checkpoints, state files, configs, metrics, reports, ONNX files, engines,
pictures) goes through :func:`atomic_path` or :func:`atomic_write` (:func:`append_line` for the metrics log):
the content goes to a unique temporary file in the destination's folder, is flushed and ``fsync``-ed, renamed
over the destination (``os.replace``, atomic on POSIX within one file system), and the folder is ``fsync``-ed
so the rename itself is durable. On any failure, Ctrl-C included, the temporary file is removed and the
destination keeps its old content. A failure the machine causes (a full disk, a quota, a read-only file
system, no permission, a name too long: :func:`kdfast.errors.write_fault`) is raised as
:class:`kdfast.errors.WriteError`, one line naming the file, the cause and what to do, whatever the writer
raised it as (``torch.save`` reports a full disk as a RuntimeError). Standard library only, so ``export`` can
use it without importing the training side.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from kdfast.errors import UsageError, WriteError, shown, shown_path, write_fault

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def write_faults_said(path: str | os.PathLike) -> Iterator[None]:
    """Turn a write fault raised in the body (directly, or as the cause of another error) into one
    :class:`WriteError` line naming ``path``; every other error passes unchanged."""
    try:
        yield
    except WriteError:
        raise
    except Exception as exc:
        fault = write_fault(exc)
        if fault is None:
            raise
        raise WriteError(path, fault) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path`` for a writer that wants a file name (``onnx.save``,
    ``fig.savefig``, a library's ``save(path)``); on a clean exit it is fsync-ed and renamed to ``path``,
    on an exception it is removed and ``path`` is untouched. The temporary name is unique per call
    (``.<name>.<random>.tmp``), so concurrent writers and stale leftovers never collide."""
    path = Path(path)
    with write_faults_said(path):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with write_faults_said(path):
            # mkstemp creates 0600; the result should get the permissions any new file gets here.
            os.chmod(tmp, 0o666 & ~_umask())
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write ``content`` (bytes, UTF-8 text, or a function that writes to a binary file object, such as
    ``lambda f: torch.save(obj, f)``) to ``path`` atomically and durably; returns ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp, write_faults_said(path), open(tmp, "wb") as f:
        if callable(content):
            content(f)
        else:
            f.write(content.encode() if isinstance(content, str) else content)
        f.flush()
    return path


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` and a newline to the log ``path`` (created if missing). A write that fails is cut
    back off, so the log never keeps half a line, and raised as :class:`WriteError`."""
    path = Path(path)
    data = line.encode() + b"\n"
    with write_faults_said(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                written = 0
                while written < len(data):  # a full disk may take part of a write before it refuses
                    written += os.write(fd, data[written:])
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)


def deepest_existing(folder: Path) -> Path:
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


# Room for the longest path either command writes inside its output folder, as a temporary file: a state
# file's ".state_baseline.pt.<8 random>.tmp", an export's ".export-staging-<pid>-<8 random>/" around one.
_LONGEST_INSIDE = 96
# Room kept in a folder's own name for the "-<n>" of a numbered run folder.
_NUMBER_ROOM = 8


def check_length(folder: Path, flag: str) -> None:
    """UsageError, before anything is created, when a name in ``folder`` (the output folder ``flag`` gave) or
    the path of a file written inside it is longer than its file system takes: ENAMETOOLONG said with its
    cause."""
    existing = deepest_existing(folder)
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096  # Linux's limits
    for part in folder.parts:
        if len(os.fsencode(part)) > name_max - _NUMBER_ROOM:
            raise UsageError(
                f"{flag} {shown_path(folder)}: the name {shown(part)} is {len(os.fsencode(part))} bytes; the "
                f"file system takes at most {name_max}: choose a shorter output folder"
            )
    length = len(os.fsencode(folder.absolute()))
    if length + _LONGEST_INSIDE > path_max:
        raise UsageError(
            f"{flag} {shown_path(folder)}: the path is {length} bytes, too long for the files written inside "
            f"(at most {path_max} in all): choose a shorter output folder"
        )
