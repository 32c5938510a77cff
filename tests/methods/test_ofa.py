"""OFA-KD (Hao et al. 2023) against its loss written out per class in float64 (target and non-target terms,
the official code's form), the cross-entropy it reduces to at eps = 1, hand-worked certain-teacher cases,
gradients included; branches sized from CNN maps and ViT tokens; the method module and its config; the
ViT teacher -> CNN student digits config end to end through training and export."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from support.exports import export_student
from support.runs import TINY_CONFIG, distill_epoch_row, train
from torch import nn

from kdfast.config import CONFIG_DIR, TapConfig, load_config
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.ofa import OFAConfig, OFALoss, TokenBranch, cnn_branch, ofa_loss
from kdfast.taps import Taps

CONFIG = CONFIG_DIR / "ofa_digits.yaml"


def logits(
    batch: int = 5, classes: int = 7, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(batch, classes, generator=g, dtype=torch.float64) + 0.3
    teacher = 5 * torch.randn(batch, classes, generator=g, dtype=torch.float64) - 1.0
    return student, teacher, torch.randint(0, classes, (batch,), generator=g)


def per_class_ofa(student, teacher, targets, eps, temperature):
    """Eq. 2 class by class: -((1 + p_t^y)^eps - 1) log p_s^y - sum_{c != y} (p_t^c)^eps log p_s^c, mean."""
    p_s = torch.softmax(student / temperature, 1)
    p_t = torch.softmax(teacher / temperature, 1)
    total = 0.0
    for b, y in enumerate(targets.tolist()):
        total = total - ((1 + p_t[b, y]) ** eps - 1) * torch.log(p_s[b, y])
        for c in range(student.shape[1]):
            if c != y:
                total = total - p_t[b, c] ** eps * torch.log(p_s[b, c])
    return total / student.shape[0]


@pytest.mark.parametrize(("eps", "temperature"), [(1.0, 1.0), (1.5, 1.0), (2.0, 3.0)])
def test_matches_the_per_class_formula_with_gradients(eps, temperature):
    student, teacher, targets = logits()
    student.requires_grad_(True)
    loss = ofa_loss(student, teacher, targets, eps=eps, temperature=temperature)
    expected = per_class_ofa(student, teacher, targets, eps, temperature)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(*(torch.autograd.grad(x, student)[0] for x in (loss, expected)))


def test_eps_one_is_the_cross_entropy_with_the_teacher():
    # (p_t + onehot) - onehot = p_t: KL(p_t || p_s) + H(p_t), with torch's own functions
    student, teacher, targets = logits(seed=1)
    p_t = torch.softmax(teacher / 2, 1)
    kl = F.kl_div(F.log_softmax(student / 2, 1), p_t, reduction="batchmean")
    entropy = -(p_t * p_t.log()).sum(1).mean()
    torch.testing.assert_close(ofa_loss(student, teacher, targets, eps=1.0, temperature=2.0), kl + entropy)


def test_certain_teachers_equal_logits_and_a_batch_of_one():
    student, _, _ = logits(batch=1, classes=4, seed=2)
    log_p = F.log_softmax(student, 1)[0]
    certain = torch.tensor([[0.0, 80.0, 0.0, 0.0]], dtype=torch.float64)
    # certain and right: only the target term, weight 2^eps - 1
    right = ofa_loss(student, certain, torch.tensor([1]), eps=1.5)
    assert right.item() == pytest.approx(-(2**1.5 - 1) * log_p[1].item(), rel=1e-10)
    # certain and wrong: the target weight is 1^eps - 1 = 0, the teacher's class weight 1^eps = 1
    wrong = ofa_loss(student, certain, torch.tensor([2]), eps=1.5)
    assert wrong.item() == pytest.approx(-log_p[1].item(), rel=1e-10)
    # a uniform student: -log p_s = log K for every class, times the summed weights
    uniform = torch.zeros(1, 4, dtype=torch.float64)
    teacher = torch.tensor([[1.0, 2.0, 0.5, -1.0]], dtype=torch.float64)
    p_t = torch.softmax(teacher, 1)[0]
    weights = (1 + p_t[0]) ** 2 - 1 + (p_t[1:] ** 2).sum()
    got = ofa_loss(uniform, teacher, torch.tensor([0]), eps=2.0)
    assert got.item() == pytest.approx(math.log(4) * weights.item(), rel=1e-10)


def test_cnn_branch_halves_the_grid_down_to_the_last_stage_and_ends_in_the_logits():
    branch = cnn_branch(channels=24, height=16, final_height=4, width=128, classes=10)
    separable = [m for m in branch if isinstance(m, nn.Sequential)]
    assert len(separable) == 2  # 16 -> 8 -> 4
    assert [s[5].out_channels for s in separable] == [48, 128]  # channels double, the last block to the width
    assert separable[0][0].groups == 24 and separable[0][0].stride == (2, 2)
    assert branch(torch.randn(3, 24, 16, 16)).shape == (3, 10)
    last = cnn_branch(channels=64, height=4, final_height=4, width=128, classes=10)
    assert isinstance(last[0], nn.Conv2d) and last[0].kernel_size == (1, 1) and last[0].out_channels == 128


def test_token_branch_merges_patches_to_seven_and_reads_the_class_token():
    branch = TokenBranch(tokens=1 + 14 * 14, dim=96, width=64, blocks=2, classes=10).eval()
    assert len([m for m in branch.merge if m.__class__.__name__ == "PatchMerging"]) == 1  # 14 -> 7
    assert len(branch.blocks) == 2 and branch.blocks[0].attn.num_heads == 4
    tokens = torch.randn(2, 197, 96)
    out = branch(tokens)
    assert out.shape == (2, 10)
    # the class token goes around the merging: the output reads it
    changed = tokens.clone()
    changed[:, 0] += 1.0
    assert not torch.allclose(branch(changed), out)
    # no class token: the mean of the tokens; a grid below 7 is not merged
    small = TokenBranch(tokens=16, dim=12, width=12, blocks=1, classes=3)
    assert len(small.merge) == 0 and small.prefix == 0 and small(torch.randn(2, 16, 12)).shape == (2, 3)


class TwoStages(nn.Module):
    """A small CNN student with two stages and a classifier, for the module tests."""

    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage2(self.stage1(x)).mean((2, 3)))


def _module(**kwargs) -> tuple[OFALoss, Taps]:
    taps = {"s1": TapConfig(path="stage1"), "s2": TapConfig(path="stage2")}
    loss_fn = OFALoss(OFAConfig(stages=["s1", "s2"], **kwargs), taps, {})
    student = TwoStages()
    return loss_fn, Taps(student, taps)


def test_module_learns_the_classes_from_the_probe_and_sums_branch_and_final_terms():
    loss_fn, student = _module(eps=1.5, final_weight=0.5)
    with pytest.raises(UsageError, match="call prepare_student"):
        loss_fn.check({}, {})
    loss_fn.prepare_student(student.model)
    logits_s, taps = student(torch.randn(4, 3, 16, 16))
    loss_fn.check(taps, {})
    assert loss_fn.classes == 6 and not student.model._forward_hooks  # the hook is gone
    assert [len([m for m in b if isinstance(m, nn.Sequential)]) for b in loss_fn.branches] == [1, 0]
    teacher = torch.randn(4, 6, requires_grad=True)
    targets = torch.tensor([0, 5, 2, 2])
    term, parts = loss_fn(logits_s, teacher, targets, taps, {})
    assert list(parts) == ["s1", "s2", "logits"]
    branch_logits = [branch(taps[name]) for name, branch in zip(["s1", "s2"], loss_fn.branches, strict=True)]
    expected = [ofa_loss(b, teacher, targets, eps=1.5) for b in branch_logits]
    expected.append(0.5 * ofa_loss(logits_s, teacher, targets, eps=1.5))
    torch.testing.assert_close(list(parts.values()), expected)
    torch.testing.assert_close(term, sum(expected))
    term.backward()
    assert teacher.grad is None
    assert all(p.grad is not None for p in loss_fn.branches.parameters())
    assert student.model.stage1[0].weight.grad.abs().sum() > 0
    # CutMix's soft targets name the class with the larger share
    soft = F.one_hot(targets, 6).double() * 0.7 + F.one_hot(torch.tensor([1, 1, 1, 1]), 6) * 0.3
    soft_term, _ = loss_fn(logits_s, teacher, soft, taps, {})
    torch.testing.assert_close(soft_term, term)


def test_a_vit_student_gets_token_branches():
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=2, num_classes=5
    )
    taps = {"b0": TapConfig(path="blocks.0"), "b1": TapConfig(path="blocks.1")}
    loss_fn = OFALoss(OFAConfig(stages=["b0", "b1"]), taps, {})
    student = Taps(vit, taps)
    loss_fn.prepare_student(vit)
    logits_s, features = student(torch.randn(2, 3, 32, 32))
    loss_fn.check(features, {})
    assert all(isinstance(b, TokenBranch) for b in loss_fn.branches)
    assert [len(b.blocks) for b in loss_fn.branches] == [1, 1]  # max(n - i, 1) for n = 2
    term, _ = loss_fn(logits_s, torch.randn(2, 5), torch.tensor([1, 4]), features, {})
    term.backward()
    assert vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_check_rejects_a_two_head_student_an_embedding_stage_and_other_shapes():
    loss_fn, student = _module()
    loss_fn.prepare_student(nn.Sequential())
    with pytest.raises(UsageError, match="two-head student"):
        loss_fn._record_classes(nn.Identity(), (), (torch.zeros(2, 6), torch.zeros(2, 6)))
    loss_fn.classes = 6
    x = torch.randn(2, 3, 16, 16)
    taps = student(x)[1]
    with pytest.raises(UsageError, match="a stage must be"):
        loss_fn.check({"s1": taps["s1"], "s2": torch.zeros(2, 16)}, {})
    loss_fn.check(taps, {})
    with pytest.raises(UsageError, match="built for"):
        loss_fn.check(student(torch.randn(2, 3, 32, 32))[1], {})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.ofa.stages=[]", "loss.ofa.stages is empty"),
        ("loss.ofa.stages=[s1, s1]", "'s1' is listed twice"),
        ("loss.ofa.stages=[s4]", "names no student tap 's4'"),
        ("loss.ofa.eps=0", "config key 'loss.ofa.eps' must be > 0"),
        ("loss.ofa.width=0", "config key 'loss.ofa.width' must be > 0"),
    ],
)
def test_config_validation(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(CONFIG, [override])
    assert message in str(error.value)


@pytest.mark.slow
def test_ofa_digits_vit_teacher_to_cnn_student_trains_and_exports_without_the_branches(tmp_path):
    out = tmp_path / "run"
    result = train(out, TINY_CONFIG, CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(out / "student.pt", weights_only=True)
    assert ckpt["arch"]["name"] == "edge_cnn" and ckpt["config"]["teacher"]["arch"]["source"] == "timm"
    assert not any("branches" in key for key in ckpt["state_dict"])
    parts = distill_epoch_row(out)["parts"]
    assert set(parts) == {"ce", "ofa", "ofa/s1", "ofa/s2", "ofa/s3", "ofa/logits"}
    assert parts["ofa"] == pytest.approx(
        sum(parts[f"ofa/{k}"] for k in ("s1", "s2", "s3", "logits")), rel=1e-5
    )
    export_student(out)
