"""Every config under ``configs/`` runs (a base file as part of the configs that inherit it, which check its
keys on load): ``python -m kdfast.train`` loads it, builds its data, teacher and student, checks its taps
with a probe forward and takes one distillation step at batch 2, on generated stand-in data of the right
shape (a CIFAR-100 folder in the official python format, an ImageFolder tree of 3 classes at ImageNet
resolution, the four Fashion-MNIST IDX files). A teacher the config reads from a file gets a stand-in weights
file of its architecture; a teacher it trains gets no epochs. A config naming an unknown method or a tap
path that names no module fails with exit 2 and one line.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from support.fashion import stand_in_folder

from kdfast.config import CONFIG_DIR, load_config, read_config_file
from kdfast.models import build_model
from kdfast.train import main

CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
# A base that other configs inherit runs as part of each of them (its own keys are checked on their load).
BASES = {
    Path(os.path.normpath(path.parent / base))
    for path in CONFIGS
    if isinstance(base := (yaml.safe_load(path.read_text()) or {}).get("base"), str)
}
RUNNABLE = [path for path in CONFIGS if path not in BASES]
WNIDS = ["n01440764", "n01443537", "n01484850"]
ONE_STEP = [
    "data.batch_size=2",
    "data.eval_batch_size=4",
    "data.max_train_samples=3",  # one batch of 2 after SoKD's search holds out one image
    "data.max_val_samples=4",
    "data.num_workers=0",
    "student.train.epochs=1",
    "baseline=false",
    "runtime.device=cpu",
    "runtime.progress=false",
    "runtime.tensorboard=false",
]


def _smooth_images(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """uint8 (count, height, width, 3) images with structure at several scales, as photos have."""
    coarse = rng.uniform(0, 255, size=(count, 3, 4, 4)).astype(np.float32)
    upsampled = torch.nn.functional.interpolate(
        torch.from_numpy(coarse), size=(height, width), mode="bicubic"
    )
    noisy = upsampled.numpy() + rng.normal(0, 12, size=upsampled.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def stand_in_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    cifar = root / "cifar" / "cifar-100-python"
    cifar.mkdir(parents=True)
    for split, count in (("train", 8), ("test", 6)):
        images = _smooth_images(rng, count, 32, 32).transpose(0, 3, 1, 2).reshape(count, 3072)
        fine = rng.integers(0, 100, size=count).tolist()
        batch = {
            b"batch_label": f"{split} batch".encode(),
            b"filenames": [f"img_{i}.png".encode() for i in range(count)],
            b"data": images,
            b"fine_labels": fine,
            b"coarse_labels": [label // 5 for label in fine],
        }
        (cifar / split).write_bytes(pickle.dumps(batch))
    meta = {
        b"fine_label_names": [f"class_{i:02d}".encode() for i in range(100)],
        b"coarse_label_names": [f"super_{i:02d}".encode() for i in range(20)],
    }
    (cifar / "meta").write_bytes(pickle.dumps(meta))
    imagenet = root / "imagenet"
    for split, per_class in (("train", 2), ("val", 2)):
        for wnid in WNIDS:
            folder = imagenet / split / wnid
            folder.mkdir(parents=True)
            for i, pixels in enumerate(_smooth_images(rng, per_class, 250, 333)):
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    fashion = stand_in_folder(root / "fashion_mnist", train=40, test=20)
    return {
        "cifar10": root / "cifar",
        "cifar100": root / "cifar",
        "imagefolder": imagenet,
        "fashion_mnist": fashion,
    }


def _overrides(path: Path, data: dict[str, Path], weights_dir: Path) -> list[str]:
    """The one-step overrides for the config at ``path``: the stand-in data, and a stand-in weights file of
    the teacher's architecture where the config reads the teacher from a file (else no teacher epochs)."""
    raw = read_config_file(path)
    name = (raw.get("data") or {}).get("name", "digits")
    overrides = list(ONE_STEP)
    if name != "digits":
        overrides.append(f"data.root={data[name]}")
    if name == "fashion_mnist":  # its class-balanced subset would stand beside max_train_samples
        overrides.append("data.train_subset=null")
    if (raw.get("teacher") or {}).get("weights") is None:
        return [*overrides, "teacher.train.epochs=0"]
    arch = load_config(path, ["teacher.weights=null", "data.name=digits"]).teacher.arch
    classes = {"digits": 10, "cifar10": 10, "cifar100": 100, "imagefolder": len(WNIDS), "fashion_mnist": 10}[
        name
    ]
    teacher = build_model(arch, num_classes=classes)
    file = weights_dir / f"{path.stem}_teacher.pth"
    torch.save(teacher.state_dict(), file)
    return [*overrides, f"teacher.weights={file}"]


@pytest.mark.slow
@pytest.mark.parametrize("path", RUNNABLE, ids=[str(p.relative_to(CONFIG_DIR)) for p in RUNNABLE])
def test_config_runs_one_step_on_stand_in_data(
    path: Path, stand_in_data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    overrides = _overrides(path, stand_in_data, tmp_path)
    argv = ["--config", str(path), "--out", str(tmp_path / "run")]
    code = main([*argv, *(arg for item in overrides for arg in ("--set", item))])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "student.pt").is_file() and (tmp_path / "run" / "results.json").is_file()


KD_PAIR = CONFIG_DIR / "benchmarks" / "cifar100" / "kd" / "resnet32x4_resnet8x4.yaml"


@pytest.mark.parametrize(
    ("child", "message"),
    [
        ({"loss": {"method": "dkdx"}}, "config key 'loss.method' names no method 'dkdx'"),
        (
            {
                "teacher": {"taps": {"t3": {"path": "layer3"}}},
                "student": {"taps": {"s3": {"path": "layer9"}}},
                "loss": {"method": ["kd", "agkd"], "agkd": {"pairs": [{"student": "s3", "teacher": ["t3"]}]}},
            },
            "student.taps.s3.path 'layer9' is not a module of CifarResNet: did you mean 'layer",
        ),
    ],
)
def test_a_config_naming_a_missing_method_or_a_bad_tap_fails(
    child: dict, message: str, stand_in_data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"base": str(KD_PAIR), **child}))
    overrides = _overrides(KD_PAIR, stand_in_data, tmp_path)
    code = main(
        ["--config", str(path), "--out", str(tmp_path / "run"), *(a for o in overrides for a in ("--set", o))]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
