"""ReviewKD (Chen et al. 2021) against hand-computed HCL pyramids and the authors' HCL loop written out in
float64, ABF recomputed with plain functional ops, the direction of the review path, the warm-up; ABFs sized
from the tapped shapes; the method module and its config; the digits config end to end through training and
export; DKD + ReviewKD from a config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.exports import export_student
from support.runs import TINY_CONFIG, distill_epoch_row, train

from kdfast.config import CONFIG_DIR, TapConfig, load_config
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.base import FeaturePair
from kdfast.methods.reviewkd import ABF, ReviewKDConfig, ReviewKDLoss, hcl_loss, review

CONFIG = CONFIG_DIR / "reviewkd_digits.yaml"


def maps(batch: int, channels: int, side: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, side, side, generator=g, dtype=torch.float64)


def authors_hcl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The authors' hcl for one pair, line by line: full MSE, then for l in 4, 2, 1 smaller than the map the
    weight halves and the pooled MSE is added with it; divided by the summed weights."""
    h = student.shape[2]
    loss = ((student - teacher) ** 2).mean()
    weight, total = 1.0, 1.0
    for level in (4, 2, 1):
        if level >= h:
            continue
        weight /= 2.0
        s = F.adaptive_avg_pool2d(student, (level, level))
        t = F.adaptive_avg_pool2d(teacher, (level, level))
        loss = loss + ((s - t) ** 2).mean() * weight
        total += weight
    return loss / total


def test_hcl_hand_computed_pyramids():
    # 2x2: levels 4 and 2 skipped, the 1x1 level at weight 1/2. student [[1, 2], [3, 4]] against zeros:
    # full MSE (1 + 4 + 9 + 16) / 4 = 7.5, pooled mean 2.5 -> 6.25; (7.5 + 3.125) / 1.5
    student = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert hcl_loss(student, torch.zeros_like(student)).item() == pytest.approx(10.625 / 1.5, rel=1e-7)
    # 4x4 with two pooled levels: 2x2 at weight 1/2, 1x1 at 1/4. Blocks of 1 (top left) and 2 (bottom
    # right): full MSE (4 * 1 + 4 * 4) / 16 = 1.25; 2x2 means [[1, 0], [0, 2]] -> (1 + 4) / 4 = 1.25;
    # mean 0.75 -> 0.5625
    student = torch.zeros(1, 1, 4, 4)
    student[0, 0, :2, :2], student[0, 0, 2:, 2:] = 1.0, 2.0
    expected = (1.25 + 0.5 * 1.25 + 0.25 * 0.5625) / 1.75
    assert hcl_loss(student, torch.zeros_like(student)).item() == pytest.approx(expected, rel=1e-7)
    # a 1x1 map (a pooled embedding): the MSE alone
    embedding = maps(3, 5, 1, seed=0)
    assert hcl_loss(embedding, 0 * embedding).item() == pytest.approx((embedding**2).mean().item())


@pytest.mark.parametrize("side", [8, 5, 3])
def test_hcl_matches_the_authors_loop_with_gradients(side):
    student = maps(2, 3, side, seed=1).requires_grad_(True)
    teacher = maps(2, 3, side, seed=2)
    loss = hcl_loss(student, teacher)
    expected = authors_hcl(student, teacher)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(*(torch.autograd.grad(x, student)[0] for x in (loss, expected)))
    # equal maps and a batch of one
    assert hcl_loss(teacher, teacher).item() == 0.0
    torch.testing.assert_close(hcl_loss(student[:1], teacher[:1]), authors_hcl(student[:1], teacher[:1]))
    with pytest.raises(UsageError, match="differ in shape"):
        hcl_loss(student, teacher[:, :2])


def test_hcl_on_a_non_square_map_follows_mdistiller():
    # mdistiller (github.com/megvii-research/mdistiller, commit a08d46f, mdistiller/distillers/ReviewKD.py,
    # hcl_loss) skips a level l >= h, the height only: an 8 x 4 map keeps the 4 x 4 level (the width 4 would
    # drop it under a min(h, w) rule) and a 4 x 8 map drops it
    for height, width in ((8, 4), (4, 8)):
        g = torch.Generator().manual_seed(height)
        student = torch.randn(2, 3, height, width, generator=g, dtype=torch.float64, requires_grad=True)
        teacher = torch.randn(2, 3, height, width, generator=g, dtype=torch.float64)
        loss, expected = hcl_loss(student, teacher), authors_hcl(student, teacher)
        torch.testing.assert_close(loss, expected)
        torch.testing.assert_close(*(torch.autograd.grad(x, student)[0] for x in (loss, expected)))
    # the 8 x 4 case by hand: levels 4, 2, 1 at weights 1/2, 1/4, 1/8 beside the full MSE
    student, teacher = torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4)
    student[0, 0, :2, :] = 4.0  # the top quarter: the 4 x 4 level's first row of cells, 2 x 1 pixels each
    full = 4.0**2 * 8 / 32
    level4 = 4.0**2 * 4 / 16  # the top row of 4 cells at 4
    level2 = 2.0**2 * 2 / 4  # the top row of 2 cells at the mean of 4 rows, 2
    level1 = 1.0**2  # the mean over the map, 1
    expected = (full + level4 / 2 + level2 / 4 + level1 / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
    assert hcl_loss(student, teacher).item() == pytest.approx(expected, rel=1e-7)


def _batch_norm(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """Training-mode BatchNorm with the batch's own statistics, written out."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight[:, None, None] + bn.bias[:, None, None]


def test_abf_fuses_with_the_two_attention_maps_and_resizes_to_the_teacher_grid():
    abf = ABF(in_channels=6, mid_channels=4, out_channels=5, fuse=True).double()
    with torch.no_grad():
        for bn in (abf.reduce[1], abf.output[1]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    feature, residual = maps(3, 6, 4, seed=3), maps(3, 4, 2, seed=4)
    out, passed = abf(feature, residual, (8, 8))
    x = _batch_norm(F.conv2d(feature, abf.reduce[0].weight), abf.reduce[1])
    r = residual.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest 2x upsampling
    z = torch.sigmoid(F.conv2d(torch.cat([x, r], 1), abf.attention.weight, abf.attention.bias))
    x = x * z[:, :1] + r * z[:, 1:]
    x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # to the 8x8 teacher grid
    torch.testing.assert_close(passed, x)
    torch.testing.assert_close(out, _batch_norm(F.conv2d(x, abf.output[0].weight, padding=1), abf.output[1]))
    assert out.shape == (3, 5, 8, 8)
    deepest = ABF(6, 4, 5, fuse=False).double()
    assert deepest.attention is None and deepest(feature, None, (4, 4))[0].shape == (3, 5, 4, 4)


def test_the_review_path_runs_from_the_deepest_feature_to_the_shallowest():
    abfs = [ABF(3, 4, 2, fuse=True), ABF(5, 4, 6, fuse=True), ABF(7, 4, 6, fuse=False)]
    for abf in abfs:
        abf.double().eval()
    features = [maps(2, 3, 8, 5), maps(2, 5, 4, 6), maps(2, 7, 1, 7)]
    sizes = [(8, 8), (4, 4), (1, 1)]
    fused = review(abfs, features, sizes)
    assert [tuple(y.shape) for y in fused] == [(2, 2, 8, 8), (2, 6, 4, 4), (2, 6, 1, 1)]
    # a change of the shallowest feature reaches only its own output; a change of the deepest reaches all
    shallow = review(abfs, [features[0] + 1, *features[1:]], sizes)
    assert not torch.equal(shallow[0], fused[0])
    assert all(torch.equal(a, b) for a, b in zip(shallow[1:], fused[1:], strict=True))
    deep = review(abfs, [*features[:2], features[2] + 1], sizes)
    assert all(not torch.equal(a, b) for a, b in zip(deep, fused, strict=True))


def _loss(**kwargs) -> ReviewKDLoss:
    student_taps = {f"s{i}": TapConfig(path=f"a{i}") for i in range(3)}
    teacher_taps = {f"t{i}": TapConfig(path=f"b{i}") for i in range(3)}
    pairs = [FeaturePair(f"s{i}", f"t{i}") for i in range(3)]
    return ReviewKDLoss(ReviewKDConfig(pairs=pairs, **kwargs), student_taps, teacher_taps)


def _taps(batch: int = 4):
    student = {
        "s0": maps(batch, 8, 8, 8),
        "s1": maps(batch, 16, 4, 9),
        "s2": maps(batch, 32, 2, 10)[:, :, 0, 0],
    }
    teacher = {"t0": maps(batch, 12, 16, 11), "t1": maps(batch, 24, 8, 12), "t2": maps(batch, 48, 1, 13)}
    return {k: v.requires_grad_(True) for k, v in student.items()}, teacher


def test_abfs_are_sized_from_the_tapped_shapes():
    loss_fn = _loss()
    student, teacher = _taps()
    loss_fn.check(student, teacher)
    shapes = [
        (a.reduce[0].in_channels, a.reduce[0].out_channels, a.output[0].out_channels) for a in loss_fn.abfs
    ]
    assert shapes == [(8, 32, 12), (16, 32, 24), (32, 32, 48)]  # middle width: the deepest student's, 32
    assert [a.attention is not None for a in loss_fn.abfs] == [True, True, False]
    narrow = _loss(max_mid_channels=16)
    narrow.check(student, teacher)
    assert {a.reduce[0].out_channels for a in narrow.abfs} == {16}
    student["s1"] = maps(4, 17, 4, 9)
    with pytest.raises(UsageError, match="built for"):
        loss_fn.check(student, teacher)


def test_term_is_the_warmed_up_sum_of_hcl_with_the_teacher_detached():
    loss_fn = _loss(warmup=4)
    student, teacher = _taps()
    with pytest.raises(UsageError, match="call check"):
        loss_fn(None, None, None, student, teacher)
    loss_fn.check(student, teacher)
    loss_fn.double()
    for t in teacher.values():
        t.requires_grad_(True)
    for epoch, factor in ((0, 0.25), (2, 0.75), (3, 1.0), (9, 1.0)):
        loss_fn.start_epoch(epoch, 240)
        term, parts = loss_fn(None, None, None, student, teacher)
        fused = review(
            loss_fn.abfs,
            [student["s0"], student["s1"], student["s2"][:, :, None, None]],
            [(16, 16), (8, 8), (1, 1)],
        )
        expected = [factor * authors_hcl(y, teacher[f"t{i}"]) for i, y in enumerate(fused)]
        assert list(parts) == ["s0-t0", "s1-t1", "s2-t2"]
        torch.testing.assert_close(list(parts.values()), expected)
        torch.testing.assert_close(term, sum(expected))
    term.backward()
    assert all(s.grad.abs().sum() > 0 for s in student.values())
    assert all(t.grad is None for t in teacher.values())
    assert all(p.grad is not None for p in loss_fn.abfs.parameters())
    # no warm-up
    none = _loss(warmup=0)
    none.start_epoch(0, 240)
    assert none.warmup.item() == 1.0


def test_a_batch_of_one_in_evaluation():
    loss_fn = _loss()
    student, teacher = _taps(batch=1)
    loss_fn.check(student, teacher)
    loss_fn.double().eval()
    term, _ = loss_fn(None, None, None, student, teacher)
    assert torch.isfinite(term)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.reviewkd.pairs=[]", "loss.reviewkd.pairs is empty"),
        ("loss.reviewkd.pairs=[{student: s1, teacher: t9}]", "names no teacher tap 't9'"),
        ("loss.reviewkd.warmup=-1", "config key 'loss.reviewkd.warmup' must be >= 0"),
        ("loss.reviewkd.max_mid_channels=0", "config key 'loss.reviewkd.max_mid_channels' must be > 0"),
    ],
)
def test_config_validation(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(CONFIG, [override])
    assert message in str(error.value)


@pytest.mark.slow
def test_reviewkd_digits_config_trains_and_its_student_exports_without_the_abfs(tmp_path):
    out = tmp_path / "run"
    result = train(out, TINY_CONFIG, CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(out / "student.pt", weights_only=True)
    assert ckpt["config"]["loss"]["method"] == ["reviewkd"]
    assert not any("abfs" in key for key in ckpt["state_dict"])
    parts = distill_epoch_row(out)["parts"]
    pairs = ["s1-t1", "s2-t2", "s3-t3", "s_pool-t_pool"]
    assert set(parts) == {"ce", "reviewkd", *(f"reviewkd/{p}" for p in pairs)}
    # warm-up 1: the full weight 5 from the first epoch
    assert parts["reviewkd"] == pytest.approx(5.0 * sum(parts[f"reviewkd/{p}"] for p in pairs), rel=1e-5)
    export_student(out)


@pytest.mark.slow
def test_dkd_plus_reviewkd_from_a_config_runs_one_step(tmp_path):
    out = tmp_path / "run"
    one_step = [*TINY_CONFIG, "data.max_train_samples=32", "loss.method=[dkd, reviewkd]"]
    result = train(out, one_step, CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    row = distill_epoch_row(out)
    assert {"ce", "dkd", "reviewkd", "reviewkd/s1-t1"} <= set(row["parts"])
    assert row["loss"] == pytest.approx(sum(row["parts"][k] for k in ("ce", "dkd", "reviewkd")), rel=1e-5)
    assert math.isfinite(row["loss"])
