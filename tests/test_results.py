"""kdfast.results on hand-worked cases: last and best epoch, running throughput and wall time, the seeds
summary, the tables; and the ``--seeds`` argument's errors."""

from __future__ import annotations

import pytest

from kdfast.results import fmt, results_table, run_results, seeds_results, stage_metrics
from kdfast.train import main


def test_stage_metrics_keep_the_last_and_the_first_best_epoch() -> None:
    metrics: dict = {}
    # top-1 per epoch 50, 70, 70, 60: the last is 60, the best 70 first reached at epoch 2
    for epoch, (top1, speed, seconds) in enumerate(
        [(50, 100, 10), (70, 200, 12), (70, 300, 11), (60, 400, 9)], 1
    ):
        validation = {"top1": top1, "top5": 90.0, "loss": 1.0}
        metrics = stage_metrics(
            metrics, validation, epoch=epoch, train_loss=0.5, images_per_s=speed, seconds=seconds
        )
    assert metrics["top1"] == 60 and metrics["epochs"] == 4
    assert (metrics["best_top1"], metrics["best_epoch"]) == (70, 2)
    assert metrics["images_per_s"] == pytest.approx((100 + 200 + 300 + 400) / 4)
    assert metrics["wall_s"] == pytest.approx(42)


def _run(top1: float, best: float) -> dict:
    row = {"arch": "resnet8", "params": 10, "top1": top1, "top5": 99.0, "best_top1": best, "best_epoch": 3}
    teacher = {"arch": "resnet20", "params": 20, "top1": 80.0, "top5": 99.0, "loss": 0.5}
    return run_results({"teacher": teacher, "student": row}, data="digits", methods=["kd"])


def test_seeds_summary_mean_and_sample_std() -> None:
    summary = seeds_results({0: _run(70.0, 72.0), 1: _run(72.0, 72.5), 2: _run(74.0, 73.0)})
    student = summary["models"]["student"]
    assert student["top1"] == {"mean": 72.0, "std": pytest.approx(2.0), "values": [70.0, 72.0, 74.0]}
    assert student["best_top1"]["mean"] == pytest.approx(72.5) and student["best_top1"][
        "std"
    ] == pytest.approx(0.5)
    # a teacher read from a file has no best epoch or timing: unknown, not zero
    assert summary["models"]["teacher"]["best_top1"]["mean"] is None
    assert summary["seeds"] == [0, 1, 2] and summary["runs"] == ["seed0", "seed1", "seed2"]
    table = results_table(summary)
    assert "| distilled student (KD) | resnet8 | 10 | 72.00 ± 2.00 | 72.50 ± 0.50 | 99.00 ± 0.00 |" in table
    assert "| teacher | resnet20 | 20 | 80.00 ± 0.00 | - |" in table
    one = seeds_results({5: _run(70.0, 71.0)})["models"]["student"]["top1"]
    assert one["std"] is None and fmt(one) == "70.00"


def test_one_runs_table_shows_the_best_epoch() -> None:
    assert "| distilled student (KD) | resnet8 | 10 | 70.00 | 72.00 (epoch 3) | 99.00 |" in results_table(
        _run(70, 72)
    )


def test_a_model_trained_for_no_epochs_has_no_row() -> None:
    # a teacher-only run: the student stage had 0 epochs, its chance-level numbers are not a result
    teacher = {"arch": "resnet20", "params": 20, "top1": 80.0, "top5": 99.0, "best_top1": 81.0}
    student = {"arch": "resnet8", "params": 10, "top1": 9.0, "top5": 50.0, "epochs": 0}
    table = results_table(
        run_results({"teacher": teacher, "student": student}, data="digits", methods=["kd"])
    )
    assert "| teacher | resnet20 |" in table
    assert "distilled student" not in table and "| 9.00 |" not in table


@pytest.mark.parametrize(
    ("seeds", "message"),
    [("0,x", "--seeds: takes comma-separated integers"), ("1,1", "'seeds' must list distinct seeds >= 0")],
)
def test_bad_seeds_are_one_line(seeds: str, message: str, capsys: pytest.CaptureFixture, tmp_path) -> None:
    assert main(["--seeds", seeds, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "run").exists()
