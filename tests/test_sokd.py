"""SoKD loss against independent references: each DAFA operation and the sampling written out by hand, the
consistency, DAM and masked losses computed with explicit loops and torch.nn.functional, the search / frozen
schedule of DAFA and its separation from the student optimizer, gradient flow, check() errors, config
validation through load_config, and real Taps on hybrid_teacher_small and edge_cnn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdfast.config import CONFIG_DIR, LossConfig, TapConfig, load_config
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.compose import CompositeLoss
from kdfast.methods.kd import KDConfig
from kdfast.methods.sokd import (
    DAFA,
    OPS,
    SoKDConfig,
    SoKDLoss,
    blur_op,
    channel_drop_op,
    consistency_loss,
    hard_relaxed_bernoulli,
    masked_feature_loss,
    mutual_interest_mask,
    noise_op,
    scale_op,
    shift_op,
    straight_through_magnitude,
)
from kdfast.models import build_model
from kdfast.taps import Taps

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
    u[0, 1], u[1, 0] = 0.2, 0.4  # channel 1 of sample 0 and channel 0 of sample 1 are attenuated
    expected = x.clone()
    expected[0, 1] *= 0.7
    expected[1, 0] *= 0.7
    assert torch.allclose(channel_drop_op(x, m, u), expected)
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


def test_every_operation_gives_its_magnitude_a_gradient():
    x = torch.randn(2, 3, 4, 4)
    for op in OPS:
        m = torch.tensor(0.4, requires_grad=True)
        op(x, m, torch.rand_like(x) * 0.9 + 0.05).square().sum().backward()
        assert m.grad is not None and m.grad.abs() > 0, op.__name__


def test_straight_through_magnitude_rounds_forward_and_passes_gradient():
    raw = torch.tensor([0.234, 0.96, 1.7, -0.2], requires_grad=True)
    m = straight_through_magnitude(raw)
    assert torch.allclose(m, torch.tensor([0.2, 1.0, 1.0, 0.0]))
    (m * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert torch.allclose(raw.grad, torch.tensor([1.0, 2.0, 0.0, 0.0]))  # clamp blocks outside [0, 1]


def test_relaxed_bernoulli_is_hard_forward_with_the_soft_gradient():
    logits = torch.tensor([0.5, -1.0], requires_grad=True)
    u = torch.tensor([0.3, 0.9])
    b = hard_relaxed_bernoulli(logits, 0.5, u)
    soft = torch.sigmoid((logits.detach() + torch.log(u / (1 - u))) / 0.5)
    assert torch.equal(b.detach(), (soft > 0.5).float())
    b.sum().backward()
    assert torch.allclose(logits.grad, soft * (1 - soft) / 0.5)


def test_dafa_sample_applies_one_policy_and_reaches_all_logits_and_magnitudes():
    torch.manual_seed(0)
    dafa = DAFA(sub_policies=4, ops_per_policy=2, temperature=0.5)
    assert sorted({i for ops in dafa.policy_ops for i in ops}) == list(range(len(OPS)))
    with torch.no_grad():
        dafa.op_logits.fill_(20.0)  # every gate open, so each magnitude matters
        dafa.magnitudes.fill_(0.5)
    x = torch.randn(2, 3, 4, 4)
    torch.manual_seed(3)
    out = dafa.train()(x)
    torch.manual_seed(3)
    policy = int(F.gumbel_softmax(dafa.policy_logits.detach(), tau=0.5, hard=True).argmax())
    torch.rand(4, 2)  # the gate uniforms: consumed in forward's order so the draws below are the same
    draws = [torch.randn_like(x) if op is noise_op else torch.rand_like(x) for op in OPS]
    expected = x
    for op_index in dafa.policy_ops[policy]:
        expected = OPS[op_index](expected, torch.tensor(0.5), draws[op_index])
    assert torch.allclose(out, expected, atol=1e-6)
    out.square().sum().backward()
    assert (dafa.policy_logits.grad != 0).all()
    assert dafa.magnitudes.grad[policy].abs().min() > 0 and dafa.magnitudes.grad.sum(1).count_nonzero() == 1
    assert torch.equal(dafa.eval()(x), x)


def test_consistency_loss_formula():
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [1.0, 8.0]])
    assert torch.isclose(consistency_loss(a, b), torch.tensor(0.5 * (1 + 4 + 4 + 16) / 4))


def test_mask_and_masked_loss_against_hand_computation():
    student_heat = torch.tensor([[[[4.0, -4.0], [0.0, 4.0]]]])
    teacher_heat = torch.tensor([[[[4.0, 4.0], [0.0, -4.0]]]])
    mask = mutual_interest_mask(student_heat, teacher_heat)  # k = 1 of 4: only (0, 0) is hot in both
    assert torch.equal(mask, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))
    target, student = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    student[0, :, 0, 0] = torch.tensor([3.0, 5.0])
    assert torch.isclose(masked_feature_loss(target, student, mask), torch.tensor((9 + 25) / (2 * 2 * 1)))


def test_forward_parts_match_explicit_terms_and_kd_plus_sokd_is_the_old_total():
    # [kd, sokd] with ce = 0.5 and kd.weight = 0.5 is what method sokd computed before methods became
    # composable: 0.5 tau^2 KL + 0.5 CE + L_feat + alpha L_D + beta L_DA
    torch.manual_seed(0)
    cfg = LossConfig(
        method=["kd", "sokd"],
        ce=0.5,
        sections={
            "kd": KDConfig(weight=0.5, temperature=2.0),
            "sokd": SoKDConfig(student="s", teacher="t", alpha=0.7, beta=0.3),
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
    l_d = (
        F.mse_loss(heads_s[0].sigmoid(), heads_t[0].sigmoid())
        + (heads_s[1] - heads_t[1]).abs().mean()
        + (heads_s[2] - heads_t[2]).abs().mean()
    )
    score = (heads_s[0].sigmoid() * heads_t[0].sigmoid()).flatten(1)
    l_da = 0.0
    for b in range(B):
        top = score[b].argsort(descending=True)[:4]  # a quarter of 16
        diff = (f_t[b] - f_s[b]).flatten(1)[:, top]
        l_da = l_da + diff.square().sum()
    l_da = l_da / (2 * CT * 4 * B)
    kd = F.kl_div(
        F.log_softmax(student_logits / 2, 1), F.softmax(teacher_logits / 2, 1), reduction="batchmean"
    )
    feat, dam = 0.5 * F.mse_loss(f_s, f_t), 0.7 * l_d + 0.3 * l_da
    assert torch.isclose(parts["sokd/feat"], feat)
    assert torch.isclose(parts["sokd/dam"], dam, atol=1e-6)
    assert torch.isclose(parts["sokd/dafa"], parts["sokd/feat"])
    assert torch.isclose(parts["sokd"], feat + dam, atol=1e-6)
    old_total = 0.5 * 4 * kd + 0.5 * F.cross_entropy(student_logits, targets) + feat + dam
    assert torch.isclose(total, old_total, atol=1e-6)
    ((student_map, teacher_map),) = loss.maps(student_taps, teacher_taps)
    assert torch.allclose(student_map, heads_s[0].sigmoid()[:, 0]) and teacher_map.shape == (B, 4, 4)


def test_gradients_reach_student_adapter_and_head_not_teacher_or_dafa():
    loss = _loss()
    student_taps, teacher_taps = _taps()
    loss.check(student_taps, teacher_taps)
    loss.train()
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
    loss.start_epoch(0)
    before = _dafa_params(loss)
    _, parts = loss(*_logits(), torch.tensor([0, 1]), student_taps, teacher_taps)
    with torch.no_grad():
        f_s = F.conv2d(student_taps["s"], loss.adapter.weight, loss.adapter.bias)
    assert torch.isclose(parts["feat"], 0.5 * F.mse_loss(f_s, teacher_taps["t"]))  # searching: target f_t
    loss.after_step()
    searched = _dafa_params(loss)
    assert not torch.equal(before, searched)
    loss.start_epoch(1)
    for _ in range(2):
        _, parts = loss(*_logits(), torch.tensor([0, 1]), student_taps, teacher_taps)
        loss.after_step()
    assert torch.equal(_dafa_params(loss), searched)
    # frozen: the feature target is the augmented teacher feature, so feat equals the consistency loss
    assert torch.isclose(parts["feat"], parts["dafa"])
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
    ],
)
def test_sokd_config_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


def test_sokd_end_to_end_hybrid_teacher_edge_cnn_student():
    torch.manual_seed(0)
    cfg = load_config(CONFIG)
    assert cfg.loss.method == ["kd", "sokd"] and cfg.loss.sections["sokd"].search_epochs == 1
    teacher = Taps(build_model(cfg.teacher.arch, num_classes=10), cfg.teacher.taps).eval()
    student = Taps(build_model(cfg.student.arch, num_classes=10), cfg.student.taps)
    loss = CompositeLoss(cfg.loss, cfg.student.taps, cfg.teacher.taps, kernels_impl="reference")
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    with torch.no_grad():
        teacher_logits, teacher_out = teacher(images)
        loss.check(student(images)[1], teacher_out)
    assert teacher_out["vgg"].shape[-2:] == (8, 8) and student(images)[1]["mid"].shape[-2:] == (8, 8)
    loss.train()
    student.train()
    params = [p for m in (student, loss) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for epoch in range(2):
        loss.start_epoch(epoch)
        student_logits, student_out = student(images)
        total, parts = loss(student_logits, teacher_logits, targets, student_out, teacher_out)
        assert torch.isfinite(total)
        assert set(parts) == {"ce", "kd", "sokd", "sokd/feat", "sokd/dam", "sokd/dafa"}
        optimizer.zero_grad()
        total.backward()
        assert all(p.grad is None for p in teacher.parameters())
        optimizer.step()
        loss.after_step()
    maps = loss.maps(student_out, teacher_out)
    assert maps[0][0].shape == maps[0][1].shape == (2, 8, 8)
