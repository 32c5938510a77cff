"""The teacher-output cache (kdfast.teacher_cache): a miss computes every view, a hit reads them back and
equals the teacher run on the replayed view (recomputed here from the stored seed, the generators seeded by
hand), a cache that does not match the run is refused in one line, a killed precompute resumes to the same
bytes, and the run's plan says why a run cannot use it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kdfast.config import AugmentConfig, DataConfig, TapConfig
from kdfast.data import build_datasets
from kdfast.errors import UsageError
from kdfast.models import build_model
from kdfast.taps import QKV, Taps
from kdfast.teacher_cache import CachePlan, ViewSampler, cache_key, decide, digest, load_or_build
from kdfast.train.loop import teacher_forward

BATCH = 8
TAPS = {
    "vgg": TapConfig(path="vgg.features.13"),
    "vit": TapConfig(path="vit.encoder.layers.encoder_layer_3.self_attention", kind="attention"),
}


def _data(augment: AugmentConfig, images: int = 20):
    cfg = DataConfig(image_size=16, max_train_samples=images, max_val_samples=8, augment=augment)
    return build_datasets(cfg, seed=0)[0]


@pytest.fixture(scope="module")
def teacher() -> Taps:
    """The default hybrid teacher at 16x16 after a few steps of training (non-zero biases, BatchNorm
    statistics of real images), tapped at a feature map and at an attention layer's Q, K, V."""
    torch.manual_seed(0)
    model = build_model(
        {"source": "kdfast", "name": "hybrid_teacher_small", "kwargs": {"image_size": 16}}, 10
    )
    data = _data(AugmentConfig())
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor(data.targets)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return Taps(model.eval().requires_grad_(False), TAPS)


class Counting:
    """The gradient-free teacher, counting its calls; KeyboardInterrupt at call ``stop_at`` (a kill)."""

    def __init__(self, teacher: Taps, stop_at: int | None = None) -> None:
        self.forward, self.calls, self.stop_at = teacher_forward(teacher), 0, stop_at

    def __call__(self, images: torch.Tensor):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.forward(images)


def _key(teacher: Taps, dataset, plan: CachePlan) -> dict:
    return cache_key(
        teacher=teacher.model,
        arch={"source": "kdfast", "name": "hybrid_teacher_small"},
        taps=TAPS,
        dataset=dataset,
        plan=plan,
        seed=7,
        fp16=True,
        device=torch.device("cpu"),
        amp=None,
    )


def _build(root: Path, key: dict, dataset, forward, lines: list[str] | None = None):
    say = (lines if lines is not None else []).append
    return load_or_build(
        root, key, dataset, forward, batch_size=BATCH, fp16=True, device=torch.device("cpu"), say=say
    )


def test_miss_computes_every_view_and_a_hit_reads_what_the_teacher_gives_each_replayed_view(
    tmp_path: Path, teacher: Taps
) -> None:
    dataset = _data(AugmentConfig(crop_padding=3, hflip=True))
    plan = CachePlan("replay", 3)
    key = _key(teacher, dataset, plan)
    counting, lines = Counting(teacher), []
    cache = _build(tmp_path, key, dataset, counting, lines)
    rows = len(dataset) * 3
    # ceil(60 / 8) batches for the precompute, one to check the cache against the teacher
    assert counting.calls == -(-rows // BATCH) + 1
    assert not cache.hit and "computing 20 images x 3 view(s)" in lines[0]
    assert cache.path == tmp_path / "teacher" / digest(key)

    again = Counting(teacher)
    hit = _build(tmp_path, key, dataset, again, lines)
    assert hit.hit and again.calls == 1 and "hit" in lines[-1]

    # The reference: view k of image i is the transform under every global generator seeded with seeds[i, k];
    # the teacher runs on it alone, in plain no_grad.
    picked = [(0, 0), (0, 2), (5, 1), (19, 2)]
    views = []
    for i, k in picked:
        seed = int(hit.seeds[i, k])
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        views.append(dataset[i][0])
    with torch.no_grad():
        logits, taps = teacher(torch.stack(views))
    cached_logits, cached_taps = hit.outputs(np.array([i * 3 + k for i, k in picked]), torch.device("cpu"))
    torch.testing.assert_close(cached_logits, logits, rtol=1e-5, atol=1e-5)  # logits are stored in float32
    scale = taps["vgg"].abs().max()
    torch.testing.assert_close(cached_taps["vgg"], taps["vgg"], rtol=0, atol=float(scale) * 2**-10)
    assert isinstance(cached_taps["vit"], QKV)
    for part in ("q", "k", "v"):
        expected = getattr(taps["vit"], part)
        atol = float(expected.abs().max()) * 2**-10
        torch.testing.assert_close(getattr(cached_taps["vit"], part), expected, rtol=0, atol=atol)
    # the augmentation is real: two views of one image differ
    assert not torch.equal(views[0], views[1])
    assert hit.arrays["tap.vgg"].dtype == np.float16 and hit.arrays["logits"].dtype == np.float32


@pytest.mark.parametrize("damage", ["key", "shape", "values", "missing"])
def test_a_cache_that_does_not_match_is_refused_in_one_line(
    tmp_path: Path, teacher: Taps, damage: str
) -> None:
    dataset = _data(AugmentConfig())
    key = _key(teacher, dataset, CachePlan("deterministic", 1))
    folder = _build(tmp_path, key, dataset, Counting(teacher)).path
    if damage == "key":
        recorded = json.loads((folder / "key.json").read_text())
        recorded["transform"] = "another transform"
        (folder / "key.json").write_text(json.dumps(recorded))
    elif damage == "shape":
        np.save(folder / "logits.npy", np.zeros((3, 10), dtype=np.float32))
    elif damage == "values":
        logits = np.load(folder / "logits.npy")
        np.save(folder / "logits.npy", logits + 1.0)
    else:
        (folder / "meta.json").unlink()
    with pytest.raises(UsageError) as caught:
        _build(tmp_path, key, dataset, Counting(teacher))
    message = str(caught.value)
    assert "\n" not in message and f"teacher cache {folder} does not match this run" in message
    assert "move it away" in message and "runtime.teacher_cache=false" in message
    expected = {
        "key": "key.json",
        "shape": "logits.npy holds",
        "values": "its logits differs",
        "missing": "meta",
    }
    assert expected[damage] in message


def test_a_killed_precompute_resumes_where_it_stopped_and_ends_with_the_same_bytes(
    tmp_path: Path, teacher: Taps
) -> None:
    dataset = _data(AugmentConfig(crop_padding=2))
    key = _key(teacher, dataset, CachePlan("replay", 2))
    killed = Counting(teacher, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "a", key, dataset, killed)
    partial = tmp_path / "a" / "teacher" / f"{digest(key)}.partial"
    assert json.loads((partial / "progress.json").read_text()) == {"rows": 2 * BATCH}
    assert not (tmp_path / "a" / "teacher" / digest(key)).exists()  # no reader sees half a cache

    resumed, lines = Counting(teacher), []
    cache = _build(tmp_path / "a", key, dataset, resumed, lines)
    rows = len(dataset) * 2
    assert resumed.calls == -(-(rows - 2 * BATCH) // BATCH) + 1
    assert f"resuming after {2 * BATCH} of {rows} views" in lines[0]
    assert not partial.exists()
    fresh = _build(tmp_path / "b", key, dataset, Counting(teacher))
    for name, array in fresh.arrays.items():
        assert np.array_equal(cache.arrays[name], array), name
    assert np.array_equal(cache.seeds, fresh.seeds) and np.array_equal(cache.fingerprints, fresh.fingerprints)


def test_plan_says_why_a_run_cannot_use_the_cache_and_finds_deterministic_views() -> None:
    plain, augmented = _data(AugmentConfig()), _data(AugmentConfig(crop_padding=2))
    assert decide(False, 4, ["kd"], AugmentConfig(), 1, augmented).mode == "off"
    assert decide("auto", 4, ["kd", "agkd"], AugmentConfig(), 1, plain) == CachePlan("deterministic", 1)
    assert decide(True, 4, ["kd"], AugmentConfig(), 1, augmented) == CachePlan("replay", 4)
    mtd = decide("auto", 4, ["mtd"], AugmentConfig(), 1, augmented)
    assert mtd.mode == "off" and mtd.reason.startswith("loss.method mtd cannot read cached teacher outputs")
    assert "Q, K and V" in mtd.describe()
    mixed = decide("auto", 4, ["kd"], AugmentConfig(cutmix=0.5), 1, augmented)
    assert mixed.mode == "off" and "cutmix" in mixed.reason
    assert "DDP" in decide("auto", 4, ["kd"], AugmentConfig(), 2, plain).reason
    with pytest.raises(UsageError, match=r"runtime.teacher_cache=true, but .*mix"):
        decide(True, 4, ["titn"], AugmentConfig(cutmix=1.0), 1, augmented)


def test_view_sampler_gives_each_image_once_per_epoch_with_a_view_drawn_from_the_generator() -> None:
    generator = torch.Generator()
    sampler = ViewSampler(torch.utils.data.RandomSampler(range(50), generator=generator), 4, generator)
    epochs = []
    for seed in (3, 3, 4):
        generator.manual_seed(seed)
        epochs.append(list(sampler))
    rows = np.array(epochs[0])
    assert sorted(rows // 4) == list(range(50)) and set(rows % 4) == {0, 1, 2, 3}
    assert epochs[0] == epochs[1] and epochs[0] != epochs[2]
