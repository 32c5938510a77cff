"""``python -m export.trt --model student.pt``: ONNX (fp32/fp16/INT8), ONNX Runtime, TensorRT, AOTInductor,
each verified against the PyTorch student on real validation images and timed; report.json/.md + chart.

Exit codes (DESIGN, Contracts): 0 done; 1 a gate failed (artifacts and report kept); 2 bad usage or input
(one line); 3 a requested backend is not available here (everything else done and kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from export import ort_backend, precision, tensorrt_backend
from export.latency import Protocol, summarize, time_cpu, time_cuda
from export.onnx_export import export_onnx
from export.report import precision_label, table, write_reports
from export.verify import DEFAULT_GATES, Gates, check_gates, failed_gates, parity
from kdfast.checkpoint import build_from_checkpoint, load_checkpoint, load_split
from kdfast.errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_OK, EXIT_UNAVAILABLE, UsageError

PRECISIONS = ("fp32", "fp16", "int8")
# The INT8 file tuned for ONNX Runtime on x86 CPUs; "int8" itself is the TensorRT-ready file.
ORT_INT8 = "int8-ort"
ORT_INT8_VARIANT = "u8s8 for ORT CPU"
BACKENDS = ("ort", "trt", "aoti")
BASELINES = ("eager", "compile")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump: exit 2 through UsageError
        raise UsageError(f"export.trt: {message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m export.trt", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="student.pt written by kdfast.train")
    p.add_argument("--out", type=Path, help="output folder (default: <model folder>/export)")
    p.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        default=list(BACKENDS),
        help="ort runs on CPU; trt needs TensorRT and a CUDA GPU (else exit 3); aoti builds a .pt2",
    )
    p.add_argument(
        "--baselines",
        nargs="*",
        choices=BASELINES,
        default=list(BASELINES),
        help="PyTorch baselines to time (eager is always the parity reference)",
    )
    p.add_argument(
        "--max-batch", type=int, default=8, help="largest batch of the dynamic dimension and batch N"
    )
    p.add_argument("--verify-samples", type=int, default=512, help="validation images to verify on (at most)")
    p.add_argument("--calib-samples", type=int, default=128, help="training images to calibrate INT8 on")
    p.add_argument(
        "--verify-data", type=Path, help="an image folder to verify on instead of the checkpoint's data"
    )
    p.add_argument(
        "--random-inputs",
        action="store_true",
        help="last resort: verify on random inputs (no accuracy; flagged in the report)",
    )
    p.add_argument(
        "--threads", type=int, default=min(4, os.cpu_count() or 1), help="CPU threads for every backend"
    )
    for prec, gates in DEFAULT_GATES.items():
        if gates.elementwise:
            p.add_argument(f"--{prec}-atol", type=float, default=gates.atol)
            p.add_argument(f"--{prec}-rtol", type=float, default=gates.rtol)
        if gates.min_agreement is not None:
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
    p.add_argument("--warmup-iters", type=int, default=50)
    p.add_argument("--warmup-s", type=float, default=0.2)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--min-time-s", type=float, default=3.0)
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
    for name in ("max_batch", "verify_samples", "calib_samples", "threads", "iters", "workspace_mb"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name, value in vars(args).items():
        if name.endswith(("_atol", "_rtol", "_max_drop", "_min_agreement")) and not value >= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if args.max_batch < 2:
        raise UsageError("--max-batch must be >= 2 so the exported batch dimension stays dynamic")


def _out_dir(args: argparse.Namespace) -> Path:
    out = args.out or args.model.parent / "export"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".kdfast-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"output folder {out} is not writable ({e.strerror or e}); pass --out DIR") from None
    return out


def _data(args: argparse.Namespace, ckpt: dict) -> tuple[torch.Tensor, np.ndarray | None, torch.Tensor, str]:
    """(verification images, labels or None, calibration images, where they came from)."""
    if args.random_inputs:
        gen = torch.Generator().manual_seed(0)
        shape = ckpt["input"]["size"]
        images = torch.randn(args.verify_samples, *shape, generator=gen)
        return images, None, torch.randn(args.calib_samples, *shape, generator=gen), "random (flagged)"
    if args.verify_data is not None:
        # The folder is read with the checkpoint's preprocessing and split; calibration comes from its
        # training part so a checkpoint whose own data is unavailable can still be exported.
        record = {**ckpt["data"], "name": "imagefolder", "root": str(args.verify_data)}
        ckpt = {**ckpt, "data": record}
        source = f"imagefolder {args.verify_data}"
    else:
        source = f"{ckpt['data'].get('name')} val split from the checkpoint"
    try:
        images, labels = load_split(ckpt, "val", args.verify_samples)
        calib, _ = load_split(ckpt, "train", args.calib_samples)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - a data set that cannot be rebuilt, whatever the reason
        raise UsageError(
            f"cannot rebuild the checkpoint's data ({type(e).__name__}: {e}); "
            "pass --verify-data DIR or, as a last resort, --random-inputs"
        ) from None
    if tuple(images.shape[1:]) != tuple(ckpt["input"]["size"]):
        raise UsageError(
            f"verification images are {tuple(images.shape[1:])}, the student expects {ckpt['input']['size']}"
        )
    return images, labels.numpy(), calib, source


def _batched(fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([fn(images[i : i + batch]) for i in range(0, len(images), batch)])


def _torch_fn(model: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[np.ndarray], np.ndarray]:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    return run


class _Run:
    """State shared by the backends of one command: data, reference logits, fixed latency inputs, rows."""

    def __init__(
        self, args: argparse.Namespace, model: nn.Module, images: torch.Tensor, labels: np.ndarray | None
    ):
        self.args, self.model = args, model
        self.images = images.numpy().astype(np.float32)
        self.labels = labels
        self.protocol = Protocol(
            warmup_iters=args.warmup_iters, warmup_s=args.warmup_s, iters=args.iters, min_s=args.min_time_s
        )
        n = args.max_batch
        reps = -(-n // len(self.images))
        # The same preallocated arrays feed every backend's timing.
        self.x1 = np.ascontiguousarray(self.images[:1])
        self.xn = np.ascontiguousarray(np.concatenate([self.images] * reps)[:n])
        self.reference = _batched(_torch_fn(model), self.images, n)
        self.rows: list[dict] = []

    def accuracy(self, logits: np.ndarray) -> float | None:
        return None if self.labels is None else float(np.mean(logits.argmax(1) == self.labels))

    def add(
        self,
        backend: str,
        prec: str,
        *,
        path: Path | None = None,
        logits: np.ndarray | None = None,
        latency: dict | None = None,
        device: str = "cpu",
        error: str | None = None,
        reference: np.ndarray | None = None,
        variant: str | None = None,
    ) -> dict:
        row: dict = {
            "backend": backend,
            "precision": prec,
            "variant": variant,
            "device": device,
            "file": str(path) if path else None,
            "size_bytes": path.stat().st_size if path and path.exists() else None,
            "latency": latency,
            "error": error,
            "parity": None,
            "gates": [],
            "accuracy": None,
        }
        if logits is not None:
            ref = self.reference if reference is None else reference
            gates = _gates(self.args, prec)
            p = parity(ref, logits, atol=gates.atol, rtol=gates.rtol, labels=self.labels)
            row.update(parity=p.as_dict(), gates=check_gates(p, gates), accuracy=p.accuracy)
        self.rows.append(row)
        return row

    def time_numpy(self, fn: Callable[[np.ndarray], object]) -> dict:
        n = self.args.max_batch
        return summarize(
            time_cpu(lambda: fn(self.x1), self.protocol), time_cpu(lambda: fn(self.xn), self.protocol), n
        )


def _baselines(run: _Run) -> None:
    eager = _torch_fn(run.model)
    run.rows.append(
        {
            "backend": "pytorch-eager",
            "precision": "fp32",
            "variant": None,
            "device": "cpu",
            "file": None,
            "size_bytes": None,
            "latency": run.time_numpy(eager) if "eager" in run.args.baselines else None,
            "error": None,
            "parity": None,
            "gates": [],
            "accuracy": run.accuracy(run.reference),
        }
    )
    if "compile" in run.args.baselines:
        compiled = _torch_fn(torch.compile(run.model, dynamic=True))
        logits = _batched(compiled, run.images, run.args.max_batch)
        run.add("torch.compile", "fp32", logits=logits, latency=run.time_numpy(compiled))


def _onnx(run: _Run, ckpt: dict, out: Path, example: torch.Tensor, calib: torch.Tensor) -> dict[str, Path]:
    args = run.args
    metadata = {
        "kdfast.format": ckpt["format"],
        "kdfast.version": ckpt["versions"].get("kdfast", "unknown"),
        "classes": ckpt["classes"],
        "input_size": ckpt["input"]["size"],
        "mean": ckpt["input"]["mean"],
        "std": ckpt["input"]["std"],
        "arch": ckpt["arch"],
        "input_layout": "NCHW float32, normalized",
    }
    files = {
        "fp32": export_onnx(
            run.model, example, out / "student.fp32.onnx", max_batch=args.max_batch, metadata=metadata
        )
    }
    if "fp16" in args.precision:
        files["fp16"] = precision.to_fp16(files["fp32"], out / "student.fp16.onnx")
        precision.copy_metadata(files["fp32"], files["fp16"])
    if "int8" in args.precision:
        images = calib.numpy().astype(np.float32)
        files["int8"] = precision.to_int8_qdq(
            files["fp32"], out / "student.int8.onnx", images, batch=args.max_batch
        )
        files[ORT_INT8] = precision.to_int8_ort(
            files["fp32"], out / "student.int8-ort.onnx", images, batch=args.max_batch
        )
        for name in ("int8", ORT_INT8):
            precision.copy_metadata(files["fp32"], files[name])
    return {p: f for p, f in files.items() if p in args.precision or p == ORT_INT8}


def _ort(run: _Run, files: dict[str, Path]) -> None:
    for name, path in files.items():
        session = ort_backend.make_session(path, threads=run.args.threads)
        fn = ort_backend.runner(session)
        run.add(
            "onnxruntime",
            "int8" if name == ORT_INT8 else name,
            path=path,
            logits=_batched(fn, run.images, run.args.max_batch),
            latency=run.time_numpy(fn),
            variant=ORT_INT8_VARIANT if name == ORT_INT8 else None,
        )


def _aoti(run: _Run, out: Path, example: torch.Tensor) -> None:
    from export import aoti

    path = aoti.compile_package(run.model, example, out / "student.pt2", max_batch=run.args.max_batch)
    fn = _torch_fn(aoti.load_package(path))
    run.add(
        "aotinductor",
        "fp32",
        path=path,
        logits=_batched(fn, run.images, run.args.max_batch),
        latency=run.time_numpy(fn),
    )


def _trt(run: _Run, ckpt: dict, files: dict[str, Path]) -> None:
    """Build, verify (against PyTorch on CUDA) and time one engine per precision."""
    args = run.args
    model = run.model.to("cuda")
    images = torch.from_numpy(run.images).cuda()
    with torch.inference_mode():
        reference = torch.cat(
            [model(images[i : i + args.max_batch]) for i in range(0, len(images), args.max_batch)]
        )
    reference = reference.float().cpu().numpy()
    x1, xn = torch.from_numpy(run.x1).cuda(), torch.from_numpy(run.xn).cuda()
    for prec, onnx_path in files.items():
        if prec == ORT_INT8:
            continue
        engine_path = onnx_path.with_suffix(".engine")
        try:
            tensorrt_backend.build_engine(
                onnx_path,
                engine_path,
                precision=prec,
                chw=ckpt["input"]["size"],
                max_batch=args.max_batch,
                workspace_bytes=args.workspace_mb << 20,
            )
        except tensorrt_backend.EngineBuildError as e:
            run.add("tensorrt", prec, path=onnx_path, device="cuda", error=str(e))
            continue
        engine = tensorrt_backend.EngineRunner(engine_path)
        logits = torch.cat(
            [engine(images[i : i + args.max_batch]).cpu() for i in range(0, len(images), args.max_batch)]
        ).numpy()
        timings = []
        for x in (x1, xn):
            engine.bind(x)
            torch.cuda.synchronize()
            timings.append(time_cuda(engine.launch, run.protocol, engine.stream))
        run.add(
            "tensorrt",
            prec,
            path=engine_path,
            device="cuda",
            logits=logits,
            reference=reference,
            latency=summarize(timings[0], timings[1], args.max_batch),
        )
    run.model.to("cpu")


def _machine(threads: int) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except ImportError:
        info["tensorrt"] = None
    return info


def export_student(args: argparse.Namespace) -> int:
    """The whole command once arguments are parsed; returns the exit code."""
    _check_args(args)
    out = _out_dir(args)
    ckpt = load_checkpoint(args.model)
    model = build_from_checkpoint(ckpt)
    images, labels, calib, source = _data(args, ckpt)
    torch.set_num_threads(args.threads)
    started = time.time()
    run = _Run(args, model, images, labels)
    notes = [f"verification data: {source}, {len(images)} images"]
    if labels is None:
        notes.append("random inputs: parity only, accuracy and the INT8 accuracy gate were not measured")
    if "int8" in args.precision:
        notes.append(
            "INT8 files: student.int8.onnx is for TensorRT (symmetric int8 Q/DQ, zero-points 0); "
            f"student.int8-ort.onnx ({ORT_INT8_VARIANT}: uint8 asymmetric activations, int8 per-channel "
            "weights, narrow convs in fp32) is the one to deploy on ONNX Runtime CPU"
        )

    example = torch.from_numpy(run.xn[:2].copy())
    _baselines(run)
    files = _onnx(run, ckpt, out, example, calib)
    if "ort" in args.backends:
        _ort(run, files)
    if "aoti" in args.backends:
        _aoti(run, out, example)
    unavailable = None
    if "trt" in args.backends:
        unavailable = tensorrt_backend.unavailable_reason()
        if unavailable is None:
            _trt(run, ckpt, files)
        else:
            notes.append(unavailable)

    problems = [
        f"{r['backend']} {precision_label(r)} {g['gate']} = {g['value']:.4g} (limit {g['threshold']:.4g})"
        for r in run.rows
        for g in failed_gates(r["gates"])
    ] + [f"{r['backend']} {precision_label(r)}: {r['error']}" for r in run.rows if r["error"]]
    if problems:
        status, code = "FAILED: " + "; ".join(problems), EXIT_GATE_FAILED
    elif unavailable:
        status, code = f"passed; TensorRT not run: {unavailable}", EXIT_UNAVAILABLE
    else:
        status, code = "passed", EXIT_OK
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    report = {
        "model": str(args.model),
        "status": status,
        "exit_code": code,
        "rows": run.rows,
        "notes": notes,
        "onnx": {p: str(f) for p, f in files.items()},
        "settings": settings,
        "machine": _machine(args.threads),
        "seconds": time.time() - started,
    }
    paths = write_reports(report, out)
    print(table(run.rows))
    print(f"report: {paths['md']}")
    if code == EXIT_GATE_FAILED:
        print(f"export.trt: {status}", file=sys.stderr)
    elif unavailable:
        print(f"export.trt: {unavailable} (ONNX files verified, report written)", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """``python -m export.trt``; bad usage or input is one line on stderr and exit code 2."""
    try:
        return export_student(_parser().parse_args(argv))
    except UsageError as e:
        print(f"export.trt: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
