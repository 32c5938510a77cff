"""``python -m kdfast.benchmark``: which runs a selection needs, the teacher-cache switch, the refusal of a
folder holding another experiment, and (slow, on the real Fashion-MNIST files) the whole command on a small
slice: teacher, CE-only and KD students, the report's numbers recomputed with plain torch on the official
test split, the resumed command training nothing, and the student exported with its test images behind the
gates."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from support.fashion import REAL, needs_real_files

from kdfast.benchmark import SUITES, cache_overrides, check_folder, gain_verdict, main, select
from kdfast.checkpoint import build_from_checkpoint, load_checkpoint
from kdfast.config import RuntimeConfig, config_text, load_config
from kdfast.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from kdfast.errors import UsageError

SUITE = SUITES["fashion_mnist"]


def test_a_selection_brings_its_ce_only_reference_and_its_teachers() -> None:
    teachers, entries = select(SUITE, ["dkd", "mtd"])
    assert teachers == ["teacher", "vit_teacher"]
    assert [e.name for e in entries] == ["kd", "dkd", "mtd"]  # kd trains the CNN student's CE-only run
    teachers, entries = select(SUITE, ["titn"])
    assert teachers == ["teacher"] and [e.name for e in entries] == ["titn"]
    assert len(select(SUITE, None)[1]) == 15
    with pytest.raises(UsageError, match="no method 'dkdx': did you mean 'dkd'"):
        select(SUITE, ["dkdx"])


def test_every_suite_config_loads_and_shares_the_data_and_student_of_its_reference() -> None:
    loaded = {e.name: load_config(e.config(SUITE.folder), ["teacher.weights=null"]) for e in SUITE.entries}
    for entry in SUITE.entries:
        reference = loaded[SUITE.references[entry.student]]
        cfg = loaded[entry.name]
        assert cfg.data == reference.data and cfg.student.arch == reference.student.arch
        assert cfg.student.train == reference.student.train, entry.name


def test_the_gain_verdict_names_a_gain_or_a_loss_only_beyond_the_spread() -> None:
    assert gain_verdict(3.04, 0.27) == "+3.04 points, a gain above the summed std 0.27"
    assert gain_verdict(-6.11, 0.96) == "-6.11 points, a loss beyond the summed std 0.96"
    assert gain_verdict(-0.41, 0.72) == "-0.41 points, within the summed std 0.72"
    assert gain_verdict(0.5, 0.5) == "+0.50 points, within the summed std 0.50"


def test_the_teacher_cache_switch_follows_the_run_schema() -> None:
    if "teacher_cache" in {f.name for f in dataclasses.fields(RuntimeConfig)}:
        assert cache_overrides("on") == ["runtime.teacher_cache=on"]
    else:
        assert cache_overrides("auto") == [] and cache_overrides("off") == []
        with pytest.raises(UsageError, match="no teacher-output cache"):
            cache_overrides("on")


def test_a_folder_of_another_experiment_is_refused(tmp_path: Path) -> None:
    cfg = load_config("benchmarks/fashion_mnist/kd", ["teacher.weights=null"])
    assert check_folder(tmp_path / "fresh", cfg) is False
    (tmp_path / "kd").mkdir()
    (tmp_path / "kd" / "config.yaml").write_text(config_text(cfg))
    cfg.runtime.threads = 7  # how fast, not what: still the same experiment
    assert check_folder(tmp_path / "kd", cfg) is True
    other = load_config("benchmarks/fashion_mnist/kd", ["teacher.weights=null", "student.train.epochs=3"])
    with pytest.raises(UsageError, match="another config .*student"):
        check_folder(tmp_path / "kd", other)
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "metrics.jsonl").write_text("")
    with pytest.raises(UsageError, match="no config.yaml"):
        check_folder(tmp_path / "stray", cfg)


def test_seconds_another_invocation_wrote_meanwhile_are_kept(tmp_path: Path, monkeypatch) -> None:
    """Two invocations on different methods of one folder each add their runs' seconds to the same file."""
    import kdfast.train.loop as loop
    from kdfast.benchmark import SECONDS, Plan, run_all

    cfg = load_config("benchmarks/fashion_mnist/rkd", ["teacher.weights=null"])
    cfg.out, cfg.seeds = str(tmp_path / "rkd"), [0]
    (tmp_path / SECONDS).write_text(json.dumps({"kd": 100.0}))

    def other_invocation_finishes(cfg, resume):  # while rkd trains, another command finishes crd
        (tmp_path / SECONDS).write_text(json.dumps({"kd": 100.0, "crd": 42.0}))

    monkeypatch.setattr(loop, "run_seeds", other_invocation_finishes)
    spent = run_all(Plan({}, {"rkd": cfg}, SUITE, tmp_path), print)
    written = json.loads((tmp_path / SECONDS).read_text())
    assert written == spent and written["kd"] == 100.0 and written["crd"] == 42.0
    assert 0.0 <= written["rkd"] < 60.0


def test_a_run_another_invocation_is_training_is_waited_for_then_read(tmp_path: Path, monkeypatch) -> None:
    """The lock of a run: a second invocation waits while the first trains it, then finds it finished."""
    import fcntl
    import threading

    import kdfast.train.loop as loop
    from kdfast.benchmark import Plan, run_all

    cfg = load_config("benchmarks/fashion_mnist/rkd", ["teacher.weights=null"])
    cfg.out, cfg.seeds = str(tmp_path / "rkd"), [0]
    held, said = threading.Event(), []

    def first_invocation() -> None:  # holds rkd's lock while it "trains" rkd, then leaves it finished
        with open(tmp_path / ".rkd.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            held.set()
            while not said:
                time.sleep(0.01)
            Path(cfg.out).mkdir()
            (Path(cfg.out) / "config.yaml").write_text(config_text(cfg))
            (Path(cfg.out) / "results.json").write_text(json.dumps({"seeds": [0]}))

    def must_not_train(cfg, resume):
        raise AssertionError("trained a run another invocation had finished")

    monkeypatch.setattr(loop, "run_seeds", must_not_train)
    first = threading.Thread(target=first_invocation)
    first.start()
    held.wait(10)
    spent = run_all(Plan({}, {"rkd": cfg}, SUITE, tmp_path), said.append)
    first.join(10)
    assert said == [f"benchmark: rkd is being trained by another invocation on {tmp_path}: waiting for it"]
    assert "rkd" not in spent


# The real files, a slice small enough for CI: 300 training images, one epoch per stage, one seed.
SLICE = [
    "data.train_subset=300",
    "data.max_val_samples=200",
    "teacher.train.epochs=1",
    "student.train.epochs=1",
    "runtime.progress=false",
]


def _benchmark(out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["--out", str(out), "--methods", "kd", "--seeds", "0"]
    args += [a for item in SLICE for a in ("--set", item)] + list(extra)  # extra --set last: it wins
    command = [sys.executable, "-m", "kdfast.benchmark", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=1500, env=env)


def _test_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The official test images normalized by hand from the raw IDX bytes, and their labels."""
    images = np.frombuffer(gzip.decompress((REAL / "t10k-images-idx3-ubyte.gz").read_bytes())[16:], np.uint8)
    labels = np.frombuffer(gzip.decompress((REAL / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:], np.uint8)
    pixels = torch.from_numpy(images.reshape(-1, 1, 28, 28).astype(np.float32) / 255)
    normalized = (pixels - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    return normalized.expand(-1, 3, -1, -1), torch.from_numpy(labels.astype(np.int64))


def _top1(path: Path, images: torch.Tensor, labels: torch.Tensor) -> float:
    model = build_from_checkpoint(load_checkpoint(path, expect=None))
    with torch.no_grad():
        predicted = torch.cat([model(chunk).argmax(1) for chunk in images.split(1000)])
    return 100.0 * (predicted == labels).float().mean().item()


@pytest.mark.slow
@needs_real_files
def test_the_command_on_a_real_slice_then_resumed_then_exported(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    first = _benchmark(out)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "benchmark.json").read_text())
    images, labels = _test_split()
    kd = report["results"]["kd"]["models"]
    seed = out / "kd" / "seed0"
    assert kd["student"]["test_top1"]["mean"] == pytest.approx(
        _top1(seed / "student.pt", images, labels), abs=1e-6
    )
    assert kd["baseline"]["test_top1"]["mean"] == pytest.approx(
        _top1(seed / "baseline.pt", images, labels), abs=1e-6
    )
    teacher = out / "teacher" / "teacher.pt"
    assert kd["teacher"]["test_top1"]["mean"] == pytest.approx(_top1(teacher, images, labels), abs=1e-6)
    assert report["load"]["start"] is not None and report["machine"]["versions"]["torch"] == torch.__version__
    assert (out / "benchmark.png").stat().st_size > 10_000
    markdown = (out / "benchmark.md").read_text()
    assert "gain over CE-only" in markdown and "teacher: teacher" in markdown

    # the same command again trains nothing and writes the same numbers
    written = {p: p.stat().st_mtime_ns for p in (teacher, seed / "student.pt", seed / "baseline.pt")}
    again = _benchmark(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in written} == written
    assert json.loads((out / "benchmark.json").read_text())["results"] == report["results"]
    changed = _benchmark(out, "--set", "student.train.epochs=2")
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1, changed.stderr
    assert "another config" in changed.stderr

    # export: the gates are measured on the official test images
    exported = subprocess.run(
        [
            sys.executable,
            "-m",
            "export.trt",
            "--model",
            str(seed / "student.pt"),
            "--out",
            str(tmp_path / "export"),
        ]
        + [
            "--backends",
            "ort",
            "--precision",
            "fp32",
            "int8",
            "--verify-samples",
            "400",
            "--control-samples",
            "100",
        ]
        + ["--threads", "1", "--iters", "3", "--min-time-s", "0.05", "--warmup-iters", "1", "--warmup-s", "0"]
        + ["--baselines"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert exported.returncode in (0, 1), exported.stderr[-3000:]  # 1: a one-epoch student may fail a gate
    export_report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert "fashion_mnist test split" in json.dumps(export_report)
    chosen = np.sort(np.random.default_rng(0).choice(10000, size=400, replace=False))
    reference = _top1(seed / "student.pt", images[chosen], labels[chosen])
    rows = {(r["backend"], r["precision"]): r for r in export_report["rows"]}
    assert 100 * rows["pytorch-eager", "fp32"]["accuracy"] == pytest.approx(reference, abs=1e-6)
    assert rows["onnxruntime", "int8"]["accuracy"] is not None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seeds", "0,x"], "--seeds takes comma-separated integers"),
        (["--methods", "kdd"], "no method 'kdd': did you mean 'kd'"),
        (["--set", "student.train.epochz=1"], "student.train.epochz"),
    ],
)
def test_bad_usage_is_one_line_and_writes_nothing(args, message, tmp_path, capsys) -> None:
    assert main([*args, "--out", str(tmp_path / "bench")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "bench").exists()
