"""The errors a user can cause, the exit codes the commands map them to (docs/contracts.md), and what both
commands share to say them in one line: :func:`shown` cuts an echoed value, :func:`os_error_advice` names
the cause of a failed file operation and what to do, :func:`one_line` is the last guard before a message is
printed, and :func:`terminate_like_ctrl_c` makes SIGTERM stop a command the way Ctrl-C does.

Standard library only, so ``export`` can use it without importing the training side.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterator

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM, what `timeout`, `kill` and job schedulers send

SHOWN_CHARS = 80  # an echoed value longer than this is cut: the line stays readable
PATH_CHARS = 300  # a path is cut later: a real one is rarely longer, and its end names the file
LINE_CHARS = 1000  # no printed error line is longer than this


class UsageError(Exception):
    """Bad usage or bad input: a one-line message naming what to change; the command exits 2."""


class ConfigError(UsageError):
    """A config key, value or file that does not validate."""


class CheckpointError(UsageError):
    """A file that is not a loadable kdfast checkpoint, or weights that do not fit the architecture."""


# The failures of writing a file that the machine, not the command, causes; each has its cause and fix.
_WRITE_FAULTS = {
    errno.ENOSPC: ("no space left on its file system", "free space there or choose another output folder"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space in the quota or choose another output folder"),
    errno.EFBIG: ("the file is larger than its file system allows", "choose another output folder"),
    errno.EROFS: ("the file system is read-only", "choose another output folder"),
    errno.EACCES: ("no permission to write there", "fix the permission or choose another output folder"),
    errno.EPERM: ("it is not permitted there", "fix the permission or choose another output folder"),
    errno.ENAMETOOLONG: (
        "the path is too long (a name over 255 bytes or a whole path over 4096)",
        "choose a shorter path",
    ),
    errno.EIO: ("an input/output error of the disk", "check the disk or choose another output folder"),
}


class WriteError(UsageError):
    """A file that cannot be written (a full disk, a quota, a read-only file system, no permission, a name
    too long): one line naming the file, the cause and what to do; the command exits 2. Raised by
    :mod:`kdfast.atomic`, the one path every file of both commands is written through."""

    def __init__(self, path: str | os.PathLike, error: OSError) -> None:
        self.path = os.fspath(path)
        self.error = error
        super().__init__(f"cannot write {shown_path(self.path)}: {os_error_advice(error)}")


def write_fault(exc: BaseException | None) -> OSError | None:
    """The OSError of a write fault (:data:`_WRITE_FAULTS`) that caused ``exc``, looked for along its chain
    of causes (``torch.save`` reports a full disk as a RuntimeError raised while handling the OSError), or
    None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _WRITE_FAULTS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def os_error_advice(error: OSError) -> str:
    """The cause of a failed file operation and what to do about it, in words."""
    if error.errno in _WRITE_FAULTS:
        cause, fix = _WRITE_FAULTS[error.errno]
        return f"{cause} ({errno.errorcode[error.errno]}): {fix}"
    return f"{error.strerror or error}: fix it or choose another output folder"


def shown(value: object, limit: int = SHOWN_CHARS, *, bare: bool = False) -> str:
    """``repr(value)`` (``str`` with ``bare``) for an error line, cut to ``limit`` characters with the length
    said: a 10 MB value must not make a 10 MB line."""
    text = str(value) if bare else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters)"


def shown_path(path: str | os.PathLike) -> str:
    """A path for an error line, cut only when longer than :data:`PATH_CHARS`."""
    return shown(os.fspath(path), PATH_CHARS, bare=True)


def one_line(message: str, limit: int = LINE_CHARS) -> str:
    """``message`` as one printable line of at most about ``limit`` characters: line breaks become spaces and
    an overlong middle is cut, keeping the start (what failed) and the end (what to change)."""
    text = " ".join(str(message).split())
    if len(text) <= limit:
        return text
    head, tail = text[: limit * 2 // 3], text[-(limit // 3) :]
    return f"{head} [... {len(text) - len(head) - len(tail):,} characters cut ...] {tail}"


class TrainingDiverged(Exception):
    """A NaN or infinite loss: the run stops, the last good checkpoint is kept; the command exits 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is when it arrives: a KeyboardInterrupt, so every clean-up Ctrl-C
    runs (temporary files removed, the last finished epoch kept) runs for it too."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM during a run: the last finished epoch is kept and ``--resume`` continues; the command
    exits 130 after Ctrl-C and 143 after SIGTERM (``code``)."""

    def __init__(self, message: str, code: int = EXIT_INTERRUPTED) -> None:
        super().__init__(message)
        self.code = code


def stop_signal(exc: KeyboardInterrupt) -> tuple[str, int]:
    """What stopped the command, in words, and its exit code: Ctrl-C (130) or SIGTERM (143)."""
    return ("SIGTERM", EXIT_TERMINATED) if isinstance(exc, Terminated) else ("Ctrl-C", EXIT_INTERRUPTED)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def terminate_like_ctrl_c() -> Iterator[None]:
    """While the body runs, SIGTERM raises :class:`Terminated` in the main thread instead of killing the
    process at once, so the command stops as it does on Ctrl-C: one line, nothing half-written. The earlier
    handler is put back afterwards (a no-op outside the main thread, where handlers cannot be set)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread of the interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
