"""The output folder of one export: nothing of an earlier export is touched until this one has produced its
files, and a run that fails leaves no trace.

Files are written (atomically, :mod:`kdfast.atomic`) into a hidden staging folder inside ``--out``; at the
end each is moved over its namesake in ``--out`` (``os.replace``, one rename per file) and the folder is
fsync-ed. Files of an earlier export that this run does not write stay as they were. If the run stops
before that (an exception, Ctrl-C), the staging folder is removed, and so is ``--out`` itself when this run
created it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from kdfast.atomic import fsync_dir
from kdfast.errors import UsageError


class OutputFolder:
    def __init__(self, out: Path):
        self.out = out
        self.staging: Path | None = None
        self._created: Path | None = None  # the outermost folder this run created
        self._committed = False

    def __enter__(self) -> OutputFolder:
        missing = [p for p in (self.out, *self.out.parents) if not p.exists()]
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._created = missing[-1] if missing else None
            self.staging = Path(tempfile.mkdtemp(prefix=".export-staging-", dir=self.out))
        except OSError as e:
            self._remove_created()
            raise UsageError(
                f"output folder {self.out} is not writable ({e.strerror or e}); pass --out DIR"
            ) from None
        return self

    def final(self, staged: Path) -> Path:
        """Where a file written in the staging folder will be once committed."""
        return self.out / staged.relative_to(self.staging)

    def commit(self) -> None:
        """Move every staged file into the output folder, replacing earlier files of the same name."""
        for path in sorted(self.staging.rglob("*")):
            if path.is_file():
                target = self.final(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
        fsync_dir(self.out)
        shutil.rmtree(self.staging, ignore_errors=True)
        self._committed = True

    def _remove_created(self) -> None:
        if self._created is not None and self._created.exists():
            shutil.rmtree(self._created, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        if self._committed:
            return
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        self._remove_created()
