"""Test-wide set-up: Triton kernels run on the GPU where there is one, else through the CPU interpreter."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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


@pytest.fixture(scope="session")
def trained_student(tmp_path_factory):
    """(student.pt, model, images, labels): the default student (edge_cnn) trained for 2 epochs on 720
    digits images, so it has non-zero biases, BatchNorm statistics of real data and a real accuracy;
    ``images`` are 128 normalized training images (N, 3, 32, 32) float32 and ``labels`` theirs."""
    from digits_students import EDGE_CNN, save_student, train_on_digits
    from test_checkpoint import digits_record

    from kdfast.data import dataset_from_record
    from kdfast.models import build_model

    torch.manual_seed(0)
    model = train_on_digits(build_model(EDGE_CNN), epochs=2, images=720)
    path = save_student(tmp_path_factory.mktemp("trained") / "student.pt", model, EDGE_CNN)
    data = dataset_from_record(digits_record(max_train=128), "train")
    images = torch.stack([data[i][0] for i in range(len(data))]).numpy()
    return path, model, images, np.asarray(data.targets)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` skip, with the reason, where there is no CUDA GPU."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
