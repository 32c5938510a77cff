"""AGKD's attention term against independent references (torch.nn.functional, pytorch_msssim, explicit
attention), and the default run's whole AGKD loss through its config against AGKD eq. 1 + 4 written out."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import pytorch_msssim
import torch
import torch.nn.functional as F
import torchvision

from kdfast.config import TapConfig, load_config
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.agkd import (
    AGKDConfig,
    AGKDLoss,
    AttentionPairConfig,
    PerceptualConfig,
    attention_metric,
    global_ssim,
)
from kdfast.methods.compose import CompositeLoss
from kdfast.methods.features import cls_attention_map
from kdfast.models import build_model
from kdfast.taps import QKV

B, K = 3, 5
STUDENT_TAPS = {"mid": TapConfig(path="blocks.2")}
TEACHER_TAPS = {"vgg": TapConfig(path="vgg.features.13"), "vit": TapConfig(path="vit.attn", kind="attention")}


def _taps(seed: int = 0, tokens: int = 1 + 16):
    g = torch.Generator().manual_seed(seed)
    student = {"mid": torch.randn(B, 6, 4, 4, generator=g)}
    qkv = QKV(*(torch.randn(B, 2, tokens, 8, generator=g) for _ in range(3)))
    return student, {"vgg": torch.randn(B, 7, 8, 8, generator=g), "vit": qkv}


def _loss(metric: str = "mse", teacher=("vgg",), combine: str = "add", ssim="windowed", **agkd) -> AGKDLoss:
    pairs = [AttentionPairConfig(student="mid", teacher=list(teacher), combine=combine)]
    cfg = AGKDConfig(metric=metric, pairs=pairs, ssim=ssim, window_size=3, **agkd)
    return AGKDLoss(cfg, STUDENT_TAPS, TEACHER_TAPS, kernels_impl="reference")


def _at_map(feature: torch.Tensor, size) -> torch.Tensor:
    """Zagoruyko & Komodakis attention map, written out: mean_c F^2, bilinear resize, L2 over the grid."""
    maps = F.interpolate(
        feature.pow(2).mean(1, keepdim=True), size=size, mode="bilinear", align_corners=False
    )
    return maps / maps.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def _cls_map(qkv: QKV, size) -> torch.Tensor:
    """The CLS row of the full N x N attention matrix, as the test's independent reference: (B, 1, h, w)."""
    full = torch.softmax(qkv.q @ qkv.k.transpose(-1, -2) / math.sqrt(qkv.q.shape[-1]), dim=-1)
    side = math.isqrt(full.shape[-1] - 1)
    row = full[:, :, 0, 1:].mean(1).reshape(-1, 1, side, side)
    row = F.interpolate(row, size=size, mode="bilinear", align_corners=False)
    return row / row.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def test_cls_attention_map_equals_the_explicit_attention_matrix():
    qkv = _taps(tokens=1 + 25)[1]["vit"]
    torch.testing.assert_close(cls_attention_map(qkv, (8, 8), impl="reference"), _cls_map(qkv, (8, 8))[:, 0])


@pytest.mark.parametrize("metric", ["mse", "cosine", "ssim", "hybrid"])
def test_metrics_match_independent_references(metric):
    student_taps, teacher_taps = _taps()
    s = _at_map(student_taps["mid"], (8, 8))  # grid: the teacher feature tap's 8 x 8
    t = _at_map(teacher_taps["vgg"], (8, 8))
    cos = 1 - F.cosine_similarity(s.flatten(1), t.flatten(1)).mean()
    peak = t.flatten(1).amax(1).view(-1, 1, 1, 1)
    one_minus_ssim = (
        1 - pytorch_msssim.ssim(s / peak, t / peak, data_range=1.0, win_size=3, size_average=False).mean()
    )
    expected = {
        "mse": F.mse_loss(s, t),
        "cosine": cos,
        "ssim": one_minus_ssim,
        "hybrid": 0.2 * one_minus_ssim + 0.8 * cos,
    }[metric]
    loss_fn = _loss(metric, alpha=0.2, beta=0.8)
    logits, teacher_logits, y = torch.randn(B, K), torch.randn(B, K), torch.tensor([0, 1, 2])
    term, parts = loss_fn(logits, teacher_logits, y, student_taps, teacher_taps)
    torch.testing.assert_close(term, expected, atol=1e-5, rtol=1e-4)
    assert parts == {}


def _global_ssim_by_hand(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Wang et al. 2004, eq. 13, with the statistics of the whole map (AGKD's SSIM), in float64, one loop per
    (sample, channel): (B,) means over the channels."""
    c1, c2 = 0.01**2, 0.03**2
    values = torch.zeros(x.shape[:2], dtype=torch.float64)
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            u, v = x[b, c].flatten().double(), y[b, c].flatten().double()
            mu_u, mu_v = u.sum() / u.numel(), v.sum() / v.numel()
            var_u = ((u - mu_u) ** 2).sum() / u.numel()
            var_v = ((v - mu_v) ** 2).sum() / v.numel()
            cov = ((u - mu_u) * (v - mu_v)).sum() / u.numel()
            values[b, c] = ((2 * mu_u * mu_v + c1) * (2 * cov + c2)) / (
                (mu_u**2 + mu_v**2 + c1) * (var_u + var_v + c2)
            )
    return values.mean(1)


@pytest.mark.parametrize("metric", ["ssim", "hybrid"])
def test_global_ssim_is_one_statistic_over_the_whole_map(metric):
    student_taps, teacher_taps = _taps()
    s = _at_map(student_taps["mid"].double(), (8, 8)).requires_grad_(True)
    t = _at_map(teacher_taps["vgg"].double(), (8, 8))
    peak = t.flatten(1).amax(1).view(-1, 1, 1, 1)
    ssim = _global_ssim_by_hand(s / peak, t / peak)
    cos = F.cosine_similarity(s.flatten(1), t.flatten(1))
    expected = {"ssim": 1 - ssim.mean(), "hybrid": 0.2 * (1 - ssim.mean()) + 0.8 * (1 - cos.mean())}[metric]
    got = attention_metric(s, t, metric=metric, alpha=0.2, beta=0.8, ssim="global")
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(*(torch.autograd.grad(x, s)[0] for x in (got, expected)))
    # the loss module's default (the paper's form) on float32 taps, and its distance from the windowed form
    loss_fn = AGKDLoss(
        AGKDConfig(metric=metric, alpha=0.2, beta=0.8, pairs=[AttentionPairConfig("mid", ["vgg"])]),
        STUDENT_TAPS,
        TEACHER_TAPS,
        kernels_impl="reference",
    )
    assert loss_fn.cfg.ssim == "global"
    args = (torch.randn(B, K), torch.randn(B, K), torch.tensor([0, 1, 2]), student_taps, teacher_taps)
    term = loss_fn(*args)[0]
    torch.testing.assert_close(term, expected.float(), rtol=1e-5, atol=1e-6)
    assert abs(term - _loss(metric, alpha=0.2, beta=0.8)(*args)[0]) > 1e-3


def test_global_ssim_by_hand_on_a_two_cell_map():
    # x = (1, 0), y = (0, 1): means 1/2, variances 1/4, covariance -1/4
    x, y = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 1.0]]]])
    c1, c2 = 1e-4, 9e-4
    expected = (2 * 0.25 + c1) * (-0.5 + c2) / ((0.5 + c1) * (0.5 + c2))
    assert global_ssim(x, y).item() == pytest.approx(expected, rel=1e-6)
    assert global_ssim(x, x).item() == pytest.approx(1.0, rel=1e-6)


def test_combine_add_and_concat():
    student_taps, teacher_taps = _taps()
    s = _at_map(student_taps["mid"], (6, 6))
    vgg, vit = _at_map(teacher_taps["vgg"], (6, 6)), _cls_map(teacher_taps["vit"], (6, 6))
    added = (vgg + vit) / (vgg + vit).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    args = (torch.randn(B, K), torch.randn(B, K), torch.tensor([0, 1, 2]), student_taps, teacher_taps)
    add = _loss("mse", ("vgg", "vit"), "add", grid=6)
    concat = _loss("mse", ("vgg", "vit"), "concat", grid=6)
    torch.testing.assert_close(add(*args)[0], F.mse_loss(s, added))
    expected_concat = (F.mse_loss(s, vgg) + F.mse_loss(s, vit)) / 2
    torch.testing.assert_close(concat(*args)[0], expected_concat)
    ((student_map, teacher_map),) = concat.maps(student_taps, teacher_taps)
    assert student_map.shape == teacher_map.shape == (B, 6, 6)
    torch.testing.assert_close(teacher_map, ((vgg + vit) / 2)[:, 0])


def test_grid_from_the_attention_tap_when_no_feature_tap():
    student_taps, teacher_taps = _taps()
    ((student_map, teacher_map),) = _loss("mse", ("vit",)).maps(student_taps, teacher_taps)
    assert student_map.shape == teacher_map.shape == (B, 4, 4)


RANDOM = PerceptualConfig(arch="random_features")


def test_perceptual_random_features_fallback_is_frozen_seeded_and_announced(caplog):
    student_taps, teacher_taps = _taps()
    student_taps["mid"].requires_grad_(True)
    with caplog.at_level(logging.WARNING):
        first, second = _loss("perceptual", perceptual=RANDOM), _loss("perceptual", perceptual=RANDOM)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "random-feature network" in warnings[0] and warnings[0].count("\n") == 0
    assert not any(p.requires_grad for p in first.parameters())
    first.train()
    assert not first.perceptual.net.training
    args = (torch.randn(B, K), torch.randn(B, K), torch.tensor([0, 1, 2]))
    value = first(*args, student_taps, teacher_taps)[0]
    torch.testing.assert_close(value, second(*args, student_taps, teacher_taps)[0])
    assert value.item() > 0
    value.backward()
    assert student_taps["mid"].grad.abs().sum() > 0
    same = {"mid": F.interpolate(teacher_taps["vgg"], size=(4, 4))}
    same_map = {"vgg": same["mid"]}
    assert first(*args, same, same_map)[0].item() == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope="module")
def squeezenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision SqueezeNet 1.1 state dict with non-zero biases, as a pretrained network's file."""
    torch.manual_seed(0)
    net = torchvision.models.squeezenet1_1()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.bias.uniform_(-0.2, 0.2)
    path = tmp_path_factory.mktemp("perceptual") / "squeezenet1_1.pth"
    torch.save(net.state_dict(), path)
    return path


def test_perceptual_uses_the_pretrained_network_from_its_weights_file(squeezenet_file):
    # eq. 3, perceptual: MSE between the pretrained network's features (here SqueezeNet's features.4) of the
    # two maps, both divided by the teacher map's per-sample max and fed as 3-channel gray images; the
    # network runs only up to that layer (its later pools would shrink an 8 x 8 map to nothing)
    arch = {"source": "torchvision", "name": "squeezenet1_1"}
    cfg = PerceptualConfig(arch=arch, weights=str(squeezenet_file), layer="features.4")
    loss_fn = _loss("perceptual", perceptual=cfg)
    student_taps, teacher_taps = _taps()
    net = torchvision.models.squeezenet1_1()
    net.load_state_dict(torch.load(squeezenet_file, weights_only=True))
    trunk = net.features[:5].eval()
    s, t = _at_map(student_taps["mid"], (8, 8)), _at_map(teacher_taps["vgg"], (8, 8))
    peak = t.flatten(1).amax(1).view(-1, 1, 1, 1)
    expected = F.mse_loss(trunk((s / peak).expand(-1, 3, -1, -1)), trunk((t / peak).expand(-1, 3, -1, -1)))
    args = (torch.randn(B, K), torch.randn(B, K), torch.tensor([0, 1, 2]), student_taps, teacher_taps)
    torch.testing.assert_close(loss_fn(*args)[0], expected, rtol=1e-5, atol=1e-7)
    assert expected.item() > 0


@pytest.mark.parametrize(
    ("perceptual", "message"),
    [
        (PerceptualConfig(), "metric=perceptual needs loss.agkd.perceptual.arch: a pretrained network"),
        (
            PerceptualConfig(arch={"source": "torchvision", "name": "vgg16"}, layer="features.8"),
            "loss.agkd.perceptual.weights: give the local weights file",
        ),
        (
            PerceptualConfig(arch={"source": "kdfast", "name": "edge_cnn"}, weights=__file__),
            "loss.agkd.perceptual.layer: name the module path",
        ),
        (
            PerceptualConfig(arch="random_features", layer="net.3"),
            "random_features takes no weights or layer",
        ),
        (PerceptualConfig(arch="random_features", weights="nope.pth"), "weights: file not found: nope.pth"),
    ],
)
def test_perceptual_network_must_be_named(perceptual, message):
    with pytest.raises(ConfigError, match=message):
        _loss("perceptual", perceptual=perceptual)


def test_a_perceptual_layer_that_is_no_module_names_the_closest(tmp_path):
    file = tmp_path / "edge_cnn.pth"
    torch.save(build_model({"source": "kdfast", "name": "edge_cnn"}).state_dict(), file)
    cfg = PerceptualConfig(arch={"source": "kdfast", "name": "edge_cnn"}, weights=str(file), layer="block.0")
    with pytest.raises(
        ConfigError, match="perceptual.layer 'block.0' is not a module of EdgeCNN: did you mean"
    ):
        _loss("perceptual", perceptual=cfg)


def test_the_attention_term_averages_over_layer_pairs():
    # eq. 4: 1/N sum over the N pairs; here N = 2, the VGG map and the ViT CLS map each against the student
    student_taps, teacher_taps = _taps()
    pairs = [
        AttentionPairConfig(student="mid", teacher=["vgg"]),
        AttentionPairConfig(student="mid", teacher=["vit"]),
    ]
    loss_fn = AGKDLoss(
        AGKDConfig(metric="mse", pairs=pairs, grid=6), STUDENT_TAPS, TEACHER_TAPS, kernels_impl="reference"
    )
    s = _at_map(student_taps["mid"], (6, 6))
    vgg, vit = _at_map(teacher_taps["vgg"], (6, 6)), _cls_map(teacher_taps["vit"], (6, 6))
    args = (torch.randn(B, K), torch.randn(B, K), torch.tensor([0, 1, 2]), student_taps, teacher_taps)
    expected = (F.mse_loss(s, vgg) + F.mse_loss(s, vit)) / 2
    torch.testing.assert_close(loss_fn(*args)[0], expected)


def test_gradients_reach_the_student_feature_through_the_hybrid_metric():
    student_taps, teacher_taps = _taps()
    student_taps["mid"].requires_grad_(True)
    loss, _ = _loss("hybrid", ("vgg", "vit"))(
        torch.randn(B, K), torch.randn(B, K), torch.zeros(B).long(), student_taps, teacher_taps
    )
    loss.backward()
    assert torch.isfinite(student_taps["mid"].grad).all() and student_taps["mid"].grad.abs().sum() > 0


def test_bad_tap_shapes_are_usage_errors():
    student_taps, teacher_taps = _taps()
    loss_fn = _loss("hybrid", ("vgg", "vit"))
    with pytest.raises(UsageError, match="feature tap 'mid' has shape \\(3, 6\\)"):
        loss_fn.check({"mid": torch.randn(B, 6)}, teacher_taps)
    with pytest.raises(UsageError, match="no class token"):
        loss_fn.check(student_taps, {**teacher_taps, "vit": _taps(tokens=16)[1]["vit"]})
    with pytest.raises(UsageError, match="student batch 3 != teacher batch 2"):
        loss_fn.check(
            student_taps, {"vgg": teacher_taps["vgg"][:2], "vit": QKV(*(t[:2] for t in teacher_taps["vit"]))}
        )
    with pytest.raises(UsageError, match="teacher tap 'vit' gave Tensor"):
        loss_fn.check(student_taps, {**teacher_taps, "vit": teacher_taps["vgg"]})
    with pytest.raises(ConfigError, match="loss.agkd.pairs\\[0\\].teacher names no teacher tap 'nope'"):
        _loss("mse", ("nope",))
    with pytest.raises(ConfigError, match="student tap 'mid' must have kind 'feature'"):
        AGKDLoss(
            AGKDConfig(pairs=[AttentionPairConfig("mid", ["vgg"])]),
            TEACHER_TAPS | {"mid": TEACHER_TAPS["vit"]},
            TEACHER_TAPS,
        )


def test_compiled_loss_has_no_graph_break_and_equals_eager():
    student_taps, teacher_taps = _taps()
    loss_fn = _loss("hybrid", ("vgg", "vit"))
    args = (torch.randn(B, K), torch.randn(B, K), torch.tensor([0, 1, 2]), student_taps, teacher_taps)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="eager")
    eager_loss, eager_parts = loss_fn(*args)
    loss, parts = compiled(*args)
    torch.testing.assert_close(loss, eager_loss)
    assert parts.keys() == eager_parts.keys()


def test_default_config_computes_agkd_eq_1_plus_4():
    # configs/default.yaml is AGKD with alpha 0.5, tau 4, lambda 1 and the hybrid metric on an 8 x 8 grid:
    # 0.5 * tau^2 KL(p_T || p_S) + 0.5 CE + 1 * (0.5 (1 - SSIM) + 0.5 (1 - cos)), the value the loss had
    # before methods became composable.
    cfg = load_config()
    g = torch.Generator().manual_seed(5)
    student_taps = {"mid": torch.randn(4, 32, 8, 8, generator=g).relu()}
    qkv = QKV(*(torch.randn(4, 4, 65, 16, generator=g) for _ in range(3)))
    teacher_taps = {"vgg": torch.randn(4, 128, 8, 8, generator=g).relu(), "vit": qkv}
    logits, teacher_logits = 3 * torch.randn(4, 10, generator=g), 5 * torch.randn(4, 10, generator=g)
    labels = torch.tensor([0, 3, 9, 3])

    tau = 4.0
    kl = F.kl_div(F.log_softmax(logits / tau, 1), F.softmax(teacher_logits / tau, 1), reduction="batchmean")
    s = _at_map(student_taps["mid"], (8, 8))
    vgg, vit = _at_map(teacher_taps["vgg"], (8, 8)), _cls_map(qkv, (8, 8))
    t = (vgg + vit) / (vgg + vit).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    peak = t.flatten(1).amax(1).view(-1, 1, 1, 1)
    ssim = pytorch_msssim.ssim(s / peak, t / peak, data_range=1.0, win_size=3, size_average=False).mean()
    cos = F.cosine_similarity(s.flatten(1), t.flatten(1)).mean()
    attention = 0.5 * (1 - ssim) + 0.5 * (1 - cos)
    expected = 0.5 * tau**2 * kl + 0.5 * F.cross_entropy(logits, labels) + 1.0 * attention

    loss_fn = CompositeLoss(cfg.loss, cfg.student.taps, cfg.teacher.taps, kernels_impl="reference")
    loss_fn.check(student_taps, teacher_taps)
    total, parts = loss_fn(logits, teacher_logits, labels, student_taps, teacher_taps)
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["agkd"], attention, rtol=1e-5, atol=1e-6)
    assert set(parts) == {"ce", "kd", "agkd"}
    torch.testing.assert_close(parts["ce"] + parts["kd"] + parts["agkd"], total)
