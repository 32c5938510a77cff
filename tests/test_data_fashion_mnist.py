"""kdfast.data's Fashion-MNIST against independent references: the data set's own reader
(``utils/mnist_reader.py`` of the distro package) on the real files, scikit-learn's stratified split, the
statistics computed with numpy in float64, IDX files written byte by byte; every bad file is one line."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.model_selection import train_test_split
from support.fashion import REAL, idx_bytes, needs_real_files, stand_in_folder, write_idx

from kdfast import config as kdfast_config
from kdfast.checkpoint import has_test_split
from kdfast.config import DataConfig, load_config
from kdfast.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    build_datasets,
    dataset_from_record,
)
from kdfast.errors import ConfigError, UsageError
from kdfast.train import main

READER = Path("/usr/share/doc/dataset-fashion-mnist/utils/mnist_reader.py")


def _official(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The data set's own loader: ``load_mnist(path, kind)`` -> (N, 784) images, (N,) labels."""
    spec = importlib.util.spec_from_file_location("mnist_reader", READER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_mnist(str(REAL), kind=kind)


def _pixels(dataset, indices) -> torch.Tensor:
    """Items back to 8-bit gray: (x * std + mean) * 255, channel 0."""
    images = torch.stack([dataset[i][0] for i in indices])
    return (images[:, 0] * FASHION_MNIST_STD[0] + FASHION_MNIST_MEAN[0]) * 255


@pytest.fixture(scope="module")
def real():
    cfg = DataConfig(name="fashion_mnist", image_size=28, val_fraction=0.1, split_seed=0)
    return build_datasets(cfg, seed=0)


@needs_real_files
def test_splits_are_the_official_files_with_sklearns_stratified_validation(real):
    train, val, info = real
    images, labels = _official("train")
    train_idx, val_idx = train_test_split(np.arange(60000), test_size=0.1, random_state=0, stratify=labels)
    assert len(train) == 54000 and len(val) == 6000
    assert val.targets == labels[np.sort(val_idx)].tolist()
    assert train.targets == labels[np.sort(train_idx)].tolist()
    assert Counter(val.targets) == dict.fromkeys(range(10), 600)
    picked = [0, 1, 2999, 5999]
    expected = torch.from_numpy(images[np.sort(val_idx)[picked]].reshape(-1, 28, 28)).float()
    torch.testing.assert_close(_pixels(val, picked), expected, atol=1e-3, rtol=0)
    test = dataset_from_record(info.record, "test")
    test_images, test_labels = _official("t10k")
    assert test.targets == test_labels.tolist()
    torch.testing.assert_close(
        _pixels(test, [0, 9999]),
        torch.from_numpy(test_images[[0, 9999]].reshape(-1, 28, 28)).float(),
        atol=1e-3,
        rtol=0,
    )
    assert info.classes == FASHION_MNIST_CLASSES and has_test_split(info.record)
    assert info.record["root"] == str(REAL)


@needs_real_files
def test_default_mean_and_std_are_the_training_images_statistics():
    images, _ = _official("train")
    pixels = images.astype(np.float64) / 255
    assert FASHION_MNIST_MEAN == [pytest.approx(pixels.mean(), abs=5e-5)] * 3
    assert FASHION_MNIST_STD == [pytest.approx(pixels.std(), abs=5e-5)] * 3


@needs_real_files
def test_train_subset_is_class_balanced_fixed_and_rebuilt_from_the_record(real):
    full_train, _, _ = real
    cfg = DataConfig(name="fashion_mnist", image_size=28, val_fraction=0.1, split_seed=0, train_subset=5003)
    train, val, info = build_datasets(cfg, seed=7)
    counts = Counter(train.targets)
    assert counts == {label: 501 if label < 3 else 500 for label in range(10)}
    again, _, _ = build_datasets(cfg, seed=7)
    assert again.targets == train.targets and torch.equal(again.split.images, train.split.images)
    # a subset of the training part: every chosen image is one of the full split's, none a validation image
    chosen = {bytes(img[0].numpy()) for img in train.split.images}
    assert chosen <= {bytes(img[0].numpy()) for img in full_train.split.images}
    assert chosen.isdisjoint({bytes(img[0].numpy()) for img in val.split.images})
    other, _, _ = build_datasets(dataclasses.replace(cfg, split_seed=1), seed=7)
    assert Counter(other.targets) == counts and not torch.equal(other.split.images, train.split.images)
    rebuilt = dataset_from_record(info.record, "train")
    assert rebuilt.targets == train.targets and torch.equal(rebuilt.split.images, train.split.images)


def test_stand_in_folder_reads_gzipped_and_plain_files_alike(tmp_path):
    zipped = stand_in_folder(tmp_path / "gz", train=40, test=20, gz=True)
    plain = stand_in_folder(tmp_path / "raw", train=40, test=20, gz=False)
    runs = [
        build_datasets(DataConfig(name="fashion_mnist", root=str(root), image_size=28, val_fraction=0.25), 0)
        for root in (zipped, plain)
    ]
    (train_a, val_a, info_a), (train_b, val_b, _) = runs
    assert len(train_a) == 30 and len(val_a) == 10 and Counter(val_a.targets) == dict.fromkeys(range(10), 1)
    assert train_a.targets == train_b.targets
    torch.testing.assert_close(_pixels(val_a, range(10)), _pixels(val_b, range(10)), atol=0, rtol=0)
    test = dataset_from_record(info_a.record, "test")
    raw = np.frombuffer(gzip.decompress((zipped / "t10k-images-idx3-ubyte.gz").read_bytes())[16:], np.uint8)
    torch.testing.assert_close(
        _pixels(test, range(20)), torch.from_numpy(raw.reshape(20, 28, 28).copy()).float(), atol=1e-3, rtol=0
    )


def test_batched_items_equal_items_one_by_one(tmp_path):
    root = stand_in_folder(tmp_path / "fm", train=40, test=20)
    _, val, info = build_datasets(DataConfig(name="fashion_mnist", root=str(root), image_size=32), 0)
    test = dataset_from_record(info.record, "test")
    for dataset in (val, test):
        batched = dataset.__getitems__(list(range(len(dataset))))
        for i, (image, label) in enumerate(batched):
            one, its_label = dataset[i]
            assert label == its_label and torch.equal(image, one) and image.shape == (3, 32, 32)


def _broken(tmp_path: Path, name: str, data: bytes) -> Path:
    root = stand_in_folder(tmp_path / "fm", train=20, test=10)
    (root / f"{name}.gz").write_bytes(data)
    return root


def _read(root: Path) -> None:
    build_datasets(DataConfig(name="fashion_mnist", root=str(root), image_size=28), 0)


def test_bad_files_are_one_line_naming_the_file_and_the_package(tmp_path):
    images = np.zeros((20, 28, 28), np.uint8)
    cases = {
        "truncated gzip": (
            "train-images-idx3-ubyte",
            gzip.compress(idx_bytes(images))[:-40],
            "not a readable gzip file",
        ),
        "truncated payload": (
            "train-images-idx3-ubyte",
            gzip.compress(idx_bytes(images)[:-100]),
            "is truncated",
        ),
        "wrong magic": (
            "train-labels-idx1-ubyte",
            gzip.compress(idx_bytes(images)),  # an image file where the labels belong
            "magic number 0x00000803, expected 0x00000801",
        ),
        "count mismatch": (
            "train-labels-idx1-ubyte",
            gzip.compress(idx_bytes(np.zeros(19, np.uint8))),
            "holds 20 images but",
        ),
        "label range": (
            "train-labels-idx1-ubyte",
            gzip.compress(idx_bytes(np.full(20, 10, np.uint8))),
            "holds label 10",
        ),
    }
    for case, (name, data, message) in cases.items():
        root = _broken(tmp_path / case.replace(" ", "_"), name, data)
        with pytest.raises(UsageError, match=message) as info:
            _read(root)
        text = str(info.value)
        assert "\n" not in text and name in text and "dataset-fashion-mnist" in text, (case, text)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="apt-get install dataset-fashion-mnist.*data.root"):
        _read(empty)


def test_missing_default_folder_is_a_config_error_naming_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(kdfast_config, "FASHION_MNIST_ROOT", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist.*data.root"):
        load_config(None, ["data.name=fashion_mnist", "data.image_size=28"])
    with pytest.raises(ConfigError, match="train_subset.*max_train_samples"):
        load_config(None, ["data.train_subset=100", "data.max_train_samples=50"])


def test_the_command_reports_a_broken_file_in_one_line_and_writes_nothing(tmp_path, capsys):
    root = _broken(
        tmp_path, "t10k-images-idx3-ubyte", gzip.compress(idx_bytes(np.zeros((9, 28, 28), np.uint8)))
    )
    out = tmp_path / "run"
    code = main(
        ["--config", "benchmarks/fashion_mnist/kd", "--out", str(out), "--set", f"data.root={root}"]
        + ["--set", "teacher.weights=null", "--set", "runtime.progress=false"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "holds 9 images but" in err, err
    assert not out.exists()


def test_small_subsets_and_missing_test_splits_are_refused(tmp_path):
    root = stand_in_folder(tmp_path / "fm", train=40, test=20)
    with pytest.raises(UsageError, match="cannot hold one image of each of the 10 classes"):
        build_datasets(DataConfig(name="fashion_mnist", root=str(root), train_subset=9), 0)
    rare = np.r_[0, 0, np.arange(38) % 9 + 1].astype(np.uint8)  # two T-shirts: one left after validation
    write_idx(root / "train-labels-idx1-ubyte.gz", rare)
    with pytest.raises(
        UsageError, match="needs 2 training images of class 'T-shirt/top', the training split holds 1"
    ):
        build_datasets(
            DataConfig(name="fashion_mnist", root=str(root), val_fraction=0.25, train_subset=20), 0
        )
    _, _, info = build_datasets(DataConfig(name="digits", image_size=8), 0)
    assert not has_test_split(info.record)
    with pytest.raises(UsageError, match="no test split"):
        dataset_from_record(info.record, "test")
