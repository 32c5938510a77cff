"""Test-wide set-up: Triton kernels run through the CPU interpreter where there is no GPU."""

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    # Must be set before any kernels module defines its @triton.jit functions.
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)


def run_without_interpreter(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh Python with ``TRITON_INTERPRET`` unset, so Triton compiles for real: the
    sm_90 compile checks need the compiler, which rejects code the interpreter accepts (and needs no GPU)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", script]
    return subprocess.run(command, capture_output=True, text=True, env=env, check=False)
