"""A run is a config file: the schema, the YAML loader, ``--set`` overrides and validation.

The dataclasses below are the schema; ``configs/default.yaml`` is the embedded default. Every value is
checked before any work starts: an unknown key names the closest valid ones, a wrong type names the
expected one, a missing file names the path. Each failure is one :class:`ConfigError` line (exit 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from kdfast.atomic import atomic_write
from kdfast.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


@dataclass
class ArchSpec:
    """How to build a model: ``kdfast.models.build_model`` takes exactly this."""

    source: Literal["timm", "torchvision", "kdfast"] = "kdfast"
    name: str = "edge_cnn"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    step_size: int = 30
    gamma: float = 0.1


@dataclass
class StageConfig:
    """One training stage (teacher, CE-only baseline, distillation)."""

    epochs: int = 10
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    label_smoothing: float = 0.0


@dataclass
class AugmentConfig:
    crop_padding: int = 0
    random_resized_crop: bool = False
    hflip: bool = False
    cutmix: float = 0.0
    cutmix_beta: float = 1.0


@dataclass
class DataConfig:
    name: Literal["digits", "imagefolder", "cifar10", "cifar100"] = "digits"
    root: str | None = None
    image_size: int = 32
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    val_fraction: float = 0.2
    max_train_samples: int | None = None
    max_val_samples: int | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TapConfig:
    """A named intermediate output: ``path`` is a module path (``model.get_submodule(path)``).

    ``feature`` records the module's output (a CNN map); ``attention`` records Q, K, V per head from the
    module's qkv projection (a ``qkv`` Linear, or an ``nn.MultiheadAttention``) without forming Q K^T.
    """

    path: str = ""
    kind: Literal["feature", "attention"] = "feature"
    heads: int | None = None


@dataclass
class ModelConfig:
    arch: ArchSpec = field(default_factory=ArchSpec)
    weights: str | None = None
    train: StageConfig = field(default_factory=StageConfig)
    taps: dict[str, TapConfig] = field(default_factory=dict)


@dataclass
class KDConfig:
    """alpha * tau^2 * KL(p_T || p_S) + (1 - alpha) * CE."""

    alpha: float = 0.5
    temperature: float = 4.0


@dataclass
class AttentionPairConfig:
    """One attention term: a student tap against one or more teacher taps combined on one grid."""

    student: str = ""
    teacher: list[str] = field(default_factory=list)
    combine: Literal["add", "concat"] = "add"


@dataclass
class PerceptualConfig:
    """The frozen network of the perceptual metric: an architecture, an optional local weight file and the
    module path whose output is compared."""

    arch: ArchSpec | None = None
    weights: str | None = None
    layer: str | None = None


@dataclass
class AttentionLossConfig:
    weight: float = 1.0
    metric: Literal["mse", "ssim", "cosine", "perceptual", "hybrid"] = "hybrid"
    alpha: float = 0.5
    beta: float = 0.5
    grid: int | None = None
    window_size: int = 3
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    pairs: list[AttentionPairConfig] = field(default_factory=list)


@dataclass
class MTDPairConfig:
    """One distilled transformer layer: a student attention tap against a teacher attention tap."""

    student: str = ""
    teacher: str = ""


@dataclass
class MTDConfig:
    """MTD: per layer, L_CAD = KL(CAD_s || CAD_t) with CAD = softmax(Q K^T / sqrt(d_q)) and
    L_VR = KL(VR_s || VR_t) with VR = softmax(V V^T / sqrt(d_v)); terms combined by ``weighting``.

    ``granularity`` "layer_kind" gives each (layer, CAD|VR) term its own weight ("25D" for 12 layers);
    "layer" shares one weight per layer ("13D"); the supervised loss is one more task.
    ``relation_heads`` re-splits the concatenated heads of both models into this many heads (MiniLMv2),
    so teacher and student may have different head counts; null keeps the heads as they are.
    """

    pairs: list[MTDPairConfig] = field(default_factory=list)
    relations: list[Literal["cad", "vr"]] = field(default_factory=lambda: ["cad", "vr"])
    weighting: Literal["uniform", "manual", "learnable", "uncertainty"] = "uncertainty"
    granularity: Literal["layer_kind", "layer"] = "layer_kind"
    manual_weights: list[float] | None = None
    relation_heads: int | None = None
    direction: Literal["student_teacher", "teacher_student"] = "student_teacher"


@dataclass
class CAKDConfig:
    """CAKD (Transformer teacher -> CNN student): a partially-cross-attention projector (PCA) and a
    group-wise linear projector (GL) map the student's CNN feature into the teacher's attention and token
    spaces; multi-view robust training perturbs the student's input and adds an adversarial term against a
    discriminator between teacher tokens and projected student tokens. Projectors and discriminator belong to
    the loss, so they are dropped at inference.

    ``student`` is a student feature tap (B, C, H, W); ``teacher_attention`` a teacher attention tap
    (Q, K, V); ``teacher_tokens`` a teacher feature tap with the block's tokens (B, N, D).
    """

    student: str = ""
    teacher_attention: str = ""
    teacher_tokens: str = ""
    pca_weight: float = 1.0
    gl_weight: float = 1.0
    replace_prob: float = 0.5
    dropout: float = 0.1
    view_prob: float = 0.5
    adversarial_weight: float = 0.1
    discriminator_every: int = 5
    discriminator_lr: float = 1e-4


@dataclass
class TITNConfig:
    """TITN: alpha * CutMix-CE(class head, labels) + (1 - alpha) * CE(distillation head, argmax teacher);
    the student is a transformer-in-transformer with a class token and a DeiT-style distillation token."""

    alpha: float = 0.5


@dataclass
class SoKDConfig:
    """SoKD, a plug-in on top of feature distillation between a student and a teacher feature tap.

    DAFA searches feature augmentation sub-policies applied to the teacher feature (Gumbel-softmax over
    ``sub_policies`` sub-policies of ``ops_per_policy`` operations, a relaxed Bernoulli per operation,
    straight-through magnitudes) by the consistency loss 1/2 (s(f_t) - f_s)^2 for the first
    ``search_epochs`` epochs; DAM's shared detection head (heatmap, size and offset branches) finds areas of
    mutual interest. Loss = kd + alpha * L_D (the two heads' outputs aligned) + beta * L_DA (the feature loss
    masked to those areas).
    """

    student: str = ""
    teacher: str = ""
    alpha: float = 1.0
    beta: float = 1.0
    search_epochs: int = 1
    sub_policies: int = 8
    ops_per_policy: int = 2
    temperature: float = 0.5
    search_lr: float = 3e-3


@dataclass
class LossConfig:
    """``method`` picks the distillation loss: AGKD (kd + attention alignment), MTD (kd + CAD/VR),
    CAKD (kd + cross-architecture projectors + multi-view adversarial term) or TITN (class + distillation
    token heads)."""

    method: Literal["agkd", "mtd", "cakd", "titn", "sokd"] = "agkd"
    kd: KDConfig = field(default_factory=KDConfig)
    attention: AttentionLossConfig = field(default_factory=AttentionLossConfig)
    mtd: MTDConfig = field(default_factory=MTDConfig)
    cakd: CAKDConfig = field(default_factory=CAKDConfig)
    titn: TITNConfig = field(default_factory=TITNConfig)
    sokd: SoKDConfig = field(default_factory=SoKDConfig)


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: Literal["auto", True, False] = "auto"
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: Literal["auto", True, False] = "auto"
    kernels: Literal["auto", "triton", "reference"] = "auto"
    grad_clip: float | None = 5.0
    log_every: int = 10
    progress: bool = True
    tensorboard: Literal["auto", True, False] = "auto"


@dataclass
class Config:
    seed: int = 0
    out: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    baseline: bool = True
    loss: LossConfig = field(default_factory=LossConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _closest(key: str, valid: typing.Iterable[str]) -> str:
    valid = sorted(valid)
    if not valid:
        return "none are defined"
    near = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    return (
        f"did you mean {' or '.join(repr(n) for n in near)}?" if near else f"valid keys: {', '.join(valid)}"
    )


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) if isinstance(a, str) else str(a).lower() for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the type hint ``tp`` and build dataclasses; raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError:
                if len([a for a in args if a is not type(None)]) == 1:
                    raise
        raise ConfigError(f"config key '{where}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        raise ConfigError(f"config key '{where}' must be one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{where}' must be {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is Any:
        return value
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a folder named 2024 reads as a number in YAML
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"config key '{where}' must be {_type_name(tp)}, got {value!r}")


def _build(cls: type, raw: Any, where: str = "") -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{where or '<top>'}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{path}': {_closest(str(key), names)}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def _set_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set a.b.c=value`` (value parsed as YAML) to the raw config mapping."""
    if "=" not in assignment:
        raise ConfigError(f"--set takes KEY=VALUE (for example data.batch_size=32), got {assignment!r}")
    key, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"--set {key}: the value {text!r} is not valid YAML ({exc.__class__.__name__})"
        ) from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' holds a value, not a mapping")
        node = child
    node[parts[-1]] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{at}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return raw


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML run config (the embedded default when ``path`` is None), apply ``--set`` overrides,
    and validate every key, type and file it names."""
    raw = _read_yaml(Path(path) if path is not None else DEFAULT_CONFIG)
    for assignment in overrides:
        _set_override(raw, assignment)
    cfg = _build(Config, raw)
    validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (a resumed run, a checkpoint's ``config``)."""
    return _build(Config, raw)


def _positive(value: float | int, where: str, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or not (value > 0 or (allow_zero and value == 0)):
        raise ConfigError(f"config key '{where}' must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: Config) -> None:
    """Checks across keys and on the file system; the schema already checked keys and types."""
    data = cfg.data
    if data.name != "digits":
        if data.root is None:
            raise ConfigError(f"data.name={data.name} needs data.root: the folder that holds the data set")
        if not Path(data.root).is_dir():
            raise ConfigError(f"data.root does not exist or is not a folder: {data.root}")
    for key in ("image_size", "batch_size", "eval_batch_size"):
        _positive(getattr(data, key), f"data.{key}")
    for key in ("max_train_samples", "max_val_samples"):
        if getattr(data, key) is not None:
            _positive(getattr(data, key), f"data.{key}")
    _positive(data.augment.crop_padding, "data.augment.crop_padding", allow_zero=True)
    _positive(data.augment.cutmix_beta, "data.augment.cutmix_beta")
    if not 0.0 < data.val_fraction < 1.0:
        raise ConfigError(f"config key 'data.val_fraction' must be between 0 and 1, got {data.val_fraction}")
    for key in ("mean", "std"):
        value = getattr(data, key)
        if value is not None and len(value) != 3:
            raise ConfigError(
                f"config key 'data.{key}' must list 3 values (one per RGB channel), got {value}"
            )
    if not 0.0 <= data.augment.cutmix <= 1.0:
        raise ConfigError(
            f"config key 'data.augment.cutmix' is a probability in [0, 1], got {data.augment.cutmix}"
        )
    for role in ("teacher", "student"):
        model: ModelConfig = getattr(cfg, role)
        if model.weights is not None and not Path(model.weights).is_file():
            raise ConfigError(f"{role}.weights: file not found: {model.weights}")
        _positive(model.train.epochs, f"{role}.train.epochs", allow_zero=True)
        _positive(model.train.optimizer.lr, f"{role}.train.optimizer.lr")
        for name, tap in model.taps.items():
            if not tap.path:
                raise ConfigError(
                    f"config key '{role}.taps.{name}.path' is empty: give the module path to tap"
                )
    if not 0.0 <= cfg.loss.kd.alpha <= 1.0:
        raise ConfigError(f"config key 'loss.kd.alpha' must be in [0, 1], got {cfg.loss.kd.alpha}")
    _positive(cfg.loss.kd.temperature, "loss.kd.temperature")
    attention = cfg.loss.attention
    if attention.window_size % 2 == 0 or attention.window_size < 1:
        raise ConfigError(
            f"config key 'loss.attention.window_size' must be odd and >= 1, got {attention.window_size}"
        )
    perceptual = attention.perceptual
    if perceptual.weights is not None and not Path(perceptual.weights).is_file():
        raise ConfigError(f"loss.attention.perceptual.weights: file not found: {perceptual.weights}")
    if cfg.loss.method == "mtd":
        _validate_mtd(cfg)
    if cfg.loss.method == "cakd":
        _validate_cakd(cfg)
    if cfg.loss.method == "sokd":
        _validate_sokd(cfg)
    if not 0.0 <= cfg.loss.titn.alpha <= 1.0:
        raise ConfigError(f"config key 'loss.titn.alpha' must be in [0, 1], got {cfg.loss.titn.alpha}")
    for i, pair in enumerate(attention.pairs):
        where = f"loss.attention.pairs[{i}]"
        if pair.student not in cfg.student.taps:
            near = _closest(pair.student, cfg.student.taps)
            raise ConfigError(f"{where}.student names no student tap {pair.student!r}: {near}")
        if not pair.teacher:
            raise ConfigError(f"{where}.teacher is empty: name one or more teacher taps")
        for name in pair.teacher:
            if name not in cfg.teacher.taps:
                raise ConfigError(
                    f"{where}.teacher names no teacher tap {name!r}: {_closest(name, cfg.teacher.taps)}"
                )
        if cfg.student.taps[pair.student].kind != "feature":
            raise ConfigError(
                f"{where}.student: student tap {pair.student!r} must have kind 'feature' (a CNN map)"
            )


def _validate_mtd(cfg: Config) -> None:
    mtd = cfg.loss.mtd
    if not mtd.pairs:
        raise ConfigError(
            "loss.method=mtd needs loss.mtd.pairs: the (student, teacher) attention taps to distill"
        )
    for i, pair in enumerate(mtd.pairs):
        for role in ("student", "teacher"):
            taps = getattr(cfg, role).taps
            name = getattr(pair, role)
            if name not in taps:
                raise ConfigError(
                    f"loss.mtd.pairs[{i}].{role} names no {role} tap {name!r}: {_closest(name, taps)}"
                )
            if taps[name].kind != "attention":
                raise ConfigError(
                    f"loss.mtd.pairs[{i}].{role}: {role} tap {name!r} must have kind 'attention'"
                )
    if not mtd.relations:
        raise ConfigError("loss.mtd.relations is empty: list 'cad', 'vr' or both")
    if mtd.weighting == "manual":
        per_layer = 1 if mtd.granularity == "layer" else len(mtd.relations)
        expected = len(mtd.pairs) * per_layer
        if mtd.manual_weights is None or len(mtd.manual_weights) != expected:
            raise ConfigError(
                f"loss.mtd.weighting=manual needs loss.mtd.manual_weights with {expected} values "
                f"({len(mtd.pairs)} pairs x {per_layer} per pair), got {mtd.manual_weights}"
            )
    if mtd.relation_heads is not None:
        _positive(mtd.relation_heads, "loss.mtd.relation_heads")


def _validate_cakd(cfg: Config) -> None:
    cakd = cfg.loss.cakd
    wanted = (
        ("student", cakd.student, cfg.student.taps, "feature"),
        ("teacher_attention", cakd.teacher_attention, cfg.teacher.taps, "attention"),
        ("teacher_tokens", cakd.teacher_tokens, cfg.teacher.taps, "feature"),
    )
    for key, name, taps, kind in wanted:
        if name not in taps:
            raise ConfigError(f"loss.cakd.{key} names no tap {name!r}: {_closest(name, taps)}")
        if taps[name].kind != kind:
            raise ConfigError(f"loss.cakd.{key}: tap {name!r} must have kind {kind!r}")
    for key in ("replace_prob", "view_prob", "dropout"):
        value = getattr(cakd, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"config key 'loss.cakd.{key}' is a probability in [0, 1], got {value}")
    _positive(cakd.discriminator_every, "loss.cakd.discriminator_every")
    _positive(cakd.discriminator_lr, "loss.cakd.discriminator_lr")


def _validate_sokd(cfg: Config) -> None:
    sokd = cfg.loss.sokd
    for role in ("student", "teacher"):
        name, taps = getattr(sokd, role), getattr(cfg, role).taps
        if name not in taps:
            raise ConfigError(f"loss.sokd.{role} names no {role} tap {name!r}: {_closest(name, taps)}")
        if taps[name].kind != "feature":
            raise ConfigError(f"loss.sokd.{role}: tap {name!r} must have kind 'feature'")
    _positive(sokd.search_epochs, "loss.sokd.search_epochs", allow_zero=True)
    for key in ("sub_policies", "ops_per_policy", "temperature", "search_lr"):
        _positive(getattr(sokd, key), f"loss.sokd.{key}")


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (what ``--resume`` and ``student.pt`` record)."""
    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
