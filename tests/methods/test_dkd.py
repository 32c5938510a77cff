"""DKD (Zhao et al. 2022) against a hand-worked case, the reference implementation's formulation (mdistiller's
``DKD.py``, written out here in float64: masks, summed probabilities, the -1000 shift), the paper's
decomposition of KD, finite differences; the warm-up, the loss module, the config and an end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.exports import export_student
from support.runs import TINY_CONFIG, distill_epoch_row, train
from torch._dynamo.testing import CompileCounter

from kdfast.config import CONFIG_DIR, load_config
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.dkd import DKDConfig, DKDLoss, decoupled_kl, dkd_loss, non_target_classes
from kdfast.methods.kd import kd_loss

CONFIG = CONFIG_DIR / "dkd_digits.yaml"


def _logits(
    batch: int = 6, classes: int = 7, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(batch, classes, generator=g, dtype=torch.float64) + 0.3
    teacher = 5 * torch.randn(batch, classes, generator=g, dtype=torch.float64) - 1.0
    return student, teacher, torch.randint(classes, (batch,), generator=g)


def _mdistiller_dkd(student, teacher, target, alpha, beta, temperature):
    """The reference implementation's formulation, line by line (mdistiller/distillers/DKD.py)."""
    gt = torch.zeros_like(student).scatter_(1, target[:, None], 1).bool()
    other = ~gt

    def cat_mask(t):
        return torch.cat([(t * gt).sum(1, keepdim=True), (t * other).sum(1, keepdim=True)], dim=1)

    pred_s = cat_mask(F.softmax(student / temperature, dim=1))
    pred_t = cat_mask(F.softmax(teacher / temperature, dim=1))
    tckd = F.kl_div(torch.log(pred_s), pred_t, reduction="sum") * temperature**2 / target.shape[0]
    part2_t = F.softmax(teacher / temperature - 1000.0 * gt, dim=1)
    log_part2_s = F.log_softmax(student / temperature - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_part2_s, part2_t, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def _z_score(logits: torch.Tensor) -> torch.Tensor:
    """Sun et al., Algorithm 1: (x - mean) / sqrt(1/K sum (x - mean)^2)."""
    mean = logits.mean(1, keepdim=True)
    return (logits - mean) / ((logits - mean) ** 2).mean(1, keepdim=True).sqrt()


def test_hand_computed_three_class_case():
    # teacher p = (1/2, 1/4, 1/4), student p = (1/5, 3/5, 1/5), target 0, tau = 1:
    # b_T = (1/2, 1/2), b_S = (1/5, 4/5); non-target p^_T = (1/2, 1/2), p^_S = (3/4, 1/4)
    teacher = torch.tensor([[math.log(4.0), math.log(2.0), math.log(2.0)]], dtype=torch.float64)
    student = torch.tensor([[0.0, math.log(3.0), 0.0]], dtype=torch.float64)
    target = torch.tensor([0])
    tckd, nckd = decoupled_kl(student, teacher, target, temperature=1.0)
    assert tckd.item() == pytest.approx(0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8), rel=1e-12)
    assert nckd.item() == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25), rel=1e-12)
    # tau = 2: every probability goes with exp(z / 2), teacher (2, sqrt 2, sqrt 2), student (1, sqrt 3, 1),
    # and each KL is multiplied by tau^2 = 4
    r2, r3 = math.sqrt(2), math.sqrt(3)
    bt, bs = 2 / (2 + 2 * r2), 1 / (2 + r3)
    hs = r3 / (r3 + 1)
    expected_t = 4 * (bt * math.log(bt / bs) + (1 - bt) * math.log((1 - bt) / (1 - bs)))
    expected_n = 4 * (0.5 * math.log(0.5 / hs) + 0.5 * math.log(0.5 / (1 - hs)))
    got = dkd_loss(student, teacher, target, alpha=2.0, beta=3.0, temperature=2.0)
    assert got.item() == pytest.approx(2 * expected_t + 3 * expected_n, rel=1e-12)


@pytest.mark.parametrize(("alpha", "beta", "tau"), [(1.0, 8.0, 4.0), (1.0, 0.5, 1.0), (0.3, 2.0, 2.5)])
def test_matches_the_reference_implementation(alpha, beta, tau):
    student, teacher, target = _logits()
    got = dkd_loss(student, teacher, target, alpha=alpha, beta=beta, temperature=tau)
    torch.testing.assert_close(got, _mdistiller_dkd(student, teacher, target, alpha, beta, tau))
    assert got.dtype == torch.float64


def test_gradients_match_the_reference_implementation_and_finite_differences():
    student, teacher, target = _logits(batch=4, classes=5, seed=1)
    a = student.clone().requires_grad_(True)
    b = student.clone().requires_grad_(True)
    dkd_loss(a, teacher, target, alpha=1.0, beta=8.0, temperature=4.0).backward()
    _mdistiller_dkd(b, teacher, target, 1.0, 8.0, 4.0).backward()
    torch.testing.assert_close(a.grad, b.grad)
    for standardize in (False, True):
        assert torch.autograd.gradcheck(
            lambda s, st=standardize: dkd_loss(
                s, teacher, target, alpha=1.0, beta=8.0, temperature=4.0, standardize=st
            ),
            (student.clone().requires_grad_(True),),
        )


def test_classical_kd_is_tckd_plus_teacher_non_target_mass_times_nckd():
    # Zhao et al., Sec. 3.1: KD = TCKD + (1 - p^T_t) NCKD, per sample, at any temperature
    student, teacher, target = _logits(batch=5, classes=6, seed=2)
    tau = 3.0
    for i in range(5):
        s, t, y = student[i : i + 1], teacher[i : i + 1], target[i : i + 1]
        tckd, nckd = decoupled_kl(s, t, y, temperature=tau)
        p_t = F.softmax(t / tau, dim=1)[0, y[0]]
        torch.testing.assert_close(tckd + (1 - p_t) * nckd, kd_loss(s, t, temperature=tau))


def test_non_target_classes_skip_each_target():
    got = non_target_classes(torch.tensor([0, 2, 3]), 4)
    assert got.tolist() == [[1, 2, 3], [0, 1, 3], [0, 1, 2]]


def test_edge_cases_certain_teacher_saturated_student_equal_logits():
    target = torch.tensor([0])
    certain = torch.tensor([[60.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    # a certain teacher and a student that agrees: b_T = b_S = (1 - 3e^-60, 3e^-60), p^ uniform for both
    flat = torch.tensor([[60.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    tckd, nckd = decoupled_kl(flat, certain, target, temperature=1.0)
    assert tckd.item() == pytest.approx(0.0, abs=1e-12) and nckd.item() == pytest.approx(0.0, abs=1e-12)
    # a student saturated at the wrong class, in float32: its non-target mass of the reference form
    # underflows to 0 (log 0 = -inf); here b is in log space, and the float64 reference gives the same number
    saturated = torch.tensor([[0.0, 120.0, 0.0, 0.0]])
    value = dkd_loss(saturated, certain.float(), target, alpha=1.0, beta=8.0, temperature=1.0)
    expected = _mdistiller_dkd(saturated.double(), certain, target, 1.0, 8.0, 1.0)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    # equal logits: uniform student against the certain teacher, finite value and gradient
    same = torch.full((1, 4), 2.5, dtype=torch.float64, requires_grad=True)
    value = dkd_loss(same, certain, target, alpha=1.0, beta=8.0, temperature=4.0, standardize=True)
    torch.testing.assert_close(
        value,
        _mdistiller_dkd(torch.zeros(1, 4, dtype=torch.float64), _z_score(certain), target, 1.0, 8.0, 4.0),
    )
    value.backward()
    assert torch.isfinite(same.grad).all()
    # a batch of one is the per-sample term; student == teacher gives zero
    s, t, y = _logits(batch=1, classes=5, seed=3)
    assert dkd_loss(t, t, y, alpha=1.0, beta=8.0, temperature=4.0).item() == pytest.approx(0.0, abs=1e-12)


def test_standardized_dkd_is_dkd_of_z_scores_and_ignores_scale_and_shift():
    student, teacher, target = _logits(seed=4)
    got = dkd_loss(student, teacher, target, alpha=1.0, beta=8.0, temperature=2.0, standardize=True)
    expected = _mdistiller_dkd(_z_score(student), _z_score(teacher), target, 1.0, 8.0, 2.0)
    torch.testing.assert_close(got, expected)
    scale, shift = torch.rand(6, 1, dtype=torch.float64) * 5 + 0.2, torch.randn(6, 1, dtype=torch.float64)
    moved = dkd_loss(
        student * scale + shift, teacher, target, alpha=1.0, beta=8.0, temperature=2.0, standardize=True
    )
    torch.testing.assert_close(moved, got)


@pytest.mark.parametrize(
    ("warmup", "factors"), [(3, [1 / 3, 2 / 3, 1.0, 1.0]), (1, [1.0] * 4), (0, [1.0] * 4)]
)
def test_warmup_is_min_of_one_based_epoch_over_warmup_and_reaches_a_compiled_step(warmup, factors):
    student, teacher, target = _logits(seed=5)
    loss = DKDLoss(DKDConfig(alpha=0.5, beta=2.0, temperature=3.0, warmup=warmup))
    full = dkd_loss(student, teacher, target, alpha=0.5, beta=2.0, temperature=3.0)
    counter = CompileCounter()
    compiled = torch.compile(lambda s, t, y: loss(s, t, y, {}, {})[0], backend=counter)
    for epoch, factor in enumerate(factors):
        loss.start_epoch(epoch, 240)
        torch.testing.assert_close(compiled(student, teacher, target), factor * full)
    assert counter.frame_count == 1  # the factor is a buffer: a new epoch does not recompile


def test_loss_module_parts_detached_teacher_soft_targets_and_two_heads():
    student, teacher, target = _logits(seed=6)
    student, teacher = student.float().requires_grad_(True), teacher.float().requires_grad_(True)
    loss = DKDLoss(DKDConfig(alpha=2.0, beta=3.0, temperature=4.0, warmup=0))
    term, parts = loss(student, teacher, target, {}, {})
    tckd, nckd = decoupled_kl(student, teacher, target, temperature=4.0)
    torch.testing.assert_close(parts["tckd"], 2.0 * tckd)
    torch.testing.assert_close(parts["nckd"], 3.0 * nckd)
    torch.testing.assert_close(term, parts["tckd"] + parts["nckd"])
    term.backward()
    assert student.grad is not None and teacher.grad is None
    # CutMix soft targets: the class with the larger share is the target
    soft = 0.3 * F.one_hot((target + 1) % 7, 7).float() + 0.7 * F.one_hot(target, 7).float()
    torch.testing.assert_close(loss(student, teacher, soft, {}, {})[0], term)
    with pytest.raises(UsageError, match="method dkd needs the student's logits as one tensor"):
        loss((student, student), teacher, target, {}, {})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.dkd.temperature=0", "'loss.dkd.temperature' must be > 0"),
        ("loss.dkd.beta=-1", "'loss.dkd.beta' must be >= 0"),
        ("loss.dkd.warmup=-2", "'loss.dkd.warmup' must be >= 0"),
        ("loss.dkd.warmup=1.5", "'loss.dkd.warmup' must be int"),
    ],
)
def test_config_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


def test_bundled_config_is_the_papers_cifar_weights():
    section = load_config(CONFIG).loss.sections["dkd"]
    assert (section.alpha, section.beta, section.temperature, section.warmup) == (1.0, 8.0, 4.0, 2)


@pytest.mark.slow
def test_dkd_digits_config_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = train(out, TINY_CONFIG, CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(out / "student.pt", weights_only=True)
    assert ckpt["format"] == "kdfast.student/1" and ckpt["config"]["loss"]["method"] == ["dkd"]
    parts = distill_epoch_row(out)["parts"]
    assert set(parts) == {"ce", "dkd", "dkd/tckd", "dkd/nckd"}
    assert parts["dkd"] == pytest.approx(parts["dkd/tckd"] + parts["dkd/nckd"], rel=1e-5)
    export_student(out)
