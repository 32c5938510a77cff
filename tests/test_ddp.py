"""``torchrun --nproc_per_node 2 -m kdfast.train`` on CPU (gloo): the run completes, rank 0 alone writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import TINY, recompute_metrics, set_args


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
