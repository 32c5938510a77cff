"""Test-wide set-up: Triton kernels run on the GPU where there is one, else through the CPU interpreter."""

import numpy as np
import pytest
import torch
from support.devices import KERNEL_DEVICE  # noqa: F401  (sets TRITON_INTERPRET first)

torch.manual_seed(0)


@pytest.fixture(scope="session")
def trained_student(tmp_path_factory):
    """(student.pt, model, images, labels): the default student (edge_cnn) trained for 2 epochs on 720
    digits images, so it has non-zero biases, BatchNorm statistics of real data and a real accuracy;
    ``images`` are 128 normalized training images (N, 3, 32, 32) float32 and ``labels`` theirs."""
    from support.students import EDGE_CNN, digits_record, save_student, train_on_digits

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
