"""``torchrun --nproc_per_node 2 -m kdfast.train`` on CPU (gloo): the run completes, rank 0 alone writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.runs import TINY, recompute_metrics, set_args


@pytest.mark.slow
def test_two_process_gloo_run_completes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "kdfast.train",
        "--out",
        str(out),
        *set_args(TINY),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(out / "student.pt", weights_only=True)
    assert ckpt["format"] == "kdfast.student/1"
    # Only rank 0 writes metrics: one validation row per stage epoch, not one per rank.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows if r["split"] == "val"] == ["teacher", "baseline", "distill"]
    # 64 images, 2 ranks, batch 32: one step per rank per epoch, so each stage ends at step 1.
    assert {r["step"] for r in rows} == {1}
    # Validation is sharded over ranks and all-reduced: the metric counts every one of the 48 images.
    _, top1, top5, _ = recompute_metrics(ckpt, expect_images=48)
    assert ckpt["metrics"]["top1"] == pytest.approx(top1, abs=1e-6)
    assert ckpt["metrics"]["top5"] == pytest.approx(top5, abs=1e-6)
    assert result.stdout.count("| distilled student (KD + AGKD) |") == 1


@pytest.mark.slow
def test_two_process_gloo_run_over_seeds_claims_one_folder_for_both_ranks(tmp_path: Path) -> None:
    """``torchrun ... --seeds 0,1`` into a folder that holds an earlier run: rank 0 claims a fresh numbered
    folder and rank 1 must write into the same one (not the requested folder); each seed is a complete
    DDP run of its own, and the summary is the mean and sample std of the seeds' own checkpoints."""
    out = tmp_path / "run"
    out.mkdir()
    earlier = {"config.yaml": b"out: run\n", "metrics.jsonl": b'{"stage": "teacher"}\n'}
    for name, data in earlier.items():
        (out / name).write_bytes(data)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "kdfast.train", "--out", str(out), "--seeds", "0,1",
        *set_args([*TINY, "teacher.train.epochs=0", "baseline=false"]),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    second = tmp_path / "run-2"
    assert sorted(p.name for p in second.iterdir()) == [
        "config.yaml",
        "results.json",
        "results.md",
        "seed0",
        "seed1",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run-2"]
    top1 = []
    for seed in (0, 1):
        ckpt = torch.load(second / f"seed{seed}" / "student.pt", weights_only=True)
        top1.append(recompute_metrics(ckpt, expect_images=48)[1])
        rows = [
            json.loads(line) for line in (second / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["stage"] for r in rows if r["split"] == "val"] == ["distill"]  # rank 0 alone writes
    summary = json.loads((second / "results.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["runs"] == ["seed0", "seed1"]
    entry = summary["models"]["student"]["top1"]
    # The last epoch's student is the checkpoint (one epoch): its top-1 recomputed from student.pt.
    assert entry["values"] == pytest.approx(top1, abs=1e-6)
    assert entry["mean"] == pytest.approx(sum(top1) / 2, abs=1e-6)
    assert entry["std"] == pytest.approx(abs(top1[0] - top1[1]) / 2**0.5, abs=1e-6)
    line = f"| {entry['mean']:.2f} ± {entry['std']:.2f} | "  # top-1 last (and best: one epoch)
    assert line in (second / "results.md").read_text()
    # Each seed's table and the summary, printed by rank 0 alone (twice as many with both ranks printing).
    assert result.stdout.count("| distilled student (KD + AGKD) |") == 3
