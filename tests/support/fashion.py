"""Fashion-MNIST for the tests: where the distro package's real files are (tests on them skip, with the
reason, where it is not installed), and IDX files written from scratch in the format's own words (a stand-in
folder of the official layout, and broken files for the reader's errors)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from kdfast.config import FASHION_MNIST_PACKAGE, FASHION_MNIST_ROOT

REAL = Path(FASHION_MNIST_ROOT)
FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
needs_real_files = pytest.mark.skipif(
    not all((REAL / f"{name}.gz").is_file() for name in FILES),
    reason=f"the Fashion-MNIST files are not installed: apt-get install {FASHION_MNIST_PACKAGE}",
)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file (LeCun et al.'s MNIST format): 0x00 0x00, type 0x08 (unsigned byte), the number of
    dimensions, each size as a big-endian int32, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def stand_in_folder(folder: Path, train: int = 40, test: int = 20, gz: bool = True, seed: int = 0) -> Path:
    """The four official files with ``train`` / ``test`` 28x28 images: each class a gray blob of its own
    size and brightness over noise (so a model can learn them), labels cycling over the 10 classes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    suffix = ".gz" if gz else ""
    for part, count in (("train", train), ("t10k", test)):
        labels = np.arange(count) % 10
        yy, xx = np.mgrid[:28, :28]
        radius = 4 + labels[:, None, None]
        blob = ((yy - 14) ** 2 + (xx - 14) ** 2 < radius**2) * (100 + 15 * labels[:, None, None])
        images = np.clip(blob + rng.normal(0, 20, size=(count, 28, 28)), 0, 255).astype(np.uint8)
        write_idx(folder / f"{part}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(folder / f"{part}-labels-idx1-ubyte{suffix}", labels.astype(np.uint8), gz)
    return folder
