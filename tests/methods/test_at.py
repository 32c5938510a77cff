"""AT (Zagoruyko & Komodakis 2017) against a hand-worked case and the paper's map and distance written out in
float64 (channel sum, explicit L2 norms), gradients included; different channel counts and grids; the method
module and its config; KD + AT and the digits config end to end through training and export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.devices import KERNEL_DEVICE
from support.exports import export_student
from support.runs import TINY_CONFIG, distill_epoch_row, train

from kdfast.config import CONFIG_DIR, TapConfig, load_config
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.at import ATConfig, ATLoss, at_loss
from kdfast.methods.base import FeaturePair

CONFIG = CONFIG_DIR / "at_digits.yaml"


def paper_at(student: torch.Tensor, teacher: torch.Tensor, p: float = 2) -> torch.Tensor:
    """Eq. 1 and 2 as the paper writes them, squared as the authors' code: Q = vec(sum_c |F_c|^p), each
    divided by its L2 norm, then the squared distance summed over the h*w positions and averaged over the
    batch and the positions."""
    q_s = student.abs().pow(p).sum(1).flatten(1)
    q_t = teacher.abs().pow(p).sum(1).flatten(1)
    q_s = q_s / q_s.norm(dim=1, keepdim=True)
    q_t = q_t / q_t.norm(dim=1, keepdim=True)
    return ((q_s - q_t) ** 2).sum(1).mean() / q_s.shape[1]


def features(batch: int, channels: int, side: int, seed: int) -> torch.Tensor:
    """Post-ReLU-like activations: non-negative, sparse, with a spatial structure."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, side, side, generator=g, dtype=torch.float64)
    return F.relu(x + torch.linspace(-0.5, 1.0, side, dtype=torch.float64))


def test_hand_computed_two_by_two_case():
    # student: two channels active at the top-left only -> sum_c |F|^2 = [2, 0, 0, 0] -> q_S = [1, 0, 0, 0];
    # teacher: one constant channel -> q_T = [1/2, 1/2, 1/2, 1/2]; squared differences 1/4 each, mean 1/4
    student = torch.zeros(1, 2, 2, 2)
    student[0, :, 0, 0] = 1.0
    teacher = torch.full((1, 1, 2, 2), 3.0)
    assert at_loss(student, teacher).item() == pytest.approx(0.25, rel=1e-6)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_matches_the_paper_with_channel_sums_for_different_channel_counts(p):
    student = features(3, 5, 6, seed=0).requires_grad_(True)
    teacher = features(3, 9, 6, seed=1)
    loss = at_loss(student, teacher, p=p)
    expected = paper_at(student, teacher, p)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, expected_grad)


def test_a_larger_map_is_compared_on_the_smaller_grid_as_its_two_by_two_average():
    student = features(2, 4, 8, seed=2).requires_grad_(True)
    teacher = features(2, 6, 4, seed=3)
    loss = at_loss(student, teacher)
    # the map of the 8x8 student, averaged over 2x2 cells (what a bilinear halving is), then eq. 2
    pooled = F.avg_pool2d(student.pow(2).sum(1, keepdim=True), 2)
    q_s = pooled.flatten(1) / pooled.flatten(1).norm(dim=1, keepdim=True)
    q_t = teacher.pow(2).sum(1).flatten(1)
    q_t = q_t / q_t.norm(dim=1, keepdim=True)
    expected = ((q_s - q_t) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, expected_grad)
    # the other way round meets on the same grid
    torch.testing.assert_close(at_loss(teacher, student), expected.detach())


def test_edge_cases_equal_scaled_and_one_hot_maps_and_a_batch_of_one():
    student = features(1, 4, 4, seed=4).requires_grad_(True)
    # equal maps, also when the teacher is the student scaled: zero loss and zero gradient
    for teacher in (student.detach(), 7.0 * student.detach()):
        loss = at_loss(student, teacher)
        assert loss.item() == pytest.approx(0.0, abs=1e-14)
        (grad,) = torch.autograd.grad(loss, student)
        assert grad.abs().max().item() < 1e-12
    # a teacher whose attention is one position k: mean (q_S - e_k)^2 = (2 - 2 q_S[k]) / (h w)
    teacher = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    teacher[0, 0, 2, 1] = 5.0
    q_s = student.detach().pow(2).sum(1).flatten(1)
    q_s = q_s / q_s.norm()
    expected = (2 - 2 * q_s[0, 2 * 4 + 1]) / 16
    assert at_loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-10)


def test_the_triton_kernel_path_gives_the_reference_loss_and_gradients():
    student = features(2, 3, 7, seed=5).float().to(KERNEL_DEVICE).requires_grad_(True)
    teacher = features(2, 5, 5, seed=6).float().to(KERNEL_DEVICE)
    results = []
    for impl in ("reference", "triton"):
        loss = at_loss(student, teacher, impl=impl)
        results.append((loss, *torch.autograd.grad(loss, student)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-8)


def _loss() -> tuple[ATLoss, dict[str, TapConfig], dict[str, TapConfig]]:
    student_taps = {"s1": TapConfig(path="a"), "s2": TapConfig(path="b")}
    teacher_taps = {"t1": TapConfig(path="c"), "t2": TapConfig(path="d")}
    pairs = [FeaturePair("s1", "t1"), FeaturePair("s2", "t2")]
    return ATLoss(ATConfig(pairs=pairs), student_taps, teacher_taps), student_taps, teacher_taps


def test_loss_module_sums_its_pairs_detaches_the_teacher_and_draws_its_maps():
    loss_fn, _, _ = _loss()
    s1, s2 = features(2, 4, 8, 7).requires_grad_(True), features(2, 8, 4, 8).requires_grad_(True)
    t1, t2 = features(2, 6, 8, 9).requires_grad_(True), features(2, 3, 2, 10).requires_grad_(True)
    student, teacher = {"s1": s1, "s2": s2}, {"t1": t1, "t2": t2}
    loss_fn.check(student, teacher)
    logits = torch.zeros(2, 3)
    term, parts = loss_fn(logits, logits, torch.zeros(2, dtype=torch.long), student, teacher)
    assert set(parts) == {"s1-t1", "s2-t2"}
    torch.testing.assert_close(parts["s1-t1"], paper_at(s1, t1))
    torch.testing.assert_close(term, sum(parts.values()))
    term.backward()
    assert s1.grad.abs().sum() > 0 and s2.grad.abs().sum() > 0
    assert t1.grad is None and t2.grad is None
    maps = loss_fn.maps(student, teacher)
    assert [tuple(m.shape) for pair in maps for m in pair] == [(2, 8, 8)] * 2 + [(2, 2, 2)] * 2
    torch.testing.assert_close(maps[0][0].flatten(1).norm(dim=1), torch.ones(2, dtype=torch.float64))


def test_vit_tokens_are_read_on_their_patch_grid():
    loss_fn, _, _ = _loss()
    tokens = torch.randn(2, 1 + 16, 12, dtype=torch.float64)  # CLS + a 4x4 grid of width 12
    grid = tokens[:, 1:].transpose(1, 2).reshape(2, 12, 4, 4)
    cnn = features(2, 5, 4, 11)
    student, teacher = {"s1": cnn, "s2": cnn}, {"t1": tokens, "t2": tokens}
    _, parts = loss_fn(None, None, None, student, teacher)
    torch.testing.assert_close(parts["s1-t1"], paper_at(cnn, grid))


def test_check_rejects_a_one_position_grid_and_different_batch_sizes():
    loss_fn, _, _ = _loss()
    fine = features(2, 4, 4, 12)
    with pytest.raises(UsageError, match="1 x 1 grid"):
        loss_fn.check({"s1": fine, "s2": torch.randn(2, 8)}, {"t1": fine, "t2": fine})
    with pytest.raises(UsageError, match="batch sizes 2 and 3 differ"):
        loss_fn.check({"s1": fine, "s2": fine}, {"t1": features(3, 4, 4, 13), "t2": fine})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.at.pairs=[]", "loss.at.pairs is empty"),
        ("loss.at.pairs=[{student: s9, teacher: t1}]", "loss.at.pairs[0].student names no student tap 's9'"),
        ("loss.at.p=0", "config key 'loss.at.p' must be > 0"),
    ],
)
def test_config_validation(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(CONFIG, [override])
    assert message in str(error.value)


@pytest.mark.slow
def test_at_digits_config_trains_and_its_student_exports(tmp_path):
    out = tmp_path / "run"
    result = train(out, TINY_CONFIG, CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(out / "student.pt", weights_only=True)
    assert ckpt["config"]["loss"]["method"] == ["at"]
    parts = distill_epoch_row(out)["parts"]
    assert set(parts) == {"ce", "at", "at/s1-t1", "at/s2-t2", "at/s3-t3"}
    assert parts["at"] == pytest.approx(250.0 * sum(parts[f"at/s{i}-t{i}"] for i in (1, 2, 3)), rel=1e-5)
    export_student(out)


@pytest.mark.slow
def test_kd_plus_at_config_runs_with_each_term_logged(tmp_path):
    out = tmp_path / "run"
    result = train(out, TINY_CONFIG, CONFIG_DIR / "kd_at_digits.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    row = distill_epoch_row(out)
    parts = row["parts"]
    assert {"ce", "kd", "at", "at/s1-t1"} <= set(parts)
    assert row["loss"] == pytest.approx(parts["ce"] + parts["kd"] + parts["at"], rel=1e-5)
