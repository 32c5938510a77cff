"""Test-wide set-up: Triton kernels run through the CPU interpreter where there is no GPU."""

import os
import subprocess
import sys

import numpy as np
import pytest
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
