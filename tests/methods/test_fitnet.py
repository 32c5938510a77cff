"""FitNet (Romero et al. 2015, one-stage as RepDistiller / mdistiller) against the hint loss written out in
float64, the regressor's convolution chosen by the spatial sizes and its output recomputed with plain
functional ops (convolution, batch statistics, ReLU), gradients included; the method module and its config;
the digits config end to end through training and export, the regressor left out of ``student.pt``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.exports import export_student
from support.runs import TINY_CONFIG, distill_epoch_row, train
from torch import nn

from kdfast.config import CONFIG_DIR, TapConfig, load_config
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.base import FeaturePair
from kdfast.methods.fitnet import FitNetConfig, FitNetLoss, HintRegressor, hint_loss

CONFIG = CONFIG_DIR / "fitnet_digits.yaml"


def maps(batch: int, channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.relu(torch.randn(batch, channels, height, width, generator=g, dtype=torch.float64) + 0.3)


def test_hint_loss_is_the_mean_squared_difference():
    regressed = maps(2, 3, 4, 5, seed=0).requires_grad_(True)
    hint = maps(2, 3, 4, 5, seed=1)
    loss = hint_loss(regressed, hint)
    n = regressed.numel()
    expected = sum((r - h) ** 2 for r, h in zip(regressed.flatten(), hint.flatten(), strict=True)) / n
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, regressed)
    torch.testing.assert_close(grad, 2 * (regressed - hint).detach() / n)
    # equal maps: zero; a batch of one: the same formula
    assert hint_loss(hint, hint).item() == 0.0
    one = hint_loss(regressed[:1], hint[:1])
    assert one.item() == pytest.approx(((regressed[:1] - hint[:1]) ** 2).mean().item(), rel=1e-12)
    with pytest.raises(UsageError, match="differ in shape"):
        hint_loss(regressed, hint[:, :2])


@pytest.mark.parametrize(
    ("student", "teacher", "conv", "kernel", "stride"),
    [
        ((6, 8, 8), (10, 4, 4), nn.Conv2d, (3, 3), (2, 2)),  # student twice the teacher's grid
        ((6, 4, 4), (10, 8, 8), nn.ConvTranspose2d, (4, 4), (2, 2)),  # half
        ((6, 8, 8), (10, 6, 5), nn.Conv2d, (3, 4), (1, 1)),  # larger: the paper's valid convolution
        ((6, 8, 8), (10, 8, 8), nn.Conv2d, (1, 1), (1, 1)),  # equal: 1x1
        ((6, 3, 3), (10, 8, 8), nn.Conv2d, (1, 1), (1, 1)),  # smaller, not half: 1x1 and a resize
    ],
)
def test_regressor_convolution_follows_the_spatial_sizes(student, teacher, conv, kernel, stride):
    regressor = HintRegressor(student, teacher).double()
    assert type(regressor.conv) is conv
    assert (regressor.conv.kernel_size, regressor.conv.stride) == (kernel, stride)
    out = regressor(maps(2, *student, seed=2))
    assert tuple(out.shape) == (2, *teacher)


def test_regressor_output_is_conv_batch_statistics_and_relu():
    regressor = HintRegressor((6, 8, 8), (10, 4, 4)).double()
    with torch.no_grad():  # trained-looking affine BatchNorm parameters, not the 1 / 0 defaults
        regressor.bn.weight.uniform_(0.5, 1.5)
        regressor.bn.bias.uniform_(-0.2, 0.2)
    x = maps(3, 6, 8, 8, seed=3)
    y = F.conv2d(x, regressor.conv.weight, regressor.conv.bias, stride=2, padding=1)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    normalized = (y - mean) / torch.sqrt(var + regressor.bn.eps)
    expected = F.relu(normalized * regressor.bn.weight[:, None, None] + regressor.bn.bias[:, None, None])
    torch.testing.assert_close(regressor(x), expected)
    linear = HintRegressor((6, 8, 8), (10, 4, 4), relu=False).double()
    assert (linear(x) < 0).any()


def _loss(relu: bool = True) -> FitNetLoss:
    student_taps = {"guided": TapConfig(path="a")}
    teacher_taps = {"hint": TapConfig(path="b")}
    cfg = FitNetConfig(relu=relu, pairs=[FeaturePair("guided", "hint")])
    return FitNetLoss(cfg, student_taps, teacher_taps).double()


def test_loss_module_regresses_the_student_onto_the_detached_teacher():
    loss_fn = _loss()
    student = maps(4, 6, 4, 4, seed=4).requires_grad_(True)
    teacher = maps(4, 12, 8, 8, seed=5).requires_grad_(True)
    with pytest.raises(UsageError, match="call check"):
        loss_fn(None, None, None, {"guided": student}, {"hint": teacher})
    loss_fn.check({"guided": student}, {"hint": teacher})
    loss_fn.double()
    term, parts = loss_fn(None, None, None, {"guided": student}, {"hint": teacher})
    (regressor,) = loss_fn.regressors
    assert isinstance(regressor.conv, nn.ConvTranspose2d)  # 4x4 student, 8x8 teacher
    torch.testing.assert_close(parts["guided-hint"], ((regressor(student) - teacher) ** 2).mean())
    torch.testing.assert_close(term, parts["guided-hint"])
    term.backward()
    assert student.grad.abs().sum() > 0 and regressor.conv.weight.grad.abs().sum() > 0
    assert teacher.grad is None


def test_vit_tokens_and_a_batch_of_one():
    loss_fn = _loss(relu=False)
    tokens = torch.randn(1, 1 + 16, 12, dtype=torch.float64)  # CLS + a 4x4 grid of width 12
    student = maps(1, 6, 8, 8, seed=6)
    loss_fn.check({"guided": student}, {"hint": tokens})
    loss_fn.double()
    term, _ = loss_fn(None, None, None, {"guided": student}, {"hint": tokens})
    grid = tokens[:, 1:].transpose(1, 2).reshape(1, 12, 4, 4)
    (regressor,) = loss_fn.regressors
    assert regressor.conv.stride == (2, 2)
    torch.testing.assert_close(term, ((regressor(student) - grid) ** 2).mean())


def test_check_rejects_other_shapes_than_the_regressors_were_built_for():
    loss_fn = _loss()
    loss_fn.check({"guided": maps(2, 6, 8, 8, 7)}, {"hint": maps(2, 10, 8, 8, 8)})
    with pytest.raises(UsageError, match="built for"):
        loss_fn.check({"guided": maps(2, 7, 8, 8, 7)}, {"hint": maps(2, 10, 8, 8, 8)})
    with pytest.raises(UsageError, match="batch sizes 2 and 3 differ"):
        loss_fn.check({"guided": maps(2, 6, 8, 8, 7)}, {"hint": maps(3, 10, 8, 8, 8)})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.fitnet.pairs=[]", "loss.fitnet.pairs is empty"),
        (
            "loss.fitnet.pairs=[{student: guided, teacher: hnt}]",
            "names no teacher tap 'hnt': did you mean 'hint'",
        ),
        ("loss.fitnet.relu=3", "config key 'loss.fitnet.relu' must be bool"),
    ],
)
def test_config_validation(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(CONFIG, [override])
    assert message in str(error.value)


@pytest.mark.slow
def test_fitnet_digits_config_trains_and_its_student_exports_without_the_regressor(tmp_path):
    out = tmp_path / "run"
    result = train(out, TINY_CONFIG, CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(out / "student.pt", weights_only=True)
    assert ckpt["config"]["loss"]["method"] == ["fitnet"]
    assert not any("regressor" in key for key in ckpt["state_dict"])
    state = torch.load(out / "state_distill.pt", weights_only=True)
    assert any(key.startswith("members.fitnet.regressors.0.conv") for key in state["extra"])
    parts = distill_epoch_row(out)["parts"]
    assert set(parts) == {"ce", "fitnet", "fitnet/guided-hint"}
    assert parts["fitnet"] == pytest.approx(100.0 * parts["fitnet/guided-hint"], rel=1e-5)
    export_student(out)
