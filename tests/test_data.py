"""kdfast.data against independent references: sklearn's own split, hand-made images, F.cross_entropy, the
torchvision policies composed by hand, Mixup's lam recovered from the mixed pixels and a Beta KS test."""

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torchvision.transforms import v2

from kdfast.config import AugmentConfig, DataConfig, RandAugmentConfig
from kdfast.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchMix,
    build_datasets,
    build_transform,
    dataset_from_record,
)
from kdfast.errors import UsageError


def _stack(ds, count=None):
    items = [ds[i] for i in range(count or len(ds))]
    return torch.stack([x for x, _ in items]), [y for _, y in items]


def _normalize(pixels, mean, std):
    return (pixels - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


@pytest.fixture(scope="module")
def digits():
    return build_datasets(DataConfig(name="digits", image_size=16, val_fraction=0.25), seed=3)


def test_digits_split_is_sklearns_stratified_split(digits):
    _, val, info = digits
    raw = load_digits()
    _, expected_val = train_test_split(
        np.arange(len(raw.target)), test_size=0.25, random_state=3, stratify=raw.target
    )
    assert sorted(val.targets) == sorted(raw.target[expected_val].tolist())
    counts, totals = Counter(val.targets), Counter(raw.target.tolist())
    for label, total in totals.items():
        assert abs(counts[label] - 0.25 * total) <= 1
    assert info.classes == [str(d) for d in range(10)]


def test_digits_items_match_upsampled_and_normalized_pixels(digits):
    train, val, info = digits
    raw = load_digits()
    train_idx, val_idx = train_test_split(
        np.arange(len(raw.target)), test_size=0.25, random_state=3, stratify=raw.target
    )
    pixels = torch.from_numpy(raw.images / 16.0).float()[:, None]
    upsampled = F.interpolate(pixels, size=(16, 16), mode="bilinear", align_corners=False)
    train_pixels = upsampled[np.sort(train_idx)]
    assert info.mean == pytest.approx([train_pixels.mean().item()] * 3, abs=1e-5)
    assert info.std == pytest.approx([train_pixels.std(unbiased=False).item()] * 3, abs=1e-5)
    assert info.record["mean"] == info.mean and info.record["std"] == info.std
    images, labels = _stack(val, 5)
    first = np.sort(val_idx)[:5]
    expected = _normalize(upsampled[first].expand(-1, 3, -1, -1), info.mean, info.std)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-5)
    assert labels == raw.target[first].tolist()
    assert images.dtype == torch.float32 and images.shape == (5, 3, 16, 16)


def test_digits_config_mean_std_is_used_and_recorded():
    cfg = DataConfig(name="digits", image_size=8, mean=[0.5] * 3, std=[0.25] * 3, max_val_samples=4)
    _, val, info = build_datasets(cfg, seed=0)
    assert info.record["mean"] == [0.5, 0.5, 0.5] and info.record["std"] == [0.25, 0.25, 0.25]
    image, label = val[0]
    assert image.min() >= (0 - 0.5) / 0.25 - 1e-6 and image.max() <= (1 - 0.5) / 0.25 + 1e-6
    raw = load_digits()
    matches = [
        i
        for i, im in enumerate(raw.images)
        if torch.allclose(torch.from_numpy(im / 16.0).float(), image[0] * 0.25 + 0.5, atol=1e-6)
    ]
    assert matches and all(raw.target[i] == label for i in matches)


def test_split_is_deterministic_and_record_rebuilds_val(digits, tmp_path):
    _, val, info = digits
    _, again, _ = build_datasets(DataConfig(name="digits", image_size=16, val_fraction=0.25), seed=3)
    _, other, _ = build_datasets(DataConfig(name="digits", image_size=16, val_fraction=0.25), seed=4)
    assert again.targets == val.targets and other.targets != val.targets
    torch.save({"data": info.record}, tmp_path / "record.pt")
    record = torch.load(tmp_path / "record.pt", weights_only=True)["data"]
    rebuilt = dataset_from_record(record, split="val")
    assert rebuilt.targets == val.targets
    torch.testing.assert_close(_stack(rebuilt)[0], _stack(val)[0], atol=0, rtol=0)


def test_max_samples_subsets_are_seeded():
    cfg = DataConfig(name="digits", image_size=8, max_train_samples=50, max_val_samples=20)
    train, val, info = build_datasets(cfg, seed=1)
    train2, val2, _ = build_datasets(cfg, seed=1)
    assert len(train) == 50 and len(val) == 20
    assert train.targets == train2.targets
    torch.testing.assert_close(_stack(val)[0], _stack(val2)[0], atol=0, rtol=0)
    rebuilt = dataset_from_record(info.record, split="val")
    torch.testing.assert_close(_stack(rebuilt)[0], _stack(val)[0], atol=0, rtol=0)
    with pytest.raises(UsageError, match="max_val_samples"):
        build_datasets(DataConfig(name="digits", image_size=8, max_val_samples=0), seed=1)


def test_train_augmentation_keeps_shape_and_datasets_pickle():
    augment = AugmentConfig(crop_padding=2, random_resized_crop=True, hflip=True)
    train, _, _ = build_datasets(DataConfig(name="digits", image_size=12, augment=augment), seed=0)
    clone = pickle.loads(pickle.dumps(train))
    torch.manual_seed(0)
    first = train[7][0]
    torch.manual_seed(0)
    assert torch.equal(clone[7][0], first) and first.shape == (3, 12, 12)


def _png(path: Path, color: tuple[int, int, int], size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


COLORS = {"cat": (200, 30, 60), "dog": (10, 250, 128)}


def test_imagefolder_train_val_folders(tmp_path):
    for split, count in (("train", 3), ("val", 2)):
        for name, color in COLORS.items():
            for i in range(count):
                _png(tmp_path / split / name / f"{i}.png", color)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=8)
    train, val, info = build_datasets(cfg, seed=0)
    assert info.classes == ["cat", "dog"] and len(train) == 6 and len(val) == 4
    assert info.record["val_source"] == "folder"
    assert info.mean == IMAGENET_MEAN and info.std == IMAGENET_STD
    for image, label in (val[i] for i in range(len(val))):
        color = torch.tensor(COLORS[info.classes[label]], dtype=torch.float32).view(3, 1, 1) / 255
        expected = _normalize(color.expand(3, 8, 8), IMAGENET_MEAN, IMAGENET_STD)
        torch.testing.assert_close(image, expected, atol=1e-5, rtol=1e-5)


def test_imagefolder_without_val_folder_is_a_recorded_stratified_split(tmp_path):
    for name, color in COLORS.items():
        for i in range(5):
            _png(tmp_path / name / f"{i}.png", color)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, val_fraction=0.4)
    train, val, info = build_datasets(cfg, seed=2)
    assert len(train) == 6 and len(val) == 4
    assert Counter(val.targets) == {0: 2, 1: 2}
    assert info.record["val_source"] == "split"
    assert set(val.split.paths).isdisjoint(train.split.paths)
    rebuilt = dataset_from_record(info.record, split="val")
    assert rebuilt.split.paths == val.split.paths


def test_imagefolder_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UsageError, match="nope"):
        build_datasets(DataConfig(name="imagefolder", root=str(missing)), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="empty.*class subfolders"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "empty")), seed=0)
    (tmp_path / "hollow" / "cat").mkdir(parents=True)
    with pytest.raises(UsageError, match="cat holds no images"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "hollow")), seed=0)
    _png(tmp_path / "onlyval" / "val" / "cat" / "0.png", COLORS["cat"])
    with pytest.raises(UsageError, match="val/ folder but no train/"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "onlyval")), seed=0)
    _png(tmp_path / "onlyval" / "train" / "cat" / "0.png", COLORS["cat"])
    _png(tmp_path / "onlyval" / "val" / "cow" / "0.png", COLORS["cat"])
    with pytest.raises(UsageError, match=r"class folders \['cow'\]"):
        build_datasets(DataConfig(name="imagefolder", root=str(tmp_path / "onlyval")), seed=0)


def _write_batch(path: Path, data: np.ndarray, labels: list[int], label_key: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # bytes keys, as the official Python-2 pickles load with encoding="bytes"
    with path.open("wb") as f:
        pickle.dump({b"data": data.reshape(len(data), -1), label_key: labels}, f, protocol=2)


def _fake_images(count: int, start: int) -> np.ndarray:
    return ((np.arange(count * 3 * 32 * 32) + start) % 256).astype(np.uint8).reshape(count, 3, 32, 32)


def test_cifar10_official_layout(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        _write_batch(base / f"data_batch_{i}", _fake_images(2, i), [i, i + 1], b"labels")
    test_images = _fake_images(3, 100)
    _write_batch(base / "test_batch", test_images, [7, 8, 9], b"labels")
    with (base / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    train, val, info = build_datasets(DataConfig(name="cifar10", root=str(tmp_path), image_size=32), seed=0)
    assert len(train) == 10 and val.targets == [7, 8, 9]
    assert train.targets == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert info.classes == [f"c{i}" for i in range(10)]
    assert info.mean == CIFAR10_MEAN and info.std == CIFAR10_STD
    expected = _normalize(torch.from_numpy(test_images[1]).float() / 255, CIFAR10_MEAN, CIFAR10_STD)
    torch.testing.assert_close(val[1][0], expected, atol=1e-5, rtol=1e-5)
    (base / "data_batch_4").unlink()
    with pytest.raises(UsageError, match="data_batch_4"):
        build_datasets(DataConfig(name="cifar10", root=str(tmp_path)), seed=0)


def test_cifar100_official_layout_and_missing_folder(tmp_path):
    base = tmp_path / "cifar-100-python"
    _write_batch(base / "train", _fake_images(4, 0), [0, 99, 5, 5], b"fine_labels")
    _write_batch(base / "test", _fake_images(2, 7), [3, 4], b"fine_labels")
    with (base / "meta").open("wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, f, protocol=2)
    train, val, info = build_datasets(DataConfig(name="cifar100", root=str(base), image_size=16), seed=0)
    assert train.targets == [0, 99, 5, 5] and val.targets == [3, 4] and len(info.classes) == 100
    assert info.mean == CIFAR100_MEAN and info.std == CIFAR100_STD and val[0][0].shape == (3, 16, 16)
    with pytest.raises(UsageError, match="cifar-100-python"):
        build_datasets(DataConfig(name="cifar100", root=str(tmp_path / "elsewhere")), seed=0)


def _labelled_batch(batch=6, classes=5, size=(9, 13)):
    images = torch.arange(batch, dtype=torch.float32).view(batch, 1, 1, 1).expand(batch, 3, *size).clone()
    labels = torch.tensor([i % classes for i in range(batch)])
    return images, labels


def test_cutmix_targets_equal_kept_pixel_fraction():
    images, labels = _labelled_batch()
    cutmix = BatchMix(5, cutmix=1.0, cutmix_beta=1.0)
    mixed_any = False
    for seed in range(20):
        mixed, targets = cutmix(images, labels, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(targets.sum(1), torch.ones(6))
        kept = (mixed == images).float().mean(dim=(1, 2, 3))
        pasted = (mixed == images.roll(1, dims=0)).float().mean(dim=(1, 2, 3))
        torch.testing.assert_close(kept + pasted, torch.ones(6))
        onehot, rolled = F.one_hot(labels, 5).float(), F.one_hot(labels.roll(1), 5).float()
        expected = kept[:, None] * onehot + (1 - kept[:, None]) * rolled
        torch.testing.assert_close(targets, expected)
        mixed_any |= bool((kept < 1).any())
    assert mixed_any


def test_cutmix_is_deterministic_and_prob_zero_is_identity():
    images, labels = _labelled_batch()
    cutmix = BatchMix(5, cutmix=1.0, cutmix_beta=0.5)
    a = cutmix(images, labels, generator=torch.Generator().manual_seed(11))
    b = cutmix(images, labels, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    identity = BatchMix(5)
    same, targets = identity(images, labels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, images) and torch.equal(targets, F.one_hot(labels, 5).float())
    with pytest.raises(UsageError, match="labels"):
        cutmix(images, labels + 5)


def test_cutmix_targets_feed_cross_entropy():
    images, labels = _labelled_batch()
    _, targets = BatchMix(5, cutmix=1.0)(images, labels, generator=torch.Generator().manual_seed(3))
    logits = torch.randn(6, 5, requires_grad=True)
    loss = F.cross_entropy(logits, targets)
    expected = -(targets * torch.log_softmax(logits, dim=1)).sum(1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad is not None


def test_mixup_targets_are_lam_weighted_labels_with_lam_from_the_pixels():
    images, labels = _labelled_batch()  # image i holds the constant value i, so the pixels give lam away
    mixup = BatchMix(5, mixup=1.0, mixup_alpha=0.4)
    lams = []
    for seed in range(200):
        mixed, targets = mixup(images, labels, generator=torch.Generator().manual_seed(seed))
        partner = images.roll(1, dims=0)
        lam = ((mixed - partner) / (images - partner))[:, 0, 0, 0]  # x = lam x_i + (1 - lam) x_partner
        torch.testing.assert_close(lam, lam[:1].expand(6))  # one lam per batch
        torch.testing.assert_close(mixed, lam[0] * images + (1 - lam[0]) * partner)
        onehot, rolled = F.one_hot(labels, 5).float(), F.one_hot(labels.roll(1), 5).float()
        torch.testing.assert_close(targets, lam[0] * onehot + (1 - lam[0]) * rolled)
        torch.testing.assert_close(targets.sum(1), torch.ones(6))
        lams.append(lam[0].item())
    # lam ~ Beta(0.4, 0.4): a Kolmogorov-Smirnov test against scipy's Beta CDF
    assert scipy.stats.kstest(lams, scipy.stats.beta(0.4, 0.4).cdf).pvalue > 0.01


def test_cutmix_and_mixup_share_the_batches_by_their_probabilities():
    images, labels = _labelled_batch()
    mix = BatchMix(5, cutmix=0.3, cutmix_beta=1.0, mixup=0.5, mixup_alpha=1.0)
    counts = Counter()
    draws = 600
    for seed in range(draws):
        mixed, targets = mix(images, labels, generator=torch.Generator().manual_seed(seed))
        pixels = torch.isin(mixed, images)  # CutMix only moves pixels; Mixup blends them
        if torch.equal(targets, F.one_hot(labels, 5).float()) and torch.equal(mixed, images):
            counts["none"] += 1
        elif pixels.all():
            counts["cutmix"] += 1
        else:
            counts["mixup"] += 1
    for kind, p in (("cutmix", 0.3), ("mixup", 0.5), ("none", 0.2)):
        sd = (p * (1 - p) / draws) ** 0.5
        assert abs(counts[kind] / draws - p) < 4 * sd, (kind, counts)


@pytest.mark.parametrize(
    ("augment", "policy", "params"),
    [
        (AugmentConfig(auto_augment="cifar10"), v2.AutoAugment, {"policy": v2.AutoAugmentPolicy.CIFAR10}),
        (AugmentConfig(auto_augment="imagenet"), v2.AutoAugment, {"policy": v2.AutoAugmentPolicy.IMAGENET}),
        (
            AugmentConfig(rand_augment=RandAugmentConfig(num_ops=3, magnitude=14)),
            v2.RandAugment,
            {"num_ops": 3, "magnitude": 14},
        ),
        (AugmentConfig(trivial_augment=True), v2.TrivialAugmentWide, {}),
    ],
)
def test_the_configured_policy_is_torchvisions_on_uint8_before_normalization(augment, policy, params):
    augment.crop_padding, augment.hflip = 2, True
    transform = build_transform("cifar10", 32, CIFAR10_MEAN, CIFAR10_STD, augment)
    kinds = [type(t) for t in transform.transforms]
    assert kinds == [
        v2.ToDtype,
        v2.Resize,
        v2.RandomCrop,
        v2.RandomHorizontalFlip,
        policy,
        v2.ToDtype,
        v2.Normalize,
    ]
    chosen = transform.transforms[4]
    assert all(getattr(chosen, key) == value for key, value in params.items())
    assert transform.transforms[0].dtype == torch.uint8 and transform.transforms[5].dtype == torch.float32
    # the same draws through torchvision's own transforms composed by hand give the same image
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
    for seed in range(5):
        torch.manual_seed(seed)
        out = transform(image)
        torch.manual_seed(seed)
        by_hand = v2.RandomHorizontalFlip()(v2.RandomCrop(32, padding=2)(image))
        by_hand = type(chosen)(**({"policy": chosen.policy} if policy is v2.AutoAugment else params))(by_hand)
        expected = _normalize(by_hand.float() / 255, CIFAR10_MEAN, CIFAR10_STD)
        torch.testing.assert_close(out, expected)


def test_a_policy_on_float_digits_and_the_record_rebuilds_it(tmp_path):
    cfg = DataConfig(name="digits", image_size=16, augment=AugmentConfig(auto_augment="svhn"))
    train, _, info = build_datasets(cfg, seed=0)
    image, _ = train[3]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
    torch.save({"data": info.record}, tmp_path / "record.pt")
    record = torch.load(tmp_path / "record.pt", weights_only=True)["data"]
    rebuilt = dataset_from_record(record, split="train", augment=True)
    (policy,) = [t for t in rebuilt.transform.transforms if isinstance(t, v2.AutoAugment)]
    assert policy.policy == v2.AutoAugmentPolicy.SVHN
