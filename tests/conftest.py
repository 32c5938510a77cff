"""Test-wide set-up: Triton kernels run through the CPU interpreter where there is no GPU."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any kernels module defines its @triton.jit functions.
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)
