"""``python -m kdfast.train`` with the teacher-output cache: with deterministic views a cached run trains as
the uncached run does; the output and results.json say which mode ran and why a run cannot use the cache; a
cache that does not match stops the run in one line (exit 2) without touching the earlier run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from support.runs import TINY, TINY_CONFIG, train

from kdfast.config import config_path


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("KDFAST_CACHE_DIR", str(folder))  # the subprocess runs inherit it
    return folder


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == "distill"]


@pytest.mark.slow
def test_a_cached_run_with_deterministic_views_trains_as_the_uncached_run(
    tmp_path: Path, cache_dir: Path
) -> None:
    # KD reads the teacher's logits, which the cache keeps in float32; no augmentation: one view per image
    common = [
        *TINY_CONFIG,
        "data.image_size=16",
        "teacher.arch.kwargs.image_size=16",
        "data.augment.crop_padding=0",
        "runtime.threads=1",
        "runtime.log_every=1",
    ]
    live = train(tmp_path / "live", [*common, "runtime.teacher_cache=false"], config_path("kd_digits"))
    cached = train(tmp_path / "cached", [*common, "runtime.teacher_cache=true"], config_path("kd_digits"))
    assert live.returncode == 0 and cached.returncode == 0, live.stderr + cached.stderr
    assert "teacher: runs at every step" in live.stdout
    assert "teacher: outputs cached, one view per image" in cached.stdout
    assert "teacher cache: computing 64 images x 1 view(s)" in cached.stdout
    runtime = json.loads((tmp_path / "cached" / "results.json").read_text())["runtime"]
    assert runtime["teacher_cache"]["mode"] == "deterministic" and runtime["teacher_cache"]["hit"] is False
    assert Path(runtime["teacher_cache"]["path"]).parent == cache_dir / "teacher"
    assert (
        json.loads((tmp_path / "live" / "results.json").read_text())["runtime"]["teacher_cache"]["mode"]
        == "off"
    )

    live_rows, cached_rows = _rows(tmp_path / "live"), _rows(tmp_path / "cached")
    assert len(live_rows) == len(cached_rows) > 2
    for a, b in zip(live_rows, cached_rows, strict=True):
        assert (a["step"], a["split"], a["scope"]) == (b["step"], b["split"], b["scope"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["parts"] == pytest.approx(a["parts"], rel=1e-5)
    ours = torch.load(tmp_path / "cached" / "student.pt", weights_only=True)["state_dict"]
    theirs = torch.load(tmp_path / "live" / "student.pt", weights_only=True)["state_dict"]
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_replayed_views_are_said_and_a_mismatching_cache_stops_the_run_in_one_line(
    tmp_path: Path, cache_dir: Path
) -> None:
    args = [
        *TINY,
        "baseline=false",
        "teacher.train.epochs=0",
        "runtime.threads=1",
        "runtime.teacher_cache=true",
        "runtime.teacher_cache_views=2",
    ]
    first = train(tmp_path / "run", args)
    assert first.returncode == 0, first.stderr
    assert "teacher: outputs cached, 2 augmented views per image replayed to the student" in first.stdout
    runtime = json.loads((tmp_path / "run" / "results.json").read_text())["runtime"]
    assert runtime["teacher_cache"]["mode"] == "replay" and runtime["teacher_cache"]["views"] == 2
    folder = Path(runtime["teacher_cache"]["path"])

    again = train(tmp_path / "run", args)  # the untrained teacher starts from the same seed: the same cache
    assert again.returncode == 0, again.stderr
    assert f"teacher cache: hit, {folder}" in again.stdout

    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    logits = folder / "logits.npy"
    np.save(logits, np.load(logits) * 2)
    refused = train(tmp_path / "run", args)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert f"teacher cache {folder} does not match this run (its logits differs" in lines[0]
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before


def test_a_run_that_cannot_use_the_cache_says_why(tmp_path: Path, cache_dir: Path) -> None:
    refused = train(tmp_path / "mixed", [*TINY, "data.augment.cutmix=1.0", "runtime.teacher_cache=true"])
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "kdfast.train: error: runtime.teacher_cache=true, but data.augment.cutmix / mixup mix two images of "
        "a batch after the views are drawn, and the teacher's output of a mix is not the mix of its outputs: "
        "set runtime.teacher_cache=auto or false"
    )
    assert not (tmp_path / "mixed").exists() and not cache_dir.exists()
