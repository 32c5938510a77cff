"""KD (Hinton et al. 2015) and logit standardization (Sun et al. 2024) against hand-worked cases, F.kl_div and
the papers' formulas written out in float64, gradients included; the method module, its config and the
end-to-end runs of the two KD configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.exports import export_student
from support.runs import TINY_CONFIG, distill_epoch_row, train

from kdfast.config import CONFIG_DIR, load_config
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.kd import KDConfig, KDLoss, kd_loss
from kdfast.methods.logits import standardize_logits


def _logits(batch: int = 5, classes: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(batch, classes, generator=g, dtype=torch.float64) + 0.5
    teacher = 6 * torch.randn(batch, classes, generator=g, dtype=torch.float64) - 1.0
    return student, teacher


def _z_score(logits: torch.Tensor) -> torch.Tensor:
    """Sun et al., Algorithm 1, line by line: mean, sigma = sqrt(1/K sum (x - mean)^2), (x - mean) / sigma."""
    k = logits.shape[1]
    mean = logits.sum(1, keepdim=True) / k
    sigma = torch.sqrt(((logits - mean) ** 2).sum(1, keepdim=True) / k)
    return (logits - mean) / sigma


def test_hand_computed_two_class_case():
    # p_T = (3/4, 1/4), p_S = (1/2, 1/2): KL(p_T || p_S) = 3/4 ln(3/2) + 1/4 ln(1/2); tau = 1
    student, teacher = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_loss(student, teacher, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    # at tau = 2 the teacher's logit gap halves: p_T = (sqrt 3, 1) / (sqrt 3 + 1), and the tau^2 factor is 4
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    at_two = 4 * (p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p)))
    assert kd_loss(student, teacher, temperature=2.0).item() == pytest.approx(at_two, rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_matches_f_kl_div_and_its_gradient_is_tau_times_the_probability_gap(tau):
    student, teacher = _logits()
    student.requires_grad_(True)
    loss = kd_loss(student, teacher, temperature=tau)
    p_s, p_t = F.softmax(student / tau, 1), F.softmax(teacher / tau, 1)
    expected = F.kl_div(p_s.log(), p_t, reduction="batchmean") * tau**2
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert loss.dtype == torch.float64
    loss.backward()
    # d/dz_S of tau^2 KL(p_T || softmax(z_S / tau)), batch mean: tau (p_S - p_T) / B
    torch.testing.assert_close(student.grad, tau * (p_s - p_t).detach() / student.shape[0])


def test_edge_cases_certain_teacher_equal_logits_batch_of_one():
    student, _ = _logits(batch=1, classes=4)
    certain = torch.tensor([[60.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    # a one-hot teacher turns KL into the student's cross-entropy on the teacher's class (its entropy is 0)
    torch.testing.assert_close(
        kd_loss(student, certain, temperature=1.0), F.cross_entropy(student, torch.tensor([0]))
    )
    same = torch.full((1, 4), 2.5, dtype=torch.float64)
    assert kd_loss(same, same + 7.0, temperature=3.0).item() == pytest.approx(0.0, abs=1e-12)
    # equal logits have sigma = 0: standardized they are zeros (uniform), not NaN, and so is the gradient
    flat = same.clone().requires_grad_(True)
    value = kd_loss(flat, certain, temperature=2.0, standardize=True)
    z_t = _z_score(certain)
    p_t = F.softmax(z_t / 2.0, 1)
    torch.testing.assert_close(value, 4.0 * (p_t * (p_t * 4).log()).sum())
    value.backward()
    assert torch.isfinite(flat.grad).all()


def test_standardize_is_algorithm_1():
    student, teacher = _logits(seed=3)
    torch.testing.assert_close(standardize_logits(student), _z_score(student))
    z = standardize_logits(teacher)
    torch.testing.assert_close(z.mean(1), torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(z.square().mean(1), torch.ones(5, dtype=torch.float64))


def test_standardized_kd_is_algorithm_2_and_ignores_each_samples_logit_scale_and_shift():
    student, teacher = _logits(seed=4)
    tau = 2.0
    p_s, p_t = F.softmax(_z_score(student) / tau, 1), F.softmax(_z_score(teacher) / tau, 1)
    expected = tau**2 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    got = kd_loss(student, teacher, temperature=tau, standardize=True)
    torch.testing.assert_close(got, expected)
    # Sun et al., Sec. 4.3: the student need not match the teacher's logit range, only its relations
    scale, shift = torch.rand(5, 1, dtype=torch.float64) * 10 + 0.1, torch.randn(5, 1, dtype=torch.float64)
    moved = kd_loss(student * scale + shift, teacher, temperature=tau, standardize=True)
    torch.testing.assert_close(moved, got)
    assert kd_loss(student * scale + shift, teacher, temperature=tau).item() != pytest.approx(
        kd_loss(student, teacher, temperature=tau).item()
    )


def test_standardized_gradients_match_finite_differences():
    student, teacher = _logits(batch=3, classes=5, seed=6)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: kd_loss(s, teacher, temperature=3.0, standardize=True), (student,)
    )


def test_loss_module_detaches_the_teacher_and_rejects_two_head_logits():
    student, teacher = _logits()
    student, teacher = student.float().requires_grad_(True), teacher.float().requires_grad_(True)
    term, parts = KDLoss(KDConfig(temperature=3.0, standardize=True))(student, teacher, None, {}, {})
    torch.testing.assert_close(term, kd_loss(student, teacher, temperature=3.0, standardize=True))
    assert parts == {}
    term.backward()
    assert student.grad is not None and teacher.grad is None
    with pytest.raises(UsageError, match="method kd needs the student's logits as one tensor"):
        KDLoss(KDConfig())((student, student), teacher, None, {}, {})
    with pytest.raises(ConfigError, match="'loss.kd.temperature' must be > 0"):
        KDLoss(KDConfig(temperature=0.0))


def test_config_section():
    cfg = load_config(None, ["loss.kd={weight: 0.7, temperature: 2, standardize: true}"]).loss
    assert cfg.sections["kd"] == KDConfig(weight=0.7, temperature=2.0, standardize=True)
    with pytest.raises(ConfigError, match="'loss.kd.standardize' must be bool"):
        load_config(None, ["loss.kd.standardize=maybe"])


def test_logit_standardization_config_is_the_authors_recipe():
    cfg = load_config(CONFIG_DIR / "kd_ls_digits.yaml").loss
    assert cfg.ce == 0.1
    assert cfg.sections["kd"] == KDConfig(weight=9.0, temperature=2.0, standardize=True)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["kd_digits.yaml", "kd_ls_digits.yaml"])
def test_kd_digits_configs_run_end_to_end(tmp_path, config):
    out = tmp_path / "run"
    result = train(out, TINY_CONFIG, CONFIG_DIR / config)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(out / "student.pt", weights_only=True)
    assert ckpt["format"] == "kdfast.student/1" and ckpt["config"]["loss"]["method"] == ["kd"]
    assert set(distill_epoch_row(out)["parts"]) == {"ce", "kd"}
    export_student(out)
