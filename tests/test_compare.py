"""``--seeds`` and ``python -m kdfast.compare`` on tiny real runs: digits at 16x16, the CIFAR zoo's ResNet-14
teacher and ResNet-8 student, the multistep SGD recipe, configs that inherit one base file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from matplotlib.image import imread

from kdfast.compare import main as compare_main
from kdfast.results import TIMING_KEYS

pytestmark = pytest.mark.slow

SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
TINY = {
    "data": {
        "name": "digits",
        "image_size": 16,
        "batch_size": 32,
        "eval_batch_size": 64,
        "max_train_samples": 96,
        "max_val_samples": 48,
        "augment": {"crop_padding": 2, "hflip": True},
    },
    "teacher": {
        "arch": {"source": "kdfast", "name": "resnet14"},
        "train": {"epochs": 1, "optimizer": {**SGD, "nesterov": True}},
    },
    "student": {
        "arch": {"source": "kdfast", "name": "resnet8"},
        "train": {"epochs": 2, "optimizer": SGD, "schedule": {"name": "multistep", "milestones": [1]}},
    },
    "runtime": {"device": "cpu", "progress": False, "tensorboard": False},
}
KD = {"base": "tiny.yaml", "loss": {"method": "kd", "ce": 0.1, "kd": {"weight": 0.9, "temperature": 4.0}}}
KD_AGKD = {
    "base": "tiny.yaml",
    "teacher": {"taps": {"t2": {"path": "layer2"}}},
    "student": {"taps": {"s2": {"path": "layer2"}}},
    "loss": {
        "method": ["kd", "agkd"],
        "ce": 0.5,
        "kd": {"weight": 0.5},
        "agkd": {"metric": "mse", "grid": 4, "pairs": [{"student": "s2", "teacher": ["t2"]}]},
    },
}


def _train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "kdfast.train", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    for name, mapping in (("tiny", TINY), ("kd", KD), ("kd_agkd", KD_AGKD)):
        (root / f"{name}.yaml").write_text(yaml.safe_dump(mapping))
    seeds = _train("--config", str(root / "kd.yaml"), "--out", str(root / "kd"), "--seeds", "0,1")
    assert seeds.returncode == 0, seeds.stderr
    single = _train("--config", str(root / "kd_agkd.yaml"), "--out", str(root / "kd_agkd"))
    assert single.returncode == 0, single.stderr
    return {"root": root, "kd": root / "kd", "kd_agkd": root / "kd_agkd", "seeds_stdout": seeds.stdout}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _distill_epochs(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "distill" and r["split"] == "val" and r["scope"] == "epoch"]


def test_each_seed_records_its_last_and_best_epoch(runs: dict) -> None:
    records = [torch.load(runs["kd"] / f"seed{s}" / "student.pt", weights_only=True)["data"] for s in (0, 1)]
    assert records[0] == records[1] and records[0]["seed"] == 0  # one validation split: the config's seed's
    for seed in (0, 1):
        folder = runs["kd"] / f"seed{seed}"
        student = _json(folder / "results.json")["models"]["student"]
        epochs = _distill_epochs(folder)
        assert [r["epoch"] for r in epochs] == [1, 2]
        best = max(epochs, key=lambda r: (r["top1"], -r["epoch"]))
        assert student["top1"] == pytest.approx(epochs[-1]["top1"])
        assert (student["best_top1"], student["best_epoch"]) == (pytest.approx(best["top1"]), best["epoch"])
        assert yaml.safe_load((folder / "config.yaml").read_text())["seed"] == seed
        assert (folder / "student.pt").is_file()


def test_the_seeds_summary_is_the_mean_and_sample_std(runs: dict) -> None:
    summary = _json(runs["kd"] / "results.json")
    assert summary["seeds"] == [0, 1] and summary["runs"] == ["seed0", "seed1"]
    assert summary["top1_shown"] == "last"
    per_seed = [_json(runs["kd"] / f"seed{s}" / "results.json")["models"] for s in (0, 1)]
    for role in ("teacher", "baseline", "student"):
        for key in ("top1", "best_top1", "top5", *TIMING_KEYS):
            values = [models[role][key] for models in per_seed]
            entry = summary["models"][role][key]
            assert entry["values"] == values
            assert entry["mean"] == pytest.approx(np.mean(values))
            assert entry["std"] == pytest.approx(np.std(values, ddof=1))
    student = summary["models"]["student"]["top1"]
    line = f"{student['mean']:.2f} ± {student['std']:.2f}"
    assert line in (runs["kd"] / "results.md").read_text() and line in runs["seeds_stdout"]


def test_compare_writes_one_row_per_run_and_a_chart(runs: dict, capsys: pytest.CaptureFixture) -> None:
    out = runs["root"] / "compare"
    assert compare_main([str(runs["kd"]), str(runs["kd_agkd"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = (out / "compare.md").read_text()
    assert printed.strip() in table
    kd = _json(runs["kd"] / "results.json")["models"]["student"]
    last = [kd["top1"]["values"][i] for i in (0, 1)]
    best = kd["best_top1"]["values"]
    rows = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in table.splitlines() if " | " in line
    }
    assert rows["kd"][1:5] == ["kd", "resnet14", "resnet8", "2"]
    assert rows["kd"][5] == f"{np.mean(last):.2f} ± {np.std(last, ddof=1):.2f}"
    assert rows["kd"][6] == f"{np.mean(best):.2f} ± {np.std(best, ddof=1):.2f}"
    single = _json(runs["kd_agkd"] / "results.json")["models"]["student"]
    assert rows["kd_agkd"][1:7] == [
        "kd + agkd",
        "resnet14",
        "resnet8",
        "1",
        f"{single['top1']:.2f}",
        f"{single['best_top1']:.2f}",
    ]
    assert rows["kd_agkd"][7] == f"{single['images_per_s']:.0f}"
    picture = imread(out / "compare.png")
    assert picture.shape[0] > 300 and picture.shape[1] > 400 and picture[..., :3].std() > 0.05


def test_compare_refuses_what_is_not_a_finished_run(runs: dict, capsys: pytest.CaptureFixture) -> None:
    root = runs["root"]
    unfinished = root / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((runs["kd_agkd"] / "config.yaml").read_text())
    empty = root / "empty"
    empty.mkdir()
    old = root / "old"
    old.mkdir()
    (old / "results.json").write_text(json.dumps({"teacher": {}, "student": {}}))
    out = root / "refused"
    for folder, message in (
        (unfinished, "is an unfinished run (no results.json yet): finish it with --resume"),
        (empty, "is not a kdfast.train run folder"),
        (root / "missing", "is not a folder"),
        (old, "is not a kdfast.results/1 file"),
    ):
        assert compare_main([str(runs["kd"]), str(folder), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and str(folder) in err
        assert not out.exists()


def test_a_finished_seeds_run_resumes_without_training_again(runs: dict) -> None:
    before = _json(runs["kd"] / "results.json")
    written = {s: (runs["kd"] / f"seed{s}" / "student.pt").stat().st_mtime_ns for s in (0, 1)}
    resumed = _train("--resume", str(runs["kd"]))
    assert resumed.returncode == 0, resumed.stderr
    assert {s: (runs["kd"] / f"seed{s}" / "student.pt").stat().st_mtime_ns for s in (0, 1)} == written
    assert _json(runs["kd"] / "results.json") == before  # the finished stages' own records, timing included
