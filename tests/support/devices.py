"""Where the kernel tests run the Triton code, and a way to run Triton's real compiler without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Must be set before any kernels module defines its @triton.jit functions.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The GPU when there is one, else the CPU through the interpreter.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_without_interpreter(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` in a fresh process with ``TRITON_INTERPRET`` unset, so Triton compiles for real: the
    compile checks need the compiler, which rejects code the interpreter accepts (and needs no GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, check=False)
