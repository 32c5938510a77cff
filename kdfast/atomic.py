"""The one way kdfast writes a file: all of it or none of it, also across a crash or a power loss.

Every file the two commands write (checkpoints, state files, configs, metrics, reports, ONNX files, engines,
pictures) goes through :func:`atomic_path` or :func:`atomic_write`: the content goes to a unique temporary
file in the destination's folder, is flushed and ``fsync``-ed, renamed over the destination (``os.replace``,
atomic on POSIX within one file system), and the folder is ``fsync``-ed so the rename itself is durable. On
any failure, Ctrl-C included, the temporary file is removed and the destination keeps its old content.
Standard library only, so ``export`` can use it without importing the training side.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

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
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path`` for a writer that wants a file name (``onnx.save``,
    ``fig.savefig``, a library's ``save(path)``); on a clean exit it is fsync-ed and renamed to ``path``,
    on an exception it is removed and ``path`` is untouched. The temporary name is unique per call
    (``.<name>.<random>.tmp``), so concurrent writers and stale leftovers never collide."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp creates 0600; the result should get the permissions any new file gets here.
    os.chmod(tmp, 0o666 & ~_umask())
    try:
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
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if callable(content):
            content(f)
        else:
            f.write(content.encode() if isinstance(content, str) else content)
        f.flush()
    return path
