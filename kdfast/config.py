"""A run is a config file: the run schema, the YAML loader, ``--set`` overrides and validation.

The dataclasses below are the run schema (data, models, taps, stages, runtime, and which methods make the
loss); ``configs/default.yaml`` is the embedded default. A file may name a ``base`` file whose values it
overrides (:func:`read_config_file`), so a benchmark's (pair, method) config is a few lines over its pair.
Each method's own section ``loss.<name>`` is typed and validated by that method's schema and validator, found
through :mod:`kdfast.methods.registry`. Every value is checked before any work starts: an unknown key names
the closest valid ones, a wrong type names the expected one, a missing file names the path. Each failure is
one :class:`ConfigError` line (exit 2).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kdfast.atomic import atomic_write
from kdfast.errors import ConfigError, shown
from kdfast.methods.registry import method, methods
from kdfast.schema import at_most, build, closest, convert, positive, read_yaml, set_override
from kdfast.spec import TapConfig

# The bundled configs ship inside the package (the checkout's top-level ``configs`` links here), so an
# installed kdfast finds them from any folder.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"
DEFAULT_METHODS = ("kd",)  # loss.method when a config names none: Hinton KD beside the CE
# Upper bounds past which a value is a typo rather than a plan: they would not end, fill any memory, or
# overflow the seeds derived from them.
MAX_EPOCHS = 100_000
MAX_IMAGE_SIZE = 4096
MAX_WORKERS = 64
MAX_THREADS = 1024
MAX_VIEWS = 1024
SEED_LIMIT = 2**32
BASE_KEY = "base"  # a config file's parent file, whose values it overrides
# Where Debian's and Ubuntu's package of Fashion-MNIST puts its files (kdfast.data reads them from here).
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


@dataclass
class ArchSpec:
    """How to build a model: ``kdfast.models.build_model`` takes exactly this."""

    source: Literal["timm", "torchvision", "kdfast"] = "kdfast"
    name: str = "edge_cnn"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    """``momentum`` and ``nesterov`` apply to SGD, ``betas`` to Adam / AdamW."""

    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class ScheduleConfig:
    """The lr after ``warmup_epochs`` of linear warmup: ``cosine`` decay to ``min_lr``; ``step``, times
    ``gamma`` every ``step_size`` epochs; ``multistep``, times ``gamma`` at each epoch in ``milestones``
    (the CIFAR distillation recipe: 150, 180, 210 of 240); ``constant``."""

    name: Literal["cosine", "step", "multistep", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    step_size: int = 30
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class StageConfig:
    """One training stage (teacher, CE-only baseline, distillation)."""

    epochs: int = 10
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    label_smoothing: float = 0.0


@dataclass
class RandAugmentConfig:
    """RandAugment (Cubuk et al. 2020): ``num_ops`` operations per image, each at ``magnitude`` (0..30, of
    torchvision's 31 bins)."""

    num_ops: int = 2
    magnitude: int = 9


@dataclass
class AugmentConfig:
    """Training-set augmentation (:func:`kdfast.data.build_transform`, :class:`kdfast.data.BatchMix`).

    Per image: ``random_resized_crop`` or the eval geometry, a random crop of the image padded by
    ``crop_padding``, ``hflip``, then at most one torchvision policy on the 8-bit image: ``auto_augment``
    (AutoAugment's learned policy for cifar10 | imagenet | svhn), ``rand_augment`` (RandAugment) or
    ``trivial_augment`` (TrivialAugmentWide). Per batch, with soft targets: CutMix with probability ``cutmix``
    (lam ~ Beta(cutmix_beta, cutmix_beta)), else Mixup with probability ``mixup`` (lam ~ Beta(mixup_alpha,
    mixup_alpha)), cutmix + mixup <= 1; timm's ``prob`` p with ``switch_prob`` s is cutmix = p s, mixup =
    p (1 - s).
    """

    crop_padding: int = 0
    random_resized_crop: bool = False
    hflip: bool = False
    auto_augment: Literal["cifar10", "imagenet", "svhn"] | None = None
    rand_augment: RandAugmentConfig | None = None
    trivial_augment: bool = False
    cutmix: float = 0.0
    cutmix_beta: float = 1.0
    mixup: float = 0.0
    mixup_alpha: float = 1.0


@dataclass
class DataConfig:
    """The data set (:mod:`kdfast.data`). ``root`` is the folder it is read from (``fashion_mnist`` without
    one reads the distro package's folder, ``apt-get install dataset-fashion-mnist``). ``train_subset``: a
    fixed-seed, class-balanced subset of that many training images, for low-data runs; ``max_*_samples``: a
    seeded random subset (not balanced)."""

    name: Literal["digits", "fashion_mnist", "imagefolder", "cifar10", "cifar100"] = "digits"
    root: str | None = None
    image_size: int = 32
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    val_fraction: float = 0.2
    split_seed: int | None = None  # draws the split and the subsets (null: the run's seed)
    train_subset: int | None = None
    max_train_samples: int | None = None
    max_val_samples: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    arch: ArchSpec = field(default_factory=ArchSpec)
    weights: str | None = None
    train: StageConfig = field(default_factory=StageConfig)
    taps: dict[str, TapConfig] = field(default_factory=dict)


@dataclass
class LossConfig:
    """The distillation stage's objective: ``ce * CE(y, p_S) + sum over m in method of weight_m * L_m``.

    ``method`` names one registered method (``kdfast/methods/<name>.py``) or a list of them whose terms are
    summed; ``sections`` holds each used method's section ``loss.<name>``, typed by that method's schema
    (every one has a ``weight``, default 1.0). In YAML the sections sit beside ``method``::

        loss:
          method: [kd, agkd]
          ce: 0.5
          kd: {weight: 0.5, temperature: 4.0}
          agkd: {pairs: [...]}

    The supervised term: the run adds ``ce`` times the cross-entropy of the student's logits with the
    labels (``ce`` null means 1.0), unless a used method computes the supervised term itself (MTD weighs it
    among its tasks, TITN puts it on its class head); then ``ce`` must stay null. At most one used method
    may compute it. Construction checks all of this and fills the sections of used methods that are not
    given with their defaults; a section of a method that is not used is an error.
    """

    method: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    ce: float | None = None
    sections: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.method, str):
            self.method = [self.method]
        if not self.method:
            raise ConfigError(
                "config key 'loss.method' is empty: name a method or a list of methods "
                f"({', '.join(methods())})"
            )
        used = {}
        for i, name in enumerate(self.method):
            if name in used:
                raise ConfigError(f"config key 'loss.method' lists {name!r} twice")
            used[name] = method(name, f"loss.method[{i}]" if len(self.method) > 1 else "loss.method")
        for name in self.sections:
            if name not in used:
                raise ConfigError(
                    f"config key 'loss.{name}' configures a method that loss.method ({', '.join(used)}) does "
                    f"not use: add {name!r} to loss.method or remove the section"
                )
        self.sections = {
            name: self.sections[name] if name in self.sections else entry.schema()
            for name, entry in used.items()
        }
        for name, entry in used.items():
            if not isinstance(self.sections[name], entry.schema):
                raise ConfigError(f"loss.{name} must be a {entry.schema.__name__}")
            positive(self.sections[name].weight, f"loss.{name}.weight", allow_zero=True)
        owners = [name for name, entry in used.items() if entry.supervised]
        if len(owners) > 1:
            raise ConfigError(
                f"config key 'loss.method' combines {' and '.join(owners)}, which each compute the "
                "supervised term: keep one of them"
            )
        pair = [name for name, entry in used.items() if entry.logits == "pair"]
        one = [name for name, entry in used.items() if entry.logits == "one"]
        if pair and one:
            raise ConfigError(
                f"config key 'loss.method' combines {pair[0]}, whose student returns (class, distillation) "
                f"logits, with {one[0]}, which reads one logit tensor: drop {one[0]}"
            )
        if owners and self.ce is not None:
            raise ConfigError(
                f"config key 'loss.ce' is set, but {owners[0]} computes the supervised term itself: "
                "remove loss.ce"
            )
        if self.ce is not None:
            positive(self.ce, "loss.ce", allow_zero=True)

    def ce_weight(self) -> float | None:
        """The weight of the CE term the run adds; None when a used method computes the supervised term."""
        if any(method(name).supervised for name in self.method):
            return None
        return 1.0 if self.ce is None else self.ce

    def to_dict(self) -> dict[str, Any]:
        """The YAML shape: ``method``, ``ce`` and one section per used method."""
        sections = {name: dataclasses.asdict(section) for name, section in self.sections.items()}
        return {"method": list(self.method), "ce": self.ce, **sections}


def read_loss(raw: Any) -> LossConfig:
    """The ``loss`` mapping typed through the method registry: ``method`` (a name or a list), ``ce`` and
    one section per used method, each built by that method's schema."""
    return LossConfig(*_typed_loss(raw))


def _typed_loss(raw: Any) -> tuple[list[str], float | None, dict[str, Any]]:
    """``loss.method``, ``loss.ce`` and the sections, each typed, before the checks across them."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config key 'loss' must be a mapping, got {shown(raw)}")
    names = raw.get("method", list(DEFAULT_METHODS))
    names = [names] if isinstance(names, str) else convert(names, list[str], "loss.method")
    ce = convert(raw.get("ce"), float | None, "loss.ce")
    registered = methods()
    sections = {}
    for key, value in raw.items():
        if key in ("method", "ce"):
            continue
        if key not in registered:
            near = closest(str(key), [*registered, "method", "ce"])
            raise ConfigError(f"unknown config key 'loss.{key}': {near}")
        sections[key] = build(registered[key].schema, value, f"loss.{key}")
    return names, ce, sections


@dataclass
class RuntimeConfig:
    """How a run executes (:func:`kdfast.train.loop.resolve_runtime`).

    ``teacher_cache`` (false | auto | true): read the frozen teacher's outputs from the teacher-output cache
    (:mod:`kdfast.teacher_cache`) instead of running the teacher at every step; ``auto`` uses it where the
    methods and the data allow and says why not otherwise, ``true`` refuses a run that cannot.
    ``teacher_cache_views``: K, the augmented views cached per training image and replayed to the student (one
    when the training transform draws nothing random). ``cache_dir``: where the teacher cache and Inductor's
    compiled graphs are kept (null: ``$KDFAST_CACHE_DIR``, else ``~/.cache/kdfast``).
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: Literal["auto", True, False] = "auto"
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: Literal["auto", True, False] = "auto"
    kernels: Literal["auto", "triton", "reference"] = "auto"
    grad_clip: float | None = 5.0
    log_every: int = 10
    progress: bool = True
    tensorboard: Literal["auto", True, False] = "auto"
    threads: Literal["auto"] | int = "auto"
    teacher_cache: Literal["auto", True, False] = False
    teacher_cache_views: int = 4
    cache_dir: str | None = None


@dataclass
class ResumeRecord:
    """One ``--resume`` that changed the config (docs/reliability.md, "Resume"): the epochs each stage had
    finished when the change took effect, and the changes as ``key=value``. With these, ``config.yaml``
    describes what was trained also when a resumed run continued with other settings."""

    after: dict[str, int] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)


@dataclass
class QadConfig:
    """``qad``: quantization-aware distillation of a trained student (``python -m kdfast.train --qad
    STUDENT``, :func:`kdfast.train.qad.qad_command`), the QAD stage of the training loop: the student with
    :class:`kdfast.quant.FakeQuant` inserted, taught by ``teacher`` (its fp32 self, or a teacher.pt) through
    ``loss.kd`` at ``temperature`` plus ``ce_weight`` times the CE, AdamW at ``lr`` with cosine decay to 0.
    ``calibration_images``: the training images the activation ranges are calibrated on at the start of
    every epoch (``python -m export.trt``'s ``--calib-samples`` default, so the same images); ``augment``: the
    training augmentation recorded in the student's data record."""

    epochs: int = 3
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 64
    temperature: float = 1.0
    ce_weight: float = 0.0
    teacher: str = "student"
    calibration_images: int = 128
    augment: bool = True
    num_workers: int = 0
    seed: int = 0


def read_qad(raw: Any, where: str = "qad") -> QadConfig:
    """The ``qad`` section typed by the schema (:func:`kdfast.schema.build`) and checked; each fault one
    ConfigError line naming ``where``."""
    cfg = build(QadConfig, raw, where)
    for name in ("epochs", "batch_size", "calibration_images", "lr", "temperature"):
        positive(getattr(cfg, name), f"{where}.{name}")
    at_most(cfg.epochs, MAX_EPOCHS, f"{where}.epochs", "the run would not end")
    at_most(cfg.num_workers, MAX_WORKERS, f"{where}.num_workers", "each worker holds a copy of the data")
    if cfg.seed >= SEED_LIMIT:
        raise ConfigError(f"config key '{where}.seed' must be < 2**32, got {cfg.seed}")
    return cfg


@dataclass
class Config:
    """A run; with ``seeds`` set, the whole run once per seed, in ``out/seed<N>/`` (``seed`` is unused).
    ``resumed`` is written by ``--resume`` alone: what it changed, and from where."""

    seed: int = 0
    seeds: list[int] | None = None
    out: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    baseline: bool = True
    loss: LossConfig = field(default_factory=LossConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    resumed: list[ResumeRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "loss": self.loss.to_dict()}


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merge key by key; any other value (list, scalar, null) replaces."""
    merged = dict(base)
    for key, value in child.items():
        both_mappings = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both_mappings else value
    return merged


def _check_base(raw: dict[str, Any], path: Path) -> None:
    """Keys and types of a base file on its own (the checks across keys run on the merged config), so an
    error in a base names that file."""
    try:
        build(Config, {key: value for key, value in raw.items() if key != "loss"})
        _typed_loss(raw.get("loss"))
    except ConfigError as exc:
        raise ConfigError(f"in base config {path}: {exc}") from None


def read_config_file(path: Path) -> dict[str, Any]:
    """The raw mapping of the config file ``path`` over its bases. A file may name one ``base: FILE`` (a
    path relative to the file's own folder) whose values it overrides, mapping by mapping; the base may have
    a base in turn. A missing base, a cycle, bad YAML or a bad key in a base is a ConfigError naming the
    file."""
    return _read_over_bases(path, children=())


def _read_over_bases(path: Path, children: tuple[Path, ...]) -> dict[str, Any]:
    raw = read_yaml(path)
    base = raw.pop(BASE_KEY, None)
    if children:
        _check_base(raw, path)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: 'base' must name one config file, got {shown(base)}")
    base_path = Path(os.path.normpath(path.parent / base))
    chain = (*children, path.resolve())
    if base_path.resolve() in chain:
        raise ConfigError(f"config file {path}: base {base} leads back to a file that names it as base")
    if not base_path.is_file():
        raise ConfigError(f"config file {path}: base file not found: {base_path}")
    return _merge(_read_over_bases(base_path, chain), raw)


def config_path(name: str | Path) -> Path:
    """The config file ``name`` names: a path as given when it exists, else a bundled config under
    ``CONFIG_DIR`` (``kd_digits``, ``kd_digits.yaml``, ``configs/kd_digits.yaml`` and
    ``benchmarks/cifar100/kd/resnet32x4_resnet8x4`` all work from any folder)."""
    given = Path(name)
    if given.exists() or given.is_absolute():
        return given
    parts = given.parts[1:] if given.parts[:1] == ("configs",) else given.parts
    for candidate in (CONFIG_DIR.joinpath(*parts), CONFIG_DIR.joinpath(*parts).with_suffix(".yaml")):
        if parts and candidate.is_file():
            return candidate
    return given


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML run config (the embedded default when ``path`` is None; a bundled config by name, see
    ``config_path``) over its bases, apply ``--set`` overrides, and validate every key, type and file it
    names."""
    raw = read_config_file(config_path(path) if path is not None else DEFAULT_CONFIG)
    for assignment in overrides:
        set_override(raw, assignment)
    cfg = config_from_dict(raw)
    validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """The typed Config of a raw mapping (a YAML file, ``Config.to_dict()`` output of a resumed run or a
    checkpoint's ``config``); the ``loss`` section is read through the method registry."""
    cfg = build(Config, {key: value for key, value in raw.items() if key != "loss"})
    cfg.loss = read_loss(raw.get("loss"))
    return cfg


def validate(cfg: Config) -> None:
    """Checks across keys, ranges and the file system; the schema already checked keys, types and that every
    number is finite and >= 0."""
    if not cfg.out.strip():
        raise ConfigError("config key 'out' is empty: name the output folder (e.g. runs/my-run)")
    if cfg.seed >= SEED_LIMIT:
        raise ConfigError(f"config key 'seed' must be < 2**32, got {cfg.seed}")
    if cfg.seeds is not None and (
        not cfg.seeds
        or len(set(cfg.seeds)) != len(cfg.seeds)
        or min(cfg.seeds) < 0
        or max(cfg.seeds) >= SEED_LIMIT
    ):
        raise ConfigError(
            f"config key 'seeds' must list distinct seeds >= 0 and < 2**32 (e.g. [0, 1, 2]), got {cfg.seeds}"
        )
    data = cfg.data
    if data.name == "fashion_mnist" and data.root is None:
        if not Path(FASHION_MNIST_ROOT).is_dir():
            raise ConfigError(
                f"data.name=fashion_mnist reads {FASHION_MNIST_ROOT} when data.root is not set, and it does "
                f"not exist: install the data set (apt-get install {FASHION_MNIST_PACKAGE}) or set data.root "
                "to the folder that holds its four IDX files"
            )
    elif data.name != "digits":
        if data.root is None:
            raise ConfigError(f"data.name={data.name} needs data.root: the folder that holds the data set")
        if not Path(data.root).is_dir():
            raise ConfigError(f"data.root does not exist or is not a folder: {data.root}")
    for key in ("image_size", "batch_size", "eval_batch_size"):
        positive(getattr(data, key), f"data.{key}")
    at_most(data.image_size, MAX_IMAGE_SIZE, "data.image_size", "images that large would fill any memory")
    at_most(data.num_workers, MAX_WORKERS, "data.num_workers", "each worker is a process holding a data copy")
    for key in ("train_subset", "max_train_samples", "max_val_samples"):
        if getattr(data, key) is not None:
            positive(getattr(data, key), f"data.{key}")
    if data.train_subset is not None and data.max_train_samples is not None:
        raise ConfigError(
            "config keys 'data.train_subset' (class-balanced) and 'data.max_train_samples' (random) both "
            "choose the training images: keep one"
        )
    _check_augment(data.augment)
    at_most(
        data.augment.crop_padding,
        data.image_size,
        "data.augment.crop_padding",
        "pad by at most the image size",
    )
    if not 0.0 < data.val_fraction < 1.0:
        raise ConfigError(f"config key 'data.val_fraction' must be between 0 and 1, got {data.val_fraction}")
    for key in ("mean", "std"):
        value = getattr(data, key)
        if value is not None and len(value) != 3:
            raise ConfigError(
                f"config key 'data.{key}' must list 3 values (one per RGB channel), got {value}"
            )
    for i, value in enumerate(data.std or []):
        positive(value, f"data.std[{i}]")
    for role in ("teacher", "student"):
        model: ModelConfig = getattr(cfg, role)
        if model.weights is not None and not Path(model.weights).is_file():
            raise ConfigError(f"{role}.weights: file not found: {model.weights}")
        _validate_stage(model.train, f"{role}.train")
        _check_recipe(model.train, f"{role}.train")
        for name, tap in model.taps.items():
            if not tap.path:
                raise ConfigError(
                    f"config key '{role}.taps.{name}.path' is empty: give the module path to tap"
                )
            if tap.heads is not None:
                positive(tap.heads, f"{role}.taps.{name}.heads")
    runtime = cfg.runtime
    positive(runtime.log_every, "runtime.log_every")
    if runtime.grad_clip is not None:
        positive(runtime.grad_clip, "runtime.grad_clip")
    if runtime.threads != "auto":
        positive(runtime.threads, "runtime.threads")
        at_most(runtime.threads, MAX_THREADS, "runtime.threads", "use at most one thread per core")
    positive(runtime.teacher_cache_views, "runtime.teacher_cache_views")
    at_most(
        runtime.teacher_cache_views, MAX_VIEWS, "runtime.teacher_cache_views", "each view is one teacher pass"
    )
    if runtime.cache_dir is not None and not runtime.cache_dir.strip():
        raise ConfigError("config key 'runtime.cache_dir' is empty: name a folder, or null for the user's")
    for name in cfg.loss.method:
        method(name).validate(cfg.loss.sections[name], cfg.student.taps, cfg.teacher.taps, f"loss.{name}")


def _validate_stage(stage: StageConfig, where: str) -> None:
    """One training stage: its length, optimizer and schedule."""
    at_most(stage.epochs, MAX_EPOCHS, f"{where}.epochs", "a run that long would not end")
    unit = f"{where}.label_smoothing"
    if not stage.label_smoothing < 1.0:
        raise ConfigError(f"config key '{unit}' must be in [0, 1), got {stage.label_smoothing}")
    opt, at = stage.optimizer, f"{where}.optimizer"
    positive(opt.lr, f"{at}.lr")
    if len(opt.betas) != 2 or not all(0.0 <= b < 1.0 for b in opt.betas):
        raise ConfigError(
            f"config key '{at}.betas' must be two values in [0, 1) (Adam's beta1, beta2), got {opt.betas}"
        )
    if not opt.momentum < 1.0:
        raise ConfigError(f"config key '{at}.momentum' must be in [0, 1), got {opt.momentum}")
    schedule, at = stage.schedule, f"{where}.schedule"
    at_most(
        schedule.min_lr, opt.lr, f"{at}.min_lr", f"the schedule decays from {where}.optimizer.lr down to it"
    )
    positive(schedule.step_size, f"{at}.step_size")
    positive(schedule.gamma, f"{at}.gamma")


def config_text(cfg: Config) -> str:
    """The resolved config as YAML (what ``config.yaml`` holds)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _check_augment(augment: AugmentConfig) -> None:
    """Crop padding >= 0, at most one policy, RandAugment's ops and magnitude in range, the batch mixes'
    probabilities summing to at most 1 and their Beta parameters > 0."""
    where = "data.augment"
    positive(augment.crop_padding, f"{where}.crop_padding", allow_zero=True)
    policies = [
        key
        for key, on in (
            ("auto_augment", augment.auto_augment is not None),
            ("rand_augment", augment.rand_augment is not None),
            ("trivial_augment", augment.trivial_augment),
        )
        if on
    ]
    if len(policies) > 1:
        raise ConfigError(
            f"config keys '{where}.{policies[0]}' and '{policies[1]}' both set a policy: keep one"
        )
    rand = augment.rand_augment
    if rand is not None:
        positive(rand.num_ops, f"{where}.rand_augment.num_ops")
        if not 0 <= rand.magnitude <= 30:
            raise ConfigError(
                f"config key '{where}.rand_augment.magnitude' must be in 0..30, got {rand.magnitude}"
            )
    for key in ("cutmix", "mixup"):
        if not 0.0 <= getattr(augment, key) <= 1.0:
            raise ConfigError(
                f"config key '{where}.{key}' is a probability in [0, 1], got {getattr(augment, key)}"
            )
    if augment.cutmix + augment.mixup > 1.0:
        raise ConfigError(
            f"config keys '{where}.cutmix' + '{where}.mixup' are the chances of either mix per batch and sum "
            f"to {augment.cutmix + augment.mixup}: lower them to a sum <= 1"
        )
    positive(augment.cutmix_beta, f"{where}.cutmix_beta")
    positive(augment.mixup_alpha, f"{where}.mixup_alpha")


def _check_recipe(stage: StageConfig, where: str) -> None:
    """A multistep schedule needs increasing milestones; Nesterov momentum needs SGD with momentum."""
    schedule, optimizer = stage.schedule, stage.optimizer
    if schedule.name == "multistep":
        milestones = schedule.milestones
        if not milestones or milestones != sorted(set(milestones)) or milestones[0] < 1:
            raise ConfigError(
                f"config key '{where}.schedule.milestones' must list increasing epochs >= 1 for the "
                f"multistep schedule (e.g. [150, 180, 210]), got {milestones}"
            )
    if optimizer.nesterov and (optimizer.name != "sgd" or optimizer.momentum <= 0):
        raise ConfigError(
            f"config key '{where}.optimizer.nesterov' needs name: sgd and momentum > 0, got "
            f"{optimizer.name} with momentum {optimizer.momentum}"
        )


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (what ``--resume`` and ``student.pt`` record)."""
    atomic_write(path, config_text(cfg))
