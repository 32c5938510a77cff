"""Validation and test top-1 reported apart, on hand-worked cases: the run's and the seeds' results, the
tables, the comparison's gain over the CE-only student with the two standard deviations summed, the chart."""

from __future__ import annotations

import statistics

import pytest
from matplotlib.image import imread

from kdfast.compare import gain, table, write_chart
from kdfast.results import TEST_SHOWN, results_table, run_results, seeds_results


def _run(val: float, test: float, baseline_test: float | None = None) -> dict:
    def row(arch: str, top1: float, test_top1: float) -> dict:
        scores = {"top1": top1, "top5": 99.0, "best_top1": top1 + 1, "best_epoch": 2, "test_top1": test_top1}
        timing = {"images_per_s": 100.0, "wall_s": 60.0}
        return {"arch": arch, "params": 10, **scores, "test_top5": 99.5, **timing}

    models = {"teacher": row("small_vgg", 95.0, 94.0), "student": row("small_vgg", val, test)}
    if baseline_test is not None:
        models["baseline"] = row("small_vgg", val - 1, baseline_test)
    return run_results(models, data="fashion_mnist", methods=["kd"])


def test_a_run_reports_validation_and_test_apart() -> None:
    results = _run(90.0, 89.5, 88.0)
    assert results["test"] == TEST_SHOWN
    text = results_table(results)
    assert "| val top-1 last (%) | val top-1 best (%) | val top-5 (%) | test top-1 (%) |" in text
    assert "| distilled student (KD) | small_vgg | 10 | 90.00 | 91.00 (epoch 2) | 99.00 | 89.50 |" in text
    without = run_results({"student": {"arch": "a", "params": 1, "top1": 1.0, "top5": 2.0}}, data="digits",
                          methods=["kd"])  # fmt: skip
    assert "test" not in without and "test top-1" not in results_table(without)


def test_seeds_average_the_test_numbers() -> None:
    summary = seeds_results({0: _run(90.0, 89.0, 87.0), 1: _run(91.0, 90.0, 87.5), 2: _run(92.0, 91.5, 88.5)})
    student = summary["models"]["student"]["test_top1"]
    assert student["mean"] == pytest.approx(statistics.fmean([89.0, 90.0, 91.5]))
    assert student["std"] == pytest.approx(statistics.stdev([89.0, 90.0, 91.5]))
    assert summary["test"] == TEST_SHOWN


def test_gain_is_the_difference_of_means_beside_the_summed_stds(tmp_path) -> None:
    kd = seeds_results({0: _run(90.0, 89.0, 87.0), 1: _run(91.0, 90.0, 87.5), 2: _run(92.0, 91.5, 88.5)})
    # by hand: students 89, 90, 91.5 (mean 90.1667, std 1.2583); CE-only 87, 87.5, 88.5 (87.6667, 0.7638)
    value, spread = gain(kd)
    assert value == pytest.approx(90.1667 - 87.6667, abs=1e-4)
    assert spread == pytest.approx(1.2583 + 0.7638, abs=1e-4)
    close = seeds_results({0: _run(90.0, 88.0, 87.0), 1: _run(91.0, 89.0, 88.9)})
    assert gain(close)[0] == pytest.approx(0.55) and gain(close)[1] > gain(close)[0]
    assert gain(_run(90.0, 89.5)) is None  # no CE-only row
    text = table({"kd": kd, "close": close})
    assert text.splitlines()[0].endswith("| test top-1 (%) | gain over CE-only (points) |")
    assert "| 90.17 ± 1.26 | +2.50 ± 2.02 |" in text.splitlines()[2]
    write_chart({"kd": kd, "close": close}, tmp_path / "chart.png")
    picture = imread(tmp_path / "chart.png")
    assert picture.shape[0] > 200 and picture.std() > 0.05
