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
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm import tqdm

from export.aoti import import_cpp_extension_quietly
from export.backends import BACKENDS, Backend, Loaded, Sources, batched, torch_runner
from export.int8 import ControlSet, make_int8
from export.latency import Protocol, batch_sizes, interleave, summarize, wall_clock
from export.machine import PeakMemory, busy_warning, load_average, machine_info, usable_cpus
from export.onnx_export import DEFAULT_OPSET, OPSETS, export_onnx, read_metadata
from export.outdir import OutputFolder
from export.precision import to_fp16
from export.qad import compare as compare_ptq_qad
from export.qdq_rules import check_tensorrt_qdq
from export.quantize import CALIBRATION_METHODS, SCHEMES, Int8Quantizer
from export.report import add_speedups, precision_label, table, write_reports
from export.verify import DEFAULT_GATES, Gates, check_gates, failed_gates, parity, unmeasured_gates
from kdfast.checkpoint import (
    build_from_checkpoint,
    has_test_split,
    load_checkpoint,
    load_split,
    preprocessing,
    rebuilding_data,
)
from kdfast.errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_OK, EXIT_UNAVAILABLE, UsageError

PRECISIONS = ("fp32", "fp16", "int8", "int8-ort")
DEFAULT_PRECISIONS = PRECISIONS
# Files that share a precision with another, by label: one INT8 layout per runtime (export.quantize).
VARIANTS = {"int8-ort": "u8s8 for ORT on x86"}
BASELINES = ("eager", "compile")
RANDOM_WARNING = (
    "random inputs: parity only; top-1 agreement and accuracy drop are not measured, so the run cannot pass"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump: exit 2 through UsageError
        raise UsageError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m export.trt", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="student.pt written by kdfast.train")
    p.add_argument("--out", type=Path, help="output folder (default: <model folder>/export)")
    p.add_argument(
        "--precision",
        nargs="+",
        choices=PRECISIONS,
        default=list(DEFAULT_PRECISIONS),
        help="INT8 in the layout each runtime fuses: int8, the TensorRT-valid Q/DQ file (OpenVINO runs it "
        "too); int8-ort, U8S8 with 7-bit weights for ONNX Runtime on x86 (and OpenVINO)",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        choices=list(BACKENDS),
        help="runtimes to verify (default: every one available here; one asked for but unavailable: exit 3)",
    )
    p.add_argument(
        "--baselines",
        nargs="*",
        choices=BASELINES,
        default=list(BASELINES),
        help="PyTorch baselines to time (eager is always the parity reference)",
    )
    p.add_argument("--max-batch", type=int, default=8, help="largest batch of the dynamic dimension")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {OPSETS[0]}..{OPSETS[-1]}")
    p.add_argument("--verify-samples", type=int, default=512, help="validation images to verify on (at most)")
    p.add_argument("--calib-samples", type=int, default=128, help="training images to calibrate INT8 on")
    p.add_argument(
        "--control-samples",
        type=int,
        default=512,
        help="validation images held out for INT8 accuracy control (at most half the split; the gates are "
        "measured on the others)",
    )
    p.add_argument("--calibration", choices=list(CALIBRATION_METHODS), default="minmax", help="INT8 ranges")
    p.add_argument(
        "--verify-data", type=Path, help="an image folder to verify on instead of the checkpoint's data"
    )
    p.add_argument(
        "--random-inputs",
        action="store_true",
        help="last resort: random inputs, parity only; the accuracy gates are not measured, so exit 1",
    )
    p.add_argument("--threads", type=int, default=min(4, usable_cpus()), help="CPU threads for every backend")
    for prec, gates in DEFAULT_GATES.items():
        if gates.elementwise:
            p.add_argument(f"--{prec}-atol", type=float, default=gates.atol)
            p.add_argument(f"--{prec}-rtol", type=float, default=gates.rtol)
        p.add_argument(
            f"--{prec}-min-agreement",
            type=float,
            default=gates.min_agreement,
            help="fraction of top-1 predictions that must match PyTorch",
        )
        if gates.max_accuracy_drop is not None:
            p.add_argument(
                f"--{prec}-max-drop",
                type=float,
                default=gates.max_accuracy_drop,
                help="accuracy drop allowed against PyTorch, in points",
            )
    p.add_argument("--warmup-iters", type=int, default=Protocol.warmup_iters, help="warm-up calls, at least")
    p.add_argument("--warmup-s", type=float, default=Protocol.warmup_s, help="warm-up seconds, at least")
    p.add_argument(
        "--iters", type=int, default=Protocol.iters, help="timed calls per row and batch size, at least"
    )
    p.add_argument(
        "--min-time-s",
        type=float,
        default=Protocol.min_s,
        help="timed seconds per row and batch size, at least",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=Protocol.rounds,
        help="rounds the rows of one batch size are interleaved in (order rotated each round); the "
        "x-vs-eager figures are medians of per-round ratios",
    )
    p.add_argument(
        "--max-time-s",
        type=float,
        help="optional cap per row and batch size; a series it cuts below --iters is marked with its sample "
        "count",
    )
    p.add_argument("--workspace-mb", type=int, default=1024, help="TensorRT workspace limit")
    return p


def _gates(args: argparse.Namespace, prec: str) -> Gates:
    base = DEFAULT_GATES[prec]
    return replace(
        base,
        atol=getattr(args, f"{prec}_atol", base.atol),
        rtol=getattr(args, f"{prec}_rtol", base.rtol),
        min_agreement=getattr(args, f"{prec}_min_agreement", base.min_agreement),
        max_accuracy_drop=getattr(args, f"{prec}_max_drop", base.max_accuracy_drop),
    )


def _check_args(args: argparse.Namespace) -> None:
    counts = ("max_batch", "verify_samples", "calib_samples", "control_samples", "threads", "iters", "rounds")
    for name in (*counts, "workspace_mb"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name, value in vars(args).items():
        if name.endswith(("_atol", "_rtol", "_max_drop", "_min_agreement")) and not value >= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if name.endswith("_min_agreement") and value > 1:
            raise UsageError(f"--{name.replace('_', '-')} is a fraction in 0..1, got {value}")
    for name in ("warmup_iters", "warmup_s", "min_time_s"):
        if not getattr(args, name) >= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.max_time_s is not None and not args.max_time_s > 0:
        raise UsageError(f"--max-time-s must be > 0, got {args.max_time_s}")
    if args.max_batch < 2:
        raise UsageError("--max-batch must be >= 2 so the exported batch dimension stays dynamic")
    if args.opset not in OPSETS:
        raise UsageError(
            f"--opset must lie in {OPSETS[0]}..{OPSETS[-1]} (the exporter's and TensorRT's), got {args.opset}"
        )


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


def _data(args: argparse.Namespace, ckpt: dict) -> _Data:
    """Verification, calibration and control images. Calibration comes from the training split. Accuracy
    control needs images like those the gates are measured on, but not those: training images, which the
    student fits with wide margins, let INT8 pass control and then fail the gates (resnet18 on digits: 99.6%
    agreement on training images, 98.1% on validation images). So a seeded random part of the validation
    split, at most half of it, is held out for control when INT8 is asked for, and the gates are measured on
    the rest. A data set with an official test split (Fashion-MNIST) keeps the two apart instead: the gates
    are measured on the test images, control on validation images."""
    shape = ckpt["input"]["size"]
    if args.random_inputs:
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(args.verify_samples, *shape, generator=gen).numpy()
        calib = torch.randn(args.calib_samples, *shape, generator=gen).numpy()
        return _Data(images, None, calib, images, None, "random inputs (no labels)")
    if args.verify_data is not None:
        # The folder is read with the checkpoint's preprocessing and split; calibration comes from its
        # training part so a checkpoint whose own data is unavailable can still be exported.
        ckpt = {**ckpt, "data": {**ckpt["data"], "name": "imagefolder", "root": str(args.verify_data)}}
        source = f"imagefolder {args.verify_data}"
    else:
        source = f"{ckpt['data'].get('name')} val split from the checkpoint"
    int8 = bool(set(SCHEMES) & set(args.precision))
    test = args.verify_data is None and has_test_split(ckpt["data"])
    with rebuilding_data("pass --verify-data DIR or, as a last resort, --random-inputs"):
        if test:
            images, labels = load_split(ckpt, "test", args.verify_samples)
            control, control_labels = (
                load_split(ckpt, "val", args.control_samples) if int8 else (images[:0], labels[:0])
            )
        else:
            held_out = args.control_samples if int8 else 0
            val, val_labels = load_split(ckpt, "val", args.verify_samples + held_out)
        calibration, _ = load_split(ckpt, "train", args.calib_samples)
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
    held_out = min(args.control_samples, len(val) // 2) if int8 else 0
    control, verify = sorted(order[:held_out]), sorted(order[held_out:][: args.verify_samples])
    val, val_labels = val.numpy(), val_labels.numpy()
    return _Data(
        val[verify], val_labels[verify], calibration.numpy(), val[control], val_labels[control], source
    )


def _select_backends(args: argparse.Namespace) -> tuple[list[Backend], dict[str, str], list[str]]:
    """(backends asked for, in table order; why each one that cannot run here cannot; the ones asked for by
    name that cannot)."""
    keys = args.backends or list(BACKENDS)
    reasons = {k: r for k in keys if (r := BACKENDS[k].unavailable_reason()) is not None}
    return [BACKENDS[k] for k in keys], reasons, [k for k in reasons if args.backends]


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class _Export:
    """One run of the command: data, reference logits, the timing protocol, the rows of the report."""

    def __init__(
        self,
        args: argparse.Namespace,
        model: torch.nn.Module,
        data: _Data,
        folder: OutputFolder,
        qad: dict | None = None,
    ):
        self.args, self.model, self.data, self.folder = args, model, data, folder
        self.protocol = Protocol(
            args.warmup_iters, args.warmup_s, args.iters, args.min_time_s, args.max_time_s, args.rounds
        )
        self.sizes = batch_sizes(args.max_batch)
        self.started = time.perf_counter()
        # The same preallocated arrays feed every backend's timing, one per batch size.
        reps = -(-args.max_batch // len(data.images))
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
        print(f"[{time.perf_counter() - self.started:6.1f} s] {message}", file=sys.stderr, flush=True)

    def reference(self, device: str) -> np.ndarray:
        """The PyTorch student's logits on the verification images, computed on ``device``."""
        if device not in self._references:
            model = self.model.to(device)
            with torch.inference_mode():
                logits = [
                    model(torch.from_numpy(self.data.images[i : i + self.args.max_batch]).to(device))
                    .float()
                    .cpu()
                    for i in range(0, len(self.data.images), self.args.max_batch)
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
        bar = tqdm(total=len(self.sizes) * self.protocol.rounds, desc="timing", unit="round", leave=False)
        with bar:
            for b, x in self.inputs.items():
                self.load_during.append(load_average())
                steps = {}
                for i, (_, loaded) in enumerate(self.timed):
                    steps[f"{i}/end_to_end"] = wall_clock(lambda run=loaded.run, x=x: run(x))
                    if loaded.compute_step is not None:
                        steps[f"{i}/compute_only"] = loaded.compute_step(x)
                bar.set_postfix_str(f"batch {b}, {len(steps)} series")
                samples, failed = interleave(steps, self.protocol, on_round=lambda _: bar.update())
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
        FakeQuant(model).calibrate(torch.from_numpy(self.data.calibration).split(self.args.max_batch))
        return batched(torch_runner(model.eval()), images, self.args.max_batch)

    def verify(
        self, row: dict, logits: np.ndarray, precision: str, device: str = "cpu", *, onnx_int8: bool = False
    ) -> None:
        gates = _gates(self.args, "int8" if precision in VARIANTS else precision)
        reference = self.reference(device)
        if self.qad is not None and onnx_int8 and precision == "int8":
            if self._fake_int8 is None:
                self._fake_int8 = self.fake_int8(self.data.images)
            reference = self._fake_int8
            row["reference"] = "the QAD student as trained (fake-quantized, kdfast.quant)"
        p = parity(reference, logits, atol=gates.atol, rtol=gates.rtol, labels=self.data.labels)
        row.update(parity=p.as_dict(), gates=check_gates(p, gates), accuracy=p.accuracy)

    def run_loaded(
        self, row: dict, load: Callable[[], Loaded], precision: str, device: str, *, onnx_int8: bool = False
    ) -> None:
        """Load, verify and time one artifact, recording load time and peak memory."""
        with PeakMemory() as memory:
            t0 = time.perf_counter()
            loaded = load()
            row["load_s"] = time.perf_counter() - t0
            row["runtime"] = loaded.info
            # Compilation and per-shape specialization (torch.compile, OpenVINO's shape inference) happen
            # at the first call of each batch size: its own column, outside the timed rounds.
            first = {}
            for b, x in self.inputs.items():
                t0 = time.perf_counter()
                loaded.run(x)
                first[b] = time.perf_counter() - t0
            row["first_call_s"] = first
            row["compile_s"] = row["load_s"] + sum(first.values())
            logits = batched(loaded.run, self.data.images, self.args.max_batch)
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
    if "eager" in run.args.baselines:
        run.to_time(eager, Loaded(torch_runner(run.model)))
    if "compile" in run.args.baselines:
        run.say("torch.compile: compiling and verifying")
        row = run.row("torch.compile", "fp32")
        try:
            run.run_loaded(
                row, lambda: Loaded(torch_runner(torch.compile(run.model, dynamic=True))), "fp32", "cpu"
            )
        except Exception as e:  # noqa: BLE001 - a failing baseline is reported, the export goes on
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
    args = run.args
    # Accuracy control keeps layers float to approach the float forward; a QAD student is the INT8 network
    # itself, so every layer stays INT8 (control not run, said in the report).
    labels = None if run.qad is not None else run.data.control_labels
    control = ControlSet(run.data.control, _logits(run, run.data.control), labels)
    with tempfile.TemporaryDirectory(prefix="kdfast-int8-") as work:
        run.say(f"INT8: calibrating ({args.calibration}) on {len(run.data.calibration)} images")
        quantizer = Int8Quantizer(
            files["fp32"],
            run.data.calibration,
            method=args.calibration,
            batch=args.max_batch,
            workdir=Path(work),
        )
        gates = _gates(args, "int8")
        for name in (p for p in SCHEMES if p in args.precision):
            scheme = SCHEMES[name]
            run.say(f"INT8 {name}: quantizing, accuracy control on {len(control.images)} held-out images")
            made = make_int8(
                quantizer,
                scheme,
                run.folder.staging / f"student.{name}.onnx",
                metadata=metadata,
                control_set=control,
                min_agreement=gates.min_agreement,
                max_drop=gates.max_accuracy_drop,
                threads=args.threads,
                batch=args.max_batch,
            )
            files[name] = made.path
            int8_report[name] = {
                "file": str(run.folder.final(made.path)),
                "calibration": args.calibration,
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
    return batched(torch_runner(run.model), images, run.args.max_batch)


def _onnx(run: _Export, ckpt: dict, int8_report: dict) -> dict[str, Path]:
    """Every ONNX file asked for; a conversion that fails is a row with its error, the rest goes on."""
    args, staging = run.args, run.folder.staging
    example = torch.from_numpy(run.inputs[2].copy())
    run.say(f"ONNX fp32: exporting (opset {args.opset}, batch 1..{args.max_batch}) and cleaning")
    try:
        fp32 = export_onnx(
            run.model,
            example,
            staging / "student.fp32.onnx",
            max_batch=args.max_batch,
            metadata=_metadata(ckpt, args.opset),
            opset=args.opset,
        )
    except Exception as e:  # noqa: BLE001 - without an fp32 file no ONNX backend can run; the rest goes on
        run.row("onnx", "fp32", error=_error_line(e), traceback=traceback.format_exc(limit=-4))
        return {}
    files = {"fp32": fp32}
    metadata = read_metadata(fp32)
    if "fp16" in args.precision:
        run.say("ONNX fp16: converting")
        try:
            files["fp16"] = to_fp16(fp32, staging / "student.fp16.onnx")
        except Exception as e:  # noqa: BLE001
            run.row("onnx", "fp16", error=_error_line(e), traceback=traceback.format_exc(limit=-4))
    if set(SCHEMES) & set(args.precision):
        try:
            _int8(run, files, metadata, int8_report)
        except Exception as e:  # noqa: BLE001
            run.row("onnx", "int8", error=_error_line(e), traceback=traceback.format_exc(limit=-4))
    return files


def _backend(run: _Export, backend: Backend, sources: Sources) -> None:
    """Convert, load, verify and time every precision ``backend`` runs of those exported (ONNX backends) or
    asked for (those converting the PyTorch student; fp32 always, as the ONNX fp32 file always is)."""
    available = sources.onnx if backend.needs_onnx else {"fp32", *run.args.precision}
    for precision in (p for p in backend.precisions if p in available):
        label = precision_label({"precision": precision, "variant": VARIANTS.get(precision)})
        row = run.row(backend.label, precision, device=backend.device)
        # Converters print their progress on stdout (litert-torch's stage log); the command's stdout is the
        # table, so what a backend prints goes to stderr beside the command's own progress.
        try:
            with contextlib.redirect_stdout(sys.stderr):
                run.say(f"{backend.label} {label}: converting")
                path = backend.convert(sources, precision)
                row.update(run.file_fields(backend.artifacts(path)))
                run.say(f"{backend.label} {label}: loading, verifying")
                run.run_loaded(
                    row,
                    lambda path=path: backend.load(path, run.args.threads),
                    precision,
                    backend.device,
                    onnx_int8=backend.needs_onnx,
                )
        except Exception as e:  # noqa: BLE001 - every failure is kept in the report, the others go on
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


def export_student(args: argparse.Namespace) -> int:
    """The whole command once arguments are parsed; returns the exit code. Everything a user can get wrong
    is checked before the output folder is touched."""
    _check_args(args)
    ckpt, model = _load_student(args.model)
    data = _data(args, ckpt)
    load_start = load_average()
    torch.set_num_threads(args.threads)
    import_cpp_extension_quietly()
    out = args.out or args.model.parent / "export"
    with OutputFolder(out) as folder:
        # Probing a runtime imports it (seconds, and its own notices): only once every input is valid.
        backends, reasons, missing = _select_backends(args)
        run = _Export(args, model, data, folder, qad=ckpt["metrics"].get("qad"))
        run.say(
            f"verifying on {data.source}, {len(data.images)} images; backends: "
            + ", ".join(b.label for b in backends if b.key not in reasons)
        )
        _baselines(run)
        int8_report: dict = {}
        files = _onnx(run, ckpt, int8_report)
        sources = Sources(
            model=model,
            onnx=files,
            example=torch.from_numpy(run.inputs[2].copy()),
            calibration=data.calibration,
            out=folder.staging,
            earlier=out,
            chw=tuple(ckpt["input"]["size"]),
            max_batch=args.max_batch,
            workspace_mb=args.workspace_mb,
        )
        for backend in backends:
            if backend.key in reasons:
                run.row(backend.label, "-", device=backend.device, unavailable=reasons[backend.key])
            else:
                _backend(run, backend, sources)
        run.say(f"timing {len(run.timed)} rows, interleaved in {run.protocol.rounds} rounds per batch size")
        run.time_rows()
        add_speedups(run.rows)
        onnx_files = _files(run, files)
        status, code = _verdict(run, onnx_files, {k: reasons[k] for k in missing})
        load_end = load_average()
        load_during = max((v for v in run.load_during if v is not None), default=None)
        machine = {
            **machine_info(args.threads),
            "load_average_start": load_start,
            "load_average_during": load_during,
            "load_average_end": load_end,
        }
        busy = busy_warning(load_start, load_during, load_end, args.threads)
        report = {
            "model": str(args.model),
            "out": str(out),
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
            "notes": [
                f"verification data: {data.source}, {len(data.images)} images"
                + (f" ({len(data.control)} more held out for INT8 control)" if len(data.control) else "")
            ],
            "protocol": {
                **vars(run.protocol),
                "batch_sizes": run.sizes,
                "boundary": "host numpy array in -> host numpy array out (TensorRT also device-only)",
            },
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": {**machine, "versions": _versions()},
            "seconds": time.perf_counter() - run.started,
        }
        write_reports(report, folder.staging)
        folder.commit()
    print(table(run.rows))
    print(f"report: {out / 'report.md'}")
    if code == EXIT_GATE_FAILED:
        print(f"export.trt: {status}", file=sys.stderr)
    elif code == EXIT_UNAVAILABLE:
        print(
            f"export.trt: {'; '.join(reasons[k] for k in missing)} (everything else done, report written)",
            file=sys.stderr,
        )
    return code


def _qad_comparison(run: _Export, ckpt: dict) -> dict | None:
    """For a QAD student, :func:`export.qad.compare` at this export's calibration size, or why it could not
    be measured (its source student gone or changed); None for any other student."""
    if run.qad is None:
        return None
    run.say("QAD student: post-training INT8 of its source against its own INT8 (ONNX Runtime)")
    try:
        return compare_ptq_qad(ckpt, run.args.calib_samples)
    except UsageError as exc:
        return {"unmeasured": str(exc)}


def main(argv: list[str] | None = None) -> int:
    """``python -m export.trt``; bad usage or input is one line on stderr and exit code 2."""
    try:
        return export_student(_parser().parse_args(argv))
    except UsageError as e:
        print(f"export.trt: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
