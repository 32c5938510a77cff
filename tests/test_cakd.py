"""CAKD loss against independent references: the PCA and GL terms written out with F.interpolate, F.conv2d,
explicit softmax matrices and per-position FCs; the discriminator schedule and its separation from the
student optimizer; the multi-view input; real Taps on a timm ViT teacher and the edge_cnn student; and
config validation through load_config."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from kdfast.config import CONFIG_DIR, LossConfig, TapConfig, load_config
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.cakd import CAKDConfig, CAKDLoss, partial_cross
from kdfast.methods.compose import CompositeLoss
from kdfast.methods.kd import KDConfig
from kdfast.models import build_model
from kdfast.taps import QKV, Taps

B, C, HEADS, D_HEAD, DIM, SIDE, CLASSES = 2, 6, 2, 4, 8, 3, 5
TOKENS = SIDE * SIDE + 1  # + CLS
ALPHA, TAU = 0.3, 2.0
STUDENT_TAPS = {"s": TapConfig(path="a", kind="feature")}
TEACHER_TAPS = {"ta": TapConfig(path="b", kind="attention"), "tt": TapConfig(path="c", kind="feature")}
CONFIG = CONFIG_DIR / "cakd_digits.yaml"


def _section(**cakd) -> CAKDConfig:
    return CAKDConfig(**{"student": "s", "teacher_attention": "ta", "teacher_tokens": "tt", **cakd})


def _loss(**cakd) -> CAKDLoss:
    return CAKDLoss(_section(**cakd), STUDENT_TAPS, TEACHER_TAPS, kernels_impl="reference")


def _taps(seed: int = 0, batch: int = B, channels: int = C):
    g = torch.Generator().manual_seed(seed)
    student = {"s": torch.randn(batch, channels, 4, 4, generator=g)}
    qkv = QKV(*(torch.randn(batch, HEADS, TOKENS, D_HEAD, generator=g) for _ in range(3)))
    return student, {"ta": qkv, "tt": torch.randn(batch, TOKENS, DIM, generator=g)}


def _logits(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, CLASSES, generator=g), torch.randn(B, CLASSES, generator=g), torch.tensor([0, 3])


def _built(**cakd) -> CAKDLoss:
    loss = _loss(**cakd)
    loss.check(*_taps())
    return loss


def _explicit_pca(loss: CAKDLoss, feature: torch.Tensor, teacher: QKV) -> torch.Tensor:
    """Eq. 2 by hand: bilinear resize to the patch grid, each conv, heads cut from consecutive channel
    blocks, full softmax matrices, CLS row and column of the teacher dropped."""
    grid = F.interpolate(feature, size=(SIDE, SIDE), mode="bilinear", align_corners=False)

    def project(conv: nn.Conv2d) -> torch.Tensor:
        x = F.conv2d(grid, conv.weight, conv.bias, padding=1)
        heads = [x[:, h * D_HEAD : (h + 1) * D_HEAD].flatten(2).transpose(1, 2) for h in range(HEADS)]
        return torch.stack(heads, dim=1)

    q, k, v = (project(conv) for conv in (loss.pca.q, loss.pca.k, loss.pca.v))
    qt, kt, vt = (x[:, :, 1:] for x in teacher)

    def attn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.softmax(a @ b.transpose(-1, -2) / math.sqrt(D_HEAD), dim=-1)

    values = (v @ v.transpose(-1, -2) - vt @ vt.transpose(-1, -2)) / math.sqrt(D_HEAD)
    return (attn(q, k) - attn(qt, kt)).square().mean() + values.square().mean()


def _explicit_gl(loss: CAKDLoss, feature: torch.Tensor) -> torch.Tensor:
    """Eq. 3 by hand: the map at 4x the patch grid; token (y, x) = sum over the 16 positions (i, j) of its
    4x4 neighbourhood of FC_ij applied to that pixel, plus the bias."""
    big = F.interpolate(feature, size=(4 * SIDE, 4 * SIDE), mode="bilinear", align_corners=False)
    tokens = []
    for y in range(SIDE):
        for x in range(SIDE):
            token = loss.gl.fcs.bias.expand(feature.shape[0], -1)
            for i in range(4):
                for j in range(4):
                    token = token + F.linear(big[:, :, 4 * y + i, 4 * x + j], loss.gl.fc(i, j))
            tokens.append(token)
    return torch.stack(tokens, dim=1)


def test_forward_parts_match_explicit_terms_and_kd_plus_cakd_is_the_old_total():
    # [kd, cakd] with ce = 1 - alpha and kd.weight = alpha is what method cakd computed before methods became
    # composable: alpha tau^2 KL + (1 - alpha) CE + pca_weight L_PCA + gl_weight L_GL + adv_weight L_MVG
    section = _section(replace_prob=0.0, dropout=0.0, pca_weight=0.7, gl_weight=1.3, adversarial_weight=0.2)
    cfg = LossConfig(
        method=["kd", "cakd"],
        ce=1 - ALPHA,
        sections={"kd": KDConfig(weight=ALPHA, temperature=TAU), "cakd": section},
    )
    composite = CompositeLoss(cfg, STUDENT_TAPS, TEACHER_TAPS, kernels_impl="reference")
    composite.check(*_taps())
    composite.train()
    student, teacher = _taps(seed=4)
    logits = _logits()
    total, parts = composite(*logits, student, teacher)

    loss = composite.members["cakd"]
    s_logits, t_logits, targets = logits
    kl = F.kl_div(F.log_softmax(s_logits / TAU, 1), F.softmax(t_logits / TAU, 1), reduction="batchmean")
    projected = _explicit_gl(loss, student["s"])
    fooled = loss.discriminator(projected)
    expected = {
        "pca": 0.7 * _explicit_pca(loss, student["s"], teacher["ta"]),
        "gl": 1.3 * (projected - teacher["tt"][:, 1:]).square().mean(),
        "adv": 0.2 * -torch.log(torch.sigmoid(fooled)).mean(),
    }
    assert set(parts) == {"ce", "kd", "cakd", "cakd/pca", "cakd/gl", "cakd/adv"}
    for key, value in expected.items():
        torch.testing.assert_close(parts[f"cakd/{key}"], value, rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(parts["cakd"], sum(expected.values()), rtol=1e-5, atol=1e-6)
    old_total = (
        ALPHA * TAU**2 * kl + (1 - ALPHA) * F.cross_entropy(s_logits, targets) + sum(expected.values())
    )
    torch.testing.assert_close(total, old_total, rtol=1e-5, atol=1e-6)


def test_full_replacement_leaves_no_pca_loss():
    loss = _built(replace_prob=1.0)
    loss.train()
    _, parts = loss(*_logits(), *_taps(seed=2))
    assert parts["pca"] == 0
    loss.eval()  # no replacement at evaluation: the student's own Q, K, V
    _, parts = loss(*_logits(), *_taps(seed=2))
    assert parts["pca"] > 0


def test_partial_cross_replaces_each_element_with_probability_p():
    torch.manual_seed(0)
    student = QKV(*(torch.zeros(4, 2, 50, 50) for _ in range(3)))
    teacher = QKV(*(torch.ones(4, 2, 50, 50) for _ in range(3)))
    for x in partial_cross(student, teacher, 0.3):
        assert set(x.unique().tolist()) == {0.0, 1.0}
        assert abs(x.mean().item() - 0.3) < 0.01  # 20k Bernoulli(0.3) draws: std 0.0032


def test_gl_projector_shapes_and_each_fc_touches_only_its_position():
    loss = _built()
    loss.eval()
    assert loss.projections(*_taps())[2].shape == (B, SIDE * SIDE, DIM)
    g = torch.Generator().manual_seed(5)
    big = torch.randn(1, C, 4 * SIDE, 4 * SIDE, generator=g)
    base = loss.gl(big)
    delta = torch.randn(C, generator=g)
    changes = {}
    for y, x in [(0, 0), (5, 6), (4 * SIDE - 1, 2), (7, 4 * SIDE - 1)]:
        poked = big.clone()
        poked[0, :, y, x] += delta
        change = loss.gl(poked) - base
        token = (y // 4) * SIDE + x // 4
        others = torch.cat([change[0, :token], change[0, token + 1 :]])
        assert others.abs().max() == 0, (y, x)
        torch.testing.assert_close(change[0, token], F.linear(delta, loss.gl.fc(y % 4, x % 4)))
        changes[y % 4, x % 4] = change[0, token]
    assert len({tuple(v.tolist()) for v in changes.values()}) == len(changes)  # 16 different FCs


def _disc_params(loss: CAKDLoss) -> list[torch.Tensor]:
    return [p.detach().clone() for p in loss.discriminator.parameters()]


def test_discriminator_updates_every_kth_step_and_is_not_in_the_student_optimizer():
    torch.manual_seed(0)
    loss = _built(discriminator_every=3, discriminator_lr=1e-2)
    loss.train()
    disc = set(loss.discriminator.parameters())
    student_params = [p for p in loss.parameters() if p.requires_grad]  # what train_stage optimizes
    assert student_params and not disc & set(student_params)
    assert set(student_params) == set(loss.pca.parameters()) | set(loss.gl.parameters())
    optimizer = torch.optim.SGD(student_params, lr=0.1)
    updated = []
    for step in range(1, 8):
        before = _disc_params(loss)
        total, _ = loss(*_logits(), *_taps(seed=step))
        optimizer.zero_grad()
        total.backward()
        assert all(p.grad is None for p in disc)
        optimizer.step()
        assert all(torch.equal(a, b) for a, b in zip(before, _disc_params(loss), strict=True))
        loss.after_step()
        if not all(torch.equal(a, b) for a, b in zip(before, _disc_params(loss), strict=True)):
            updated.append(step)
    assert updated == [3, 6]


def _bce(loss: CAKDLoss) -> torch.Tensor:
    teacher, student = loss._stash
    real, fake = loss.discriminator(teacher), loss.discriminator(student)
    return -(torch.log(torch.sigmoid(real)).mean() + torch.log(1 - torch.sigmoid(fake)).mean())


def test_discriminator_step_lowers_its_loss_and_resume_restores_it(tmp_path):
    torch.manual_seed(0)
    loss = _built(discriminator_every=1, discriminator_lr=1e-2)
    loss.train()
    loss(*_logits(), *_taps(seed=3))
    before = _bce(loss)
    loss.after_step()
    torch.testing.assert_close(loss.last_disc_loss, before)
    assert _bce(loss) < before

    torch.save(loss.state_dict(), tmp_path / "extra.pt")
    resumed = _built(discriminator_every=1, discriminator_lr=1e-2)
    resumed.load_state_dict(torch.load(tmp_path / "extra.pt", weights_only=True))
    assert resumed.steps == 1
    for a, b in zip(_disc_params(loss), _disc_params(resumed), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    resumed.train()
    resumed._stash = loss._stash
    loss.after_step()
    resumed.after_step()  # same Adam moments: the same second update
    for a, b in zip(_disc_params(loss), _disc_params(resumed), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_student_view_identity_and_every_sample_changed():
    torch.manual_seed(0)
    images = torch.randn(16, 3, 16, 16)
    assert torch.equal(_loss(view_prob=0.0).train().student_view(images), images)
    always = _loss(view_prob=1.0)
    assert torch.equal(always.eval().student_view(images), images)
    always.train()
    for _ in range(3):
        viewed = always.student_view(images)
        assert viewed.shape == images.shape
        assert ((viewed - images).flatten(1).abs().amax(1) > 0).all()


def _shift(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``image`` moved right by dx and down by dy, zeros shifted in."""
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        :, max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def test_shift_view_is_an_integer_shift_with_optional_flip():
    torch.manual_seed(1)
    images = torch.randn(8, 3, 16, 16)
    shifted = CAKDLoss._shifted(images)
    reach = 16 // 8
    for image, out in zip(images, shifted, strict=True):
        candidates = [
            _shift(source, dx, dy)
            for source in (image, image.flip(-1))
            for dx in range(-reach, reach + 1)
            for dy in range(-reach, reach + 1)
            if (dx, dy) != (0, 0)
        ]
        assert any(torch.equal(out, c) for c in candidates)


def test_gradients_reach_student_and_projectors_not_teacher():
    torch.manual_seed(0)
    loss = _built()
    loss.train()
    student_conv = nn.Conv2d(3, C, 3, padding=1)
    teacher_proj = nn.Linear(5, 3 * HEADS * D_HEAD + DIM)
    feature = student_conv(torch.randn(B, 3, 4, 4))
    mixed = teacher_proj(torch.randn(B, TOKENS, 5))
    q, k, v, tokens = mixed.split([HEADS * D_HEAD] * 3 + [DIM], dim=-1)
    heads = lambda x: x.reshape(B, TOKENS, HEADS, D_HEAD).transpose(1, 2)
    teacher_logits = torch.randn(B, CLASSES, requires_grad=True)
    student_logits = torch.randn(B, CLASSES, requires_grad=True)
    total, _ = loss(
        student_logits,
        teacher_logits,
        torch.tensor([1, 2]),
        {"s": feature},
        {"ta": QKV(heads(q), heads(k), heads(v)), "tt": tokens},
    )
    total.backward()
    assert student_conv.weight.grad is not None and student_conv.weight.grad.abs().sum() > 0
    for p in [*loss.pca.parameters(), *loss.gl.parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert teacher_proj.weight.grad is None and teacher_logits.grad is None
    assert all(p.grad is None for p in loss.discriminator.parameters())


def test_check_rejects_taps_that_cannot_be_matched():
    student, teacher = _taps()
    with pytest.raises(UsageError, match="teacher tap 'ta' gave Tensor"):
        _loss().check(student, {**teacher, "ta": teacher["tt"]})
    with pytest.raises(UsageError, match="teacher_tokens: tap 'tt' has shape \\(2, 6, 4, 4\\)"):
        _loss().check(student, {**teacher, "tt": student["s"]})
    with pytest.raises(UsageError, match="batch sizes 3, 2, 2"):
        _loss().check(_taps(batch=3)[0], teacher)
    with pytest.raises(UsageError, match="expected \\(B, C, H, W\\)"):
        _loss().check({"s": torch.zeros(B, C)}, teacher)
    loss = _built()
    with pytest.raises(
        UsageError, match="built for .* \\(6, 2, 4, 8\\), but these taps give \\(7, 2, 4, 8\\)"
    ):
        loss.check(*_taps(channels=7))
    with pytest.raises(UsageError, match="call check\\(\\) on a real batch first"):
        _loss()(*_logits(), *_taps())
    with pytest.raises(
        ConfigError, match="loss.cakd.teacher_tokens: teacher tap 'ta' must have kind 'feature'"
    ):
        _loss(teacher_tokens="ta")


def test_cakd_digits_config_loads_and_its_models_match():
    cfg = load_config(CONFIG)
    assert cfg.loss.method == ["kd", "cakd"] and cfg.loss.sections["cakd"].replace_prob == 0.5
    teacher = Taps(build_model(cfg.teacher.arch, num_classes=10), cfg.teacher.taps).eval()
    student = Taps(build_model(cfg.student.arch, num_classes=10), cfg.student.taps)
    loss = CAKDLoss(cfg.loss.sections["cakd"], cfg.student.taps, cfg.teacher.taps, kernels_impl="reference")
    images = torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        teacher_logits, teacher_out = teacher(images)
    student_logits, student_out = student(images)
    loss.check(student_out, teacher_out)
    assert student_out["mid"].shape[-2:] == (8, 8) and teacher_out["attn"].q.shape[2] == 17
    assert loss.gl.fcs.out_channels == 128 and loss.pca.heads == 4
    total, _ = loss(student_logits, teacher_logits, torch.tensor([1, 7]), student_out, teacher_out)
    assert torch.isfinite(total)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.cakd.student=nope", "loss.cakd.student names no student tap 'nope'"),
        (
            "teacher.taps.attn.kind=feature",
            "teacher_attention: teacher tap 'attn' must have kind 'attention'",
        ),
        ("loss.cakd.replace_prob=1.5", "replace_prob' must be in \\[0, 1\\]"),
        ("loss.cakd.discriminator_every=0", "discriminator_every' must be > 0"),
    ],
)
def test_cakd_config_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


def test_cakd_end_to_end_timm_vit_teacher_edge_cnn_student():
    torch.manual_seed(0)
    teacher_taps = {
        "attn": TapConfig(path="blocks.1.attn", kind="attention"),
        "tokens": TapConfig(path="blocks.1", kind="feature"),
    }
    student_taps = {"mid": TapConfig(path="blocks.2", kind="feature")}
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2, num_classes=3
    )
    teacher = Taps(vit, teacher_taps).eval()
    student = Taps(build_model({"source": "kdfast", "name": "edge_cnn"}, num_classes=3), student_taps)
    cfg = CAKDConfig(student="mid", teacher_attention="attn", teacher_tokens="tokens", discriminator_every=1)
    loss = CAKDLoss(cfg, student_taps, teacher_taps, kernels_impl="reference")
    images, targets = torch.randn(B, 3, 16, 16), torch.tensor([0, 2])
    with torch.no_grad():
        loss.check(student(images)[1], teacher(images)[1])
        teacher_logits, teacher_out = teacher(images)
    loss.train()
    student.train()
    params = [p for m in (student, loss) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    disc_before = _disc_params(loss)
    student_logits, student_out = student(loss.student_view(images))
    total, parts = loss(student_logits, teacher_logits, targets, student_out, teacher_out)
    assert torch.isfinite(total) and all(parts[k] > 0 for k in ("pca", "gl", "adv"))
    total.backward()
    assert student.model.blocks[2].block[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in [*loss.pca.parameters(), *loss.gl.parameters()])
    assert all(p.grad is None for p in vit.parameters())
    optimizer.step()
    loss.after_step()
    assert not torch.equal(disc_before[0], _disc_params(loss)[0])
    ((student_map, teacher_map),) = loss.maps(student_out, teacher_out)
    assert student_map.shape == teacher_map.shape == (B, 4, 4)
    torch.testing.assert_close(teacher_map.flatten(1).norm(dim=1), torch.ones(B))
