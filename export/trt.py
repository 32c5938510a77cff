"""``python -m export.trt --model student.pt``: the student as clean ONNX files (fp32, fp16, TensorRT-valid
INT8), each runtime of the backend table verified against the PyTorch student on real validation images
with the same gates and timed with the same protocol; report.md (read it first), report.json and charts.

Exit codes (docs/contracts.md): 0 done; 1 a gate failed or could not be measured (artifacts and report
kept); 2 bad usage or input (one line, nothing written); 3 a requested backend is not available here
(everything else done and kept).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import onnx
import torch
from tqdm import tqdm

from export.aoti import import_cpp_extension_quietly
from export.backends import BACKENDS, Backend, Loaded, Sources, batched, torch_runner
from export.config import BASELINES, PRECISIONS, ExportConfig, default, read_config
from export.int8 import ControlSet, make_int8
from export.latency import batch_sizes, interleave, summarize, wall_clock
from export.machine import PeakMemory, busy_warning, load_average, machine_info
from export.onnx_export import OPSETS, export_onnx, read_metadata
from export.outdir import LOG, PREVIOUS, REPORT, OutputFolder, native_output
from export.precision import to_fp16
from export.qad import compare as compare_ptq_qad
from export.qdq_rules import check_tensorrt_qdq
from export.quantize import CALIBRATION_METHODS, SCHEMES, Int8Quantizer
from export.report import add_speedups, precision_label, table, write_reports
from export.verify import DEFAULT_GATES, check_gates, failed_gates, parity, unmeasured_gates
from kdfast.atomic import atomic_write, check_length
from kdfast.checkpoint import (
    build_from_checkpoint,
    has_test_split,
    load_checkpoint,
    load_split,
    preprocessing,
    rebuilding_data,
)
from kdfast.errors import (
    EXIT_BAD_INPUT,
    EXIT_GATE_FAILED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    UsageError,
    WriteError,
    one_line,
    os_error_advice,
    shown_path,
    stop_signal,
    terminate_like_ctrl_c,
    write_fault,
)

# Files that share a precision with another, by label: one INT8 layout per runtime (export.quantize).
VARIANTS = {"int8-ort": "u8s8 for ORT on x86"}
RANDOM_WARNING = (
    "random inputs: parity only; top-1 agreement and accuracy drop are not measured, so the run cannot pass"
)
HEARTBEAT_S = 30.0  # a step still running says so this often: no silent stretch is longer

EPILOG = """\
Every flag sets one key of the export's config (its name in brackets); --config FILE gives any of them
in YAML and --set KEY=VALUE any one (the value read as YAML), e.g. --set timing.iters=200. The file comes
first, then the flags, then --set. report.json records the config as resolved (docs/export.md lists the
keys).

An export owns its output folder: report.json lists every file it wrote with its SHA-256 (manifest). A
folder holding an earlier export is refused unless --overwrite, which moves the earlier export's files to
.previous-export/ there when this one is done. Native runtime logging goes to export.log in that folder.

exit codes:
  0    done: every gate passed
  1    a verification gate failed or could not be measured (artifacts and report kept; it says which)
  2    bad usage or input, or a file that cannot be written (a full disk, no permission): one line
       names what to change; nothing of an earlier export is changed
  3    a backend asked for by name is not available here (everything else done and kept)
  130  interrupted (Ctrl-C), 143 stopped by SIGTERM: this run's files are removed, an earlier export
       in the folder is unchanged

examples:
  python -m export.trt --model runs/default/student.pt
  python -m export.trt --model runs/default/student.pt --backends ort openvino --precision fp32 int8
  python -m export.trt --config export.yaml --set timing.iters=200 --overwrite"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump: exit 2 through UsageError
        raise UsageError(f"{message} (see --help)")


def _parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The command line, and the config key -> flag of every flag that sets one."""
    p = _Parser(
        prog="python -m export.trt",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    flags: dict[str, str] = {}

    def flag(name: str, key: str, help: str, **kwargs: object) -> None:
        value = default(key)
        shown = " ".join(map(str, value)) if isinstance(value, list) else json.dumps(value).strip('"')
        if "type" in kwargs and "choices" not in kwargs:
            kwargs.setdefault("metavar", "N" if kwargs["type"] is int else "X")
        p.add_argument(
            name, dest=key, default=argparse.SUPPRESS, help=f"{help} [{key}; default: {shown}]", **kwargs
        )
        flags[key] = name

    p.add_argument("--config", metavar="FILE", help="a YAML file of export config keys (default: none)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set one config key, the value read as YAML, e.g. --set gates.int8.max_drop=0.5 (repeatable)",
    )
    flag("--model", "model", "student.pt written by kdfast.train (required)", metavar="FILE")
    flag("--out", "out", "output folder (null: <model folder>/export)", metavar="DIR")
    flag(
        "--overwrite",
        "overwrite",
        "replace an earlier export in the output folder",
        action="store_const",
        const=True,
    )
    flag(
        "--precision",
        "precision",
        "ONNX files to build, INT8 in the layout each runtime fuses: int8, the TensorRT-valid Q/DQ file "
        "(OpenVINO runs it too); int8-ort, U8S8 with 7-bit weights for ONNX Runtime on x86 (and OpenVINO)",
        nargs="+",
        choices=PRECISIONS,
    )
    flag(
        "--backends",
        "backends",
        "runtimes to verify (null: every one available here; one asked for but unavailable: exit 3)",
        nargs="+",
        choices=list(BACKENDS),
    )
    flag(
        "--baselines",
        "baselines",
        "PyTorch baselines to time; none with the flag alone (eager is always the parity reference)",
        nargs="*",
        choices=BASELINES,
    )
    flag("--max-batch", "max_batch", "largest batch of the dynamic batch dimension, >= 2", type=int)
    flag("--opset", "opset", f"ONNX opset, {OPSETS[0]}..{OPSETS[-1]}", type=int)
    flag("--verify-samples", "data.verify_samples", "validation images to verify on, at most", type=int)
    flag("--calib-samples", "data.calib_samples", "training images to calibrate INT8 on", type=int)
    flag(
        "--control-samples",
        "data.control_samples",
        "validation images held out for INT8 accuracy control (at most half the split; the gates are "
        "measured on the others)",
        type=int,
    )
    flag("--calibration", "data.calibration", "how INT8 ranges are found", choices=list(CALIBRATION_METHODS))
    flag(
        "--verify-data",
        "data.verify_data",
        "an image folder to verify on instead of the checkpoint's data",
        metavar="DIR",
    )
    flag(
        "--random-inputs",
        "data.random_inputs",
        "last resort: random inputs, parity only; the accuracy gates are not measured, so exit 1",
        action="store_const",
        const=True,
    )
    flag("--threads", "threads", "CPU threads of every backend (auto: min(4, usable CPUs))", type=int)
    for prec, gates in DEFAULT_GATES.items():
        if gates.elementwise:
            flag(f"--{prec}-atol", f"gates.{prec}.atol", f"{prec}: absolute tolerance per logit", type=float)
            flag(
                f"--{prec}-rtol",
                f"gates.{prec}.rtol",
                f"{prec}: relative tolerance per logit (a logit fails outside both)",
                type=float,
            )
        flag(
            f"--{prec}-min-agreement",
            f"gates.{prec}.min_agreement",
            f"{prec}: fraction of top-1 predictions that must match PyTorch's",
            type=float,
        )
        if gates.max_accuracy_drop is not None:
            flag(
                f"--{prec}-max-drop",
                f"gates.{prec}.max_drop",
                f"{prec}: accuracy drop allowed against PyTorch, in points",
                type=float,
            )
    flag("--warmup-iters", "timing.warmup_iters", "warm-up calls per row and batch size, at least", type=int)
    flag("--warmup-s", "timing.warmup_s", "warm-up seconds per row and batch size, at least", type=float)
    flag("--iters", "timing.iters", "timed calls per row and batch size, at least", type=int)
    flag("--min-time-s", "timing.min_time_s", "timed seconds per row and batch size, at least", type=float)
    flag(
        "--rounds",
        "timing.rounds",
        "rounds the rows of one batch size are interleaved in (order rotated each round); the x-vs-eager "
        "figures are medians of per-round ratios",
        type=int,
    )
    flag(
        "--max-time-s",
        "timing.max_time_s",
        "a cap per batch size; a series it cuts below --iters is marked with its sample count",
        type=float,
    )
    flag("--workspace-mb", "workspace_mb", "TensorRT's workspace limit in MB", type=int)
    return p, flags


def parse_config(argv: list[str] | None) -> ExportConfig:
    """The command line as the export's resolved config (:func:`export.config.read_config`)."""
    parser, flag_names = _parser()
    args = vars(parser.parse_args(argv))
    file, sets = args.pop("config"), args.pop("set")
    return read_config(file, args, sets, flag_names)


def _load_student(path: Path) -> tuple[dict, torch.nn.Module]:
    """The checkpoint at ``path`` and the student built from it, or one line saying why it is not a
    student kdfast can export."""
    if path.is_file() and not zipfile.is_zipfile(path):
        raise UsageError(
            f"--model {path} is not a torch checkpoint (not the zip archive torch.save writes): "
            "pass the student.pt that kdfast.train wrote"
        )
    ckpt = load_checkpoint(path)
    try:
        return ckpt, build_from_checkpoint(ckpt)
    except UsageError as e:
        raise UsageError(f"--model {path}: {e}") from None


@dataclass(frozen=True)
class _Data:
    images: np.ndarray  # verification images
    labels: np.ndarray | None
    calibration: np.ndarray
    control: np.ndarray  # images INT8 accuracy control measures on
    control_labels: np.ndarray | None
    source: str


def _data(cfg: ExportConfig, ckpt: dict) -> _Data:
    """Verification, calibration and control images. Calibration comes from the training split. Accuracy
    control needs images like those the gates are measured on, but not those: training images, which the
    student fits with wide margins, let INT8 pass control and then fail the gates (resnet18 on digits: 99.6%
    agreement on training images, 98.1% on validation images). So a seeded random part of the validation
    split, at most half of it, is held out for control when INT8 is asked for, and the gates are measured on
    the rest. A data set with an official test split (Fashion-MNIST) keeps the two apart instead: the gates
    are measured on the test images, control on validation images."""
    shape, data = ckpt["input"]["size"], cfg.data
    if data.random_inputs:
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(data.verify_samples, *shape, generator=gen).numpy()
        calib = torch.randn(data.calib_samples, *shape, generator=gen).numpy()
        return _Data(images, None, calib, images, None, "random inputs (no labels)")
    if data.verify_data is not None:
        # The folder is read with the checkpoint's preprocessing and split; calibration comes from its
        # training part so a checkpoint whose own data is unavailable can still be exported.
        ckpt = {**ckpt, "data": {**ckpt["data"], "name": "imagefolder", "root": data.verify_data}}
        source = f"imagefolder {data.verify_data}"
    else:
        source = f"{ckpt['data'].get('name')} val split from the checkpoint"
    int8 = bool(set(SCHEMES) & set(cfg.precision))
    test = data.verify_data is None and has_test_split(ckpt["data"])
    with rebuilding_data("pass --verify-data DIR or, as a last resort, --random-inputs"):
        if test:
            images, labels = load_split(ckpt, "test", data.verify_samples)
            control, control_labels = (
                load_split(ckpt, "val", data.control_samples) if int8 else (images[:0], labels[:0])
            )
        else:
            held_out = data.control_samples if int8 else 0
            val, val_labels = load_split(ckpt, "val", data.verify_samples + held_out)
        calibration, _ = load_split(ckpt, "train", data.calib_samples)
    verified = images if test else val
    if list(verified.shape[1:]) != list(shape):
        raise UsageError(f"verification images are {tuple(verified.shape[1:])}, the student expects {shape}")
    if test:
        source = f"{ckpt['data']['name']} test split from the checkpoint (INT8 control: its val split)"
        arrays = (images, labels, calibration, control, control_labels)
        return _Data(*(a.numpy() for a in arrays), source)
    if int8 and len(val) < 2:
        raise UsageError(f"the validation split has {len(val)} image; INT8 needs 2, one held out for control")
    order = np.random.default_rng(0).permutation(len(val))
    held_out = min(data.control_samples, len(val) // 2) if int8 else 0
    control, verify = sorted(order[:held_out]), sorted(order[held_out:][: data.verify_samples])
    val, val_labels = val.numpy(), val_labels.numpy()
    return _Data(
        val[verify], val_labels[verify], calibration.numpy(), val[control], val_labels[control], source
    )


def _select_backends(cfg: ExportConfig) -> tuple[list[Backend], dict[str, str], list[str]]:
    """(backends asked for, in table order; why each one that cannot run here cannot; the ones asked for by
    name that cannot)."""
    keys = cfg.backends or list(BACKENDS)
    reasons = {k: r for k in keys if (r := BACKENDS[k].unavailable_reason()) is not None}
    return [BACKENDS[k] for k in keys], reasons, [k for k in reasons if cfg.backends]


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _unless_write_fault(e: Exception) -> None:
    """Raise ``e`` again when it is a file that cannot be written (a full disk: the command stops, exit 2),
    not a failure of a backend to report in its row and go on."""
    if isinstance(e, WriteError):
        raise e
    fault = write_fault(e)
    if fault is not None:
        raise WriteError(fault.filename or "a file of this export", fault) from None


class _Export:
    """One run of the command: data, reference logits, the timing protocol, the rows of the report."""

    def __init__(
        self,
        cfg: ExportConfig,
        model: torch.nn.Module,
        data: _Data,
        folder: OutputFolder,
        qad: dict | None = None,
        console: TextIO | None = None,
        log: TextIO | None = None,
    ):
        self.cfg, self.model, self.data, self.folder = cfg, model, data, folder
        # progress lines go to the console; what converters print (and native code: outdir.native_output)
        # to the export's log
        self.console = console if console is not None else sys.stderr
        self.log = log if log is not None else self.console
        self.protocol = cfg.timing.protocol()
        self.sizes = batch_sizes(cfg.max_batch)
        self.started = time.perf_counter()
        # The same preallocated arrays feed every backend's timing, one per batch size.
        reps = -(-cfg.max_batch // len(data.images))
        pool = np.concatenate([data.images] * reps)
        self.inputs = {b: np.ascontiguousarray(pool[:b]) for b in self.sizes}
        self._references: dict[str, np.ndarray] = {}
        self.rows: list[dict] = []
        # Rows verified and waiting to be timed, with what runs them: all are timed together at the end.
        self.timed: list[tuple[dict, Loaded]] = []
        self.load_during: list[float] = []
        # A QAD student (kdfast.train --qad) was trained as the INT8 network: the file's rows are verified
        # against that network (the PyTorch fake quantization of the same layout, calibrated on the same
        # images), not against its float forward, and no layer is kept float.
        self.qad = qad
        self._fake_int8: np.ndarray | None = None

    def say(self, message: str) -> None:
        # through tqdm, so that a line said while the timing bar is drawn does not break it
        tqdm.write(f"[{time.perf_counter() - self.started:6.1f} s] {message}", file=self.console)
        self.console.flush()

    @contextlib.contextmanager
    def step(self, what: str, status: Callable[[float], str] | None = None) -> Iterator[None]:
        """Say ``what`` starts, and every :data:`HEARTBEAT_S` seconds that it is still running (a compile,
        a conversion: steps whose length nothing predicts), so that no stretch of the command is silent;
        ``status(seconds so far)`` adds how far it is where the step can tell."""
        self.say(what)
        started, done = time.perf_counter(), threading.Event()

        def beat() -> None:
            while not done.wait(HEARTBEAT_S):
                elapsed = time.perf_counter() - started
                said = f"{elapsed:.0f} s" if status is None else f"{elapsed:.0f} s, {status(elapsed)}"
                self.say(f"  ... still {what} ({said})")

        beating = threading.Thread(target=beat, daemon=True)
        beating.start()
        try:
            yield
        finally:
            done.set()
            beating.join()

    def reference(self, device: str) -> np.ndarray:
        """The PyTorch student's logits on the verification images, computed on ``device``."""
        if device not in self._references:
            model = self.model.to(device)
            with torch.inference_mode():
                logits = [
                    model(torch.from_numpy(self.data.images[i : i + self.cfg.max_batch]).to(device))
                    .float()
                    .cpu()
                    for i in range(0, len(self.data.images), self.cfg.max_batch)
                ]
            self.model.to("cpu")
            self._references[device] = torch.cat(logits).numpy()
        return self._references[device]

    def to_time(self, row: dict, loaded: Loaded) -> None:
        """Queue ``row`` for :meth:`time_rows`, run by ``loaded``."""
        row["latency"] = {"end_to_end": [], "compute_only": None if loaded.compute_step is None else []}
        self.timed.append((row, loaded))

    def time_rows(self) -> None:
        """Every queued row, batch size by batch size, in interleaved rounds
        (:func:`export.latency.interleave`): end to end, and device-only where the backend has it; a runner
        that raises while timed gets the error on its row. The runners are released afterwards."""
        count = sum(1 if loaded.compute_step is None else 2 for _, loaded in self.timed)
        least = count * len(self.sizes) * (self.protocol.warmup_s + self.protocol.min_s)
        what = (
            f"timing {len(self.timed)} rows ({count} series), interleaved in {self.protocol.rounds} rounds "
            f"per batch size {', '.join(map(str, self.sizes))}: at least {least:.0f} s"
        )
        rounds, finished = len(self.sizes) * self.protocol.rounds, [0]

        def status(elapsed: float) -> str:
            done = finished[0]
            eta = f", about {elapsed / done * (rounds - done):.0f} s to go" if done else ""
            return f"{done}/{rounds} rounds{eta}"

        def one_more(_: int) -> None:
            finished[0] += 1
            bar.update()

        # the bar on a terminal (rate and ETA); a log or a pipe gets the step's lines, with the same figures
        bar = tqdm(total=rounds, desc="timing", unit="round", leave=False, file=self.console, disable=None)
        with self.step(what, status), bar:
            for b, x in self.inputs.items():
                self.load_during.append(load_average())
                steps = {}
                for i, (_, loaded) in enumerate(self.timed):
                    steps[f"{i}/end_to_end"] = wall_clock(lambda run=loaded.run, x=x: run(x))
                    if loaded.compute_step is not None:
                        steps[f"{i}/compute_only"] = loaded.compute_step(x)
                bar.set_postfix_str(f"batch {b}, {len(steps)} series")
                samples, failed = interleave(steps, self.protocol, on_round=one_more)
                for key, series in samples.items():
                    i, kind = key.split("/")
                    self.timed[int(i)][0]["latency"][kind].append(summarize(series, b, self.protocol))
                for key, e in failed.items():
                    row = self.timed[int(key.split("/")[0])][0]
                    row["error"] = row["error"] or f"while timed at batch {b}: {_error_line(e)}"
        self.timed.clear()

    def row(self, backend: str, precision: str, **fields: object) -> dict:
        row = {
            "backend": backend,
            "precision": "int8" if precision in VARIANTS else precision,
            "variant": VARIANTS.get(precision),
            "device": "cpu",
            "file": None,
            "artifacts": None,  # every file the row's runtime loads (what ships)
            "size_bytes": None,
            "parity": None,
            "gates": [],
            "accuracy": None,
            "latency": None,
            "load_s": None,
            "first_call_s": None,  # batch -> seconds of the first call (compilation, specialization)
            "compile_s": None,  # load_s + every first call: what it takes before the timed rounds
            "peak_rss_mb": None,
            "error": None,
            "unavailable": None,  # why this backend cannot run here (then nothing else is filled in)
            "runtime": {},  # what the runtime reports actually ran: version, execution precision, threads
            **fields,
        }
        self.rows.append(row)
        return row

    def fake_int8(self, images: np.ndarray) -> np.ndarray:
        """The QAD student's logits as trained: fake-quantized in the TensorRT layout (kdfast.quant), its
        activation ranges calibrated on the export's calibration images."""
        from kdfast.quant import FakeQuant

        model = copy.deepcopy(self.model).cpu()
        FakeQuant(model).calibrate(torch.from_numpy(self.data.calibration).split(self.cfg.max_batch))
        return batched(torch_runner(model.eval()), images, self.cfg.max_batch)

    def verify(
        self, row: dict, logits: np.ndarray, precision: str, device: str = "cpu", *, onnx_int8: bool = False
    ) -> None:
        gates = self.cfg.gates.of(precision)
        reference = self.reference(device)
        if self.qad is not None and onnx_int8 and precision == "int8":
            if self._fake_int8 is None:
                self._fake_int8 = self.fake_int8(self.data.images)
            reference = self._fake_int8
            row["reference"] = "the QAD student as trained (fake-quantized, kdfast.quant)"
        p = parity(reference, logits, atol=gates.atol, rtol=gates.rtol, labels=self.data.labels)
        row.update(parity=p.as_dict(), gates=check_gates(p, gates), accuracy=p.accuracy)

    def run_loaded(
        self,
        row: dict,
        load: Callable[[], Loaded],
        precision: str,
        device: str,
        label: str,
        *,
        onnx_int8: bool = False,
    ) -> None:
        """Load, verify and time one artifact (``label`` in the progress lines), recording load time and
        peak memory."""
        with PeakMemory() as memory:
            with self.step(f"{label}: loading and verifying on {len(self.data.images)} images"):
                t0 = time.perf_counter()
                loaded = load()
                row["load_s"] = time.perf_counter() - t0
                row["runtime"] = loaded.info
                # Compilation and per-shape specialization (torch.compile, OpenVINO's shape inference)
                # happen at the first call of each batch size: its own column, outside the timed rounds.
                # Largest batch first: ExecuTorch 1.5's XNNPACK int8 program whose first call had batch 1
                # gave wrong logits at batch 2 ever after (top-1 agreement 0.50 on digits; fp32 and a first
                # call at the largest batch were exact), so no runner starts below the sizes it will see.
                first = {}
                for b in sorted(self.inputs, reverse=True):
                    t0 = time.perf_counter()
                    loaded.run(self.inputs[b])
                    first[b] = time.perf_counter() - t0
                row["first_call_s"] = dict(sorted(first.items()))
                row["compile_s"] = row["load_s"] + sum(first.values())
                logits = batched(loaded.run, self.data.images, self.cfg.max_batch)
                self.verify(row, logits, precision, device, onnx_int8=onnx_int8)
        row["peak_rss_mb"] = memory.peak_bytes / 2**20
        self.to_time(row, loaded)

    def file_fields(self, files: list[Path]) -> dict:
        """The artifact (the first of ``files``), every file it is loaded from (what ships), their bytes."""
        return {
            "file": str(self.folder.final(files[0])),
            "artifacts": [f.name for f in files],
            "size_bytes": sum(f.stat().st_size for f in files),
        }


def _baselines(run: _Export) -> None:
    labels = run.data.labels
    accuracy = None if labels is None else float(np.mean(run.reference("cpu").argmax(1) == labels))
    eager = run.row("pytorch-eager", "fp32", accuracy=accuracy)
    if "eager" in run.cfg.baselines:
        run.to_time(eager, Loaded(torch_runner(run.model)))
    if "compile" in run.cfg.baselines:
        row = run.row("torch.compile", "fp32")
        try:
            run.run_loaded(
                row,
                lambda: Loaded(torch_runner(torch.compile(run.model, dynamic=True))),
                "fp32",
                "cpu",
                "torch.compile (compiles on the first call)",
            )
        except Exception as e:  # noqa: BLE001 - a failing baseline is reported, the export goes on
            _unless_write_fault(e)
            row["error"] = _error_line(e)


def _metadata(ckpt: dict, opset: int) -> dict[str, object]:
    return {
        "kdfast.format": ckpt["format"],
        "kdfast.version": ckpt["versions"].get("kdfast", "unknown"),
        "classes": ckpt["classes"],
        "input_size": ckpt["input"]["size"],
        "mean": ckpt["input"]["mean"],
        "std": ckpt["input"]["std"],
        "preprocessing": preprocessing(ckpt),
        "arch": ckpt["arch"],
        "opset": opset,
    }


def _int8(run: _Export, files: dict[str, Path], metadata: dict[str, str], int8_report: dict) -> None:
    cfg = run.cfg
    # Accuracy control keeps layers float to approach the float forward; a QAD student is the INT8 network
    # itself, so every layer stays INT8 (control not run, said in the report).
    labels = None if run.qad is not None else run.data.control_labels
    control = ControlSet(run.data.control, _logits(run, run.data.control), labels)
    with tempfile.TemporaryDirectory(prefix="kdfast-int8-") as work:
        with run.step(f"INT8: calibrating ({cfg.data.calibration}) on {len(run.data.calibration)} images"):
            quantizer = Int8Quantizer(
                files["fp32"],
                run.data.calibration,
                method=cfg.data.calibration,
                batch=cfg.max_batch,
                workdir=Path(work),
            )
        gates = cfg.gates.of("int8")
        for name in (p for p in SCHEMES if p in cfg.precision):
            scheme = SCHEMES[name]
            with run.step(
                f"INT8 {name}: quantizing, accuracy control on {len(control.images)} held-out images"
            ):
                made = make_int8(
                    quantizer,
                    scheme,
                    run.folder.staging / f"student.{name}.onnx",
                    metadata=metadata,
                    control_set=control,
                    min_agreement=gates.min_agreement,
                    max_drop=gates.max_accuracy_drop,
                    threads=cfg.threads,
                    batch=cfg.max_batch,
                )
            files[name] = made.path
            int8_report[name] = {
                "file": str(run.folder.final(made.path)),
                "calibration": cfg.data.calibration,
                "keep_float": [] if made.control is None else made.control.keep_float,
                "control": None if made.control is None else made.control.as_dict(),
                "control_not_run": None
                if made.control is not None
                else "a QAD student is the INT8 network it was trained as"
                if run.qad is not None
                else "no labelled images",
                "layers": made.layers,
            }


def _logits(run: _Export, images: np.ndarray) -> np.ndarray:
    return batched(torch_runner(run.model), images, run.cfg.max_batch)


def _onnx(run: _Export, ckpt: dict, int8_report: dict) -> dict[str, Path]:
    """Every ONNX file asked for; a conversion that fails is a row with its error, the rest goes on."""
    cfg, staging = run.cfg, run.folder.staging
    example = torch.from_numpy(run.inputs[2].copy())
    try:
        with run.step(f"ONNX fp32: exporting (opset {cfg.opset}, batch 1..{cfg.max_batch}) and cleaning"):
            fp32 = export_onnx(
                run.model,
                example,
                staging / "student.fp32.onnx",
                max_batch=cfg.max_batch,
                metadata=_metadata(ckpt, cfg.opset),
                opset=cfg.opset,
            )
    except Exception as e:  # noqa: BLE001 - without an fp32 file no ONNX backend can run; the rest goes on
        _unless_write_fault(e)
        run.row("onnx", "fp32", error=_error_line(e), traceback=traceback.format_exc(limit=-4))
        return {}
    files = {"fp32": fp32}
    metadata = read_metadata(fp32)
    if "fp16" in cfg.precision:
        try:
            with run.step("ONNX fp16: converting"):
                files["fp16"] = to_fp16(fp32, staging / "student.fp16.onnx")
        except Exception as e:  # noqa: BLE001
            _unless_write_fault(e)
            run.row("onnx", "fp16", error=_error_line(e), traceback=traceback.format_exc(limit=-4))
    if set(SCHEMES) & set(cfg.precision):
        try:
            _int8(run, files, metadata, int8_report)
        except Exception as e:  # noqa: BLE001
            _unless_write_fault(e)
            run.row("onnx", "int8", error=_error_line(e), traceback=traceback.format_exc(limit=-4))
    return files


def _backend(run: _Export, backend: Backend, sources: Sources) -> None:
    """Convert, load, verify and time every precision ``backend`` runs of those exported (ONNX backends) or
    asked for (those converting the PyTorch student; fp32 always, as the ONNX fp32 file always is)."""
    available = sources.onnx if backend.needs_onnx else {"fp32", *run.cfg.precision}
    for precision in (p for p in backend.precisions if p in available):
        label = (
            f"{backend.label} {precision_label({'precision': precision, 'variant': VARIANTS.get(precision)})}"
        )
        row = run.row(backend.label, precision, device=backend.device)
        # Converters print their progress on stdout (litert-torch's stage log); the command's stdout is the
        # table, so what a backend prints goes to the export's log.
        try:
            with contextlib.redirect_stdout(run.log):
                with run.step(f"{label}: converting"):
                    path = backend.convert(sources, precision)
                row.update(run.file_fields(backend.artifacts(path)))
                run.run_loaded(
                    row,
                    lambda path=path: backend.load(path, run.cfg.threads),
                    precision,
                    backend.device,
                    label,
                    onnx_int8=backend.needs_onnx,
                )
        except Exception as e:  # noqa: BLE001 - every failure is kept in the report, the others go on
            _unless_write_fault(e)
            row.update(error=_error_line(e), traceback=traceback.format_exc(limit=-4))


def _versions() -> dict:
    import onnx
    import onnxruntime

    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    versions["numpy"] = np.__version__
    versions["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return versions


def _files(run: _Export, files: dict[str, Path]) -> dict[str, dict]:
    """Size, node count and TensorRT's parser and Q/DQ rules (export.qdq_rules) for every ONNX file; all but
    the ONNX Runtime CPU INT8 layout are meant to load in TensorRT, so a violation there is a failure."""
    info = {}
    for precision, path in files.items():
        proto = onnx.load(path)
        info[precision] = {
            "file": str(run.folder.final(path)),
            "bytes": path.stat().st_size,
            "nodes": len(proto.graph.node),
            "for_tensorrt": precision not in VARIANTS,
            "tensorrt_violations": [str(v) for v in check_tensorrt_qdq(proto)],
        }
    return info


def _verdict(run: _Export, files: dict[str, dict], missing: dict[str, str]) -> tuple[str, int]:
    problems = [
        f"{r['backend']} {precision_label(r)} {g['gate']} = {g['value']:.4g} (limit {g['threshold']:.4g})"
        for r in run.rows
        for g in failed_gates(r["gates"])
    ]
    problems += [f"{r['backend']} {precision_label(r)}: {r['error']}" for r in run.rows if r["error"]]
    problems += [
        f"{Path(info['file']).name} breaks TensorRT's rules: {info['tensorrt_violations'][0]}"
        + (f" (+{len(info['tensorrt_violations']) - 1} more)" if len(info["tensorrt_violations"]) > 1 else "")
        for info in files.values()
        if info["for_tensorrt"] and info["tensorrt_violations"]
    ]
    unmeasured = sorted({g["gate"] for r in run.rows for g in unmeasured_gates(r["gates"])})
    if problems:
        return "FAILED: " + "; ".join(problems), EXIT_GATE_FAILED
    if unmeasured:
        return (
            f"NOT VERIFIED: {', '.join(unmeasured)} not measured (random inputs, no labels)",
            EXIT_GATE_FAILED,
        )
    if missing:
        return "passed; not available here: " + "; ".join(missing.values()), EXIT_UNAVAILABLE
    return "passed", EXIT_OK


def export_student(cfg: ExportConfig) -> int:
    """The whole command once its config is read (:func:`parse_config`); returns the exit code. Everything a
    user can get wrong is checked before the output folder is touched; a file that cannot be written stops
    it (WriteError, exit 2) with the folder as it was."""
    model_path, out = Path(cfg.model), Path(cfg.out)
    check_length(out, "--out")
    ckpt, model = _load_student(model_path)
    data = _data(cfg, ckpt)
    folder = OutputFolder(out, cfg.overwrite)
    folder.check()
    load_start = load_average()
    torch.set_num_threads(cfg.threads)
    import_cpp_extension_quietly()
    with folder:
        try:
            with native_output(folder.staging / LOG) as (console, log):
                run = _Export(cfg, model, data, folder, ckpt["metrics"].get("qad"), console, log)
                report = _run(run, ckpt, load_start)
            report["manifest"] = folder.manifest()
            atomic_write(folder.staging / REPORT, json.dumps(report, indent=2, default=str))
            folder.commit()
        except WriteError as e:  # name the file where it would have been, not in the staging folder
            staged = Path(e.path)
            final = folder.final(staged) if staged.is_relative_to(folder.staging) else staged
            raise WriteError(final, e.error) from None
    print(table(run.rows))
    print(f"report: {out / 'report.md'}")
    code, status = report["exit_code"], report["status"]
    if code == EXIT_GATE_FAILED:
        _say(status)
    elif code == EXIT_UNAVAILABLE:  # backends named with --backends: each unavailable one was asked for
        _say(f"{'; '.join(report['unavailable'].values())} (everything else done, report written)")
    return code


def _run(run: _Export, ckpt: dict, load_start: float | None) -> dict:
    """Build, verify and time everything, write the reports into the staging folder; the report."""
    cfg, folder, data = run.cfg, run.folder, run.data
    # Probing a runtime imports it (seconds, and its own notices): only once every input is valid.
    backends, reasons, missing = _select_backends(cfg)
    run.say(
        f"verifying on {data.source}, {len(data.images)} images; backends: "
        + ", ".join(b.label for b in backends if b.key not in reasons)
    )
    _baselines(run)
    int8_report: dict = {}
    files = _onnx(run, ckpt, int8_report)
    sources = Sources(
        model=run.model,
        onnx=files,
        example=torch.from_numpy(run.inputs[2].copy()),
        calibration=data.calibration,
        out=folder.staging,
        earlier=folder.out,
        chw=tuple(ckpt["input"]["size"]),
        max_batch=cfg.max_batch,
        workspace_mb=cfg.workspace_mb,
    )
    for backend in backends:
        if backend.key in reasons:
            run.row(backend.label, "-", device=backend.device, unavailable=reasons[backend.key])
        else:
            _backend(run, backend, sources)
    run.time_rows()
    add_speedups(run.rows)
    onnx_files = _files(run, files)
    status, code = _verdict(run, onnx_files, {k: reasons[k] for k in missing})
    load_end = load_average()
    load_during = max((v for v in run.load_during if v is not None), default=None)
    machine = {
        **machine_info(cfg.threads),
        "load_average_start": load_start,
        "load_average_during": load_during,
        "load_average_end": load_end,
    }
    busy = busy_warning(load_start, load_during, load_end, cfg.threads)
    notes = [
        f"verification data: {data.source}, {len(data.images)} images"
        + (f" ({len(data.control)} more held out for INT8 control)" if len(data.control) else ""),
        f"what the runtimes' native code and the converters printed: {LOG}",
    ]
    if folder.overwrite and folder.earlier():
        notes.append(f"the earlier export in this folder was moved to {PREVIOUS}/")
    report = {
        "model": cfg.model,
        "out": cfg.out,
        "status": status,
        "exit_code": code,
        "warnings": [w for w in (busy, None if data.labels is not None else RANDOM_WARNING) if w],
        "images": len(data.images),  # the verification images every gate is measured on
        "rows": run.rows,
        "files": onnx_files,
        "int8": int8_report,
        # A student from `kdfast.train --qad`: post-training INT8 of its source against its own INT8.
        "qad": _qad_comparison(run, ckpt),
        "unavailable": reasons,
        "notes": notes,
        "protocol": {
            **vars(run.protocol),
            "batch_sizes": run.sizes,
            "boundary": "host numpy array in -> host numpy array out (TensorRT also device-only)",
        },
        "config": cfg.to_dict(),
        "machine": {**machine, "versions": _versions()},
        "seconds": time.perf_counter() - run.started,
    }
    with run.step("writing the reports and charts"):
        write_reports(report, folder.staging)
    return report


def _say(message: str) -> None:
    print(f"export.trt: {one_line(message)}", file=sys.stderr)


def _qad_comparison(run: _Export, ckpt: dict) -> dict | None:
    """For a QAD student, :func:`export.qad.compare` at this export's calibration size, or why it could not
    be measured (its source student gone or changed); None for any other student."""
    if run.qad is None:
        return None
    run.say("QAD student: post-training INT8 of its source against its own INT8 (ONNX Runtime)")
    try:
        return compare_ptq_qad(ckpt, run.cfg.data.calib_samples)
    except UsageError as exc:
        return {"unmeasured": str(exc)}


def main(argv: list[str] | None = None) -> int:
    """``python -m export.trt``; bad usage or input is one line on stderr and exit code 2, Ctrl-C 130 and
    SIGTERM 143 (this run's files removed, an earlier export in the folder unchanged)."""
    with terminate_like_ctrl_c():
        try:
            return export_student(parse_config(argv))
        except WriteError as e:
            _say(f"{e}; this run's files were removed and an earlier export there is unchanged: run it again")
            return EXIT_BAD_INPUT
        except UsageError as e:
            _say(str(e))
            return EXIT_BAD_INPUT
        except OSError as e:  # a file that cannot be read or looked up (a name too long, no permission)
            where = f" {shown_path(e.filename)}" if e.filename else ""
            _say(f"cannot use{where}: {os_error_advice(e)}")
            return EXIT_BAD_INPUT
        except KeyboardInterrupt as e:
            what, code = stop_signal(e)
            _say(f"stopped by {what}; this run's files were removed and an earlier export there is unchanged")
            return code


if __name__ == "__main__":
    sys.exit(main())
