"""CAKD loss against independent references written in the test from the paper's equations: the GL
projector token by token with its group's FC (eq. 5), the PCA loss (eq. 4) with explicit exp-normalized
attention and a fixed swap mask, eq. 8 and eq. 9 on discriminator logits; Algorithm 1's discriminator
schedule and its separation from the student optimizer; the multi-view transforms against torch.rot90,
F.interpolate and hand formulas; real Taps on a timm ViT teacher and the edge_cnn student; config
validation through load_config."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from kdfast.config import CONFIG_DIR, LossConfig, TapConfig, load_config
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.cakd import (
    CAKDConfig,
    CAKDLoss,
    GLProjector,
    crop_and_rotate,
    discriminator_loss,
    generator_loss,
    jitter_colours,
    mask_patches,
    pca_loss,
    swap_masks,
)
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


def _taps(seed: int = 0, batch: int = B, channels: int = C, side: int = SIDE):
    g = torch.Generator().manual_seed(seed)
    student = {"s": torch.randn(batch, channels, side, side, generator=g)}
    qkv = QKV(*(torch.randn(batch, HEADS, TOKENS, D_HEAD, generator=g) for _ in range(3)))
    return student, {"ta": qkv, "tt": torch.randn(batch, TOKENS, DIM, generator=g)}


def _logits(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, CLASSES, generator=g), torch.randn(B, CLASSES, generator=g), torch.tensor([0, 3])


def _built(**cakd) -> CAKDLoss:
    loss = _loss(**cakd)
    loss.check(*_taps())
    return loss


def _trained_like(module: nn.Module, seed: int) -> nn.Module:
    """Weights and biases drawn away from their initialization (non-zero biases), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return module


def _group(y: int, x: int, side: int) -> int:
    """The paper's grouping written out: the 4x4 block of neighbouring pixels (y, x) lies in, row-major
    over the ceil(side / 4) blocks per row."""
    per_row = -(-side // 4)
    return (y // 4) * per_row + (x // 4)


@pytest.mark.parametrize(("side", "groups"), [(14, 16), (7, 4), (4, 1)])
def test_gl_projector_token_n_is_fc_of_its_group_applied_to_pixel_n(side, groups):
    projector = _trained_like(GLProjector(C, DIM, side, dropout=0.0), seed=side).eval()
    assert projector.weight.shape == (groups, DIM, C) and projector.bias.shape == (groups, DIM)
    feature = torch.randn(B, C, side, side, generator=torch.Generator().manual_seed(1))
    tokens = projector(feature)
    assert tokens.shape == (B, side * side, DIM)
    for y in range(side):
        for x in range(side):
            g = _group(y, x, side)
            expected = feature[:, :, y, x] @ projector.weight[g].T + projector.bias[g]
            torch.testing.assert_close(tokens[:, y * side + x], expected, rtol=1e-5, atol=1e-6)
    poked = feature.clone()
    poked[1, :, side - 1, 0] += 1.0  # one pixel of one sample: exactly one token of that sample moves
    moved = (projector(poked) - tokens).abs().amax(-1) > 0
    expected = torch.zeros(B, side * side, dtype=torch.bool)
    expected[1, (side - 1) * side] = True
    assert torch.equal(moved, expected)


def test_gl_projector_resizes_the_student_map_to_the_teacher_grid_first():
    loss = _loss(dropout=0.0)
    student, teacher = _taps(side=SIDE + 2)  # a 5x5 student map, a 3x3 teacher patch grid
    loss.check(student, teacher)
    projected = loss.projections(student, teacher)[2]
    grid = F.interpolate(student["s"], size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    torch.testing.assert_close(projected, loss.gl(grid))


def _softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    e = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _eq4_by_hand(student: QKV, teacher: QKV, swap: QKV) -> torch.Tensor:
    """Eq. 4 head by head: Attn_T with the teacher's CLS key and value in its softmax and sum (patch query
    rows only), PCAttn_S on the element-wise mix of eq. 3, the value relation on the student's own V."""
    d = student.q.shape[-1]
    attn_sq, vr_sq, count_attn, count_vr = 0.0, 0.0, 0, 0
    for b in range(student.q.shape[0]):
        for h in range(student.q.shape[1]):
            qt, kt, vt = (x[b, h] for x in teacher)  # (1 + N, d): row 0 is CLS
            qs, ks, vs = (x[b, h] for x in student)
            attn_t = _softmax_rows(qt[1:] @ kt.T / math.sqrt(d)) @ vt
            pairs = zip((qs, ks, vs), teacher, swap, strict=True)
            g = [torch.where(m[b, h], t[b, h, 1:], s) for s, t, m in pairs]
            attn_s = _softmax_rows(g[0] @ g[1].T / math.sqrt(d)) @ g[2]
            vr_t = vt[1:] @ vt[1:].T / math.sqrt(d)
            vr_s = vs @ vs.T / math.sqrt(d)
            attn_sq += (attn_t - attn_s).square().sum()
            vr_sq += (vr_t - vr_s).square().sum()
            count_attn += attn_t.numel()
            count_vr += vr_t.numel()
    return attn_sq / count_attn + vr_sq / count_vr


def test_pca_loss_equals_eq4_by_hand_with_a_fixed_swap_mask():
    g = torch.Generator().manual_seed(3)
    n = SIDE * SIDE
    student = QKV(*(torch.randn(B, HEADS, n, D_HEAD, generator=g) for _ in range(3)))
    teacher = QKV(*(2 * torch.randn(B, HEADS, n + 1, D_HEAD, generator=g) for _ in range(3)))
    swap = QKV(*(torch.rand(B, HEADS, n, D_HEAD, generator=g) < 0.5 for _ in range(3)))
    torch.testing.assert_close(pca_loss(student, teacher, swap), _eq4_by_hand(student, teacher, swap))
    none = QKV(*(torch.zeros_like(m) for m in swap))
    torch.testing.assert_close(pca_loss(student, teacher), _eq4_by_hand(student, teacher, none))
    every = QKV(*(torch.ones_like(m) for m in swap))
    swapped = pca_loss(student, teacher, every)
    torch.testing.assert_close(swapped, _eq4_by_hand(student, teacher, every))
    # fully swapped, the student attends with the teacher's patch tokens but has no CLS key: were the CLS
    # key dropped from the teacher's softmax too, the attention term would vanish
    relation = lambda v: v @ v.transpose(-1, -2) / math.sqrt(D_HEAD)
    attention_term = swapped - F.mse_loss(relation(student.v), relation(teacher.v[:, :, 1:]))
    assert attention_term > 1e-3


def test_swap_masks_draw_each_element_with_probability_p():
    torch.manual_seed(0)
    like = QKV(*(torch.zeros(4, 2, 50, 50) for _ in range(3)))
    for m in swap_masks(like, 0.3):
        assert m.dtype == torch.bool and abs(m.float().mean().item() - 0.3) < 0.01  # 20k draws: std 0.0032


def test_generator_and_discriminator_losses_are_eq9_and_eq8():
    z_fake, z_real = torch.tensor([[-1.5], [0.2], [2.0]]), torch.tensor([[0.7], [-0.3], [1.1]])
    d_fake, d_real = torch.sigmoid(z_fake), torch.sigmoid(z_real)
    torch.testing.assert_close(generator_loss(z_fake, "minimax"), torch.log(1 - d_fake).mean())
    torch.testing.assert_close(generator_loss(z_fake, "non_saturating"), -torch.log(d_fake).mean())
    torch.testing.assert_close(
        discriminator_loss(z_real, z_fake), -(torch.log(d_real).mean() + torch.log(1 - d_fake).mean())
    )
    assert CAKDConfig().adversarial == "minimax"


def test_forward_parts_match_explicit_terms_and_compose_with_kd():
    # [kd, cakd] with ce = 1 - alpha and kd.weight = alpha: alpha tau^2 KL + (1 - alpha) CE + eq. 10
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
    convs = (loss.pca.q, loss.pca.k, loss.pca.v)
    qkv = QKV(
        *(
            F.conv2d(student["s"], c.weight, c.bias, padding=1).view(B, HEADS, D_HEAD, -1).transpose(-1, -2)
            for c in convs
        )
    )
    projected = torch.stack(
        [
            student["s"][:, :, y, x] @ loss.gl.weight[_group(y, x, SIDE)].T + loss.gl.bias[_group(y, x, SIDE)]
            for y in range(SIDE)
            for x in range(SIDE)
        ],
        dim=1,
    )
    fooled = loss.discriminator(projected.flatten(1))
    no_swap = QKV(*(torch.zeros(B, HEADS, SIDE * SIDE, D_HEAD, dtype=torch.bool) for _ in range(3)))
    expected = {
        "pca": 0.7 * _eq4_by_hand(qkv, teacher["ta"], no_swap),
        "gl": 1.3 * (projected - teacher["tt"][:, 1:]).square().mean(),
        "adv": 0.2 * torch.log(1 - torch.sigmoid(fooled)).mean(),
    }
    assert set(parts) == {"ce", "kd", "cakd", "cakd/pca", "cakd/gl", "cakd/adv"}
    for key, value in expected.items():
        torch.testing.assert_close(parts[f"cakd/{key}"], value, rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(parts["cakd"], sum(expected.values()), rtol=1e-5, atol=1e-6)
    ce = F.cross_entropy(s_logits, targets)
    reference = ALPHA * TAU**2 * kl + (1 - ALPHA) * ce + sum(expected.values())
    torch.testing.assert_close(total, reference, rtol=1e-5, atol=1e-6)


def test_swap_only_in_training():
    loss = _built(replace_prob=1.0)
    student, teacher = _taps(seed=2)
    loss.train()
    _, trained = loss(*_logits(), student, teacher)
    loss.eval()
    _, evaluated = loss(*_logits(), student, teacher)
    qkv = loss.projections(student, teacher)[0]
    every = QKV(*(torch.ones_like(x, dtype=torch.bool) for x in qkv))
    torch.testing.assert_close(trained["pca"], pca_loss(qkv, teacher["ta"], every))
    torch.testing.assert_close(evaluated["pca"], pca_loss(qkv, teacher["ta"]))


def test_discriminator_scores_a_whole_sample():
    loss = _built(discriminator_width=16)
    first = loss.discriminator[1]
    assert first.in_features == SIDE * SIDE * DIM and loss.discriminator[-1].out_features == 1
    projected = torch.randn(B, SIDE * SIDE, DIM)
    base = loss.discriminator(projected)
    poked = projected.clone()
    poked[0, SIDE * SIDE - 1] += 1.0  # the last token of sample 0 moves sample 0's score only
    moved = loss.discriminator(poked) - base
    assert moved[0].abs() > 0 and moved[1].abs() == 0


def _disc_params(loss: CAKDLoss) -> list[torch.Tensor]:
    return [p.detach().clone() for p in loss.discriminator.parameters()]


def test_discriminator_trains_when_step_mod_k_is_zero_and_is_not_in_the_student_optimizer():
    torch.manual_seed(0)
    loss = _built(discriminator_every=3, discriminator_lr=1e-2)
    loss.train()
    disc = set(loss.discriminator.parameters())
    student_params = [p for p in loss.parameters() if p.requires_grad]  # what train_stage optimizes
    assert student_params and not disc & set(student_params)
    assert set(student_params) == set(loss.pca.parameters()) | set(loss.gl.parameters())
    optimizer = torch.optim.SGD(student_params, lr=0.1)
    updated = []
    for step in range(7):
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
    assert updated == [0, 3, 6]  # Algorithm 1: step % 3 == 0, steps counted from 0


def _eq8(loss: CAKDLoss) -> torch.Tensor:
    teacher, student = loss._stash
    real, fake = loss.discriminator(teacher), loss.discriminator(student)
    return -(torch.log(torch.sigmoid(real)).mean() + torch.log(1 - torch.sigmoid(fake)).mean())


def test_discriminator_step_lowers_its_loss_and_resume_restores_it(tmp_path):
    torch.manual_seed(0)
    loss = _built(discriminator_every=1, discriminator_lr=1e-2)
    loss.train()
    loss(*_logits(), *_taps(seed=3))
    before = _eq8(loss)
    loss.after_step()
    torch.testing.assert_close(loss.last_disc_loss, before)
    assert _eq8(loss) < before

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


def test_eq7_leaves_half_the_inputs_untouched_and_gives_the_others_one_transform():
    # Eq. 7: x~ = x with probability 1 - p, else one transform. Over 20,000 draws the untouched share is
    # 0.5 (binomial std 0.0035) and each transform 0.5 / 4 = 0.125 (std 0.0023); no sample gets two
    torch.manual_seed(0)
    draws = _loss(view_prob=0.5)._draw_views(20_000, torch.device("cpu"))
    assert draws.shape == (4, 20_000) and draws.sum(0).max() == 1
    untouched = (~draws.any(0)).float().mean()
    assert abs(untouched.item() - 0.5) < 0.015
    torch.testing.assert_close(draws.float().mean(1), torch.full((4,), 0.125), atol=0.01, rtol=0)
    # the same share through the generator itself: a sample comes back equal to its input exactly when no
    # transform was drawn (a drawn transform changes every image here)
    images = torch.randn(4_000, 3, 8, 8)
    viewed = _loss(view_prob=0.5).train().student_view(images)
    same = (viewed == images).flatten(1).all(1).float().mean()
    assert abs(same.item() - 0.5) < 0.03  # std 0.008


def test_student_view_identity_and_every_sample_changed():
    torch.manual_seed(0)
    images = torch.randn(16, 3, 16, 16)
    assert torch.equal(_loss(view_prob=0.0).train().student_view(images), images)
    always = _loss(view_prob=1.0)
    assert torch.equal(always.eval().student_view(images), images)
    always.train()
    viewed = always.student_view(images)
    assert viewed.shape == images.shape
    assert ((viewed - images).flatten(1).abs().amax(1) > 0).all()


def test_rotation_by_a_right_angle_is_rot90_and_a_central_crop_is_an_upsampling():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 8, 8, generator=g)
    ones, zeros = torch.ones(2), torch.zeros(2)
    rotated = crop_and_rotate(images, ones, torch.zeros(2, 2), torch.full((2,), math.pi / 2))
    torch.testing.assert_close(rotated, torch.rot90(images, k=1, dims=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(crop_and_rotate(images, ones, torch.zeros(2, 2), zeros), images)
    cropped = crop_and_rotate(images, torch.full((2,), 0.5), torch.zeros(2, 2), zeros)
    upsampled = F.interpolate(images[:, :, 2:6, 2:6], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(cropped[:, :, 1:7, 1:7], upsampled[:, :, 1:7, 1:7])  # border: clamped there


def test_colour_jitter_and_patch_masking_by_hand():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 4, 4, generator=g)
    brightness, contrast = torch.tensor([1.2, 0.8]), torch.tensor([0.7, 1.3])
    saturation = torch.tensor([1.1, 0.6])
    out = jitter_colours(images, brightness, contrast, saturation)
    for b in range(2):
        x = images[b]
        x = (x - x.mean()) * contrast[b] + x.mean()
        grey = x.mean(0, keepdim=True)
        x = grey + saturation[b] * (x - grey) + (brightness[b] - 1)
        torch.testing.assert_close(out[b], x)
    torch.testing.assert_close(jitter_colours(images, *[torch.ones(2)] * 3), images)
    keep = torch.tensor([[[True, False], [False, True]], [[False, False], [True, True]]])
    masked = mask_patches(images, keep)
    for b in range(2):
        for i in range(2):
            for j in range(2):
                block = masked[b, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2]
                expected = images[b, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] * keep[b, i, j]
                assert torch.equal(block, expected)


def test_gradients_reach_student_and_projectors_not_teacher():
    torch.manual_seed(0)
    loss = _built()
    loss.train()
    student_conv = nn.Conv2d(3, C, 3, padding=1)
    teacher_proj = nn.Linear(5, 3 * HEADS * D_HEAD + DIM)
    feature = student_conv(torch.randn(B, 3, SIDE, SIDE))
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
    with pytest.raises(UsageError, match="teacher_tokens: tap 'tt' has shape \\(2, 6, 3, 3\\)"):
        _loss().check(student, {**teacher, "tt": student["s"]})
    with pytest.raises(UsageError, match="batch sizes 3, 2, 2"):
        _loss().check(_taps(batch=3)[0], teacher)
    with pytest.raises(UsageError, match="expected \\(B, C, H, W\\)"):
        _loss().check({"s": torch.zeros(B, C)}, teacher)
    with pytest.raises(UsageError, match="attention tap has 9 patch tokens and the token tap 16"):
        _loss().check(student, {**teacher, "tt": torch.zeros(B, 17, DIM)})
    loss = _built()
    with pytest.raises(
        UsageError, match="built for .* \\(6, 2, 4, 9, 8\\), but these taps give \\(7, 2, 4, 9, 8\\)"
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
    cakd = cfg.loss.sections["cakd"]
    assert cfg.loss.method == ["kd", "cakd"] and cakd.replace_prob == 0.5 and cakd.adversarial == "minimax"
    teacher = Taps(build_model(cfg.teacher.arch, num_classes=10), cfg.teacher.taps).eval()
    student = Taps(build_model(cfg.student.arch, num_classes=10), cfg.student.taps)
    loss = CAKDLoss(cakd, cfg.student.taps, cfg.teacher.taps, kernels_impl="reference")
    images = torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        teacher_logits, teacher_out = teacher(images)
    student_logits, student_out = student(images)
    loss.check(student_out, teacher_out)
    # the student's tap and the teacher's patch grid agree (4x4), as in the paper's pairs: no resize
    assert student_out["mid"].shape[-2:] == (4, 4) and teacher_out["attn"].q.shape[2] == 17
    assert loss.gl.weight.shape[:2] == (1, 128) and loss.pca.heads == 4
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
        ("loss.cakd.discriminator_width=0", "discriminator_width' must be > 0"),
        ("loss.cakd.adversarial=wgan", "adversarial"),
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
    assert torch.isfinite(total) and parts["pca"] > 0 and parts["gl"] > 0 and parts["adv"] < 0
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


PAPER_CONFIGS = {
    "cakd_vitb16_resnet50_cifar100.yaml": ("resnet50", 200, [100, 150], 64),
    "cakd_vitb16_effb0_imagenet.yaml": ("efficientnet_b0", 120, [30, 60, 90], 256),
}


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_hold_the_papers_setting_and_need_local_weights(name, tmp_path):
    student, epochs, milestones, batch = PAPER_CONFIGS[name]
    with pytest.raises(ConfigError, match="teacher.weights: file not found"):
        load_config(CONFIG_DIR / name, [f"data.root={tmp_path}"])
    weights = tmp_path / "vit_b_16.pth"
    weights.touch()
    cfg = load_config(CONFIG_DIR / name, [f"data.root={tmp_path}", f"teacher.weights={weights}"])
    assert cfg.teacher.arch.name == "vit_b_16" and cfg.student.arch.name == student
    train = cfg.student.train
    assert (train.epochs, train.schedule.name, train.schedule.milestones, train.schedule.gamma) == (
        epochs,
        "multistep",
        milestones,
        0.1,
    )
    assert (train.optimizer.name, train.optimizer.lr, train.optimizer.momentum) == ("sgd", 0.1, 0.9)
    assert (
        train.optimizer.weight_decay == 1e-4 and cfg.data.batch_size == batch and cfg.data.image_size == 224
    )
    # eq. 10 beside the CE, nothing kdfast adds: no logit KD, eq. 9's minimax term, Algorithm 1's period
    cakd = cfg.loss.sections["cakd"]
    assert cfg.loss.method == ["cakd"] and cfg.loss.ce_weight() == 1.0
    assert (cakd.adversarial, cakd.discriminator_every, cakd.replace_prob, cakd.view_prob) == (
        "minimax",
        5,
        0.5,
        0.5,
    )
