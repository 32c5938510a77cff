"""The teacher-output cache: what the frozen teacher gives each training image, computed once, stored on disk
and read back instead of running the teacher at every step of every epoch.

A distillation step spends most of its time in the teacher's forward when the teacher is the larger model,
yet the teacher is frozen: its output is a function of the image it sees. With random augmentation that image
changes every epoch, so the cache holds K *views* per training image (FKD, Shen & Xing, ECCV 2022, store
region-level soft labels with the crop coordinates that made them): view k of image i is the training
transform run with every global random generator (torch, Python, NumPy) seeded with ``seeds[i, k]``, so the
seed is the augmentation's parameters and replaying it gives the student exactly the view the teacher saw
(Beyer et al., CVPR 2022, "Knowledge distillation: a good teacher is patient and consistent": student and
teacher must see the same view). Every epoch each image shows one of its K views, drawn with the data order's
generator. A transform that draws nothing random (no augmentation) has one view per image: the
deterministic mode, in which a cached run trains as an uncached one does.

On disk (``<root>/teacher/<digest>/``, ``root`` the user's cache folder or ``runtime.cache_dir``):
``key.json`` (what the digest was taken of: the teacher's weights, architecture and taps, the training split's
images and labels, the transform, the views and their seed, the precision), ``meta.json`` (the stored outputs:
name, row shape, stored and live dtype), one ``.npy`` file per output (rows ``i * K + k``; logits float32,
taps float16 where the methods' tolerance allows) read through ``numpy.memmap``, ``seeds.npy`` and
``fingerprints.npy`` (a position-weighted sum of each view, to check a replay). A cache is built in
``<digest>.partial/`` (its progress in ``progress.json``, written atomically after the rows it counts were
flushed) and renamed into place once complete, so a reader never sees half a cache and a killed precompute
resumes where it stopped. A cache that does not match the run (its key, its files, or the teacher's outputs on
its first rows) is refused in one line. :func:`decide` says, before a run writes anything, whether the run can
use a cache and why not; :func:`load_or_build` opens or builds it.

The interface to the data is generic: any :class:`kdfast.data.ImageDataset` (a ``split`` with labels and
images or paths, and a ``transform``) works.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from kdfast.atomic import atomic_write, fsync_dir
from kdfast.data import ImageDataset
from kdfast.errors import UsageError
from kdfast.methods.registry import method
from kdfast.taps import QKV

FORMAT = "kdfast.teacher_cache/1"
CACHE_ENV = "KDFAST_CACHE_DIR"  # the user cache folder; else $XDG_CACHE_HOME/kdfast, else ~/.cache/kdfast
QKV_PARTS = ("q", "k", "v")
FLOAT16_MAX = float(torch.finfo(torch.float16).max)
Outputs = tuple[Tensor, dict[str, Any]]  # a teacher's (logits, {tap: tensor | QKV})


def cache_root(setting: str | None) -> Path:
    """The folder kdfast keeps its caches in (the teacher outputs, Inductor's compiled graphs):
    ``runtime.cache_dir`` when set, else ``$KDFAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/kdfast``, else
    ``~/.cache/kdfast``."""
    if setting:
        return Path(setting).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdfast"


@dataclass
class CachePlan:
    """What a run does with the teacher: ``mode`` "off" (the teacher runs at every step), "replay" (K cached
    views per image, each replayed for the student) or "deterministic" (one view per image: the transform
    draws nothing random); ``reason``: why the cache is off although asked for (empty otherwise)."""

    mode: str
    views: int
    reason: str = ""

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def describe(self) -> str:
        """One line for the run's output."""
        if self.mode == "replay":
            return (
                f"teacher: outputs cached, {self.views} augmented views per image replayed to the student "
                "(one of them per image each epoch)"
            )
        if self.mode == "deterministic":
            return "teacher: outputs cached, one view per image (the training transform draws nothing random)"
        return "teacher: runs at every step" + (f" ({self.reason})" if self.reason else "")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """The global torch (CPU), Python and NumPy generators seeded with ``seed`` inside, restored after: a
    transform drawing its parameters from any of them draws the same ones for the same seed."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


def draws_random(dataset: ImageDataset) -> bool:
    """Whether the dataset's transform draws from a global random generator (torch, Python or NumPy): their
    states after transforming the first image differ from those before."""
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()
    dataset[0]
    after = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.set_rng_state(before[0])
    random.setstate(before[1])
    np.random.set_state(before[2])
    return not (
        torch.equal(before[0], after[0])
        and before[1] == after[1]
        and all(np.array_equal(a, b) for a, b in zip(before[2], after[2], strict=True))
    )


def fingerprint(image: Tensor) -> float:
    """A position-weighted sum of a view's pixels (float64): equal for a replayed view, different for another
    crop or a flip (which a plain sum would not see)."""
    flat = image.detach().reshape(-1).double()
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64).sin()
    return float((flat * weights).sum())


def decide(
    setting: bool | str, views: int, methods: Sequence[str], augment: Any, world_size: int, dataset: Dataset
) -> CachePlan:
    """The run's :class:`CachePlan` from ``runtime.teacher_cache`` (``setting``: false, "auto" or true) and
    ``runtime.teacher_cache_views``: the cache is used when every method in ``loss.method`` can read cached
    outputs (its ``teacher_cache`` declaration), no batch mix (CutMix, Mixup) mixes the views, the run is one
    process, and the training set is an ImageDataset. With ``true`` a reason against is a UsageError naming
    it; with "auto" the run goes on with the teacher, saying why."""
    if setting is False:
        return CachePlan("off", 0)
    reasons = [
        f"loss.method {name} cannot read cached teacher outputs: {method(name).teacher_cache.reason}"
        for name in methods
        if not method(name).teacher_cache.usable
    ]
    if augment.cutmix > 0 or augment.mixup > 0:
        reasons.append(
            "data.augment.cutmix / mixup mix two images of a batch after the views are drawn, and the "
            "teacher's output of a mix is not the mix of its outputs"
        )
    if world_size > 1:
        reasons.append("the cache is built by one process: it is not available under DDP")
    if not isinstance(dataset, ImageDataset):
        reasons.append(f"the training data is a {type(dataset).__name__}, not a kdfast ImageDataset")
    if reasons:
        if setting is True:
            raise UsageError(
                f"runtime.teacher_cache=true, but {reasons[0]}: set runtime.teacher_cache=auto or false"
            )
        return CachePlan("off", 0, reasons[0])
    if not draws_random(dataset):
        return CachePlan("deterministic", 1)
    return CachePlan("replay", views)


def state_digest(state: Mapping[str, Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}\0".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def split_digest(dataset: ImageDataset) -> str:
    """SHA-256 of the training split's identity: its labels and its images (the pixels of in-memory images;
    path, size and modification time of image files)."""
    split = dataset.split
    digest = hashlib.sha256(json.dumps(list(split.labels)).encode())
    if split.paths is not None:
        for path in split.paths:
            info = os.stat(path)
            digest.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\0".encode())
    else:
        images = split.images.contiguous()
        digest.update(f"{images.dtype}:{list(images.shape)}\0".encode())
        digest.update(images.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(
    *,
    teacher: torch.nn.Module,
    arch: Mapping[str, Any],
    taps: Mapping[str, Any],
    dataset: ImageDataset,
    plan: CachePlan,
    seed: int,
    fp16: bool,
    device: torch.device,
    amp: torch.dtype | None,
) -> dict[str, Any]:
    """Everything the stored outputs depend on (what :func:`digest` is taken of). The views' seed counts only
    for replayed views: one deterministic view per image is the same whatever the run's seed."""
    return {
        "format": FORMAT,
        "teacher_weights": state_digest(teacher.state_dict()),
        "teacher_arch": dict(arch),
        "teacher_taps": {name: dataclasses.asdict(spec) for name, spec in taps.items()},
        "data": split_digest(dataset),
        "images": len(dataset),
        "transform": repr(dataset.transform),
        "mode": plan.mode,
        "views": plan.views,
        "view_seed": seed if plan.mode == "replay" else None,
        "taps_fp16": fp16,
        "device": device.type,
        "amp": str(amp) if amp is not None else None,
    }


def digest(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def flatten(outputs: Outputs) -> dict[str, Tensor]:
    """(logits, taps) as named tensors: ``logits``, ``tap.<name>`` (a feature tap) and ``q.<name>``,
    ``k.<name>``, ``v.<name>`` (an attention tap); a tap that is neither a tensor nor Q, K, V is a
    UsageError."""
    logits, taps = outputs
    flat = {"logits": logits}
    for name, value in taps.items():
        if isinstance(value, QKV):
            flat.update({f"{part}.{name}": getattr(value, part) for part in QKV_PARTS})
        elif isinstance(value, Tensor):
            flat[f"tap.{name}"] = value
        else:
            raise UsageError(
                f"teacher tap {name!r} gives a {type(value).__name__}; the teacher cache stores tensors and "
                "Q, K, V"
            )
    return flat


def unflatten(flat: Mapping[str, Tensor]) -> Outputs:
    """The inverse of :func:`flatten`."""
    taps: dict[str, Any] = {}
    for key, value in flat.items():
        kind, _, name = key.partition(".")
        if kind == "tap":
            taps[name] = value
        elif kind in QKV_PARTS:
            taps.setdefault(name, {})[kind] = value
    return flat["logits"], {name: QKV(**v) if isinstance(v, dict) else v for name, v in taps.items()}


class ReplayedViews(Dataset):
    """Items ``(view, label, row)`` for the rows ``i * K + k`` of a cache: image i of ``dataset`` through its
    transform under :func:`seeded` ``(seeds[i, k])``, the view the teacher saw for that row."""

    def __init__(self, dataset: ImageDataset, seeds: np.ndarray) -> None:
        self.dataset = dataset
        self.seeds = seeds
        self.views = seeds.shape[1]

    def __len__(self) -> int:
        return self.seeds.size

    def __getitem__(self, row: int) -> tuple[Tensor, int, int]:
        index, view = divmod(int(row), self.views)
        with seeded(int(self.seeds[index, view])):
            image, label = self.dataset[index]
        return image, label, int(row)


class ViewSampler(Sampler[int]):
    """The rows of one epoch: the image order of ``sampler`` and, per image, one of its K views drawn with
    ``generator`` after the order (which the loop re-seeds every epoch, so a resumed run draws the same)."""

    def __init__(self, sampler: Sampler[int], views: int, generator: torch.Generator) -> None:
        self.sampler, self.views, self.generator = sampler, views, generator

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        order = np.fromiter(self.sampler, dtype=np.int64)
        picks = torch.randint(self.views, (len(order),), generator=self.generator).numpy()
        return iter((order * self.views + picks).tolist())


@dataclass
class TeacherCache:
    """An opened cache: ``arrays`` (output name -> memory-mapped rows), ``live`` (name -> the dtype the live
    teacher gives), ``seeds`` (N, K), ``fingerprints`` (per row), and what the run reports (``path``, ``hit``,
    ``seconds``, ``nbytes``)."""

    path: Path
    arrays: dict[str, np.ndarray]
    live: dict[str, torch.dtype]
    seeds: np.ndarray
    fingerprints: np.ndarray
    hit: bool
    seconds: float

    @property
    def views(self) -> int:
        return self.seeds.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def dataset(self, dataset: ImageDataset) -> ReplayedViews:
        return ReplayedViews(dataset, self.seeds)

    def outputs(self, rows: Tensor | np.ndarray, device: torch.device) -> Outputs:
        """The teacher's (logits, taps) of these rows, on ``device`` in the dtypes the live teacher gives."""
        index = np.asarray(rows, dtype=np.int64)
        flat = {
            name: torch.from_numpy(np.ascontiguousarray(array[index])).to(device, non_blocking=True)
            for name, array in self.arrays.items()
        }
        return unflatten({name: t.to(self.live[name]) for name, t in flat.items()})

    def report(self, plan: CachePlan) -> dict[str, Any]:
        """What ``results.json`` records of the cache."""
        return {
            "mode": plan.mode,
            "views": self.views,
            "path": str(self.path),
            "hit": self.hit,
            "precompute_s": None if self.hit else round(self.seconds, 2),
            "bytes": self.nbytes,
        }


class CacheSpaceError(UsageError):
    """The disk holding the cache folder has too little room for the cache."""


def _refuse(path: Path, what: str) -> UsageError:
    return UsageError(
        f"teacher cache {path} does not match this run ({what}): move it away to rebuild it, or set "
        "runtime.teacher_cache=false"
    )


def _read_json(path: Path, folder: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise _refuse(folder, f"{path.name} is missing or not JSON") from None


def _open(folder: Path, key: Mapping[str, Any], hit: bool, seconds: float) -> TeacherCache:
    """Open a complete cache folder; every way it can fail to be this run's cache is one refusal line."""
    if _read_json(folder / "key.json", folder) != dict(key):
        raise _refuse(folder, "key.json records another teacher, data, transform or view setting")
    meta = _read_json(folder / "meta.json", folder)
    rows = key["images"] * key["views"]
    arrays, live = {}, {}
    try:
        for name, entry in meta["outputs"].items():
            array = np.load(folder / f"{name}.npy", mmap_mode="r")
            if array.shape != (rows, *entry["shape"]) or array.dtype != np.dtype(entry["stored"]):
                raise _refuse(folder, f"{name}.npy holds {array.dtype} {list(array.shape)}")
            arrays[name], live[name] = array, getattr(torch, entry["live"])
        seeds = np.load(folder / "seeds.npy")
        fingerprints = np.load(folder / "fingerprints.npy")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _refuse(folder, f"unreadable: {type(exc).__name__}: {exc}") from None
    if seeds.shape != (key["images"], key["views"]) or fingerprints.shape != (rows,):
        raise _refuse(folder, f"it holds views {list(seeds.shape)}")
    return TeacherCache(folder, arrays, live, seeds, fingerprints, hit, seconds)


def _check_against_teacher(
    cache: TeacherCache,
    dataset: ImageDataset,
    teacher: Callable[[Tensor], Outputs],
    rows: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> None:
    """Replay the first ``rows`` rows and run the teacher on them: the views must replay (their fingerprints
    match) and the cached outputs must equal the teacher's within the stored precision."""
    views = cache.dataset(dataset)
    chosen = np.arange(min(rows, len(views)))
    images = torch.stack([views[r][0] for r in chosen])
    replayed = np.array([fingerprint(image) for image in images])
    if not np.allclose(replayed, cache.fingerprints[chosen], rtol=1e-9, atol=1e-6):
        raise UsageError(
            "the student would see views the teacher did not: the training transform under the cached seeds "
            f"does not give the cached views ({cache.path}), so it draws from a random source other than the "
            "torch, Python and NumPy generators: set runtime.teacher_cache=false"
        )
    with autocast():
        live = flatten(teacher(images.to(device)))
    cached = flatten(cache.outputs(chosen, device))
    for name, value in live.items():
        expected, got = value.float(), cached[name].float()
        # float16 storage rounds to 2^-11 relative, bf16 autocast to 2^-8; float32 differs by summation order
        coarse = cache.arrays[name].dtype == np.float16 or value.dtype == torch.bfloat16
        tolerance = (2**-8 if coarse else 1e-4) * float(expected.abs().max()) + 1e-5
        error = float((expected - got).abs().max())
        if error > tolerance:
            raise _refuse(cache.path, f"its {name} differs from the teacher's by up to {error:.3g}")


def _progress(partial: Path) -> int:
    """Rows already computed into ``partial`` (0 for a fresh one)."""
    path = partial / "progress.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else 0


def _layout(flat: Mapping[str, Tensor], fp16: bool) -> dict[str, Any]:
    """Per output: its row shape, the dtype stored (float32 logits; the taps float16 when ``fp16``) and the
    dtype the live teacher gives."""
    return {
        name: {
            "shape": list(t.shape[1:]),
            "stored": "float16" if fp16 and name != "logits" else "float32",
            "live": str(t.dtype).removeprefix("torch."),
        }
        for name, t in flat.items()
    }


def _build(
    root: Path,
    partial: Path,
    key: Mapping[str, Any],
    dataset: ImageDataset,
    teacher: Callable[[Tensor], Outputs],
    *,
    batch_size: int,
    fp16: bool,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    num_workers: int,
    progress: bool,
) -> None:
    """Compute every row into ``partial``, resuming after the rows its ``progress.json`` counts; the last
    batch is padded to ``batch_size``, so a compiled teacher sees one shape."""
    if (partial / "key.json").is_file() and json.loads((partial / "key.json").read_text()) != dict(key):
        shutil.rmtree(partial)  # a hand-edited folder (or a digest collision): start it over
    partial.mkdir(parents=True, exist_ok=True)
    images, views = key["images"], key["views"]
    total = images * views
    if not (partial / "seeds.npy").is_file():
        seeds = np.random.default_rng(key["view_seed"] or 0).integers(0, 2**62, size=(images, views))
        atomic_write(partial / "seeds.npy", lambda f: np.save(f, seeds))
        atomic_write(partial / "key.json", json.dumps(dict(key), indent=2, sort_keys=True) + "\n")
    seeds = np.load(partial / "seeds.npy")
    done = _progress(partial)
    mode = "r+" if done else "w+"
    fingerprints = np.lib.format.open_memmap(partial / "fingerprints.npy", mode, np.float64, (total,))
    arrays: dict[str, np.ndarray] = {}
    bar = tqdm(
        total=total,
        initial=done,
        desc="teacher cache",
        unit="view",
        disable=None if progress else True,
        leave=False,
        dynamic_ncols=True,
    )
    loader = DataLoader(
        Subset(ReplayedViews(dataset, seeds), range(done, total)),
        batch_size=batch_size,
        num_workers=num_workers,
    )
    for batch, _, rows in loader:
        count = len(rows)
        if count < batch_size:
            batch = torch.cat([batch, batch[:1].expand(batch_size - count, *batch.shape[1:])])
        with autocast():
            flat = flatten(teacher(batch.to(device, non_blocking=True)))
        if not arrays:
            layout = _layout(flat, fp16)
            if (partial / "layout.json").is_file() and _read_json(partial / "layout.json", partial) != layout:
                raise _refuse(partial, "the teacher's outputs changed shape since its precompute started")
            atomic_write(partial / "layout.json", json.dumps(layout, indent=2) + "\n")
            row_bytes = sum(
                np.dtype(e["stored"]).itemsize * int(np.prod(e["shape"])) for e in layout.values()
            )
            short = None if done else check_space(root, row_bytes * total)
            if short is not None:
                raise CacheSpaceError(
                    f"the teacher cache does not fit: {short}: set runtime.cache_dir elsewhere"
                )
            for name, entry in layout.items():
                shape = (total, *entry["shape"])
                arrays[name] = np.lib.format.open_memmap(
                    partial / f"{name}.npy", mode, entry["stored"], shape
                )
        first, last = int(rows[0]), int(rows[-1]) + 1
        for name, value in flat.items():
            exact = value[:count].detach().float().cpu().numpy()
            stored = exact.astype(arrays[name].dtype)
            if not np.isfinite(stored).all() and np.isfinite(exact).all():
                raise UsageError(
                    f"teacher output {name} exceeds float16's range ({FLOAT16_MAX:g}); set "
                    "runtime.teacher_cache=false"
                )
            arrays[name][first:last] = stored
        fingerprints[first:last] = [fingerprint(image) for image in batch[:count]]
        for array in (*arrays.values(), fingerprints):
            array.flush()
        # written after the rows it counts are on disk, so a kill leaves a count that is never too high
        atomic_write(partial / "progress.json", json.dumps({"rows": last}) + "\n")
        bar.update(count)
    bar.close()
    layout = _read_json(partial / "layout.json", partial)
    atomic_write(partial / "meta.json", json.dumps({"format": FORMAT, "outputs": layout}, indent=2) + "\n")


def load_or_build(
    root: Path,
    key: Mapping[str, Any],
    dataset: ImageDataset,
    teacher: Callable[[Tensor], Outputs],
    *,
    batch_size: int,
    fp16: bool,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    num_workers: int = 0,
    progress: bool = False,
    say: Callable[[str], None] = print,
) -> TeacherCache:
    """The cache of ``key`` under ``root/teacher/``: opened when complete (a hit), else computed with
    ``teacher`` (a gradient-free ``images -> (logits, taps)``, run under ``autocast()``) over every view of
    ``dataset``, resuming a killed precompute. Either way its first rows are checked against the teacher
    (:func:`_check_against_teacher`). Two runs building one cache at once take turns (a file lock)."""
    name = digest(key)
    base = root / "teacher"
    folder, partial = base / name, base / f"{name}.partial"
    base.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(base / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        hit = folder.is_dir()
        if not hit:
            done = _progress(partial)
            resumed = f", resuming after {done} of {key['images'] * key['views']} views" if done else ""
            views = f"{key['images']} images x {key['views']} view(s)"
            say(f"teacher cache: computing {views} into {folder}{resumed}")
            _build(
                root,
                partial,
                key,
                dataset,
                teacher,
                batch_size=batch_size,
                fp16=fp16,
                device=device,
                autocast=autocast,
                num_workers=num_workers,
                progress=progress,
            )
            for scratch in ("progress.json", "layout.json"):
                (partial / scratch).unlink()
            os.rename(partial, folder)
            fsync_dir(base)
        cache = _open(folder, key, hit, time.perf_counter() - started)
    _check_against_teacher(cache, dataset, teacher, batch_size, device, autocast)
    took = "hit" if hit else f"built in {cache.seconds:.1f} s"
    say(f"teacher cache: {took}, {folder} ({cache.nbytes / 2**20:.1f} MiB)")
    return cache


def check_space(root: Path, nbytes: int) -> str | None:
    """Why ``nbytes`` more cannot be written under ``root`` (more than 90% of its free space), or None."""
    existing = root
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if nbytes > 0.9 * free:
        return f"it needs {nbytes / 2**30:.2f} GiB and {existing} has {free / 2**30:.2f} GiB free"
    return None
