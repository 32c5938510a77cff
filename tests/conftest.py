"""Test-wide set-up: Triton kernels run on the GPU where there is one, else through the CPU interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Must be set before any kernels module defines its @triton.jit functions.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Where the kernel tests run the Triton code: the GPU when there is one, else the CPU through the interpreter.
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

torch.manual_seed(0)


def run_without_interpreter(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` in a fresh process with ``TRITON_INTERPRET`` unset, so Triton compiles for real: the
    compile checks need the compiler, which rejects code the interpreter accepts (and needs no GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, check=False)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` skip, with the reason, where there is no CUDA GPU."""
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
