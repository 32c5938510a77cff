"""The errors a user can cause, and the exit codes the commands map them to (docs/contracts.md)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad usage or bad input: a one-line message naming what to change; the command exits 2."""


class ConfigError(UsageError):
    """A config key, value or file that does not validate."""


class CheckpointError(UsageError):
    """A file that is not a loadable kdfast checkpoint, or weights that do not fit the architecture."""


class TrainingDiverged(Exception):
    """A NaN or infinite loss: the run stops, the last good checkpoint is kept; the command exits 1."""


class TrainingInterrupted(Exception):
    """Ctrl-C during a run: the last finished epoch is kept and ``--resume`` continues; the command exits 130
    (128 + SIGINT, as a shell reports a process stopped by Ctrl-C)."""
