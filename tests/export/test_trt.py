"""python -m export.trt exit codes and output-folder safety: 1 on a failed or unmeasured gate (artifacts
kept), 2 on bad input (one line, nothing written, an earlier export untouched), 3 when a backend asked for
cannot run here; a run that stops midway leaves no trace."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from support.exports import FAST, LOOSE_INT8
from support.students import CLASSES

from export import trt
from export.backends import BACKENDS
from export.config import ExportConfig
from export.tensorrt_backend import unavailable_reason
from export.trt import main
from kdfast.checkpoint import STUDENT_FORMAT, TEACHER_FORMAT


@pytest.fixture(scope="module")
def student(trained_student):
    return trained_student[0]


def _run(argv: list[str]) -> int:
    return main([*argv, *FAST, *LOOSE_INT8])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _earlier_export(folder: Path) -> dict[str, bytes]:
    """A folder holding an earlier export's files (and a file of the user's)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text('{"status": "passed"}')
    (folder / "student.fp32.onnx").write_bytes(os.urandom(64))
    (folder / "notes.txt").write_text("mine")
    return _snapshot(folder)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _bad_models(root: Path, student: Path) -> dict[str, tuple[Path, str]]:
    """Files given as --model, each with the words its one-line message must contain."""
    ckpt = torch.load(student, weights_only=True)
    key = next(iter(ckpt["state_dict"]))
    files: dict[str, tuple[object, str]] = {
        "random.pt": (os.urandom(4096), "is not a torch checkpoint"),
        "text.pt": (b"name: edge_cnn\nweights: here\n", "is not a torch checkpoint"),
        "empty.pt": (b"", "is not a torch checkpoint"),
        "truncated.pt": (student.read_bytes()[: student.stat().st_size // 2], "is not a torch checkpoint"),
        "teacher.pt": ({**ckpt, "format": TEACHER_FORMAT}, "expected 'kdfast.student/1'"),
        "arch.pt": ({**ckpt, "arch": {"source": "timm", "name": "no_such_net", "kwargs": {}}}, "no_such_net"),
        "weights.pt": (
            {**ckpt, "state_dict": {**ckpt["state_dict"], key: torch.zeros(2)}},
            f"weight '{key}'",
        ),
        "evil.pt": ({"format": STUDENT_FORMAT, "x": _RunsCode(root / "code-ran")}, "was refused"),
        "nofields.pt": ({"format": STUDENT_FORMAT}, "lacks the field"),
    }
    paths = {}
    for name, (content, words) in files.items():
        path = root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        paths[name] = (path, words)
    with zipfile.ZipFile(root / "notorch.pt", "w") as z:  # a zip, but not one torch.save wrote
        z.writestr("readme.txt", "hello")
    paths["notorch.pt"] = (root / "notorch.pt", "is not a readable torch checkpoint")
    return paths


BAD_FLAGS = {
    "precision": (["--precision", "fp64"], "invalid choice: 'fp64'"),
    "backends": (["--backends", "tflite9"], "invalid choice: 'tflite9'"),
    "calibration": (["--calibration", "kl"], "invalid choice: 'kl'"),
    "max-batch": (["--max-batch", "1"], "--max-batch (config key 'max_batch') must be >= 2"),
    "atol": (["--fp32-atol", "-1"], "--fp32-atol (config key 'gates.fp32.atol') must be >= 0"),
    "agreement": (
        ["--int8-min-agreement", "1.5"],
        "--int8-min-agreement (config key 'gates.int8.min_agreement') must be in [0, 1]",
    ),
    "opset": (["--opset", "12"], "--opset (config key 'opset') must lie in 18..24"),
    "iters": (["--iters", "0"], "--iters (config key 'timing.iters') must be > 0"),
    "cap": (["--max-time-s", "0"], "--max-time-s (config key 'timing.max_time_s') must be > 0"),
    "set-unknown-key": (
        ["--set", "timing.iter=3"],
        "unknown config key 'timing.iter': did you mean 'iters'",
    ),
    "set-wrong-type": (["--set", "max_batch=many"], "config key 'max_batch' must be int, got 'many'"),
    "set-not-key-value": (["--set", "max_batch"], "--set takes KEY=VALUE"),
    "set-unknown-backend": (
        ["--set", "backends=[ort, tflite9]"],
        "config key 'backends[1]': no backend 'tflite9'",
    ),
    "not-a-number": (["--threads", "two"], "argument --threads: invalid int value: 'two'"),
    "verify-data": (["--verify-data", "/no/such/folder"], "not found"),
}


def _one_line_exit_2(argv: list[str], capsys, match: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("export.trt: ") and not err.startswith("export.trt: export.trt"), err
    assert match in err, err
    return err


def test_bad_models_one_line_exit_2_and_nothing_touched(student, tmp_path, capsys):
    out = tmp_path / "out"
    before = _earlier_export(out)
    for name, (path, words) in _bad_models(tmp_path, student).items():
        err = _one_line_exit_2(["--model", str(path), "--out", str(out)], capsys, words)
        assert str(path) in err, (name, err)
        assert _snapshot(out) == before, name
        # with no --out, the default <model folder>/export must not appear either
        _one_line_exit_2(["--model", str(path)], capsys, words)
        assert not (path.parent / "export").exists(), name
    assert not (tmp_path / "code-ran").exists()


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flags_one_line_exit_2_and_nothing_touched(student, tmp_path, capsys, case):
    flags, words = BAD_FLAGS[case]
    out = tmp_path / "out"
    before = _earlier_export(out)
    err = _one_line_exit_2(["--model", str(student), "--out", str(out), *flags], capsys, words)
    assert flags[0] in err or case in (
        "verify-data",
        "set-unknown-key",
        "set-wrong-type",
        "set-unknown-backend",
    )
    assert _snapshot(out) == before
    _one_line_exit_2(["--model", str(student), "--out", str(tmp_path / "new"), *flags], capsys, words)
    assert not (tmp_path / "new").exists()


def test_missing_model_creates_nothing(tmp_path, capsys):
    _one_line_exit_2(["--model", str(tmp_path / "none.pt")], capsys, "does not exist")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out(student, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _one_line_exit_2(["--model", str(student), "--out", str(blocker / "sub")], capsys, "not writable")
    assert blocker.read_text() == ""


def test_module_entry_point_exit_code(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "export.trt", "--model", str(tmp_path / "x.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "does not exist" in done.stderr


def test_a_run_stopped_midway_leaves_no_trace(student, tmp_path, monkeypatch, capsys):
    """Ctrl-C (or any crash) after the output folder was prepared: one line, exit 130, a folder this run
    created is removed, an existing one keeps exactly its earlier files (--overwrite included)."""

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(trt, "_onnx", interrupted)
    fresh = tmp_path / "fresh" / "out"
    assert _run(["--model", str(student), "--out", str(fresh), "--backends", "ort"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "export.trt: stopped by Ctrl-C; this run's files were removed and an earlier export there is "
        "unchanged"
    )
    assert not (tmp_path / "fresh").exists()
    earlier = tmp_path / "earlier"
    before = _earlier_export(earlier)
    assert _run(["--model", str(student), "--out", str(earlier), "--backends", "ort", "--overwrite"]) == 130
    assert _snapshot(earlier) == before


def test_failed_gate_exits_1_keeps_artifacts_and_replaces_only_its_own_files(student, tmp_path, capsys):
    out = tmp_path / "out"
    before = _earlier_export(out)
    flags = [
        "--precision",
        "fp32",
        "--backends",
        "ort",
        "--fp32-atol",
        "0",
        "--fp32-rtol",
        "0",
        "--overwrite",
    ]
    assert _run(["--model", str(student), "--out", str(out), *flags]) == 1
    assert (out / "student.fp32.onnx").read_bytes() != before["student.fp32.onnx"]
    assert (out / "notes.txt").read_text() == "mine"
    moved = {
        name: (out / ".previous-export" / name).read_bytes() for name in ("report.json", "student.fp32.onnx")
    }
    assert moved == {name: before[name] for name in moved}, "the earlier export is kept aside, unchanged"
    report = json.loads((out / "report.json").read_text())
    (row,) = [r for r in report["rows"] if r["backend"] == "onnxruntime"]
    failed = [g for g in row["gates"] if g["passed"] is False]
    assert failed and failed[0]["gate"].startswith("elements within atol=0") and failed[0]["miss"] > 0
    assert report["status"].startswith("FAILED") and "atol=0" in (out / "report.md").read_text()
    assert "atol=0" in capsys.readouterr().err.strip().splitlines()[-1]


def test_random_inputs_cannot_pass(student, tmp_path, capsys):
    out = tmp_path / "out"
    flags = ["--precision", "fp32", "int8", "--backends", "ort", "--random-inputs", "--verify-samples", "5"]
    assert _run(["--model", str(student), "--out", str(out), *flags]) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["status"].startswith("NOT VERIFIED") and report["exit_code"] == 1
    assert any("cannot pass" in w for w in report["warnings"])
    for row in (r for r in report["rows"] if r["backend"] == "onnxruntime"):
        gates = {g["gate"]: g for g in row["gates"]}
        assert gates["top-1 agreement"]["passed"] is None and row["accuracy"] is None
        assert "accuracy drop (points)" not in gates or gates["accuracy drop (points)"]["passed"] is None
    assert report["int8"]["int8"]["control"] is None
    assert "NOT VERIFIED" in capsys.readouterr().err


def test_tensorrt_asked_for_where_it_cannot_run_exits_3_after_the_rest(student, tmp_path, capsys):
    reason = unavailable_reason()
    if reason is None:
        pytest.skip("TensorRT and a GPU are present here; the GPU test covers the engine path")
    out = tmp_path / "out"
    code = _run(
        ["--model", str(student), "--out", str(out), "--precision", "fp32", "--backends", "ort", "trt"]
    )
    assert code == 3
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"export.trt: {reason} (everything else done, report written)"
    )
    report = json.loads((out / "report.json").read_text())
    assert report["unavailable"] == {"trt": reason} and report["exit_code"] == 3
    (row,) = [r for r in report["rows"] if r["backend"] == "onnxruntime"]
    assert all(g["passed"] for g in row["gates"])


def test_default_backends_are_those_available(student, tmp_path, monkeypatch):
    """Without --backends every table entry that can run here runs; one that cannot is a row saying why, not
    an error (the other runtimes have their own tests: test_report.py, AOTInductor's minute-long
    compile in test_verify.py)."""
    for key in [k for k in BACKENDS if k not in ("ort", "trt")]:
        monkeypatch.delitem(BACKENDS, key)
    out = tmp_path / "out"
    assert _run(["--model", str(student), "--out", str(out), "--precision", "fp32"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {r["backend"] for r in report["rows"]} == {"pytorch-eager", "onnxruntime", "tensorrt"}
    (trt_row,) = [r for r in report["rows"] if r["backend"] == "tensorrt"]
    assert trt_row["unavailable"] == unavailable_reason()
    assert set(report["unavailable"]) == ({"trt"} if unavailable_reason() else set())


def test_verify_data_folder_replaces_the_checkpoints_data(student, tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 2), ("val", 1)):
        for c in CLASSES:
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "imgs" / split / c / f"{i}.png")
    out = tmp_path / "out"
    flags = ["--precision", "fp32", "--backends", "ort", "--verify-data", str(tmp_path / "imgs")]
    assert _run(["--model", str(student), "--out", str(out), *flags]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["notes"][0] == f"verification data: imagefolder {tmp_path / 'imgs'}, {len(CLASSES)} images"
    flags[1:2] = ["fp32", "int8"]
    assert _run(["--model", str(student), "--out", str(tmp_path / "out8"), *flags]) in (0, 1)
    notes = json.loads((tmp_path / "out8" / "report.json").read_text())["notes"]
    half = len(CLASSES) // 2
    assert notes[0].endswith(f", {half} images ({half} more held out for INT8 control)")
    (row,) = [r for r in report["rows"] if r["backend"] == "onnxruntime"]
    assert row["accuracy"] is not None and row["parity"]["elements"] == len(CLASSES) ** 2


def _help(capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def _leaves(node: object, prefix: str = "") -> dict[str, object]:
    """Every key of the config as a dotted path, with its default."""
    if dataclasses.is_dataclass(node):
        return {
            k: v
            for f in dataclasses.fields(node)
            for k, v in _leaves(getattr(node, f.name), f"{prefix}{f.name}.").items()
        }
    return {prefix[:-1]: node}


def test_help_shows_every_flag_with_its_key_and_default_and_the_exit_codes(capsys):
    """Each flag's help names the config key it sets and that key's default, read here from the dataclass
    itself; the exit codes of the contract are listed."""
    text = " ".join(_help(capsys).split())
    parser, flags = trt._parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
    defaults = _leaves(ExportConfig())
    assert set(flags) <= set(defaults)
    for key, flag in flags.items():
        value = defaults[key]
        shown = " ".join(map(str, value)) if isinstance(value, list) else json.dumps(value).strip('"')
        assert f"[{key}; default: {shown}]" in text, (flag, key)
    for code, meaning in (("0", "done"), ("1", "gate failed"), ("2", "bad usage"), ("3", "not available")):
        assert f"{code} " in text and meaning in text
    assert "130 interrupted (Ctrl-C), 143 stopped by SIGTERM" in text


def test_config_file_flags_and_set_resolve_into_report_json(student, tmp_path):
    """``--config`` gives keys, a flag overrides the file, ``--set`` overrides both; report.json records the
    whole config as resolved (threads and out filled in), and the run used it."""
    config = tmp_path / "export.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "precision": ["fp32"],
                "backends": ["ort"],
                "max_batch": 3,
                "timing": {"iters": 7, "warmup_iters": 1, "warmup_s": 0.0, "min_time_s": 0.0},
                "gates": {"fp32": {"atol": 0.5}},
                "data": {"verify_samples": 9},
            }
        )
    )
    out = tmp_path / "out"
    argv = ["--config", str(config), "--model", str(student), "--out", str(out), "--baselines"]
    argv += ["--max-batch", "4", "--set", "max_batch=5", "--set", "data.calib_samples=6", "--threads", "1"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    expected = ExportConfig().to_dict()
    expected.update(model=str(student), out=str(out), precision=["fp32"], backends=["ort"], baselines=[])
    expected.update(max_batch=5, threads=1)
    expected["timing"].update(iters=7, warmup_iters=1, warmup_s=0.0, min_time_s=0.0)
    expected["gates"]["fp32"]["atol"] = 0.5
    expected["data"].update(verify_samples=9, calib_samples=6)
    assert report["config"] == expected
    assert report["protocol"]["iters"] == 7 and report["protocol"]["batch_sizes"] == [1, 2, 4, 5]
    (row,) = [r for r in report["rows"] if r["backend"] == "onnxruntime"]
    assert row["parity"]["elements"] == 9 * len(CLASSES)
    assert any(g["gate"].startswith("elements within atol=0.5") for g in row["gates"])


def test_bad_config_files_are_one_line(student, tmp_path, capsys):
    for name, content, words in (
        ("missing.yaml", None, "config file not found"),
        ("list.yaml", "- 1\n", "must hold a mapping"),
        ("empty.yaml", "", "is empty: give a YAML export config"),
        ("typo.yaml", "timing: {iter: 3}\n", "unknown config key 'timing.iter': did you mean 'iters'"),
        ("type.yaml", "opset: twenty\n", "config key 'opset' must be int, got 'twenty'"),
    ):
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        _one_line_exit_2(
            ["--config", str(path), "--model", str(student), "--out", str(tmp_path / "o")], capsys, words
        )
    assert not (tmp_path / "o").exists()
    _one_line_exit_2(["--out", str(tmp_path / "o")], capsys, "--model is required")


def _manifest_matches(out: Path, report: dict, mine: set[str]) -> None:
    """report.json's manifest lists exactly the files in ``out`` but itself and ``mine``, each with the size
    and SHA-256 hashlib gives."""
    files = {p.name for p in out.iterdir() if p.is_file()} - {"report.json"} - mine
    assert {e["file"] for e in report["manifest"]} == files
    for entry in report["manifest"]:
        data = (out / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_an_export_owns_its_folder(student, tmp_path, capsys):
    """A second export into a folder is refused without --overwrite (nothing touched); with it the first
    export's files, also those the second does not write, move to .previous-export/ and the folder holds
    what the new manifest lists; a staging folder a killed export left is removed."""
    out = tmp_path / "out"
    first = ["--model", str(student), "--out", str(out), "--backends", "ort", "--precision", "fp32", "fp16"]
    assert _run(first) == 0
    (out / "notes.txt").write_text("mine")
    report = json.loads((out / "report.json").read_text())
    _manifest_matches(out, report, {"notes.txt"})
    assert "student.fp16.onnx" in {e["file"] for e in report["manifest"]}
    (out / ".export-staging-oldstyle").mkdir()
    (out / ".export-staging-4194999-abc").mkdir()  # beyond the kernel's pid range: no such process
    before = _snapshot(out)
    capsys.readouterr()
    second = ["--model", str(student), "--out", str(out), "--backends", "ort", "--precision", "fp32"]
    _one_line_exit_2([*second, *FAST], capsys, "holds an earlier export (report.json): pass --overwrite")
    assert _snapshot(out) == before

    assert _run([*second, "--overwrite"]) == 0
    report = json.loads((out / "report.json").read_text())
    _manifest_matches(out, report, {"notes.txt"})
    assert not (out / "student.fp16.onnx").exists(), (
        "a file of the earlier export stayed beside the new report"
    )
    previous = out / ".previous-export"
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == {
        name: data for name, data in before.items() if name not in ("notes.txt",) and "/" not in name
    }
    assert not list(out.glob(".export-staging-*")), "stale staging folders stay"


def _stamped(err: str) -> list[tuple[float, str]]:
    """The progress lines of ``err`` as (seconds since the start, text)."""
    lines = []
    for line in err.splitlines():
        if line.startswith("[") and " s] " in line:
            stamp, text = line[1:].split(" s] ", 1)
            lines.append((float(stamp), text))
    return lines


def test_every_step_says_it_runs_and_how_long_timing_takes(student, tmp_path, capsys, monkeypatch):
    """With the heartbeat at 0.3 s no stretch of the run is silent for long: each step longer than that
    repeats that it still runs, and the timing line says how long it takes at least (the protocol's warm-up
    and timed seconds per series and batch size: 2 rows x 2 batch sizes x (0.01 + 1) s here) and, while it
    runs, the rounds done of 2 batch sizes x 2 rounds and the seconds left at that pace."""
    monkeypatch.setattr(trt, "HEARTBEAT_S", 0.3)
    out = tmp_path / "out"
    argv = ["--model", str(student), "--out", str(out), "--backends", "ort", "--precision", "fp32"]
    sets = ["--set", "baselines=[eager]", "--set", "timing.min_time_s=1"]
    assert _run([*argv, "--rounds", "2", *sets]) == 0
    lines = _stamped(capsys.readouterr().err)
    texts = [text for _, text in lines]
    assert any(t.startswith("  ... still ONNX fp32: exporting") for t in texts), texts
    timing = "timing 2 rows (2 series), interleaved in 2 rounds per batch size 1, 2: at least 4 s"
    assert timing in texts
    beats = [t for t in texts if t.startswith(f"  ... still {timing} (")]
    assert any("/4 rounds, about " in t and t.endswith(" s to go)") for t in beats), beats
    gaps = [b - a for (a, _), (b, _) in zip(lines, lines[1:], strict=False)]
    assert max(gaps) < 0.3 + 2.0, list(zip(gaps, texts[1:], strict=True))


NATIVE = """
import os, sys
from pathlib import Path
from export.outdir import native_output
log = Path(sys.argv[1])
with native_output(log) as (console, text):
    os.write(2, b"[cpuinfo_utils.cpp:87] Failed to open midr file\\n")
    os.write(1, b"a converter's stage log\\n")
    print("a library warning", file=sys.stderr)
    print("[   1.0 s] progress", file=console, flush=True)
print("the table", flush=True)
"""


def test_native_runtime_output_goes_to_the_log_and_progress_to_the_terminal(tmp_path):
    """What native code writes to file descriptors 1 and 2 and what Python code prints on sys.stderr while
    the runtimes work lands in export.log; the command's own progress still reaches the terminal's stderr,
    and its stdout works again afterwards."""
    log = tmp_path / "export.log"
    done = subprocess.run(
        [sys.executable, "-c", NATIVE, str(log)], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stderr == "[   1.0 s] progress\n"
    assert done.stdout == "the table\n"
    assert log.read_text().splitlines() == [
        "[cpuinfo_utils.cpp:87] Failed to open midr file",
        "a converter's stage log",
        "a library warning",
    ]


@pytest.mark.slow
@pytest.mark.skipif(BACKENDS["executorch"].unavailable_reason() is not None, reason="ExecuTorch not here")
def test_executorch_logging_stays_off_the_terminal(student, tmp_path):
    """ExecuTorch's C++ runtime logs its CPU probing (cpuinfo_utils.cpp) on stderr, where it reads like an
    error: the command's stderr holds only its own lines, and export.log is one of the files it lists."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "export.trt", "--model", str(student), "--out", str(out)]
    argv += ["--backends", "executorch", "--precision", "fp32", *FAST]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    foreign = [line for line in done.stderr.splitlines() if not line.startswith(("[", "export.trt: "))]
    assert not foreign, foreign
    report = json.loads((out / "report.json").read_text())
    assert "export.log" in {e["file"] for e in report["manifest"]}


def test_the_earlier_export_is_what_its_manifest_lists_or_its_outputs_but_the_checkpoint(tmp_path):
    """With a manifest: the files it lists that exist, and report.json. Without one (an export from before
    manifests): its reports, charts, log and student.* files, but never kdfast.train's student.pt, which an
    --out beside the checkpoint holds; a user's notes are never the export's."""
    from export.outdir import earlier_export

    out = tmp_path / "out"
    out.mkdir()
    names = ("student.pt", "student.fp32.onnx", "student.xml", "student.bin", "report.md", "notes.txt")
    for name in (*names, "latency_batch.png"):
        (out / name).write_bytes(b"x")
    assert earlier_export(out) == []
    (out / "report.json").write_text('{"rows": []}\n')
    old = ["latency_batch.png", "report.json", "report.md", "student.bin", "student.fp32.onnx", "student.xml"]
    assert earlier_export(out) == [out / name for name in old]
    manifest = [{"file": "student.xml"}, {"file": "student.bin"}, {"file": "student.pte"}]  # .pte gone since
    (out / "report.json").write_text(json.dumps({"manifest": manifest}))
    assert earlier_export(out) == [out / "report.json", out / "student.bin", out / "student.xml"]
