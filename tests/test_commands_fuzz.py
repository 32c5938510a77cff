"""Both commands fed bad input, one case per row of a table: every case must end with exit code 2, at most
3 lines on stderr, no traceback, a line naming the key or file and what to change, and leave every file of
the earlier run (or export) it pointed at byte for byte as it was, and create no folder.

The commands run in this process (``kdfast.train.main(argv)``, ``export.trt.main(argv)``), so most cases
end in validation within a second; Ctrl-C and kill -9 need a real process and live in ``test_resume.py``.
New-run cases pass ``--out <earlier run> --overwrite``: the flag that would replace the earlier run, so a
check that came too late would show as a changed file.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.runs import TINY, set_args

from export.trt import main as export_main
from kdfast.compare import main as compare_main
from kdfast.train import main as train_main


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class _RunsCode:
    """A pickle that would create a file when loaded (it never is: weights_only refuses it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The command sets torch's thread count for its run; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real tiny run, finished: teacher, baseline, student, states, metrics, pictures."""
    out = tmp_path_factory.mktemp("fuzz") / "finished"
    assert train_main([*set_args(TINY), "--out", str(out)]) == 0
    return out


def _resumable(run: Path) -> None:
    """Turn a finished run into one killed during its distillation stage (its state file kept)."""
    for name in ("student.pt", "results.json", "results.md", "curves.png", "attention.png"):
        (run / name).unlink()


def _write(path: Path, content: bytes | str | object) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)


def _images(root: Path, classes: list[str], per_class: int, suffix: str = ".png") -> Path:
    """An ImageFolder tree of small RGB images (smooth gradients plus noise, like photos at 16x16)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            ramp = np.linspace(0, 255, 16)[None, :, None] * np.ones((16, 16, 3))
            pixels = np.clip(ramp * (c + 1) / len(classes) + rng.normal(0, 20, (16, 16, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}{suffix}")
    return root


def _truncated_jpeg(tmp: Path, run: Path) -> None:
    """40 JPEGs per class, one of them cut in half as a copy interrupted mid-file leaves it: its header reads,
    its pixels do not. It sits in the second class, outside the first training batch the probe step reads."""
    _images(tmp / "photos", ["cat", "dog", "fox"], 40, ".jpg")
    broken = tmp / "photos" / "dog" / "3.jpg"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])


# 40 images per class: the data of an ImageFolder run in these cases, the whole of it used
PHOTOS = ["data.name=imagefolder", "data.root={tmp}/photos", "data.max_train_samples=null"]
PHOTOS += ["data.max_val_samples=null", "data.batch_size=8"]
# a value as long as a file pasted into a config by mistake
HUGE = "x" * 10_000_000
# export.trt at its shortest: ONNX Runtime fp32, no baselines, few timed calls
EXPORT_FAST = ["--backends", "ort", "--precision", "fp32", "--baselines", "--iters", "2", "--min-time-s", "0"]
EXPORT_FAST += ["--warmup-iters", "1", "--warmup-s", "0", "--max-batch", "2", "--threads", "1"]


@dataclass
class Case:
    """``argv(tmp, run)`` -> the command line; ``setup(tmp, run)`` prepares input files (and may damage the
    earlier ``run``, which is then snapshot as damaged); ``needles`` must appear in the error line
    (``{tmp}`` / ``{run}`` are filled in)."""

    argv: Callable[[Path, Path], list[str]]
    needles: tuple[str, ...]
    setup: Callable[[Path, Path], None] = lambda tmp, run: None
    command: str = "train"
    resumable: bool = False
    extra: dict = field(default_factory=dict)


def new_run(*overrides: str) -> Callable[[Path, Path], list[str]]:
    """A new run with ``--set`` overrides on the tiny config, pointed at the earlier run with --overwrite."""
    return lambda tmp, run: [*set_args([*TINY, *overrides]), "--out", str(run), "--overwrite"]


def resume(*overrides: str) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, run: ["--resume", str(run), *set_args(list(overrides))]


def damage(name: str, content: Callable[[Path, Path], bytes | str | object]) -> Callable[[Path, Path], None]:
    """Replace the earlier run's file ``name`` with ``content(tmp, run)``."""
    return lambda tmp, run: _write(run / name, content(tmp, run))


def _truncated(name: str) -> Callable[[Path, Path], bytes]:
    return lambda tmp, run: (run / name).read_bytes()[: (run / name).stat().st_size // 2]


def _foreign_state(tmp: Path, run: Path) -> dict:
    """The distillation state file with the teacher's weights in it: a state from another architecture."""
    state = torch.load(run / "state_distill.pt", weights_only=True)
    state["model"] = torch.load(run / "state_teacher.pt", weights_only=True)["model"]
    return state


Content = bytes | str | Callable[[Path, Path], object]


def _file(tmp: Path, run: Path, name: str, content: Content) -> str:
    """Write ``content`` (or ``content(tmp, run)``) to ``tmp/inputs/name``; its path."""
    path = tmp / "inputs" / name
    path.parent.mkdir(exist_ok=True)
    _write(path, content(tmp, run) if callable(content) else content)
    return str(path)


def config_file(name: str, content: Content) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, run: ["--config", _file(tmp, run, name, content), "--out", str(run), "--overwrite"]


def teacher_weights(name: str, content: Content) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, run: new_run(f"teacher.weights={_file(tmp, run, name, content)}")(tmp, run)


def export_model(name: str, content: Content) -> Callable[[Path, Path], list[str]]:
    return lambda tmp, run: ["--model", _file(tmp, run, name, content), "--out", str(run / "export")]


def _earlier_export(tmp: Path, run: Path) -> None:
    export = run / "export"
    export.mkdir()
    (export / "student.fp32.onnx").write_bytes(os.urandom(64))
    (export / "report.json").write_text('{"rows": []}\n')


TRAIN_CASES: dict[str, Case] = {
    # every kind of config value: a zero, a negative, a wrong type, an absurd value, NaN and inf
    "log_every-zero": Case(new_run("runtime.log_every=0"), ("runtime.log_every", "> 0")),
    "num_workers-negative": Case(new_run("data.num_workers=-1"), ("data.num_workers", ">= 0")),
    "num_workers-absurd": Case(new_run("data.num_workers=100000"), ("data.num_workers", "<= 64")),
    "betas-out-of-range": Case(new_run("teacher.train.optimizer.betas=[2,3]"), ("optimizer.betas", "[0, 1)")),
    "betas-one-value": Case(new_run("student.train.optimizer.betas=[0.9]"), ("optimizer.betas", "two")),
    "lr-inf": Case(new_run("student.train.optimizer.lr=.inf"), ("student.train.optimizer.lr", "finite")),
    "lr-nan": Case(new_run("teacher.train.optimizer.lr=.nan"), ("teacher.train.optimizer.lr", "finite")),
    "lr-zero": Case(new_run("teacher.train.optimizer.lr=0"), ("teacher.train.optimizer.lr", "> 0")),
    "epochs-huge": Case(new_run("student.train.epochs=1000000000"), ("student.train.epochs", "<= 100000")),
    "epochs-float": Case(new_run("teacher.train.epochs=2.5"), ("teacher.train.epochs", "int")),
    "batch_size-zero": Case(new_run("data.batch_size=0"), ("data.batch_size", "> 0")),
    "batch_size-text": Case(new_run("data.batch_size=many"), ("data.batch_size", "int")),
    "image_size-absurd": Case(new_run("data.image_size=1000000"), ("data.image_size", "<= 4096")),
    "val_fraction-one": Case(new_run("data.val_fraction=1"), ("data.val_fraction", "between 0 and 1")),
    "cutmix-above-one": Case(new_run("data.augment.cutmix=2"), ("data.augment.cutmix", "[0, 1]")),
    "crop_padding-absurd": Case(new_run("data.augment.crop_padding=100000"), ("crop_padding", "<=")),
    "std-zero": Case(new_run("data.std=[0,0,0]"), ("data.std[0]", "> 0")),
    "mean-one-value": Case(new_run("data.mean=[0.5]"), ("data.mean", "3 values")),
    "label_smoothing-one": Case(new_run("student.train.label_smoothing=1"), ("label_smoothing", "[0, 1)")),
    "momentum-above-one": Case(new_run("student.train.optimizer.momentum=1.5"), ("momentum", "[0, 1)")),
    "min_lr-above-lr": Case(new_run("student.train.schedule.min_lr=1"), ("schedule.min_lr", "<=")),
    "step_size-zero": Case(new_run("student.train.schedule.step_size=0"), ("schedule.step_size", "> 0")),
    "grad_clip-zero": Case(new_run("runtime.grad_clip=0"), ("runtime.grad_clip", "> 0")),
    "threads-zero": Case(new_run("runtime.threads=0"), ("runtime.threads", "> 0")),
    "threads-text": Case(new_run("runtime.threads=lots"), ("runtime.threads", "'auto' or int")),
    "amp-unknown": Case(new_run("runtime.amp=fp8"), ("runtime.amp", "'bf16'")),
    "seed-negative": Case(new_run("seed=-3"), ("seed", ">= 0")),
    "seed-absurd": Case(new_run("seed=99999999999999"), ("seed", "2**32")),
    "kd-temperature-zero": Case(new_run("loss.kd.temperature=0"), ("loss.kd.temperature", "> 0")),
    "agkd-window-even": Case(new_run("loss.agkd.window_size=4"), ("loss.agkd.window_size", "odd")),
    "method-unknown": Case(new_run("loss.method=[kd, agdk]"), ("loss.method[1]", "'agkd'")),
    "key-misspelled": Case(new_run("data.batch_sise=3"), ("data.batch_sise", "'batch_size'")),
    "set-without-value": Case(new_run("data.batch_size"), ("--set", "KEY=VALUE")),
    "set-bad-yaml": Case(new_run("data.mean=[0.5,"), ("data.mean", "not valid YAML")),
    # the data and the models
    "one-class": Case(
        new_run("data.name=imagefolder", "data.root={tmp}/one_class", "data.max_val_samples=null"),
        ("1 class", "at least 2"),
        setup=lambda tmp, run: (_images(tmp / "one_class", ["cat"], 6), None)[1],
    ),
    "empty-image-folder": Case(
        new_run("data.name=imagefolder", "data.root={tmp}/no_images"),
        ("{tmp}/no_images", "class"),
        setup=lambda tmp, run: (tmp / "no_images").mkdir(),
    ),
    "one-training-image": Case(new_run("data.max_train_samples=1"), ("1 image(s)", "at least 2")),
    "image-size-vs-vit": Case(new_run("data.image_size=48"), ("data.image_size=48", "built for 16x16")),
    "tap-path-missing": Case(
        new_run("student.taps.mid.path=blocks.22"), ("student.taps.mid.path", "'blocks.2'")
    ),
    "tap-kind-wrong": Case(new_run("teacher.taps.vit.kind=feature"), ("vit",)),
    "image-truncated": Case(
        new_run(*PHOTOS), ("{tmp}/photos/dog/3.jpg", "cannot be decoded"), setup=_truncated_jpeg
    ),
    "one-image-per-class": Case(
        new_run(*PHOTOS),
        ("no training image", "data.val_fraction"),
        setup=lambda tmp, run: (_images(tmp / "photos", ["cat", "dog", "fox"], 1), None)[1],
    ),
    "seeds-not-integers": Case(
        lambda tmp, run: [*new_run()(tmp, run), "--seeds", "0,x"], ("--seeds", "0,1,2")
    ),
    "seeds-repeated": Case(
        lambda tmp, run: [*new_run()(tmp, run), "--seeds", "1,1"], ("'seeds'", "distinct")
    ),
    "seeds-negative": Case(new_run("seeds=[0, -3]"), ("seeds", ">= 0")),
    "seeds-huge": Case(new_run("seeds=[4294967296]"), ("seeds", "2**32")),
    "seeds-on-resume-of-one-run": Case(
        lambda tmp, run: [*resume()(tmp, run), "--seeds", "0,1"],
        ("seeds", "single run", "--out"),
        resumable=True,
    ),
    "kd-with-titn": Case(
        lambda tmp, run: [
            *config_file("kd_titn.yaml", KD_TITN)(tmp, run),
            *set_args(["data.batch_size=8", "data.max_train_samples=16", "data.max_val_samples=8"]),
        ],
        ("'loss.method' combines titn", "drop kd"),
    ),
    # files the command reads: --config, weights files
    "config-missing": Case(
        lambda tmp, run: ["--config", f"{tmp}/nope.yaml", "--out", str(run)], ("nope.yaml",)
    ),
    "config-empty": Case(config_file("e.yaml", ""), ("e.yaml", "empty")),
    "config-random-bytes": Case(config_file("r.yaml", lambda tmp, run: os.urandom(256)), ("r.yaml", "YAML")),
    "config-torch-file": Case(config_file("c.pt", lambda tmp, run: {"a": torch.ones(2)}), ("c.pt", "YAML")),
    "config-a-list": Case(config_file("l.yaml", "- 1\n- 2\n"), ("l.yaml", "mapping")),
    "config-bad-yaml": Case(config_file("b.yaml", "data: [1,\n"), ("b.yaml", "line")),
    "config-value-10-mb": Case(
        config_file("huge.yaml", f"data:\n  name: {HUGE}\n"), ("data.name", "characters")
    ),
    "set-value-100-kb": Case(new_run(f"data.batch_size={HUGE[:100_000]}"), ("data.batch_size", "characters")),
    "config-a-folder": Case(lambda tmp, run: ["--config", str(tmp), "--out", str(run)], ("{tmp}",)),
    "weights-truncated": Case(teacher_weights("t.pt", _truncated("teacher.pt")), ("t.pt", "truncated")),
    "weights-empty": Case(teacher_weights("e.pt", b""), ("e.pt", "empty")),
    "weights-random-bytes": Case(
        teacher_weights("r.pt", lambda t, r: os.urandom(4096)), ("r.pt", "torch.save")
    ),
    "weights-text": Case(teacher_weights("w.pt", "layer: 1\n"), ("w.pt", "torch.save")),
    "weights-run-code": Case(
        teacher_weights("x.pt", lambda t, r: {"w": _RunsCode(t / "ran")}), ("x.pt", "refused")
    ),
    "weights-raw-pickle": Case(
        teacher_weights("p.pt", lambda t, r: pickle.dumps(_RunsCode(t / "ran"), protocol=2)), ("p.pt",)
    ),
    "weights-other-arch": Case(
        teacher_weights("s.pt", lambda t, r: (r / "student.pt").read_bytes()), ("s.pt", "key")
    ),
    # the output folder
    "out-is-a-file": Case(
        lambda tmp, run: [*set_args(TINY), "--out", str(run / "results.md")], ("results.md", "is a file")
    ),
    "out-under-a-file": Case(
        lambda tmp, run: [*set_args(TINY), "--out", str(run / "results.md" / "x")], ("results.md", "a file")
    ),
    "out-empty": Case(lambda tmp, run: [*set_args(TINY), "--out", ""], ("--out", "empty")),
    # /proc takes no new folders, for root too (root passes every permission check, so the run gets as far
    # as creating the folder)
    "out-unwritable": Case(
        lambda tmp, run: [*set_args(TINY), "--out", "/proc/kdfast-fuzz"], ("/proc", "another")
    ),
    "out-name-too-long": Case(
        lambda tmp, run: [*set_args(TINY), "--out", str(tmp / ("a" * 300))],
        ("is 300 bytes", "at most 255", "shorter output folder"),
    ),
    "out-path-too-long": Case(
        lambda tmp, run: [*set_args(TINY), "--out", str(tmp.joinpath(*["b" * 200] * 21))],
        ("the path is", "too long", "shorter output folder"),
    ),
    # the command line
    "unknown-flag": Case(lambda tmp, run: ["--epochs", "3", "--out", str(run)], ("--epochs",)),
    "compile-choice": Case(lambda tmp, run: ["--compile", "maybe", "--out", str(run)], ("--compile",)),
    "resume-with-out": Case(
        lambda tmp, run: ["--resume", str(run), "--out", str(run)], ("--resume", "--out")
    ),
    "resume-no-run": Case(
        lambda tmp, run: ["--resume", f"{tmp}/none"], ("{tmp}/none", "output folder of a run")
    ),
    # --resume: every file it reads back, damaged
    "resume-state-truncated": Case(
        resume(),
        ("state_distill.pt", "truncated"),
        damage("state_distill.pt", _truncated("state_distill.pt")),
        resumable=True,
    ),
    "resume-state-empty": Case(
        resume(), ("state_distill.pt", "empty"), damage("state_distill.pt", lambda t, r: b""), resumable=True
    ),
    "resume-state-run-code": Case(
        resume(),
        ("state_distill.pt", "refused"),
        damage("state_distill.pt", lambda t, r: {"stage": "distill", "x": _RunsCode(t / "ran")}),
        resumable=True,
    ),
    "resume-state-not-kdfast": Case(
        resume(),
        ("state_distill.pt", "not a kdfast resume state"),
        damage("state_distill.pt", lambda t, r: torch.ones(3)),
        resumable=True,
    ),
    "resume-state-other-stage": Case(
        resume(),
        ("state_distill.pt", "stage 'baseline'"),
        damage("state_distill.pt", lambda t, r: torch.load(r / "state_baseline.pt", weights_only=True)),
        resumable=True,
    ),
    "resume-state-other-arch": Case(
        resume(),
        ("state_distill.pt", "another config"),
        damage("state_distill.pt", _foreign_state),
        resumable=True,
    ),
    "resume-checkpoint-truncated": Case(
        resume(),
        ("baseline.pt", "truncated"),
        damage("baseline.pt", _truncated("baseline.pt")),
        resumable=True,
    ),
    "resume-config-random": Case(
        resume(), ("config.yaml",), damage("config.yaml", lambda t, r: os.urandom(300)), resumable=True
    ),
    "resume-config-unknown-key": Case(
        resume(),
        ("'runtime.speed'",),
        damage(
            "config.yaml",
            lambda t, r: (r / "config.yaml").read_text().replace("runtime:\n", "runtime:\n  speed: 11\n"),
        ),
        resumable=True,
    ),
    "resume-config-missing": Case(
        resume(), ("config.yaml",), lambda tmp, run: (run / "config.yaml").unlink(), resumable=True
    ),
    "resume-metrics-garbage": Case(
        resume(),
        ("metrics.jsonl line 2", "move the file away"),
        damage(
            "metrics.jsonl", lambda t, r: '{"stage": "teacher", "epoch": 1, "split": "train"}\nnot json\n{}\n'
        ),
        resumable=True,
    ),
    "resume-bad-set": Case(resume("runtime.log_every=0"), ("runtime.log_every",), resumable=True),
    # --resume --set: what may change on resume (docs/reliability.md, "Resume"), on the finished run
    "resume-fewer-epochs": Case(
        resume("student.train.epochs=0"), ("baseline stage has trained 1 epochs", "student.train.epochs=0")
    ),
    "resume-teacher-longer": Case(
        resume("teacher.train.epochs=2"), ("teacher.train.epochs=2", "after the student was distilled")
    ),
    "resume-other-data": Case(
        resume("data.batch_size=16"), ("--set data.batch_size=16", "would change what this run trained")
    ),
    "resume-other-method": Case(resume("loss.kd.temperature=8"), ("loss.kd.temperature=8", "--out")),
    "resume-without-a-state-to-continue": Case(
        resume("student.train.epochs=2"),
        ("state_distill.pt", "is gone"),
        lambda tmp, run: (run / "state_distill.pt").unlink(),
    ),
    "resume-half-written": Case(
        resume(), ("state_teacher.pt", "truncated"), lambda tmp, run: _half_written(run)
    ),
}


def _half_written(run: Path) -> None:
    """A run killed while it wrote its first state file, on a file system without atomic renames."""
    for path in run.iterdir():
        if path.name not in ("config.yaml", "state_teacher.pt"):
            path.unlink()
    _write(run / "state_teacher.pt", (run / "state_teacher.pt").read_bytes()[:3000])


KD_TITN = """\
data: {name: digits, image_size: 32, batch_size: 64}
teacher:
  arch: {source: kdfast, name: hybrid_teacher_small, kwargs: {}}
  train: {epochs: 1}
student:
  arch: {source: kdfast, name: tnt_distilled_digits, kwargs: {}}
  train: {epochs: 1}
loss:
  method: [kd, titn]
  kd: {weight: 0.5}
runtime: {progress: false, tensorboard: false}
"""

EXPORT_CASES: dict[str, Case] = {
    "export-model-missing": Case(
        lambda tmp, run: ["--model", f"{tmp}/none.pt", "--out", str(run / "export")],
        ("none.pt",),
        command="export",
    ),
    "export-model-random-bytes": Case(
        export_model("r.pt", lambda t, r: os.urandom(4096)), ("r.pt",), command="export"
    ),
    "export-model-truncated": Case(
        export_model("t.pt", _truncated("student.pt")), ("t.pt",), command="export"
    ),
    "export-model-text": Case(export_model("x.pt", "name: edge_cnn\n"), ("x.pt",), command="export"),
    "export-model-run-code": Case(
        export_model("e.pt", lambda t, r: {"format": "kdfast.student/1", "x": _RunsCode(t / "ran")}),
        ("e.pt", "refused"),
        command="export",
    ),
    "export-model-a-zip": Case(export_model("z.pt", lambda t, r: _zip()), ("z.pt",), command="export"),
    "export-into-an-earlier-export": Case(
        lambda tmp, run: ["--model", str(run / "student.pt"), "--out", str(run / "export"), *EXPORT_FAST],
        ("{run}/export holds an earlier export", "--overwrite"),
        command="export",
    ),
    "export-precision-100-kb": Case(
        lambda tmp, run: ["--model", str(run / "student.pt"), "--precision", HUGE[:100_000]],
        ("--precision", "invalid choice", "characters cut"),
        command="export",
    ),
    "export-set-unknown-key": Case(
        lambda tmp, run: ["--model", str(run / "student.pt"), "--set", "timing.iter=3"],
        ("timing.iter", "'iters'"),
        command="export",
    ),
    "export-set-value-10-mb": Case(
        lambda tmp, run: ["--model", str(run / "student.pt"), "--set", f"opset={HUGE}"],
        ("config key 'opset' must be int", "characters"),
        command="export",
    ),
    "export-out-name-too-long": Case(
        lambda tmp, run: ["--model", str(run / "student.pt"), "--out", str(tmp / ("e" * 300))],
        ("--out", "is 300 bytes", "shorter output folder"),
        command="export",
    ),
    "export-model-path-too-long": Case(
        lambda tmp, run: ["--model", str(tmp / ("m" * 300) / "student.pt"), "--out", str(run / "export")],
        ("the path is too long", "ENAMETOOLONG"),
        command="export",
    ),
    "export-model-teacher": Case(
        export_model("teacher.pt", lambda t, r: (r / "teacher.pt").read_bytes()),
        ("teacher.pt", "kdfast.student/1"),
        command="export",
    ),
}


def _zip() -> bytes:
    """A zip archive that torch.save did not write."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("readme.txt", "hello")
    return buffer.getvalue()


def _run(case: Case, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = {"train": train_main, "export": export_main, "compare": compare_main}[case.command](argv)
    return code, capsys.readouterr().err


def compare_run(out: str = "{tmp}/compare") -> Callable[[Path, Path], list[str]]:
    return lambda tmp, run: [str(run), "--out", out]


# python -m kdfast.compare on the earlier (finished) run
COMPARE_CASES: dict[str, Case] = {
    "compare-results-random-bytes": Case(
        compare_run(),
        ("results.json", "not JSON"),
        damage("results.json", lambda t, r: os.urandom(512)),
        "compare",
    ),
    "compare-results-truncated": Case(
        compare_run(),
        ("results.json", "not JSON"),
        damage("results.json", _truncated("results.json")),
        "compare",
    ),
    "compare-results-a-list": Case(
        compare_run(),
        ("results.json", "kdfast.results/1"),
        damage("results.json", lambda t, r: "[1, 2]\n"),
        "compare",
    ),
    "compare-out-is-a-file": Case(
        compare_run(), ("{tmp}/compare", "is a file"), lambda t, r: _write(t / "compare", "notes"), "compare"
    ),
    "compare-out-under-a-file": Case(
        compare_run("{tmp}/notes/compare"),
        ("notes", "is a file"),
        lambda t, r: _write(t / "notes", "x"),
        "compare",
    ),
}


@pytest.mark.parametrize("name", [*TRAIN_CASES, *EXPORT_CASES, *COMPARE_CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(
    name: str, finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    case = {**TRAIN_CASES, **EXPORT_CASES, **COMPARE_CASES}[name]
    run = tmp_path / "earlier"
    shutil.copytree(finished_run, run)
    if case.resumable:
        _resumable(run)
    if case.command == "export":
        _earlier_export(tmp_path, run)
    case.setup(tmp_path, run)
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in case.argv(tmp_path, run)]
    before, folders = snapshot(run), sorted(p for p in tmp_path.rglob("*") if p.is_dir())

    code, err = _run(case, argv, capsys)

    lines = err.strip().splitlines()
    assert code == 2, err[:3000]
    assert 1 <= len(lines) <= 3, err[:3000]
    assert all(len(line) <= 1200 for line in lines), f"an error line of {max(map(len, lines)):,} characters"
    assert "Traceback" not in err, err
    for needle in case.needles:
        assert needle.replace("{tmp}", str(tmp_path)).replace("{run}", str(run)) in err, err
    assert snapshot(run) == before, "the earlier run changed"
    assert sorted(p for p in tmp_path.rglob("*") if p.is_dir()) == folders, "a folder was created"
    assert not (tmp_path / "ran").exists(), "a pickle ran code"


def test_the_table_covers_forty_cases() -> None:
    assert len(TRAIN_CASES) + len(EXPORT_CASES) >= 40


@pytest.mark.slow
def test_the_same_command_twice_keeps_the_first_run_and_writes_a_numbered_folder(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "default"
    shutil.copytree(finished_run, run)
    before = snapshot(run)

    assert train_main([*set_args(TINY), "--out", str(run)]) == 0

    out = capsys.readouterr().out
    assert f"{run} holds an earlier run, kept as it is; this run writes to {run}-2" in out
    assert snapshot(run) == before
    assert (tmp_path / "default-2" / "student.pt").is_file()
    assert f"out: {run}-2" in (tmp_path / "default-2" / "config.yaml").read_text()


@dataclass
class Fault:
    """The OS refuses ``call`` (``replace``: the rename that puts a written file in place; ``open``: opening
    a file to write it, a temporary one included) with ``error`` for the first file whose name contains
    ``name``: a write fault injected at the boundary between the command and the OS."""

    name: str
    error: int
    call: str = "replace"
    nth: int = 1  # the nth call that matches (an export's file is renamed into staging, then into --out)


WRITE_FAULTS = {
    "config-yaml-name-too-long": Fault("config.yaml", errno.ENAMETOOLONG, "open"),
    "metrics-no-permission": Fault("metrics.jsonl", errno.EACCES, "open"),
    "first-state-disk-full": Fault("state_teacher.pt", errno.ENOSPC),
    "student-quota": Fault("student.pt", errno.EDQUOT),
    "curves-io-error": Fault("curves.png", errno.EIO),
    "results-read-only": Fault("results.json", errno.EROFS),
}


def inject(monkeypatch: pytest.MonkeyPatch, fault: Fault) -> list[str]:
    """Make ``fault`` happen once; the list gets the path it hit."""
    hit: list[str] = []
    real = getattr(os, fault.call)

    seen = []

    def refusing(*args, **kwargs):
        target = os.fspath(args[1] if fault.call == "replace" else args[0])
        if not hit and fault.name in Path(target).name:
            seen.append(target)
            if len(seen) == fault.nth:
                hit.append(target)
                raise OSError(fault.error, os.strerror(fault.error), target)
        return real(*args, **kwargs)

    monkeypatch.setattr(os, fault.call, refusing)
    return hit


@pytest.mark.slow
@pytest.mark.parametrize("name", WRITE_FAULTS)
def test_a_write_fault_is_one_line_exit_2_and_the_run_resumes(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault, out = WRITE_FAULTS[name], tmp_path / "run"
    hit = inject(monkeypatch, fault)

    code = train_main([*set_args(TINY), "--out", str(out)])

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert hit, "the fault was never reached"
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"cannot write {out / fault.name}" in lines[0], err
    assert errno.errorcode[fault.error] in lines[0], err
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp")), "a temporary file was left"
    monkeypatch.undo()
    if fault.name == "config.yaml":  # the run's first write: the folder it had just created is gone again
        assert not out.exists()
        return
    assert f"continue with python -m kdfast.train --resume {out}" in lines[0], err
    assert train_main(["--resume", str(out)]) == 0, capsys.readouterr().err
    assert (out / "results.json").is_file() and (out / "student.pt").is_file()


EXPORT_FAULTS = {
    "onnx-disk-full": Fault("student.fp32.onnx", errno.ENOSPC),
    "chart-quota": Fault("latency_batch.png", errno.EDQUOT),
    "report-read-only": Fault("report.json", errno.EROFS),
    "commit-no-permission": Fault("report.md", errno.EACCES, nth=2),  # the rename into --out
}


@pytest.mark.parametrize("name", EXPORT_FAULTS)
def test_an_export_write_fault_is_one_line_exit_2_and_changes_nothing(
    name: str,
    finished_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Wherever the export cannot write, also halfway through moving its files into --out: one line naming
    the file where it would have been, exit 2, the earlier export (replaced with --overwrite) byte for byte as
    it was, no staging folder left."""
    fault, out = EXPORT_FAULTS[name], tmp_path / "export"
    _earlier_export(tmp_path, tmp_path)
    before = snapshot(out)
    hit = inject(monkeypatch, fault)

    code = export_main(
        ["--model", str(finished_run / "student.pt"), "--out", str(out), "--overwrite", *EXPORT_FAST]
    )

    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("export.trt: ")]
    assert hit, "the fault was never reached"
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    if fault.call == "replace":
        assert f"cannot write {out / fault.name}: " in lines[0], err
    assert errno.errorcode[fault.error] in lines[0] and "an earlier export there is unchanged" in lines[0], (
        err
    )
    assert snapshot(out) == before
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "a staging folder was left"
