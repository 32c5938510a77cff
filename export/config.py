"""What one ``python -m export.trt`` does, as a typed config: :class:`ExportConfig`, read through
:mod:`kdfast.schema` as a training run's config is (a YAML file with ``--config``, ``--set KEY=VALUE``, and
each flag of the command a shorthand that sets one key), so every error is one line naming the key and the
closest valid ones. ``report.json`` holds the resolved config under ``config``; docs/export.md lists the
keys.

``read_config(file, flags, sets)`` merges the three (file, then flags, then ``--set``), types the result and
checks what one key's type cannot say (:func:`check`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from export.backends import BACKENDS
from export.latency import Protocol
from export.machine import usable_cpus
from export.onnx_export import DEFAULT_OPSET, OPSETS
from export.quantize import CALIBRATION_METHODS
from export.verify import DEFAULT_GATES, Gates
from kdfast.errors import ConfigError, UsageError, shown
from kdfast.schema import build, closest, positive, read_yaml, set_override, unit_interval

PRECISIONS = ("fp32", "fp16", "int8", "int8-ort")
DEFAULT_PRECISIONS = PRECISIONS
BASELINES = ("eager", "compile")
Precision = Literal["fp32", "fp16", "int8", "int8-ort"]
Baseline = Literal["eager", "compile"]
Calibration = Literal[tuple(CALIBRATION_METHODS)]
THREADS_AUTO_MAX = 4  # threads: auto gives every backend this many CPU threads at most


@dataclass
class DataConfig:
    """The images the export verifies, calibrates and controls INT8 on."""

    verify_samples: int = 512  # validation images the gates are measured on (at most)
    calib_samples: int = 128  # training images INT8 is calibrated on
    control_samples: int = 512  # validation images held out for INT8 accuracy control (at most half)
    calibration: Calibration = "minmax"  # how INT8 ranges are found
    verify_data: str | None = None  # an image folder to verify on instead of the checkpoint's data
    random_inputs: bool = False  # last resort: random inputs, parity only (exit 1: nothing is verified)


@dataclass
class Fp32Gates:
    """fp32: every logit close to PyTorch's (Polygraphy's rule: one outside both ``atol`` and ``rtol``
    fails), and the top-1 predictions of at least ``min_agreement`` of the images the same."""

    atol: float = DEFAULT_GATES["fp32"].atol
    rtol: float = DEFAULT_GATES["fp32"].rtol
    min_agreement: float = DEFAULT_GATES["fp32"].min_agreement


@dataclass
class Fp16Gates:
    """fp16: the same gates as fp32, wider."""

    atol: float = DEFAULT_GATES["fp16"].atol
    rtol: float = DEFAULT_GATES["fp16"].rtol
    min_agreement: float = DEFAULT_GATES["fp16"].min_agreement


@dataclass
class Int8Gates:
    """INT8: top-1 agreement with PyTorch, and the accuracy lost against it in points."""

    min_agreement: float = DEFAULT_GATES["int8"].min_agreement
    max_drop: float = DEFAULT_GATES["int8"].max_accuracy_drop


@dataclass
class GatesConfig:
    """The verification gates per precision (export.verify)."""

    fp32: Fp32Gates = field(default_factory=Fp32Gates)
    fp16: Fp16Gates = field(default_factory=Fp16Gates)
    int8: Int8Gates = field(default_factory=Int8Gates)

    def of(self, precision: str) -> Gates:
        """export.verify's gates of ``precision`` ("int8-ort" is checked as int8) with these thresholds."""
        base = DEFAULT_GATES["int8" if precision == "int8-ort" else precision]
        if base.elementwise:
            ours = getattr(self, precision)
            return dataclasses.replace(base, atol=ours.atol, rtol=ours.rtol, min_agreement=ours.min_agreement)
        return dataclasses.replace(
            base, min_agreement=self.int8.min_agreement, max_accuracy_drop=self.int8.max_drop
        )


@dataclass
class TimingConfig:
    """The latency protocol (export.latency.Protocol) of every backend and batch size."""

    warmup_iters: int = Protocol.warmup_iters  # warm-up calls per row and batch size, at least
    warmup_s: float = Protocol.warmup_s  # warm-up seconds per row and batch size, at least
    iters: int = Protocol.iters  # timed calls per row and batch size, at least
    min_time_s: float = Protocol.min_s  # timed seconds per row and batch size, at least
    max_time_s: float | None = None  # a cap per batch size; a series it cuts below iters is marked
    rounds: int = Protocol.rounds  # rounds the rows of one batch size are interleaved in

    def protocol(self) -> Protocol:
        return Protocol(
            self.warmup_iters, self.warmup_s, self.iters, self.min_time_s, self.max_time_s, self.rounds
        )


@dataclass
class ExportConfig:
    """One export: the student, where its files go, what is built, verified and timed, and how."""

    model: str | None = None  # student.pt written by kdfast.train (required)
    out: str | None = None  # output folder (null: <model folder>/export)
    overwrite: bool = False  # replace an earlier export in out (its files move to out/.previous-export/)
    precision: list[Precision] = field(default_factory=lambda: list(DEFAULT_PRECISIONS))
    backends: list[str] | None = None  # keys of export.backends.BACKENDS; null: every one available here
    baselines: list[Baseline] = field(default_factory=lambda: list(BASELINES))
    max_batch: int = 8  # largest batch of the dynamic batch dimension
    opset: int = DEFAULT_OPSET
    threads: Literal["auto"] | int = "auto"  # CPU threads of every backend; auto: min(4, usable CPUs)
    workspace_mb: int = 1024  # TensorRT's workspace limit
    data: DataConfig = field(default_factory=DataConfig)
    gates: GatesConfig = field(default_factory=GatesConfig)
    timing: TimingConfig = field(default_factory=TimingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default(key: str) -> Any:
    """The default of the dotted ``key`` (what ``--help`` shows)."""
    node: Any = ExportConfig()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def read_config(
    file: str | Path | None, flags: Mapping[str, Any], sets: Sequence[str], flag_names: Mapping[str, str]
) -> ExportConfig:
    """The export's config: the YAML ``file`` (or every default), then ``flags`` (dotted key -> value, the
    flags given on the command line), then ``sets`` (``KEY=VALUE``); typed, checked, and resolved
    (``threads: auto`` to a number, ``out`` to its default). An error about a key that a flag set names
    the flag too (``flag_names``: key -> flag)."""
    raw = read_yaml(Path(file), "export config", "model: runs/default/student.pt") if file else {}
    try:
        for key, value in flags.items():
            node = raw
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        for assignment in sets:
            set_override(raw, assignment)
        cfg = build(ExportConfig, raw)
        check(cfg)
    except ConfigError as exc:
        message = str(exc)
        for key in flags:
            message = message.replace(f"config key '{key}'", f"{flag_names[key]} (config key '{key}')")
        raise ConfigError(message) from None
    return resolve(cfg)


def check(cfg: ExportConfig) -> None:
    """What the types cannot say: the student is given, counts are at least 1, fractions lie in 0..1, the
    batch stays dynamic, the opset is one the exporter and TensorRT both take."""
    if not cfg.model:
        raise UsageError("--model is required: the student.pt kdfast.train wrote (or model: in --config)")
    counts = {"max_batch": cfg.max_batch, "workspace_mb": cfg.workspace_mb, "timing.iters": cfg.timing.iters}
    counts["timing.rounds"] = cfg.timing.rounds
    counts |= {
        f"data.{k}": getattr(cfg.data, k) for k in ("verify_samples", "calib_samples", "control_samples")
    }
    if cfg.threads != "auto":
        counts["threads"] = cfg.threads
    for key, value in counts.items():
        positive(value, key)
    for i, key in enumerate(cfg.backends or []):  # the table as it is now (a test may plant a backend)
        if key not in BACKENDS:
            raise ConfigError(
                f"config key 'backends[{i}]': no backend {shown(key)}; {closest(key, BACKENDS, 'backends')}"
            )
    for precision in ("fp32", "fp16", "int8"):
        unit_interval(getattr(cfg.gates, precision).min_agreement, f"gates.{precision}.min_agreement")
    if cfg.timing.max_time_s is not None:
        positive(cfg.timing.max_time_s, "timing.max_time_s")
    if cfg.max_batch < 2:
        raise ConfigError(
            "config key 'max_batch' must be >= 2 so the exported batch dimension stays dynamic, "
            f"got {cfg.max_batch}"
        )
    if cfg.opset not in OPSETS:
        raise ConfigError(
            f"config key 'opset' must lie in {OPSETS[0]}..{OPSETS[-1]} (the exporter's and TensorRT's), "
            f"got {cfg.opset}"
        )


def resolve(cfg: ExportConfig) -> ExportConfig:
    """``threads: auto`` as the number this machine gives it and ``out`` as the folder it stands for: what
    report.json records."""
    threads = min(THREADS_AUTO_MAX, usable_cpus()) if cfg.threads == "auto" else cfg.threads
    out = cfg.out or str(Path(cfg.model).parent / "export")
    return dataclasses.replace(cfg, threads=threads, out=out)
