"""TITN: the transformer-in-transformer student with a distillation token, and its loss, against independent
references: F.unfold + hand index arithmetic for the visual words, hand-applied heads, hand-computed cross
entropies, ONNX Runtime for the exported model, and load_config for the bundled run config."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from export.onnx_export import INPUT_NAME, export_onnx
from kdfast.config import CONFIG_DIR, LossConfig, load_config
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.compose import CompositeLoss
from kdfast.methods.registry import method
from kdfast.methods.titn import TITNConfig, TITNLoss
from kdfast.models import build_model
from kdfast.models.tnt import TNTDistilled
from kdfast.taps import Taps
from kdfast.train import distill_step

CLASSES = 10
TINY = {"source": "kdfast", "name": "tnt_distilled_digits"}


def _tiny(**kwargs) -> TNTDistilled:
    torch.manual_seed(0)
    return build_model({**TINY, "kwargs": kwargs}, num_classes=CLASSES)


def _images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _loss(alpha: float = 0.5) -> TITNLoss:
    return TITNLoss(TITNConfig(alpha=alpha))


def test_forward_shapes_and_registered_sizes():
    model = _tiny()
    x = _images()
    # 32 / 8 = 4x4 patches, 8 / 2 = 4x4 words per patch, inner width 16, outer width 64, 2 prefix tokens
    assert model.words(x).shape == (2 * 16, 16, 16)
    assert model.forward_features(x).shape == (2, 2 + 16, 64)
    model.eval()
    assert model(x).shape == (2, CLASSES)
    model.train().set_distilled_training(True)
    logits, distill = model(x)
    assert logits.shape == distill.shape == (2, CLASSES)
    assert 100_000 <= sum(p.numel() for p in model.parameters()) <= 300_000
    small = build_model({"source": "kdfast", "name": "tnt_distilled_s"}, num_classes=1000)
    # TNT-S is 23.8M parameters (Han et al. 2021, Table 1); the extra token and head add ~0.4M
    assert 23_000_000 < sum(p.numel() for p in small.parameters()) < 24_500_000
    assert len(small.blocks) == 12 and small.blocks[0].outer.attn.num_heads == 6
    assert small.blocks[0].inner.attn.num_heads == 4
    # 224 / 16 = 14x14 patches of 16 / 4 = 4x4 words, 24 wide
    assert small.words(torch.zeros(1, 3, 224, 224)).shape == (196, 16, 24)


def test_visual_words_are_the_linear_projection_of_each_patch_sub_patch():
    """Eq. 1 by hand: F.unfold cuts the image into 2x2 sub-patches in row-major order over the 16x16
    sub-patch grid; word j of patch i is the sub-patch at grid row pr * 4 + wr, column pc * 4 + wc."""
    model = _tiny()
    x = _images()
    cols = F.unfold(x, kernel_size=2, stride=2)  # (B, 3 * 2 * 2, 16 * 16)
    weight = model.word_embed.weight.flatten(1)
    expected = torch.empty(2, 16, 16, 16)
    for pr in range(4):
        for pc in range(4):
            for wr in range(4):
                for wc in range(4):
                    column = (pr * 4 + wr) * 16 + pc * 4 + wc
                    expected[:, pr * 4 + pc, wr * 4 + wc] = (
                        cols[:, :, column] @ weight.T + model.word_embed.bias
                    )
    expected = expected + model.word_pos
    torch.testing.assert_close(model.words(x), expected.reshape(32, 16, 16), rtol=1e-5, atol=1e-5)


def test_one_pixel_changes_one_word_then_its_patch_then_the_whole_sentence():
    """Inner/outer structure (eq. 2-4): a pixel at (13, 21) lies in patch (1, 2) = 6, sub-patch (2, 2) of it
    = word 10. Before the inner transformer only that word moves; after it, only patch 6's words (inner
    attention mixes words within a patch, never across patches); after the first outer block, every token
    of that image; the other image of the batch never moves."""
    model = _tiny().eval()
    seen: dict[str, torch.Tensor] = {}
    model.blocks[0].inner.register_forward_hook(lambda _m, _a, out: seen.__setitem__("inner", out))
    model.blocks[0].register_forward_hook(lambda _m, _a, out: seen.__setitem__("outer", out[1]))
    x = _images()
    y = x.clone()
    y[0, 1, 13, 21] += 1.0
    with torch.no_grad():
        words = [model.words(v).reshape(2, 16, 16, 16) for v in (x, y)]
        model(x)
        inner_x, outer_x = seen["inner"].reshape(2, 16, 16, 16), seen["outer"]
        model(y)
        inner_y, outer_y = seen["inner"].reshape(2, 16, 16, 16), seen["outer"]

    def moved(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).abs().amax(-1) > 1e-6

    word_moved = moved(*words)
    assert word_moved.nonzero().tolist() == [[0, 6, 10]]
    inner_moved = moved(inner_x, inner_y)
    assert inner_moved[0, 6].all()
    assert not inner_moved[0, torch.arange(16) != 6].any() and not inner_moved[1].any()
    outer_moved = moved(outer_x, outer_y)
    assert outer_moved[0].all() and not outer_moved[1].any()


def test_eval_output_is_the_mean_of_the_two_heads_of_a_train_mode_forward():
    model = _tiny()  # no dropout by default, so train and eval compute the same tokens
    x = _images(3)
    model.train().set_distilled_training(True)
    with torch.no_grad():
        logits, distill = model(x)
        tokens = model.forward_features(x)
        model.eval()
        averaged = model(x)
    torch.testing.assert_close(logits, tokens[:, 0] @ model.head.weight.T + model.head.bias)
    torch.testing.assert_close(distill, tokens[:, 1] @ model.head_dist.weight.T + model.head_dist.bias)
    assert not torch.allclose(logits, distill)
    torch.testing.assert_close(averaged, (logits + distill) / 2, rtol=1e-5, atol=1e-6)


def test_set_distilled_training_toggles_the_training_mode_output_only():
    model = _tiny()
    x = _images()
    model.train()
    assert isinstance(model(x), torch.Tensor)  # the baseline CE stage trains on one tensor
    model.set_distilled_training(True)
    assert isinstance(model(x), tuple)
    model.eval()
    assert isinstance(model(x), torch.Tensor)  # validation and ONNX export see one tensor
    model.train().set_distilled_training(False)
    assert isinstance(model(x), torch.Tensor)


def test_loss_matches_a_hand_computed_case_with_soft_targets_and_an_argmax_teacher():
    # class head softmax (1/4, 3/4), soft target (1/2, 1/2); distillation head softmax (1/5, 4/5);
    # the teacher's argmax is class 0, so the distillation term is -ln(1/5) = ln 5
    logits = torch.tensor([[0.0, math.log(3.0)]])
    distill = torch.tensor([[0.0, math.log(4.0)]])
    teacher = torch.tensor([[5.0, -1.0]])
    soft = torch.tensor([[0.5, 0.5]])
    loss, parts = _loss(alpha=0.3)((logits, distill), teacher, soft, {}, {})
    cls = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert parts["cls"].item() == pytest.approx(0.3 * cls, rel=1e-6)
    assert parts["distill"].item() == pytest.approx(0.7 * math.log(5.0), rel=1e-6)
    assert loss.item() == pytest.approx(0.3 * cls + 0.7 * math.log(5.0), rel=1e-6)


@pytest.mark.parametrize("soft", [False, True])
def test_loss_matches_f_cross_entropy_on_a_batch(soft):
    g = torch.Generator().manual_seed(3)
    logits, distill, teacher = (torch.randn(6, CLASSES, generator=g) for _ in range(3))
    labels = torch.randint(0, CLASSES, (6,), generator=g)
    if soft:  # a CutMix target: lam * onehot(y) + (1 - lam) * onehot(y rolled)
        lam = 0.37
        onehot = F.one_hot(labels, CLASSES).float()
        targets = lam * onehot + (1 - lam) * onehot.roll(1, dims=0)
    else:
        targets = labels
    loss, parts = _loss(alpha=0.5)((logits, distill), teacher, targets, {}, {})
    teacher_labels = torch.tensor([max(range(CLASSES), key=lambda k: row[k].item()) for row in teacher])
    expected_cls = F.cross_entropy(logits, targets)
    expected_distill = F.cross_entropy(distill, teacher_labels)
    torch.testing.assert_close(parts["cls"], 0.5 * expected_cls)
    torch.testing.assert_close(parts["distill"], 0.5 * expected_distill)
    torch.testing.assert_close(loss, parts["cls"] + parts["distill"])


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_gradients_reach_both_heads_through_the_training_step(alpha):
    """The loop's distill_step on Taps-wrapped models: prepare_student unwraps Taps; both heads learn, and
    with alpha = 1 the distillation head gets nothing; the teacher gets no gradient."""
    student, teacher = _tiny(), _tiny(depth=1)
    loss_fn = _loss(alpha)
    loss_fn.prepare_student(Taps(student, {}))
    student.train()
    step = distill_step(Taps(student, {}), Taps(teacher, {}), loss_fn)
    loss, parts = step(_images(4), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert set(parts) == {"cls", "distill"}
    assert student.head.weight.grad.abs().sum() > 0
    assert student.cls_token.grad.abs().sum() > 0 and student.word_embed.weight.grad.abs().sum() > 0
    distill_grad = student.head_dist.weight.grad
    if alpha == 1.0:
        assert distill_grad is None or not distill_grad.any()
    else:
        assert distill_grad.abs().sum() > 0 and student.dist_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_check_and_prepare_student_name_what_to_change():
    loss_fn = _loss()
    teacher = torch.randn(2, CLASSES)
    model = _tiny().eval()
    with pytest.raises(UsageError, match="class_logits, distill_logits") as excinfo:
        loss_fn.check({}, {}, student_logits=model(_images()), teacher_logits=teacher)
    assert "(2, 10)" in _one_line(excinfo)
    wrong = (torch.randn(2, 7), torch.randn(2, 7))
    with pytest.raises(UsageError, match="same number of classes") as excinfo:
        loss_fn.check({}, {}, student_logits=wrong, teacher_logits=teacher)
    _one_line(excinfo)
    with pytest.raises(UsageError, match="class_logits, distill_logits"):
        loss_fn(torch.randn(2, CLASSES), teacher, torch.tensor([0, 1]), {}, {})
    edge = build_model({"source": "kdfast", "name": "edge_cnn"}, num_classes=CLASSES)
    with pytest.raises(UsageError, match="distillation token") as excinfo:
        loss_fn.prepare_student(Taps(edge, {}))
    assert "tnt_distilled_digits" in _one_line(excinfo)
    model.train()
    loss_fn.prepare_student(torch.compile(model))
    loss_fn.check({}, {}, student_logits=model(_images()), teacher_logits=teacher)
    assert loss_fn.maps({}, {}) == []
    with pytest.raises(UsageError, match="takes 32x32 images, got 28x28"):
        model(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ConfigError, match="patch_size and sub_patch"):
        build_model({**TINY, "kwargs": {"sub_patch": 3}}, num_classes=CLASSES)


def test_eval_model_exports_to_onnx_and_matches_onnx_runtime(tmp_path):
    model = _tiny()
    model.set_distilled_training(True)  # eval mode must still export the mean of the two heads
    path = export_onnx(model.eval(), _images(2), tmp_path / "tnt.onnx", max_batch=4, metadata={})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (2, 3):
        x = _images(batch, seed=batch)
        (got,) = session.run(None, {INPUT_NAME: x.numpy()})
        with torch.no_grad():
            expected = model(x)
        assert got.shape == (batch, CLASSES)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_bundled_config_loads_and_builds_the_student_and_the_loss():
    cfg = load_config(CONFIG_DIR / "titn_digits.yaml")
    assert cfg.loss.method == ["titn"] and cfg.loss.sections["titn"].alpha == 0.5
    assert (cfg.data.name, cfg.data.image_size) == ("digits", 32)
    assert cfg.data.augment.cutmix == 1.0 and cfg.data.augment.cutmix_beta == 0.5
    teacher = build_model(cfg.teacher.arch, num_classes=10)
    # the teacher's conv trunk is torchvision's VGG16-BN layer for layer (same parameter names and shapes)
    reference = torchvision.models.vgg16_bn(weights=None).features.state_dict()
    trunk = teacher.features.state_dict()
    assert {k: v.shape for k, v in trunk.items()} == {k: v.shape for k, v in reference.items()}
    assert teacher(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert cfg.student.taps == {} and cfg.teacher.taps == {}
    student = build_model(cfg.student.arch, num_classes=10)
    assert isinstance(student, TNTDistilled) and student.img_size == cfg.data.image_size
    loss_fn = CompositeLoss(cfg.loss, cfg.student.taps, cfg.teacher.taps)
    loss_fn.prepare_student(student)
    assert student.distilled_training
    # what the config computed before methods became composable, and no run-level CE beside it:
    # 0.5 CE(class head, CutMix targets) + 0.5 CE(distillation head, argmax teacher)
    student.train()
    torch.manual_seed(0)
    logits, distill = student(_images(3))
    teacher_logits = torch.randn(3, 10)
    soft = torch.softmax(torch.randn(3, 10), 1)
    total, parts = loss_fn((logits, distill), teacher_logits, soft, {}, {})
    expected = 0.5 * F.cross_entropy(logits, soft) + 0.5 * F.cross_entropy(distill, teacher_logits.argmax(1))
    torch.testing.assert_close(total, expected)
    assert set(parts) == {"titn", "titn/cls", "titn/distill"}


def _tnt_parameters(*, classes, img, patch, sub, outer, inner, depth) -> int:
    """TNT with two prefix tokens and two heads, counted from its equations (Han et al. 2021, Sec. 2.2; DeiT
    Sec. 4): a transformer block of width d (qkv without bias, MLP ratio 4, two LayerNorms) has
    3d^2 + (d^2 + d) + (4d^2 + 4d) + (4d^2 + d) + 4d = 12 d^2 + 10 d parameters."""
    words, patches = (patch // sub) ** 2, (img // patch) ** 2

    def block(d: int) -> int:
        return 12 * d * d + 10 * d

    word_embed = 3 * inner * sub * sub + inner + words * inner  # sub-patch projection + word positions
    patch_embed = 2 * words * inner + words * inner * outer + outer + 2 * outer  # LN, FC, LN (eq. 5)
    tokens = 2 * outer + (2 + patches) * outer  # class and distillation tokens, positions
    per_layer = block(inner) + 2 * inner + words * inner * outer + outer + block(outer)  # eq. 2-4
    heads = 2 * (outer * classes + classes)
    return word_embed + patch_embed + tokens + depth * per_layer + 2 * outer + heads


def test_tnt_ti_student_has_the_papers_parameter_count():
    ti = {"source": "kdfast", "name": "tnt_distilled_ti"}
    cifar = {**ti, "kwargs": {"img_size": 32, "patch_size": 4, "sub_patch": 1}}
    shape = {"img": 32, "patch": 4, "sub": 1, "outer": 192, "inner": 12, "depth": 12}
    for classes in (10, 100):
        model = build_model(cifar, num_classes=classes)
        count = sum(p.numel() for p in model.parameters())
        assert count == _tnt_parameters(classes=classes, **shape)
        paper_arch = {**ti, "kwargs": {"img_size": 32, "patch_size": 8, "sub_patch": 2}}
        paper = build_model(paper_arch, num_classes=classes)
        paper_count = sum(p.numel() for p in paper.parameters())
        assert paper_count == _tnt_parameters(classes=classes, **{**shape, "patch": 8, "sub": 2})
    # TITN's 5.85M: this shape counted with 10 classes' heads (5,853,956), the paper's 8 x 8 patches of 2 x 2
    # words 5,844,848: the count hardly tells the geometries apart (their FLOPs do, test below)
    assert round(_tnt_parameters(classes=10, **shape) / 1e6, 2) == 5.85
    assert _tnt_parameters(classes=10, **{**shape, "patch": 8, "sub": 2}) == 5_844_848
    assert _tnt_parameters(classes=100, **shape) == 5_888_696
    # at its native 224x224 with 16x16 patches of 4x4 words and one 1000-class head it is TNT-Ti's 6.1M
    native = sum(p.numel() for p in build_model(ti, num_classes=1000).parameters())
    one_head = native - (192 * 1000 + 1000)
    assert native == _tnt_parameters(classes=1000, img=224, patch=16, sub=4, outer=192, inner=12, depth=12)
    assert round(one_head / 1e6, 1) == 6.1


def _tnt_macs(*, classes, img, patch, sub, outer=192, inner=12, depth=12) -> int:
    """Multiply-accumulates of one image through TNT with two prefix tokens and two heads, counted from its
    equations (Han et al. 2021, Sec. 2.2): a transformer block of width d on t tokens does 12 t d^2 (qkv 3,
    projection 1, MLP 8) and 2 t^2 d (Q K^T and A V); per layer the inner block runs on each of the n
    patches' m words, the words' projection adds n (m c) D, the outer block runs on the n + 2 tokens."""
    n, m, tokens = (img // patch) ** 2, (patch // sub) ** 2, (img // patch) ** 2 + 2

    def block(t: int, d: int) -> int:
        return 12 * t * d * d + 2 * t * t * d

    embed = n * m * inner * 3 * sub * sub + n * m * inner * outer  # eq. 1 (sub-patch projection), eq. 5 FC
    per_layer = n * block(m, inner) + n * m * inner * outer + block(tokens, outer)  # eq. 2-4
    return embed + depth * per_layer + 2 * outer * classes


def _counted_macs(patch: int, sub: int) -> int:
    """The MACs torch's FlopCounterMode sees in one forward of the TITN student at 32 x 32 (attention as
    explicit matmuls, so they are counted), FLOPs / 2."""
    geometry = {"img_size": 32, "patch_size": patch, "sub_patch": sub}
    model = build_model({"source": "kdfast", "name": "tnt_distilled_ti", "kwargs": geometry}, num_classes=100)
    model.eval()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    return counter.get_total_flops() // 2


@pytest.mark.slow
def test_titn_geometry_is_told_apart_by_its_flops_not_its_parameters():
    # The paper's TITN at 32 x 32: 8 x 8 patches of 2 x 2-pixel words (16 patches). Its Table 1 gives
    # 111.40 and 36.09 (M) for this geometry and for 16 x 16 patches of 4 x 4 words: a ratio of 3.09
    geometries = {"paper": (8, 2), "coarse": (16, 4), "fine": (4, 1)}
    macs = {name: _counted_macs(*g) for name, g in geometries.items()}
    for name, (patch, sub) in geometries.items():
        assert macs[name] == _tnt_macs(classes=100, img=32, patch=patch, sub=sub), name
    assert macs["paper"] / macs["coarse"] == pytest.approx(111.40 / 36.09, rel=0.015)
    assert macs["paper"] / 1e6 == pytest.approx(111.40, rel=0.002)
    # 4 x 4 patches of single-pixel words cost 3.8 times the paper's geometry for nearly the same
    # parameters (5,888,696 and 5,879,588 at 100 classes: 0.15% apart)
    assert macs["fine"] / macs["paper"] == pytest.approx(3.84, abs=0.01)
    shape = {"img": 32, "outer": 192, "inner": 12, "depth": 12, "classes": 100}
    fine, paper = (_tnt_parameters(patch=p, sub=q, **shape) for p, q in ((4, 1), (8, 2)))
    assert (fine, paper) == (5_888_696, 5_879_588)


def test_head_fusion_max_gives_the_top1_of_the_concatenated_heads():
    model = _tiny(head_fusion="max")
    x = _images(4)
    model.train().set_distilled_training(True)
    with torch.no_grad():
        logits, distill = model(x)
        fused = model.eval()(x)
    torch.testing.assert_close(fused, torch.maximum(logits, distill))
    concatenated = torch.cat([logits, distill], dim=1)  # (B, 2K), Algorithm 1's concatenation of the heads
    assert torch.equal(fused.argmax(1), concatenated.argmax(1) % CLASSES)
    with pytest.raises(ConfigError, match="head_fusion of the TNT student must be one of mean, max"):
        _tiny(head_fusion="concat")


@pytest.mark.slow
def test_a_max_fused_student_exports_what_it_computes(tmp_path):
    model = _tiny(head_fusion="max").eval()
    path = export_onnx(model, _images(2), tmp_path / "tnt_max.onnx", max_batch=4, metadata={})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _images(3, seed=5)
    (got,) = session.run(None, {INPUT_NAME: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_kd_beside_titn_is_refused_in_one_line():
    with pytest.raises(
        ConfigError,
        match="combines titn, whose student returns \\(class, distillation\\) logits, "
        "with kd, which reads one logit tensor: drop kd$",
    ):
        load_config(CONFIG_DIR / "titn_digits.yaml", ["loss.method=[kd, titn]"])


def test_paper_config_has_the_papers_teacher_student_and_recipe(tmp_path):
    cfg = load_config(CONFIG_DIR / "titn_vgg16bn_tnt_ti_cifar100.yaml", [f"data.root={tmp_path}"])
    assert (cfg.data.name, cfg.data.image_size, cfg.data.augment.auto_augment) == ("cifar100", 32, "cifar10")
    assert cfg.data.augment.cutmix == 1.0 and cfg.data.augment.cutmix_beta == 0.5
    assert cfg.loss.method == ["titn"] and cfg.loss.sections["titn"].alpha == 0.5
    student = build_model(cfg.student.arch, num_classes=100)
    assert (student.grid, student.side) == (4, 4)  # Table 1: 16 patches of 4 x 4 words (2 x 2 pixels each)
    assert sum(p.numel() for p in student.parameters()) == 5_879_588 and student.head_fusion == "mean"
    # Sec. 4.1: SGD, momentum 0.9, weight decay 1e-4, lr 0.1, cosine, batch 1024; the teacher 600 epochs
    assert cfg.data.batch_size == 1024
    for stage in (cfg.student.train, cfg.teacher.train):
        sgd = stage.optimizer
        assert (sgd.name, sgd.lr, sgd.momentum, sgd.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
        assert (stage.schedule.name, stage.schedule.warmup_epochs) == ("cosine", 0.0)
    assert cfg.teacher.train.epochs == 600
    teacher = build_model(cfg.teacher.arch, num_classes=100)
    assert isinstance(teacher, torchvision.models.VGG) and (
        cfg.teacher.arch.source,
        cfg.teacher.arch.name,
    ) == (
        "torchvision",
        "vgg16_bn",
    )
    # VGG16-BN (config "D") with torchvision's classifier 25088 -> 4096 -> 4096 -> 100, counted by hand
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = sum(
        9 * c_in * c_out + c_out + 2 * c_out for c_in, c_out in zip([3, *widths], widths, strict=False)
    )
    classifier = 25088 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 100 + 100
    assert sum(p.numel() for p in teacher.parameters()) == convs + classifier == 134_678_692
    with torch.no_grad():
        assert teacher.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("feature_method", ["rkd", "crd", "fitnet", "at", "agkd"])
def test_a_method_that_reads_no_logits_composes_with_titn(feature_method):
    """A feature method's term never reads the student's logits (its loss is called with ``None`` for them in
    its own tests), so TITN's two-head student may be distilled by it too; a logit method stays refused."""
    sections = {"titn": method("titn").schema(), feature_method: method(feature_method).schema()}
    cfg = LossConfig(method=["titn", feature_method], sections=sections)
    assert cfg.method == ["titn", feature_method]
    with pytest.raises(ConfigError, match="drop dkd$"):
        LossConfig(method=["titn", "dkd"], sections={"titn": sections["titn"], "dkd": method("dkd").schema()})
