"""SoKD loss against independent references written in the test from the paper's equations: each DAFA
operation and eq. 10's straight-through rule by hand, DAM's decoded areas (eq. 13) from a known heatmap,
size and offset against boxes decoded by hand, L_D (eq. 12) and L_DA (eq. 14) with explicit loops and
torch.nn.functional, the target s(F^t) during and after the search, the search length, DAFA's training
and its separation from the student optimizer, gradient flow, check() errors, config validation through
load_config, and real Taps on hybrid_teacher_small and edge_cnn."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from support.runs import TINY_CONFIG

from kdfast.config import CONFIG_DIR, LossConfig, TapConfig, load_config
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.base import FeaturePair
from kdfast.methods.compose import CompositeLoss
from kdfast.methods.fitnet import FitNetConfig
from kdfast.methods.kd import KDConfig
from kdfast.methods.sokd import (
    DAFA,
    OPS,
    SoKDConfig,
    SoKDLoss,
    area_feature_loss,
    blur_op,
    channel_drop_op,
    consistency_loss,
    dam_alignment,
    decode_areas,
    hard_relaxed_bernoulli,
    noise_op,
    scale_op,
    search_length,
    shift_op,
    straight_through_op,
)
from kdfast.models import build_model
from kdfast.taps import Taps
from kdfast.train import loop, main

B, CS, CT, CLASSES = 2, 3, 5, 4
STUDENT_TAPS = {"s": TapConfig(path="a", kind="feature")}
TEACHER_TAPS = {"t": TapConfig(path="b", kind="feature")}
CONFIG = CONFIG_DIR / "sokd_digits.yaml"


def _loss(**sokd) -> SoKDLoss:
    return SoKDLoss(
        SoKDConfig(student="s", teacher="t", **sokd), STUDENT_TAPS, TEACHER_TAPS, kernels_impl="reference"
    )


def _taps(seed: int = 0, batch: int = B, student_channels: int = CS, teacher_side: int = 4):
    g = torch.Generator().manual_seed(seed)
    student = {"s": torch.randn(batch, student_channels, 4, 4, generator=g, requires_grad=True)}
    teacher = {"t": torch.randn(batch, CT, teacher_side, teacher_side, generator=g, requires_grad=True)}
    return student, teacher


def _logits():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, CLASSES, generator=g, requires_grad=True), torch.randn(B, CLASSES, generator=g)


def test_each_operation_against_hand_computation():
    x = torch.arange(2 * 2 * 3 * 3, dtype=torch.float32).view(2, 2, 3, 3)
    m = torch.tensor(0.3)
    z = torch.full_like(x, 2.0)
    assert torch.allclose(scale_op(x, m, z), x * 1.3)
    assert torch.allclose(noise_op(x, m, z), x + 0.6)
    u = torch.ones_like(x)
    u[0, 1], u[1, 0] = 0.2, 0.25  # below m = 0.3: channel 1 of sample 0 and channel 0 of sample 1 are masked
    expected = x.clone()
    expected[0, 1] = 0
    expected[1, 0] = 0
    assert torch.equal(channel_drop_op(x, m, u), expected)
    blurred = torch.empty_like(x)
    for y in range(3):
        for xx in range(3):
            window = x[:, :, max(0, y - 1) : y + 2, max(0, xx - 1) : xx + 2]
            blurred[:, :, y, xx] = window.mean(dim=(2, 3))
    assert torch.allclose(blur_op(x, m, u), 0.7 * x + 0.3 * blurred)
    shifted = torch.empty_like(x)
    for y in range(3):
        for xx in range(3):
            shifted[:, :, y, xx] = x[:, :, (y - 1) % 3, (xx - 1) % 3]
    assert torch.allclose(shift_op(x, m, u), 0.7 * x + 0.3 * shifted)


@pytest.mark.parametrize("op", OPS, ids=lambda op: op.__name__)
def test_straight_through_op_has_the_ops_value_and_df_dm_one(op):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    draw = torch.rand(2, 3, 4, 4, generator=g)
    upstream = torch.randn(2, 3, 4, 4, generator=g)
    m = torch.tensor(0.4, requires_grad=True)
    out = straight_through_op(op, x, m, draw)
    torch.testing.assert_close(out, op(x.detach(), torch.tensor(0.4), draw))
    (out * upstream).sum().backward()
    torch.testing.assert_close(m.grad, upstream.sum())  # eq. 10: dF/dm = 1 for every element
    x_ref = x.detach().clone().requires_grad_(True)
    (op(x_ref, torch.tensor(0.4), draw) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)  # the operation's own gradient with respect to x


def test_relaxed_bernoulli_is_hard_forward_with_the_soft_gradient():
    logits = torch.tensor([0.5, -1.0], requires_grad=True)
    u = torch.tensor([0.3, 0.9])
    b = hard_relaxed_bernoulli(logits, 0.5, u)
    soft = torch.sigmoid((logits.detach() + torch.log(u / (1 - u))) / 0.5)
    assert torch.equal(b.detach(), (soft > 0.5).float())
    b.sum().backward()
    assert torch.allclose(logits.grad, soft * (1 - soft) / 0.5)


def test_dafa_search_sample_applies_one_policy_and_reaches_all_logits_and_magnitudes():
    torch.manual_seed(0)
    dafa = DAFA(sub_policies=4, ops_per_policy=2, temperature=0.5)
    assert sorted({i for ops in dafa.policy_ops for i in ops}) == list(range(len(OPS)))
    with torch.no_grad():
        dafa.op_logits.fill_(20.0)  # every gate open, so each magnitude matters
        dafa.magnitudes.fill_(0.5)
    x = torch.randn(2, 3, 4, 4)
    torch.manual_seed(3)
    out = dafa.train()(x, True)
    torch.manual_seed(3)
    draws = [torch.randn_like(x) if op is noise_op else torch.rand_like(x) for op in OPS]
    policy = int(F.gumbel_softmax(dafa.policy_logits.detach(), tau=0.5, hard=True).argmax())
    expected = x
    for op_index in dafa.policy_ops[policy]:
        expected = OPS[op_index](expected, torch.tensor(0.5), draws[op_index])
    assert torch.allclose(out, expected, atol=1e-6)
    out.square().sum().backward()
    assert (dafa.policy_logits.grad != 0).all()
    assert dafa.magnitudes.grad[policy].abs().min() > 0 and dafa.magnitudes.grad.sum(1).count_nonzero() == 1
    assert torch.equal(dafa.eval()(x, True), x)


def _searched(dafa: DAFA) -> DAFA:
    """Policy 2 (shift, then scale) the argmax, its first gate always open and its second never."""
    with torch.no_grad():
        dafa.policy_logits.copy_(torch.tensor([0.4, -0.2, 0.9, 0.1]))
        dafa.op_logits[2] = torch.tensor([30.0, -30.0])
        dafa.magnitudes[2] = torch.tensor([0.3, 0.8])
    return dafa


def test_dafa_after_search_applies_the_argmax_policy_with_its_learned_probabilities():
    dafa = _searched(DAFA(sub_policies=4, ops_per_policy=2, temperature=0.5)).train()
    assert dafa.policy_ops[2] == (4, 0)  # shift, scale
    x = torch.randn(2, 3, 4, 4)
    expected = 0.7 * x + 0.3 * torch.roll(x, shifts=(1, 1), dims=(2, 3))  # shift at 0.3; scale's gate shut
    for seed in range(5):  # no sub-policy is sampled: the same output whatever the random state
        torch.manual_seed(seed)
        torch.testing.assert_close(dafa(x, False), expected)
    with torch.no_grad():
        dafa.op_logits[2] = torch.tensor([0.0, 0.0])  # each gate open with probability 0.5
    torch.manual_seed(0)
    open_first = torch.stack([(dafa(x, False) - x).abs().sum() > 0 for _ in range(400)]).float().mean()
    assert abs(open_first.item() - 0.75) < 0.07  # at least one of two p = 0.5 gates open: 0.75, std 0.022


def test_search_length_is_the_papers_20_of_240_scaled_to_the_run():
    assert search_length(None, 240) == 20
    assert search_length(None, 120) == 10 and search_length(None, 200) == 17
    assert search_length(None, 10) == 1 and search_length(None, 3) == 1  # at least one epoch
    assert search_length(5, 240) == 5 and search_length(0, 240) == 0
    loss = _loss()
    loss.check(*_taps())
    assert [loss.start_epoch(e, 24) or loss.searching for e in range(4)] == [True, True, False, False]


def test_consistency_loss_formula():
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [1.0, 8.0]])
    assert torch.isclose(consistency_loss(a, b), torch.tensor(0.5 * (1 + 4 + 4 + 16) / 4))


def _cones(height: int, width: int, tips: list[tuple[int, int, float]]) -> torch.Tensor:
    """A (1, 1, H, W) heatmap of logits max over tips of (top - distance to the tip): its only local maxima
    are the tips."""
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    cones = [top - ((ys - y) ** 2 + (xs - x) ** 2).sqrt() for y, x, top in tips]
    return torch.stack(cones).amax(0)[None, None]


def test_dam_decodes_the_areas_of_a_known_heatmap_size_and_offset():
    heatmap = _cones(6, 7, [(1, 1, 4.0), (4, 5, 3.0)])
    size, offset = torch.zeros(1, 2, 6, 7), torch.zeros(1, 2, 6, 7)
    size[0, :, 1, 1], offset[0, :, 1, 1] = torch.tensor([2.0, 3.0]), torch.tensor([0.5, 0.25])
    size[0, :, 4, 5], offset[0, :, 4, 5] = torch.tensor([1.0, 0.5]), torch.tensor([-0.5, 0.0])
    masks = decode_areas(heatmap, size, offset, areas=3)
    assert masks.shape == (1, 3, 6, 7)
    # by hand: peak (1, 1), the higher: centre (1.5, 1.25); x in [0.5, 2.5], y in [-0.25, 2.75] clipped
    # to [0, 2.75]: columns 0..2, rows 0..2
    first = torch.zeros(6, 7)
    first[0:3, 0:3] = 1
    # peak (4, 5): centre (4.5, 4.0); x in [4.0, 5.0], y in [3.75, 4.25]: columns 4..5, rows 3..4
    second = torch.zeros(6, 7)
    second[3:5, 4:6] = 1
    assert torch.equal(masks[0, 0], first) and torch.equal(masks[0, 1], second)
    assert masks[0, 2].sum() == 0  # two peaks only: the third area is empty
    size[0, :, 4, 5] = torch.tensor([-3.0, 40.0])  # negative width: one column; huge height: clipped
    masks = decode_areas(heatmap, size, offset, areas=2)
    second = torch.zeros(6, 7)
    second[:, 4] = 1
    assert torch.equal(masks[0, 1], second)
    assert decode_areas(heatmap, size, offset, areas=1).sum() == first.sum()  # the highest peak only


def test_l_d_and_l_da_by_hand():
    g = torch.Generator().manual_seed(0)
    student = tuple(torch.randn(2, c, 3, 3, generator=g) for c in (1, 2, 2))
    teacher = tuple(torch.randn(2, c, 3, 3, generator=g) for c in (1, 2, 2))
    by_hand = sum(((s - t) ** 2).sum() / s.numel() for s, t in zip(student, teacher, strict=True))
    torch.testing.assert_close(dam_alignment(student, teacher), by_hand)
    target, feature = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    masks = torch.zeros(2, 2, 3, 3)
    masks[0, 0, 0:2, 0:2] = 1
    masks[0, 1, 1:3, 1:3] = 1  # overlaps the first at (1, 1): counted twice
    masks[1, 0, 2, :] = 1
    total = 0.0
    for b in range(2):
        for p in range(2):
            total += ((masks[b, p] * feature[b] - masks[b, p] * target[b]) ** 2).sum()
    torch.testing.assert_close(area_feature_loss(target, feature, masks), total / feature.numel())


def test_forward_parts_match_explicit_terms_and_compose_with_kd():
    # [kd, sokd] with ce = 0.5 and kd.weight = 0.5: 0.5 tau^2 KL + 0.5 CE + alpha L_D + beta L_DA
    torch.manual_seed(0)
    cfg = LossConfig(
        method=["kd", "sokd"],
        ce=0.5,
        sections={
            "kd": KDConfig(weight=0.5, temperature=2.0),
            "sokd": SoKDConfig(student="s", teacher="t", alpha=0.7, beta=0.3, areas=3),
        },
    )
    composite = CompositeLoss(cfg, STUDENT_TAPS, TEACHER_TAPS, kernels_impl="reference")
    student_taps, teacher_taps = _taps(teacher_side=8)
    composite.check(student_taps, teacher_taps)
    composite.eval()  # DAFA is the identity in eval, so the target is the resized teacher feature
    loss = composite.members["sokd"]
    student_logits, teacher_logits = _logits()
    targets = torch.tensor([0, 3])
    total, parts = composite(student_logits, teacher_logits, targets, student_taps, teacher_taps)
    f_s = F.conv2d(student_taps["s"], loss.adapter.weight, loss.adapter.bias)
    f_t = F.interpolate(teacher_taps["t"], size=(4, 4), mode="bilinear", align_corners=False)
    heads_s, heads_t = loss.head(f_s), loss.head(f_t)
    assert [h.shape for h in heads_s] == [(B, 1, 4, 4), (B, 2, 4, 4), (B, 2, 4, 4)]
    l_d = sum(F.mse_loss(s, t) for s, t in zip(heads_s, heads_t, strict=True))
    masks = decode_areas(*heads_s, areas=3)
    l_da = sum(((masks[:, p : p + 1] * (f_s - f_t)) ** 2).sum() for p in range(3)) / f_s.numel()
    kd = F.kl_div(
        F.log_softmax(student_logits / 2, 1), F.softmax(teacher_logits / 2, 1), reduction="batchmean"
    )
    assert set(parts) == {"ce", "kd", "sokd", "sokd/dam", "sokd/areas", "sokd/aug"}
    torch.testing.assert_close(parts["sokd/dam"], 0.7 * l_d)
    torch.testing.assert_close(parts["sokd/areas"], 0.3 * l_da)
    torch.testing.assert_close(parts["sokd/aug"], 0.5 * F.mse_loss(f_s, f_t))
    torch.testing.assert_close(parts["sokd"], 0.7 * l_d + 0.3 * l_da)
    reference = 0.5 * 4 * kd + 0.5 * F.cross_entropy(student_logits, targets) + 0.7 * l_d + 0.3 * l_da
    torch.testing.assert_close(total, reference)
    ((student_map, teacher_map),) = loss.maps(student_taps, teacher_taps)
    assert torch.allclose(student_map, heads_s[0].sigmoid()[:, 0]) and teacher_map.shape == (B, 4, 4)


@pytest.mark.parametrize("searching", [True, False])
def test_the_student_and_the_teacher_branch_see_s_of_f_t_during_and_after_the_search(searching):
    loss = _loss(alpha=0.6, beta=1.7, areas=2, feature_weight=0.4, search_epochs=1, sub_policies=4)
    student_taps, teacher_taps = _taps()
    loss.check(student_taps, teacher_taps)
    dafa = _searched(loss.dafa)
    if searching:  # the Gumbel sample picks policy 2 whatever the noise
        with torch.no_grad():
            dafa.policy_logits[2] = 200.0
            dafa.op_logits[2, 1] = -200.0
    loss.train()
    loss.start_epoch(0 if searching else 1, 10)
    assert loss.searching is searching
    _, parts = loss(*_logits(), torch.tensor([0, 1]), student_taps, teacher_taps)
    with torch.no_grad():
        f_s = F.conv2d(student_taps["s"], loss.adapter.weight, loss.adapter.bias)
        f_t = teacher_taps["t"]
        target = 0.7 * f_t + 0.3 * torch.roll(f_t, shifts=(1, 1), dims=(2, 3))  # s(F^t), policy 2
        heads_s, heads_t = loss.head(f_s), loss.head(target)
    l_d = sum(F.mse_loss(s, t) for s, t in zip(heads_s, heads_t, strict=True))
    masks = decode_areas(*heads_s, areas=2)
    l_da = sum(((masks[:, p : p + 1] * (f_s - target)) ** 2).sum() for p in range(2)) / f_s.numel()
    torch.testing.assert_close(parts["dam"], 0.6 * l_d)
    torch.testing.assert_close(parts["areas"], 1.7 * l_da)
    torch.testing.assert_close(parts["feat"], 0.4 * 0.5 * F.mse_loss(f_s, target))  # kdfast's option


def test_gradients_reach_student_adapter_and_head_not_teacher_or_dafa():
    loss = _loss(feature_weight=1.0)
    student_taps, teacher_taps = _taps()
    loss.check(student_taps, teacher_taps)
    loss.train()
    loss.start_epoch(0, 10)
    total, _ = loss(*_logits(), torch.tensor([0, 1]), student_taps, teacher_taps)
    total.backward()
    assert student_taps["s"].grad.abs().sum() > 0 and loss.adapter.weight.grad.abs().sum() > 0
    assert loss.head.heatmap[0].weight.grad.abs().sum() > 0
    assert teacher_taps["t"].grad is None
    assert all(not p.requires_grad and p.grad is None for p in loss.dafa.parameters())


def _dafa_params(loss: SoKDLoss) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in loss.dafa.parameters()])


def test_dafa_trains_in_search_epochs_and_is_frozen_after():
    torch.manual_seed(0)
    loss = _loss(search_epochs=1, search_lr=0.05)
    student_taps, teacher_taps = _taps()
    loss.check(student_taps, teacher_taps)
    loss.train()
    student_params = [p for p in loss.parameters() if p.requires_grad]
    assert not any(p is q for p in loss.dafa.parameters() for q in student_params)
    loss.start_epoch(0, 5)
    loss.use_held_out(lambda: _taps(seed=3))
    before = _dafa_params(loss)
    loss(*_logits(), torch.tensor([0, 1]), student_taps, teacher_taps)
    loss.after_step()
    searched = _dafa_params(loss)
    assert not torch.equal(before, searched)
    loss.start_epoch(1, 5)
    for _ in range(2):
        loss(*_logits(), torch.tensor([0, 1]), student_taps, teacher_taps)
        loss.after_step()
    assert torch.equal(_dafa_params(loss), searched)
    restored = _loss(search_epochs=1, search_lr=0.05)
    restored.check(student_taps, teacher_taps)
    restored.load_state_dict(loss.state_dict())
    assert torch.equal(_dafa_params(restored), searched)
    assert (
        restored.dafa_optimizer.state_dict()["state"].keys()
        == loss.dafa_optimizer.state_dict()["state"].keys()
    )


def test_check_rejects_taps_that_cannot_be_matched():
    loss = _loss()
    with pytest.raises(UsageError, match="call check\\(\\) on a real batch first"):
        loss(*_logits(), torch.tensor([0, 1]), *_taps())
    with pytest.raises(UsageError, match="batch sizes 3 and 2"):
        loss.check(_taps(batch=3)[0], _taps()[1])
    loss.check(*_taps())
    with pytest.raises(UsageError, match="adapter was built for"):
        loss.check(*_taps(student_channels=CS + 1))
    with pytest.raises(UsageError, match="teacher tap 't' gave nothing"):
        loss.check(_taps()[0], {})
    with pytest.raises(
        ConfigError, match="loss.sokd.student names no student tap 'x': valid student taps: s"
    ):
        SoKDLoss(SoKDConfig(student="x", teacher="t"), STUDENT_TAPS, TEACHER_TAPS)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.sokd.student=nope", "loss.sokd.student names no student tap 'nope'"),
        ("teacher.taps.vgg.kind=attention", "loss.sokd.teacher: teacher tap 'vgg' must have kind 'feature'"),
        ("loss.sokd.sub_policies=0", "sub_policies"),
        ("loss.sokd.temperature=-1", "temperature"),
        ("loss.sokd.areas=0", "areas"),
        ("loss.sokd.search_epochs=-1", "search_epochs"),
        ("loss.sokd.feature_weight=-0.5", "feature_weight"),
    ],
)
def test_sokd_config_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


def test_sokd_end_to_end_hybrid_teacher_edge_cnn_student():
    torch.manual_seed(0)
    cfg = load_config(CONFIG)
    sokd = cfg.loss.sections["sokd"]
    assert cfg.loss.method == ["kd", "sokd"] and sokd.search_epochs is None and sokd.feature_weight == 0
    teacher = Taps(build_model(cfg.teacher.arch, num_classes=10), cfg.teacher.taps).eval()
    student = Taps(build_model(cfg.student.arch, num_classes=10), cfg.student.taps)
    loss = CompositeLoss(cfg.loss, cfg.student.taps, cfg.teacher.taps, kernels_impl="reference")
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    with torch.no_grad():
        teacher_logits, teacher_out = teacher(images)
        loss.check(student(images)[1], teacher_out)
    held_out = torch.randn(2, 3, 32, 32)
    loss.use_held_out(lambda: tuple(model(held_out)[1] for model in (student, teacher)))
    assert teacher_out["vgg"].shape[-2:] == (8, 8) and student(images)[1]["mid"].shape[-2:] == (8, 8)
    loss.train()
    student.train()
    params = [p for m in (student, loss) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for epoch in range(2):
        loss.start_epoch(epoch, cfg.student.train.epochs)
        student_logits, student_out = student(images)
        total, parts = loss(student_logits, teacher_logits, targets, student_out, teacher_out)
        assert torch.isfinite(total)
        assert set(parts) == {"ce", "kd", "sokd", "sokd/dam", "sokd/areas", "sokd/aug"}
        optimizer.zero_grad()
        total.backward()
        assert all(p.grad is None for p in teacher.parameters())
        optimizer.step()
        loss.after_step()
    maps = loss.maps(student_out, teacher_out)
    assert maps[0][0].shape == maps[0][1].shape == (2, 8, 8)


def test_the_search_reads_only_the_held_out_batch():
    # Eq. 7: one Adam step of DAFA on L_aug = 1/2 mean (resize(s(F^t)) - Phi_s(F^s))^2 of the held-out
    # batch, recomputed here with a copy of DAFA, the same random draws and torch.optim.Adam; the training
    # batch the step follows does not enter it
    torch.manual_seed(0)
    loss = _loss(search_epochs=1, search_lr=0.05, sub_policies=4)
    train_taps = _taps(teacher_side=8)
    loss.check(*train_taps)
    loss.train()
    loss.start_epoch(0, 5)
    held_student, held_teacher = _taps(seed=3, teacher_side=8)
    loss.use_held_out(lambda: (held_student, held_teacher))
    assert loss.held_out_share() == 0.1
    before = _dafa_params(loss)
    reference = copy.deepcopy(loss.dafa).requires_grad_(True)
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.05)
    with torch.no_grad():
        f_s = F.conv2d(held_student["s"], loss.adapter.weight, loss.adapter.bias)
    torch.manual_seed(11)
    refined = reference(held_teacher["t"].detach(), True)
    resized = F.interpolate(refined, size=(4, 4), mode="bilinear", align_corners=False)
    (0.5 * ((resized - f_s) ** 2).mean()).backward()
    optimizer.step()
    loss(*_logits(), torch.tensor([0, 1]), *train_taps)  # a training forward between, as in the loop
    torch.manual_seed(11)
    loss.after_step()
    for got, expected in zip(loss.dafa.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, expected)
    assert not torch.equal(_dafa_params(loss), before)
    # without held-out batches the search refuses to run on the training batch
    fresh = _loss(search_epochs=1)
    fresh.check(*train_taps)
    fresh.train()
    with pytest.raises(UsageError, match="the search reads held-out images"):
        fresh.after_step()


def test_the_feature_method_sokd_plugs_into_distills_s_of_f_t():
    # [fitnet, sokd]: L_task's FitNet hint is the refined s(F^t) (eq. 15), here the sub-policy forced to
    # 0.7 F^t + 0.3 roll(F^t); without SoKD the same FitNet reads F^t
    torch.manual_seed(0)
    sections = {
        "fitnet": FitNetConfig(pairs=[FeaturePair("s", "t")], relu=False),
        "sokd": SoKDConfig(student="s", teacher="t", search_epochs=1, sub_policies=4),
    }
    composite = CompositeLoss(
        LossConfig(method=["fitnet", "sokd"], sections=sections),
        STUDENT_TAPS,
        TEACHER_TAPS,
        kernels_impl="reference",
    )
    student_taps, teacher_taps = _taps()
    composite.check(student_taps, teacher_taps)
    sokd, fitnet = composite.members["sokd"], composite.members["fitnet"]
    _searched(sokd.dafa)
    with torch.no_grad():
        sokd.dafa.policy_logits[2] = 200.0
        sokd.dafa.op_logits[2, 1] = -200.0
    composite.train()
    composite.start_epoch(0, 10)
    _, parts = composite(*_logits(), torch.tensor([0, 1]), student_taps, teacher_taps)
    f_t = teacher_taps["t"].detach()
    target = 0.7 * f_t + 0.3 * torch.roll(f_t, shifts=(1, 1), dims=(2, 3))
    regressed = fitnet.regressors[0](student_taps["s"], "reference")
    torch.testing.assert_close(parts["fitnet/s-t"], F.mse_loss(regressed, target))
    assert not torch.allclose(parts["fitnet/s-t"], F.mse_loss(regressed, f_t))
    assert teacher_taps["t"].grad is None and torch.equal(teacher_taps["t"], f_t)  # the taps are not changed


@pytest.mark.slow
def test_a_run_holds_out_a_split_only_the_search_reads(tmp_path, monkeypatch):
    # sokd_digits on 64 training images with a quarter held out: the run trains on the other 48 (3 steps of
    # 16 per epoch) and the search reads one held-out batch per step of its one epoch, none in the second
    seen: dict = {"reads": 0}
    real = loop.held_out_taps

    def recording(run, student, teacher):
        seen["run"] = run
        taps = real(run, student, teacher)

        def counted():
            seen["reads"] += 1
            return taps()

        return counted

    monkeypatch.setattr(loop, "held_out_taps", recording)
    overrides = [
        *TINY_CONFIG,
        "data.batch_size=16",
        "student.train.epochs=2",
        "loss.sokd.search_epochs=1",
        "loss.sokd.search_split=0.25",
        "runtime.device=cpu",
    ]
    argv = ["--config", str(CONFIG), "--out", str(tmp_path / "run")]
    assert main([*argv, *(arg for item in overrides for arg in ("--set", item))]) == 0
    run = seen["run"]
    train, held_out = set(run.train_ds.indices), set(run.held_out_ds.indices)
    assert len(held_out) == 16 and len(train) == 48 and train.isdisjoint(held_out)
    assert train | held_out == set(range(64))
    assert seen["reads"] == 3


def test_benchmark_configs_are_the_papers_plug_in_rows_on_the_registered_base_methods(tmp_path):
    weights = tmp_path / "resnet32x4.pth"
    weights.touch()
    for base, target in (("fitnet", "74.41"), ("reviewkd", "77.41")):
        path = CONFIG_DIR / "benchmarks" / "cifar100" / f"{base}_sokd" / "resnet32x4_resnet8x4.yaml"
        assert f"Target: {target} top-1 (SoKD Table 1" in path.read_text()
        cfg = load_config(path, [f"data.root={tmp_path}", f"teacher.weights={weights}"])
        sokd = cfg.loss.sections["sokd"]
        assert cfg.loss.method == [base, "sokd"] and cfg.loss.ce_weight() == 1.0
        assert (cfg.teacher.arch.name, cfg.student.arch.name) == ("resnet32x4", "resnet8x4")
        assert search_length(sokd.search_epochs, cfg.student.train.epochs) == 20  # the paper's 20 of 240
        assert sokd.feature_weight == 0.0 and sokd.search_split > 0  # eq. 15 alone, searched on held-out
        # the feature SoKD refines is one the base method distills, so the base reads s(F^t)
        base_pairs = cfg.loss.sections[base].pairs
        assert (sokd.student, sokd.teacher) in {(pair.student, pair.teacher) for pair in base_pairs}
