"""RKD (Park et al. 2019) against a hand-worked triangle, the authors' / mdistiller's formulation written out
in float64 (expanded pairwise distances, the mean over positive distances, F.normalize angles), finite
differences; a batch of one, a student that embeds two samples alike; the loss module on real taps, the
config and an end-to-end run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.exports import export_student
from support.runs import TINY_CONFIG, distill_epoch_row, train

from kdfast.config import CONFIG_DIR, TapConfig, load_config
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.rkd import RKDConfig, RKDLoss, rkd_loss, rkd_parts

CONFIG = CONFIG_DIR / "rkd_digits.yaml"
TAPS = {"emb": TapConfig(path="pool")}


def _huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def _reference_rkd(student, teacher, distance_weight, angle_weight):
    """mdistiller/distillers/RKD.py's formulation, line by line."""

    def pdist(e):
        squared = e.pow(2).sum(1)
        res = (squared[:, None] + squared[None, :] - 2 * e @ e.T).clamp(min=1e-12).sqrt().clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    def angles(e):
        d = F.normalize(e[None] - e[:, None], p=2, dim=2)
        return torch.bmm(d, d.transpose(1, 2)).view(-1)

    s, t = student.view(student.shape[0], -1), teacher.view(teacher.shape[0], -1)
    t_d = pdist(t)
    t_d = t_d / t_d[t_d > 0].mean()
    d = pdist(s)
    d = d / d[d > 0].mean()
    return distance_weight * F.smooth_l1_loss(d, t_d) + angle_weight * F.smooth_l1_loss(angles(s), angles(t))


def _embeddings(batch=6, d_s=5, d_t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, d_s, generator=g, dtype=torch.float64)
    teacher = 3 * torch.randn(batch, d_t, generator=g, dtype=torch.float64) + 1.0
    return student, teacher


def test_hand_computed_triangle():
    # teacher: a 3-4-5 right triangle (mu = 4); student: an isosceles right triangle 1-1-sqrt 2
    teacher = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    mu = (2 + math.sqrt(2)) / 3
    pairs = [(1 / mu, 0.75), (1 / mu, 1.0), (math.sqrt(2) / mu, 1.25)]
    distance = 2 * sum(_huber(s - t) for s, t in pairs) / 9  # B^2 = 9 entries, 3 pairs twice, 3 zeros
    # cosines at each vertex: teacher (0, 0.6, 0.8), student (0, 1/sqrt 2, 1/sqrt 2); each appears for the
    # two orders of the other points; (i, i) gives 1 on both sides, degenerate triplets 0: B^3 = 27 entries
    r = 1 / math.sqrt(2)
    angle = 2 * (_huber(0.0) + _huber(r - 0.6) + _huber(r - 0.8)) / 27
    got_distance, got_angle = rkd_parts(student, teacher)
    assert got_distance.item() == pytest.approx(distance, rel=1e-12)
    assert got_angle.item() == pytest.approx(angle, rel=1e-12)
    got = rkd_loss(student, teacher, distance_weight=25.0, angle_weight=50.0)
    assert got.item() == pytest.approx(25 * distance + 50 * angle, rel=1e-12)


@pytest.mark.parametrize(("distance_weight", "angle_weight"), [(25.0, 50.0), (1.0, 0.0), (0.0, 2.0)])
def test_matches_the_reference_formulation_for_different_widths(distance_weight, angle_weight):
    student, teacher = _embeddings()
    got = rkd_loss(student, teacher, distance_weight=distance_weight, angle_weight=angle_weight)
    torch.testing.assert_close(got, _reference_rkd(student, teacher, distance_weight, angle_weight))
    # (B, C, 1, 1) inputs are flattened per sample
    torch.testing.assert_close(
        rkd_loss(
            student[..., None, None], teacher, distance_weight=distance_weight, angle_weight=angle_weight
        ),
        got,
    )


def test_gradients_match_the_reference_and_finite_differences():
    student, teacher = _embeddings(batch=5, seed=1)
    a, b = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    rkd_loss(a, teacher, distance_weight=25.0, angle_weight=50.0).backward()
    _reference_rkd(b, teacher, 25.0, 50.0).backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert torch.autograd.gradcheck(
        lambda s: rkd_loss(s, teacher, distance_weight=25.0, angle_weight=50.0),
        (student.clone().requires_grad_(True),),
    )


def test_relations_ignore_scale_rotation_and_translation():
    # psi_D is normalized by the mean distance and psi_A is a cosine: a similarity transform of the student
    # changes nothing, which is why the student's width and scale need not match the teacher's
    student, teacher = _embeddings(d_s=4, seed=2)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    moved = 7.5 * student @ rotation + torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(
        rkd_loss(moved, teacher, distance_weight=25.0, angle_weight=50.0),
        rkd_loss(student, teacher, distance_weight=25.0, angle_weight=50.0),
    )
    assert rkd_loss(teacher, teacher, distance_weight=25.0, angle_weight=50.0).item() == pytest.approx(0.0)


def test_bf16_autocast_does_not_round_the_relations():
    student, teacher = _embeddings(seed=5)
    student, teacher = student.float(), teacher.float()
    exact = rkd_loss(student, teacher, distance_weight=25.0, angle_weight=50.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = rkd_loss(student, teacher, distance_weight=25.0, angle_weight=50.0)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact)


def test_edge_cases_batch_of_one_and_a_collapsed_student():
    one = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    value = rkd_loss(one, torch.randn(1, 3, dtype=torch.float64), distance_weight=25.0, angle_weight=50.0)
    assert value.item() == 0.0  # no pair, no triplet
    value.backward()
    assert torch.count_nonzero(one.grad) == 0
    # two samples the student embeds identically and the teacher does not (a collapsed student): the reference
    # normalizes their zero difference by eps = 1e-12 and its gradient is scaled by 1e12; here the pair has
    # distance 0 and unit vector 0 with zero gradient, and the loss value is the same
    student, teacher = _embeddings(batch=5, seed=3)
    student = torch.cat([student[:4], student[:1]])
    reference = student.clone().requires_grad_(True)
    _reference_rkd(reference, teacher, 25.0, 50.0).backward()
    assert reference.grad.abs().max() > 1e9
    student.requires_grad_(True)
    value = rkd_loss(student, teacher, distance_weight=25.0, angle_weight=50.0)
    torch.testing.assert_close(
        value, _reference_rkd(student.detach(), teacher, 25.0, 50.0), rtol=1e-5, atol=1e-6
    )
    value.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().max() < 100


def test_loss_module_pools_maps_detaches_the_teacher_and_checks_taps():
    loss = RKDLoss(RKDConfig(student="emb", teacher="emb", distance_weight=3.0, angle_weight=4.0), TAPS, TAPS)
    g = torch.Generator().manual_seed(4)
    feature = torch.randn(6, 8, 3, 3, generator=g, requires_grad=True)
    teacher = torch.randn(6, 12, generator=g, requires_grad=True)
    loss.check({"emb": feature}, {"emb": teacher})
    term, parts = loss(None, None, None, {"emb": feature}, {"emb": teacher})
    distance, angle = rkd_parts(feature.mean(dim=(2, 3)), teacher)
    torch.testing.assert_close(parts["distance"], 3.0 * distance)
    torch.testing.assert_close(parts["angle"], 4.0 * angle)
    torch.testing.assert_close(term, parts["distance"] + parts["angle"])
    term.backward()
    assert feature.grad is not None and teacher.grad is None
    with pytest.raises(UsageError, match="an embedding tap must give"):
        loss.check({"emb": torch.randn(6, 5, 8)}, {"emb": teacher})
    with pytest.raises(UsageError, match="6 samples and the teacher's 4"):
        loss.check({"emb": feature}, {"emb": teacher[:4]})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.rkd.student=nope", "loss.rkd.student names no student tap 'nope'"),
        ("teacher.taps.embedding.kind=attention", "teacher tap 'embedding' must have kind 'feature'"),
        ("loss.rkd.angle_weight=-1", "'loss.rkd.angle_weight' must be >= 0"),
    ],
)
def test_config_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


@pytest.mark.slow
def test_rkd_digits_config_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = train(out, TINY_CONFIG, CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(out / "student.pt", weights_only=True)
    assert ckpt["format"] == "kdfast.student/1" and ckpt["config"]["loss"]["method"] == ["rkd"]
    parts = distill_epoch_row(out)["parts"]
    assert set(parts) == {"ce", "rkd", "rkd/distance", "rkd/angle"}
    assert parts["rkd"] == pytest.approx(parts["rkd/distance"] + parts["rkd/angle"], rel=1e-5)
    export_student(out)
