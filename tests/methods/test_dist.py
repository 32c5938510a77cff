"""DIST (Huang et al. 2022) against a hand-worked case, Pearson's correlation from ``torch.corrcoef`` row by
row and column by column, finite differences; a batch of one, equal logits, a certain teacher; the loss
module, the config and an end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch
from support.exports import export_student
from support.runs import TINY_CONFIG, distill_epoch_row, train

from kdfast.config import CONFIG_DIR, load_config
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.dist import DISTConfig, DISTLoss, dist_loss, dist_relations, intra_class_relation

CONFIG = CONFIG_DIR / "dist_digits.yaml"


def _logits(batch: int = 6, classes: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(batch, classes, generator=g, dtype=torch.float64) + 0.3
    teacher = 4 * torch.randn(batch, classes, generator=g, dtype=torch.float64) - 1.0
    return student, teacher


def _pearson(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pearson's correlation of two vectors, from torch.corrcoef."""
    return torch.corrcoef(torch.stack([u, v]))[0, 1]


def _z_score(logits: torch.Tensor) -> torch.Tensor:
    mean = logits.mean(1, keepdim=True)
    return (logits - mean) / ((logits - mean) ** 2).mean(1, keepdim=True).sqrt()


def test_hand_computed_single_sample():
    # teacher p = (1, 2, 5) / 8, student p = (1, 1, 2) / 4: centred they are (-5, -2, 7) / 24 and
    # (-1, -1, 2) / 12, inner product 21 / 288, norms sqrt(78) / 24 and sqrt(6) / 12, so
    # rho = (21 / 288) / (sqrt(468) / 288 + eps) with the authors' eps = 1e-8 (21 / sqrt(468) without).
    # One sample: each class column has no variance, so L_intra = 1.
    teacher = torch.log(torch.tensor([[1.0, 2.0, 5.0]], dtype=torch.float64))
    student = torch.log(torch.tensor([[1.0, 1.0, 2.0]], dtype=torch.float64))
    rho = (21 / 288) / (math.sqrt(468) / 288 + 1e-8)
    inter, intra = dist_relations(student, teacher, temperature=1.0)
    assert inter.item() == pytest.approx(1 - rho, rel=1e-12)
    assert intra.item() == 1.0
    assert dist_loss(student, teacher, beta=2.0, gamma=3.0, temperature=1.0).item() == pytest.approx(
        2 * (1 - rho) + 3.0, rel=1e-12
    )


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_relations_are_one_minus_pearson_over_rows_and_columns_times_tau_squared(tau):
    student, teacher = _logits()
    y_s, y_t = torch.softmax(student / tau, 1), torch.softmax(teacher / tau, 1)
    inter = 1 - torch.stack([_pearson(y_s[i], y_t[i]) for i in range(6)]).mean()
    intra = 1 - torch.stack([_pearson(y_s[:, j], y_t[:, j]) for j in range(5)]).mean()
    # corrcoef has no eps; the authors' eps = 1e-8 beside norms products of 1e-3..1e-1 moves rho by < 1e-5
    close = {"rtol": 1e-5, "atol": 0.0}
    got_inter, got_intra = dist_relations(student, teacher, temperature=tau)
    torch.testing.assert_close(got_inter, tau**2 * inter, **close)
    torch.testing.assert_close(got_intra, tau**2 * intra, **close)
    got = dist_loss(student, teacher, beta=0.7, gamma=1.3, temperature=tau)
    torch.testing.assert_close(got, tau**2 * (0.7 * inter + 1.3 * intra), **close)
    assert got.dtype == torch.float64


def test_gradients_match_finite_differences():
    student, teacher = _logits(batch=4, classes=5, seed=1)
    for standardize in (False, True):
        assert torch.autograd.gradcheck(
            lambda s, st=standardize: dist_loss(
                s, teacher, beta=1.0, gamma=2.0, temperature=4.0, standardize=st
            ),
            (student.clone().requires_grad_(True),),
        )


def test_batch_of_one_intra_is_the_constant_tau_squared_and_only_inter_teaches():
    student, teacher = _logits(batch=1, seed=2)
    student.requires_grad_(True)
    inter, intra = dist_relations(student, teacher, temperature=2.0)
    assert intra.item() == 4.0
    (grad,) = torch.autograd.grad(intra, student, retain_graph=True, allow_unused=True)
    assert grad is None or torch.count_nonzero(grad) == 0
    y_s, y_t = torch.softmax(student / 2, 1)[0], torch.softmax(teacher / 2, 1)[0]
    torch.testing.assert_close(inter, 4.0 * (1 - _pearson(y_s, y_t)), rtol=1e-5, atol=0.0)
    (grad,) = torch.autograd.grad(inter, student)
    assert torch.count_nonzero(grad) > 0


def test_edge_cases_equal_logits_and_certain_teacher():
    # equal student logits: uniform predictions have no variance across classes, so rho = 0 per sample
    teacher = torch.tensor([[60.0, 0.0, 0.0, 0.0], [0.0, 0.0, 60.0, 0.0]], dtype=torch.float64)
    flat = torch.full((2, 4), 1.5, dtype=torch.float64, requires_grad=True)
    inter, _ = dist_relations(flat, teacher, temperature=1.0)
    assert inter.item() == pytest.approx(1.0, abs=1e-12)
    inter.backward()
    assert torch.isfinite(flat.grad).all()
    # a certain teacher and a student that agrees: every row correlates perfectly; of the class columns, the
    # two classes no sample predicts hold the same e^-60 in both rows, no variance, so they count as
    # uncorrelated (d_p = 1) and L_intra = (0 + 1 + 0 + 1) / 4
    inter, intra = dist_relations(teacher, teacher, temperature=1.0)
    assert inter.item() == pytest.approx(0.0, abs=1e-7) and intra.item() == pytest.approx(0.5, abs=1e-7)
    # the teacher's certainty does not blow up a disagreeing student's relation
    student, _ = _logits(batch=2, classes=4, seed=3)
    inter, intra = dist_relations(student, teacher, temperature=1.0)
    y_s, y_t = torch.softmax(student, 1), torch.softmax(teacher, 1)
    expected = 1 - (_pearson(y_s[0], y_t[0]) + _pearson(y_s[1], y_t[1])) / 2
    torch.testing.assert_close(inter, expected, rtol=1e-5, atol=0.0)


def test_intra_class_relation_is_inter_on_the_transpose():
    student, teacher = _logits(seed=4)
    y_s, y_t = torch.softmax(student, 1), torch.softmax(teacher, 1)
    expected = 1 - torch.stack([_pearson(y_s[:, j], y_t[:, j]) for j in range(5)]).mean()
    torch.testing.assert_close(intra_class_relation(y_s, y_t), expected)


def test_standardized_dist_is_dist_of_z_scores():
    student, teacher = _logits(seed=5)
    got = dist_loss(student, teacher, beta=1.0, gamma=1.0, temperature=2.0, standardize=True)
    expected = dist_loss(_z_score(student), _z_score(teacher), beta=1.0, gamma=1.0, temperature=2.0)
    torch.testing.assert_close(got, expected)
    assert got.item() != pytest.approx(
        dist_loss(student, teacher, beta=1.0, gamma=1.0, temperature=2.0).item()
    )


def test_loss_module_parts_and_detached_teacher():
    student, teacher = _logits(seed=6)
    student, teacher = student.float().requires_grad_(True), teacher.float().requires_grad_(True)
    loss = DISTLoss(DISTConfig(beta=2.0, gamma=0.5, temperature=3.0))
    term, parts = loss(student, teacher, torch.zeros(6, dtype=torch.long), {}, {})
    inter, intra = dist_relations(student, teacher, temperature=3.0)
    torch.testing.assert_close(parts["inter"], 2.0 * inter)
    torch.testing.assert_close(parts["intra"], 0.5 * intra)
    torch.testing.assert_close(term, parts["inter"] + parts["intra"])
    term.backward()
    assert student.grad is not None and teacher.grad is None
    with pytest.raises(UsageError, match="method dist needs the student's logits as one tensor"):
        loss((student, student), teacher, None, {}, {})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.dist.temperature=0", "'loss.dist.temperature' must be > 0"),
        ("loss.dist.gamma=-0.5", "'loss.dist.gamma' must be >= 0"),
        ("loss.dist.standardize=sometimes", "'loss.dist.standardize' must be bool"),
    ],
)
def test_config_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


@pytest.mark.slow
def test_dist_digits_config_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = train(out, TINY_CONFIG, CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(out / "student.pt", weights_only=True)
    assert ckpt["format"] == "kdfast.student/1" and ckpt["config"]["loss"]["method"] == ["dist"]
    parts = distill_epoch_row(out)["parts"]
    assert set(parts) == {"ce", "dist", "dist/inter", "dist/intra"}
    assert parts["dist"] == pytest.approx(parts["dist/inter"] + parts["dist/intra"], rel=1e-5)
    export_student(out)
