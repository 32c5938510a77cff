"""Data sets, transforms (torchvision's AutoAugment, RandAugment, TrivialAugmentWide among them) and the batch
mixes CutMix and Mixup.

Every source (scikit-learn's bundled digits, an ImageFolder tree, the official CIFAR-10/100 python files,
the Fashion-MNIST IDX files) becomes a list of labels plus either in-memory images or image paths; one
:class:`ImageDataset` turns them into ``(float32 normalized C x H x W tensor, int label)`` items. Splits are
fixed by ``(val_fraction, seed)`` so that :func:`dataset_from_record` rebuilds the validation split of a run
from the small ``DataInfo.record`` stored in its checkpoint. A data set with an official test split
(Fashion-MNIST) keeps it apart: validation is carved from the training images, and the test images are only
ever evaluated (``dataset_from_record(record, "test")``). Nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from kdfast.config import FASHION_MNIST_PACKAGE, FASHION_MNIST_ROOT, AugmentConfig, DataConfig
from kdfast.errors import ConfigError, UsageError, shown
from kdfast.schema import build

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]
CIFAR100_MEAN = [0.5071, 0.4865, 0.4409]
CIFAR100_STD = [0.2673, 0.2564, 0.2762]

# Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) as Debian and Ubuntu package it (apt-get install
# dataset-fashion-mnist): the four IDX files, gzipped, in FASHION_MNIST_ROOT.
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# The mean and standard deviation of the 60,000 official training images' pixels / 255 (one gray channel,
# repeated as R, G, B like the pixels).
FASHION_MNIST_MEAN = [0.2860, 0.2860, 0.2860]
FASHION_MNIST_STD = [0.3530, 0.3530, 0.3530]
# IDX magic numbers: two zero bytes, the element type (0x08: unsigned byte), the number of dimensions.
IDX_UBYTE = 0x08

# ImageNet's evaluation geometry: resize the short side to 256/224 of the crop, then center crop.
EVAL_RESIZE_RATIO = 256 / 224

# the per-image augmentation keys a data record keeps (the batch mixes act in the loop, not in the data set)
IMAGE_AUGMENT = (
    "crop_padding",
    "random_resized_crop",
    "hflip",
    "auto_augment",
    "rand_augment",
    "trivial_augment",
)
RECORD_KEYS = (
    "name",
    "root",
    "image_size",
    "val_fraction",
    "seed",
    "max_val_samples",
    "mean",
    "std",
    "classes",
)
SPLITS = ("train", "val", "test")


@dataclass
class DataInfo:
    """What the rest of a run needs to know about its data; ``record`` rebuilds the splits."""

    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Split:
    """One split before transforms: labels plus images (N, 3, h, w) in [0, 1] or uint8, or image paths."""

    labels: list[int]
    images: Tensor | None = None
    paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: Sequence[int]) -> _Split:
        idx = [int(i) for i in indices]
        return _Split(
            labels=[self.labels[i] for i in idx],
            images=self.images[idx] if self.images is not None else None,
            paths=[self.paths[i] for i in idx] if self.paths is not None else None,
        )


@dataclass
class _Source:
    """A data set's splits before subsets and transforms, its class names and where val came from ("split",
    "folder", "official test set"); ``test`` the official test split where it is kept apart from val."""

    train: _Split
    val: _Split
    classes: list[str]
    val_source: str
    test: _Split | None = None


class ImageDataset(Dataset):
    """Items ``(image, label)``: the image is transformed to a normalized float32 (3, H, W) tensor.

    Holds only tensors, strings and torchvision transforms, so it pickles into DataLoader workers.
    ``deterministic``: the transform draws nothing at random (an evaluation transform), so a batch of
    in-memory images may go through it at once (:meth:`__getitems__`).
    """

    def __init__(
        self, split: _Split, transform: v2.Compose, classes: list[str], deterministic: bool = False
    ) -> None:
        self.split = split
        self.transform = transform
        self.classes = classes
        self.deterministic = deterministic

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if self.split.paths is not None:
            image = _read_image(self.split.paths[index])
        else:
            image = self.split.images[index]
        return self.transform(image), self.split.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        """The items of a batch (``DataLoader`` asks for them so): with a deterministic transform of in-memory
        images, one call of it on the stacked images, the same numbers as item by item (torchvision's v2
        transforms act on any leading dimensions) without the per-item overhead that made evaluating
        Fashion-MNIST's 10,000 test images take longer than the model's forward passes; else item by item."""
        if not self.deterministic or self.split.images is None:
            return [self[i] for i in indices]
        idx = [int(i) for i in indices]
        images = self.transform(self.split.images[idx])
        return list(zip(images.unbind(0), (self.split.labels[i] for i in idx), strict=True))

    @property
    def targets(self) -> list[int]:
        return self.split.labels


def _read_image(path: str) -> Tensor:
    """The whole image decoded (``convert`` reads every pixel, so a truncated file fails here, not only its
    header), as uint8 RGB; a file that cannot be decoded is one UsageError line naming it."""
    try:
        with Image.open(path) as im:
            return v2.functional.pil_to_tensor(im.convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - PIL says a broken file with OSError, SyntaxError or ValueError
        raise UsageError(
            f"image {path} cannot be decoded ({type(exc).__name__}: {shown(str(exc), bare=True)}): "
            "replace it with a readable copy"
        ) from None


def check_decodes(dataset: ImageDataset, limit: int, seed: int = 0) -> int:
    """Decode the image files of ``dataset`` (an ImageFolder split; in-memory images need no check): every
    one when it holds at most ``limit``, else a seeded random ``limit`` of them. The first that cannot be
    decoded is one UsageError line naming it. Returns how many files were decoded."""
    paths = dataset.split.paths
    if paths is None:
        return 0
    chosen = range(len(paths))
    if len(paths) > limit:
        chosen = sorted(np.random.default_rng(seed).choice(len(paths), size=limit, replace=False).tolist())
    for index in chosen:
        _read_image(paths[index])
    return len(chosen)


def _stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Fixed train/val indices; stratified whenever every class can give the validation split a sample."""
    if len(labels) < 2:
        raise UsageError(
            f"cannot split {len(labels)} image(s) into train and val: add images or a val/ folder"
        )
    indices = np.arange(len(labels))
    counts = np.bincount(np.asarray(labels))
    counts = counts[counts > 0]
    n_val = int(np.ceil(val_fraction * len(labels)))
    can_stratify = counts.min() >= 2 and n_val >= len(counts) and len(labels) - n_val >= len(counts)
    train, val = train_test_split(
        indices, test_size=val_fraction, random_state=seed, stratify=labels if can_stratify else None
    )
    return sorted(train.tolist()), sorted(val.tolist())


def _limit(split: _Split, limit: int | None, seed: int, key: str) -> _Split:
    """A seeded, order-preserving random subset of ``limit`` items (``max_train/val_samples``)."""
    if limit is None or limit >= len(split):
        return split
    if limit <= 0:
        raise UsageError(f"data.{key} must be > 0 (or null for all samples), got {limit}")
    chosen = np.random.default_rng(seed).choice(len(split), size=limit, replace=False)
    return split.take(sorted(chosen.tolist()))


def _balanced(split: _Split, size: int | None, seed: int, classes: list[str]) -> _Split:
    """``data.train_subset``: ``size`` images drawn with ``seed``, ``size // K`` of each of the K classes and
    one more of each of the first ``size % K`` classes, kept in split order (a low-data run that every seed
    and every method of a comparison trains on alike)."""
    if size is None or size >= len(split):
        return split
    if size < len(classes):
        raise UsageError(
            f"data.train_subset={size} cannot hold one image of each of the {len(classes)} classes: "
            f"raise it to at least {len(classes)}"
        )
    labels = np.asarray(split.labels)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label, name in enumerate(classes):
        members = np.flatnonzero(labels == label)
        wanted = size // len(classes) + (label < size % len(classes))
        if len(members) < wanted:
            raise UsageError(
                f"data.train_subset={size} needs {wanted} training images of class {name!r}, the training "
                f"split holds {len(members)}: lower data.train_subset"
            )
        chosen += rng.choice(members, size=wanted, replace=False).tolist()
    return split.take(sorted(chosen))


def _digits(val_fraction: float, seed: int) -> tuple[_Split, _Split, list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # Pixel values are 0..16; three identical channels so RGB students and teachers take them unchanged.
    images = torch.from_numpy(digits.images / 16.0).float().unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    labels = digits.target.tolist()
    train_idx, val_idx = _stratified_split(labels, val_fraction, seed)
    whole = _Split(labels=labels, images=images)
    return whole.take(train_idx), whole.take(val_idx), [str(c) for c in digits.target_names]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def _scan_folder(folder: Path, classes: list[str] | None) -> tuple[_Split, list[str]]:
    """One ImageFolder level: one subfolder per class. Given ``classes`` (from train), the val folder must
    use them, so a label means the same class in both splits; a val folder may lack some classes."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not found:
        raise UsageError(f"{folder} holds no class subfolders: expected one subfolder of images per class")
    is_train = classes is None
    if is_train:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UsageError(f"{folder} has class folders {unknown} that the training folder does not have")
    labels, paths = [], []
    for label, name in enumerate(classes):
        files = _images_in(folder / name) if (folder / name).is_dir() else []
        if not files and is_train:
            raise UsageError(f"class folder {folder / name} holds no images ({', '.join(IMG_EXTENSIONS)})")
        labels += [label] * len(files)
        paths += [str(p) for p in files]
    return _Split(labels=labels, paths=paths), classes


def _imagefolder(root: Path, val_fraction: float, seed: int) -> tuple[_Split, _Split, list[str], str]:
    """``root/train`` + ``root/val``; without a val folder, a fixed stratified split of the train images."""
    if not root.is_dir():
        raise UsageError(f"data.root not found: {root} (expected train/ and val/ folders, or class folders)")
    train_dir = root / "train" if (root / "train").is_dir() else root
    if (root / "val").is_dir() and train_dir == root:
        raise UsageError(f"{root} has a val/ folder but no train/ folder: add {root / 'train'}")
    train, classes = _scan_folder(train_dir, None)
    if (root / "val").is_dir():
        val, _ = _scan_folder(root / "val", classes)
        if len(val) == 0:
            raise UsageError(f"{root / 'val'} holds no images: add images or remove it to split {train_dir}")
        return train, val, classes, "folder"
    train_idx, val_idx = _stratified_split(train.labels, val_fraction, seed)
    return train.take(train_idx), train.take(val_idx), classes, "split"


def _unpickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UsageError(f"CIFAR file not found: {path} (expected the official python-version files)")
    try:
        with path.open("rb") as f:
            # The official CIFAR files are pickles: acceptable only because the user points at them.
            raw = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UsageError(f"{path} is not a CIFAR python-version batch file ({exc})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path} is not a CIFAR python-version batch file (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _cifar_batch(path: Path, label_key: str) -> _Split:
    batch = _unpickle(path)
    if "data" not in batch or label_key not in batch:
        raise UsageError(f"{path} lacks the 'data' or '{label_key}' entry of a CIFAR python-version batch")
    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return _Split(labels=[int(y) for y in batch[label_key]], images=torch.from_numpy(data.copy()))


def _cifar(name: str, root: Path) -> tuple[_Split, _Split, list[str]]:
    """The official train files as train, the official test file as val (no split to record)."""
    if name == "cifar10":
        folder, test_file = "cifar-10-batches-py", "test_batch"
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        meta_file, names_key, label_key = "batches.meta", "label_names", "labels"
    else:
        folder, train_files, test_file = "cifar-100-python", ["train"], "test"
        meta_file, names_key, label_key = "meta", "fine_label_names", "fine_labels"
    base = root if root.name == folder else root / folder
    if not base.is_dir():
        raise UsageError(f"{name} folder not found: {base} (expected {folder}/ from the official archive)")
    parts = [_cifar_batch(base / f, label_key) for f in train_files]
    train = _Split(labels=sum((p.labels for p in parts), []), images=torch.cat([p.images for p in parts]))
    val = _cifar_batch(base / test_file, label_key)
    meta = _unpickle(base / meta_file)
    if names_key not in meta:
        raise UsageError(f"{base / meta_file} lacks the '{names_key}' entry")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    return train, val, classes


def _idx_file(root: Path, name: str) -> Path:
    """``root/name.gz``, else ``root/name``; missing, a one-line error naming the key and the package."""
    for path in (root / f"{name}.gz", root / name):
        if path.is_file():
            return path
    where = "its default" if str(root) == FASHION_MNIST_ROOT else "data.root"
    raise UsageError(
        f"Fashion-MNIST file {name}.gz (or {name}) not found in {root} ({where}): install the data set with "
        f"apt-get install {FASHION_MNIST_PACKAGE} (it puts the files in {FASHION_MNIST_ROOT}) or set "
        "data.root to the folder that holds the four IDX files"
    )


def read_idx(path: Path, dims: int) -> np.ndarray:
    """One IDX file (the MNIST format, which Fashion-MNIST keeps), gzipped or not: the magic number (two zero
    bytes, the element type 0x08 for unsigned bytes, the number of dimensions), ``dims`` big-endian int32
    sizes, then the bytes in row-major order. A file that is not gzip, not IDX of ``dims`` dimensions or
    shorter or longer than its header says is a one-line UsageError naming it and how to repair it."""
    repair = f"reinstall it (apt-get install --reinstall {FASHION_MNIST_PACKAGE}) or fix data.root"
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # the gzip magic number
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError; truncation an EOFError
        raise UsageError(f"{path} is not a readable gzip file ({exc}): {repair}") from None
    magic = bytes([0, 0, IDX_UBYTE, dims])
    header = 4 + 4 * dims
    if len(raw) < header or raw[:4] != magic:
        raise UsageError(
            f"{path} is not an IDX file of {dims}-dimensional unsigned bytes (magic number "
            f"0x{raw[:4].hex() or 'missing'}, expected 0x{magic.hex()}): {repair}"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        state = "truncated" if len(raw) < expected else "longer than its header says"
        raise UsageError(
            f"{path} is {state}: its header promises {' x '.join(map(str, shape))} bytes ({expected} with "
            f"the header), the file holds {len(raw)}: {repair}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _fashion_mnist_part(root: Path, part: str) -> _Split:
    """The official ``train`` (60,000) or ``test`` (10,000) images as (N, 3, 28, 28) uint8 (the gray channel
    repeated as R, G, B, a view that costs no memory until a split takes its images) and their labels."""
    images_name, labels_name = FASHION_MNIST_FILES[part]
    paths = (_idx_file(root, images_name), _idx_file(root, labels_name))
    return _read_images_and_labels(*paths, tuple((p.stat().st_mtime_ns, p.stat().st_size) for p in paths))


@functools.lru_cache(maxsize=4)
def _read_images_and_labels(images_path: Path, labels_path: Path, stamp: tuple) -> _Split:
    """An IDX image file and its label file, read once per process while ``stamp`` (their modification times
    and sizes) holds: a comparison builds the same data set for every run, and a run once more for its test
    split. Splits only ever ``take`` from the result, which makes copies."""
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise UsageError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels: the "
            f"files do not belong together; reinstall them (apt-get install --reinstall "
            f"{FASHION_MNIST_PACKAGE}) or fix data.root"
        )
    if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise UsageError(
            f"{labels_path} holds label {int(labels.max())}, Fashion-MNIST's are 0..9: it is not its label "
            f"file; reinstall it (apt-get install --reinstall {FASHION_MNIST_PACKAGE}) or fix data.root"
        )
    pixels = torch.from_numpy(images.copy()).unsqueeze(1).expand(-1, 3, -1, -1)
    return _Split(labels=labels.tolist(), images=pixels)


def _fashion_mnist(root: Path, val_fraction: float, seed: int) -> _Source:
    """Validation is a fixed stratified part of the 60,000 training images; the 10,000 test images are the
    official test split, kept apart."""
    whole = _fashion_mnist_part(root, "train")
    train_idx, val_idx = _stratified_split(whole.labels, val_fraction, seed)
    return _Source(
        whole.take(train_idx),
        whole.take(val_idx),
        list(FASHION_MNIST_CLASSES),
        "split",
        test=_fashion_mnist_part(root, "test"),
    )


def data_root(name: str, root: str | None) -> str | None:
    """The folder a data set is read from: ``data.root``, or for Fashion-MNIST the distro package's folder
    when none is given."""
    if root is None and name == "fashion_mnist":
        return FASHION_MNIST_ROOT
    return root


def _load(name: str, root: str | None, val_fraction: float, seed: int) -> _Source:
    """The splits of a data set (:class:`_Source`)."""
    if name == "digits":
        return _Source(*_digits(val_fraction, seed), "split")
    root = data_root(name, root)
    if root is None:
        raise UsageError(f"data.name={name} needs data.root: the folder that holds the data set")
    if name == "fashion_mnist":
        return _fashion_mnist(Path(root), val_fraction, seed)
    if name == "imagefolder":
        return _Source(*_imagefolder(Path(root), val_fraction, seed))
    if name in ("cifar10", "cifar100"):
        return _Source(*_cifar(name, Path(root)), "official test set")
    raise UsageError(
        f"unknown data set {name!r}: use digits, fashion_mnist, imagefolder, cifar10 or cifar100"
    )


def _computed_stats(split: _Split, image_size: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training images at the size the model sees them."""
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    count = 0
    for chunk in split.images.split(256):
        x = F.interpolate(chunk.float(), size=(image_size, image_size), mode="bilinear", align_corners=False)
        total += x.double().sum(dim=(0, 2, 3))
        total_sq += x.double().pow(2).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def _default_stats(name: str, train: _Split, image_size: int) -> tuple[list[float], list[float]]:
    if name == "fashion_mnist":
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    if name == "imagefolder":
        return IMAGENET_MEAN, IMAGENET_STD
    if name == "cifar10":
        return CIFAR10_MEAN, CIFAR10_STD
    if name == "cifar100":
        return CIFAR100_MEAN, CIFAR100_STD
    return _computed_stats(train, image_size)


def build_transform(
    name: str, image_size: int, mean: Sequence[float], std: Sequence[float], augment: AugmentConfig | None
) -> v2.Compose:
    """Eval (``augment=None``): resize (ImageFolder: resize to 256/224 of the size, then center crop) and
    normalize. Train: random-resized crop or the eval geometry, random crop with padding, horizontal flip,
    then the policy (AutoAugment, RandAugment or TrivialAugmentWide), each as ``augment`` asks, then
    normalize. A policy's operations are defined on 8-bit pixels (posterize, solarize, equalize), so with one
    the image stays uint8 until after it; without, it becomes float32 first, as before policies existed."""
    policy = augment_policy(augment) if augment is not None else None
    steps: list[v2.Transform] = [v2.ToDtype(torch.uint8 if policy else torch.float32, scale=True)]
    if augment is not None and augment.random_resized_crop:
        steps.append(v2.RandomResizedCrop(image_size, antialias=True))
    elif name == "imagefolder":
        steps += [v2.Resize(round(image_size * EVAL_RESIZE_RATIO), antialias=True), v2.CenterCrop(image_size)]
    else:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
    if augment is not None and augment.crop_padding > 0:
        steps.append(v2.RandomCrop(image_size, padding=augment.crop_padding))
    if augment is not None and augment.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if policy is not None:
        steps += [policy, v2.ToDtype(torch.float32, scale=True)]
    steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


# How each data source's pixels reach [0, 1] before the eval transform (``_digits``, ``_cifar_batch``,
# ``_read_image``).
_PIXEL_SOURCES = {
    "digits": "scikit-learn digits: 8x8 gray levels 0..16 divided by 16, gray repeated as R, G, B",
    "cifar10": "8-bit RGB divided by 255",
    "cifar100": "8-bit RGB divided by 255",
    "imagefolder": "the image decoded by PIL, converted to 8-bit RGB, divided by 255",
    "fashion_mnist": "Fashion-MNIST: 28x28 8-bit gray divided by 255, gray repeated as R, G, B",
}


def preprocessing_contract(record: dict[str, Any]) -> dict[str, Any]:
    """The eval transform of :func:`build_transform` (``augment=None``) for a data ``record``, spelled out
    for a deployment that reimplements it without kdfast: pixel source and scale, channel order, resize
    geometry and interpolation, normalization, layout."""
    size = int(record["image_size"])
    if record["name"] == "imagefolder":
        resize = {"shorter_side_to": round(size * EVAL_RESIZE_RATIO), "then_center_crop": [size, size]}
    else:
        resize = {"to": [size, size]}
    return {
        "pixels": _PIXEL_SOURCES.get(record["name"], "values in [0, 1]"),
        "channel_order": "RGB",
        "pixel_range": [0.0, 1.0],
        "resize": resize,
        "interpolation": "bilinear, antialiased (torchvision v2.Resize(antialias=True))",
        "normalize": "(x - mean) / std per channel, after the resize",
        "mean": list(record["mean"]),
        "std": list(record["std"]),
        "layout": "NCHW",
        "dtype": "float32",
    }


def augment_policy(augment: AugmentConfig) -> v2.Transform | None:
    """The configured torchvision policy: ``v2.AutoAugment`` with its learned CIFAR-10 / ImageNet / SVHN
    policy (Cubuk et al. 2019), ``v2.RandAugment(num_ops, magnitude)`` (Cubuk et al. 2020) or
    ``v2.TrivialAugmentWide()`` (Mueller & Hutter 2021); None without one."""
    if augment.auto_augment is not None:
        return v2.AutoAugment(v2.AutoAugmentPolicy(augment.auto_augment))
    if augment.rand_augment is not None:
        return v2.RandAugment(num_ops=augment.rand_augment.num_ops, magnitude=augment.rand_augment.magnitude)
    if augment.trivial_augment:
        return v2.TrivialAugmentWide()
    return None


def _chosen(source: _Source, split: str, limits: dict[str, Any], seed: int) -> _Split:
    """One split with the subsets a run draws from it: the training images' class-balanced
    ``train_subset``, then ``max_train_samples``; ``max_val_samples`` of the validation images; the test
    split whole (its numbers are comparable only over all of it)."""
    if split == "test":
        if source.test is None:
            raise UsageError(
                "this data set has no test split apart from validation (only fashion_mnist keeps one): "
                "use the val split"
            )
        return source.test
    if split == "train":
        chosen = _balanced(source.train, limits.get("train_subset"), seed, source.classes)
        return _limit(chosen, limits.get("max_train_samples"), seed, "max_train_samples")
    return _limit(source.val, limits.get("max_val_samples"), seed, "max_val_samples")


def build_datasets(cfg: DataConfig, seed: int) -> tuple[ImageDataset, ImageDataset, DataInfo]:
    """The training and validation data sets of a run, and the DataInfo (with the record) describing them.
    The split and the ``train_subset`` / ``max_*_samples`` subsets are drawn with ``cfg.split_seed``, else
    the run's ``seed``. A data set with an official test split records it (``test_source``); its images are
    read again only by ``dataset_from_record(record, "test")``, after training."""
    seed = cfg.split_seed if cfg.split_seed is not None else seed
    source = _load(cfg.name, cfg.root, cfg.val_fraction, seed)
    if cfg.mean is not None and cfg.std is not None:
        mean, std = list(cfg.mean), list(cfg.std)
    else:
        default_mean, default_std = _default_stats(cfg.name, source.train, cfg.image_size)
        mean = list(cfg.mean) if cfg.mean is not None else default_mean
        std = list(cfg.std) if cfg.std is not None else default_std
    root = data_root(cfg.name, cfg.root)
    record = {
        "name": cfg.name,
        "root": str(Path(root).resolve()) if root is not None else None,
        "image_size": cfg.image_size,
        "val_fraction": cfg.val_fraction,
        "seed": seed,
        "max_val_samples": cfg.max_val_samples,
        "mean": mean,
        "std": std,
        "classes": source.classes,
        "val_source": source.val_source,
        "test_source": "official test set" if source.test is not None else None,
        "train_subset": cfg.train_subset,
        "max_train_samples": cfg.max_train_samples,
        "augment": {
            key: value for key, value in dataclasses.asdict(cfg.augment).items() if key in IMAGE_AUGMENT
        },
    }
    train = _chosen(source, "train", record, seed)
    val = _chosen(source, "val", record, seed)
    classes = source.classes
    train_ds = ImageDataset(train, build_transform(cfg.name, cfg.image_size, mean, std, cfg.augment), classes)
    val_ds = ImageDataset(
        val, build_transform(cfg.name, cfg.image_size, mean, std, None), classes, deterministic=True
    )
    info = DataInfo(classes=classes, image_size=cfg.image_size, mean=mean, std=std, record=record)
    return train_ds, val_ds, info


def dataset_from_record(record: dict[str, Any], split: str = "val", augment: bool = False) -> ImageDataset:
    """Rebuild a run's ``split`` ("train", "val" or, where the record has a ``test_source``, "test") from
    ``DataInfo.record`` (as stored in a checkpoint's ``data``)."""
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise UsageError(f"data record lacks {', '.join(missing)}: it was not written by kdfast.data")
    if split not in SPLITS:
        raise UsageError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    source = _load(record["name"], record["root"], record["val_fraction"], record["seed"])
    if source.classes != list(record["classes"]):
        raise UsageError(
            f"the data at {record['root']} has classes {source.classes}, the record says {record['classes']}"
        )
    chosen = _chosen(source, split, record, record["seed"])
    try:
        augment_cfg = build(AugmentConfig, record.get("augment", {}), "data.augment") if augment else None
    except ConfigError as exc:
        raise UsageError(f"the data record's augment does not fit this kdfast: {exc}") from None
    transform = build_transform(
        record["name"], record["image_size"], record["mean"], record["std"], augment_cfg
    )
    return ImageDataset(chosen, transform, source.classes, deterministic=augment_cfg is None)


def _clipped_span(center: float, length: float, size: int) -> tuple[int, int]:
    """The pixel span of a box side centred at ``center``, cut off at the image border (so it can shrink)."""
    low, high = np.clip([round(center - length / 2), round(center + length / 2)], 0, size)
    return int(low), int(high)


class BatchMix:
    """The batch mixes, each with soft (B, K) targets for ``F.cross_entropy``: per batch, with probability
    ``cutmix`` CutMix, else with probability ``mixup`` Mixup, else the batch unchanged (one-hot targets); the
    partner of image i is image i - 1 (the batch rolled by one).

    CutMix (Yun et al. 2019, eq. 1-2): lam ~ Beta(cutmix_beta, cutmix_beta); a box of area (1 - lam) W H at a
    uniform center is cut out of each image and filled from its partner; the targets are lam' onehot(y) +
    (1 - lam') onehot(y_partner), lam' = 1 - (clipped box area) / (W H), the fraction of pixels actually kept.
    Mixup (Zhang et al. 2018, eq. 1): lam ~ Beta(mixup_alpha, mixup_alpha); x = lam x_i + (1 - lam)
    x_partner and the targets lam onehot(y) + (1 - lam) onehot(y_partner).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        cutmix: float = 0.0,
        cutmix_beta: float = 1.0,
        mixup: float = 0.0,
        mixup_alpha: float = 1.0,
    ) -> None:
        if num_classes < 1:
            raise UsageError(f"the batch mixes need num_classes >= 1, got {num_classes}")
        if min(cutmix, mixup) < 0 or cutmix + mixup > 1:
            raise UsageError(
                f"data.augment.cutmix and mixup are probabilities summing to <= 1, got {cutmix}, {mixup}"
            )
        if min(cutmix_beta, mixup_alpha) <= 0:
            raise UsageError(
                f"data.augment.cutmix_beta and mixup_alpha must be > 0, got {cutmix_beta}, {mixup_alpha}"
            )
        self.num_classes = num_classes
        self.cutmix, self.cutmix_beta = cutmix, cutmix_beta
        self.mixup, self.mixup_alpha = mixup, mixup_alpha

    def __call__(
        self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        low, high = (int(labels.min()), int(labels.max())) if labels.numel() else (0, 0)
        if low < 0 or high >= self.num_classes:
            raise UsageError(f"batch mix labels must lie in [0, {self.num_classes}), got {low} to {high}")
        targets = F.one_hot(labels.long(), self.num_classes).float()
        # numpy draws the Beta sample; its seed comes from torch so a torch.Generator fixes the whole result.
        device = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
        rng = np.random.default_rng(seed)
        which = rng.random()
        if which < self.cutmix:
            return self._cutmix(images, targets, rng)
        if which < self.cutmix + self.mixup:
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            mixed = lam * images + (1.0 - lam) * images.roll(1, dims=0)
            return mixed.to(images.dtype), lam * targets + (1.0 - lam) * targets.roll(1, dims=0)
        return images, targets

    def _cutmix(self, images: Tensor, targets: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        height, width = images.shape[-2:]
        cut = float(np.sqrt(1.0 - rng.beta(self.cutmix_beta, self.cutmix_beta)))
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        top, bottom = _clipped_span(cy, cut * height, height)
        left, right = _clipped_span(cx, cut * width, width)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = images.roll(1, dims=0)[..., top:bottom, left:right]
        kept = 1.0 - (bottom - top) * (right - left) / (height * width)
        return mixed, kept * targets + (1.0 - kept) * targets.roll(1, dims=0)


def batch_mix(augment: AugmentConfig, num_classes: int) -> BatchMix | None:
    """The run's batch mix, or None when neither CutMix nor Mixup is configured."""
    if augment.cutmix == 0 and augment.mixup == 0:
        return None
    return BatchMix(
        num_classes,
        cutmix=augment.cutmix,
        cutmix_beta=augment.cutmix_beta,
        mixup=augment.mixup,
        mixup_alpha=augment.mixup_alpha,
    )
