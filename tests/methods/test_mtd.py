"""MTD loss against independent references: full softmax matrices + F.kl_div, hand reshapes, the weighting
formulas written out (task 0 the CE alone, uniform weights all 1), real Taps on small timm ViTs, the
optimizer's no-decay group, and config validation through load_config."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from kdfast.config import CONFIG_DIR, LossConfig, OptimizerConfig, StageConfig, TapConfig, load_config
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.compose import CompositeLoss
from kdfast.methods.kd import KDConfig
from kdfast.methods.mtd import MTDConfig, MTDLoss, MTDPairConfig, relation_heads
from kdfast.models import build_model
from kdfast.taps import QKV, Taps
from kdfast.train import make_optimizer, param_groups

B, N, CLASSES = 2, 5, 4
STUDENT_TAPS = {"s0": TapConfig(path="a", kind="attention"), "s1": TapConfig(path="b", kind="attention")}
TEACHER_TAPS = {"t0": TapConfig(path="c", kind="attention"), "t1": TapConfig(path="d", kind="attention")}
PAIRS = [MTDPairConfig(student="s0", teacher="t0"), MTDPairConfig(student="s1", teacher="t1")]
CONFIG = CONFIG_DIR / "mtd_digits.yaml"


def _loss(impl: str = "reference", pairs=PAIRS, **mtd) -> MTDLoss:
    cfg = MTDConfig(pairs=pairs, **mtd)
    return MTDLoss(cfg, STUDENT_TAPS, TEACHER_TAPS, kernels_impl=impl)


def tap_qkv(g: torch.Generator, heads: int, width: int, tokens: int = N) -> QKV:
    return QKV(*(torch.randn(B, heads, tokens, width, generator=g) for _ in range(3)))


def _taps(seed: int = 0, student=(2, 4), teacher=(2, 6)):
    g = torch.Generator().manual_seed(seed)
    return (
        {name: tap_qkv(g, *student) for name in STUDENT_TAPS},
        {name: tap_qkv(g, *teacher) for name in TEACHER_TAPS},
    )


def _kl_rows(a_s: torch.Tensor, a_t: torch.Tensor, direction: str) -> torch.Tensor:
    """Mean over rows of KL between two full (B, H, N, N) attention matrices, through F.kl_div."""
    p, q = (a_s, a_t) if direction == "student_teacher" else (a_t, a_s)
    return F.kl_div(q.log(), p, reduction="none").sum(-1).mean()


def _softmax_relation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x @ y.transpose(-1, -2) / math.sqrt(x.shape[-1]), dim=-1)


def _concat_resplit(x: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLMv2 by hand: heads laid side by side along the feature axis, then cut into equal slices."""
    wide = torch.cat([x[:, h] for h in range(x.shape[1])], dim=-1)
    return torch.stack(wide.chunk(heads, dim=-1), dim=1)


def _explicit_terms(s: QKV, t: QKV, direction: str = "student_teacher", heads: int | None = None):
    if heads is not None:
        s = QKV(*(_concat_resplit(x, heads) for x in s))
        t = QKV(*(_concat_resplit(x, heads) for x in t))
    cad = _kl_rows(_softmax_relation(s.q, s.k), _softmax_relation(t.q, t.k), direction)
    vr = _kl_rows(_softmax_relation(s.v, s.v), _softmax_relation(t.v, t.v), direction)
    return cad, vr


def _logits(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, CLASSES, generator=g), torch.randn(B, CLASSES, generator=g), torch.tensor([0, 3])


def _task_loss(student_logits, targets) -> torch.Tensor:
    """MTD's supervised task L_0: the task loss alone, -mean_b log softmax(z_b)[y_b]."""
    return -torch.log_softmax(student_logits, 1)[torch.arange(len(targets)), targets].mean()


@pytest.mark.parametrize("direction", ["student_teacher", "teacher_student"])
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_cad_and_vr_match_full_softmax_kl(direction, impl):
    loss = _loss(impl, direction=direction)
    student, teacher = _taps()
    terms = loss.relations(PAIRS[0], student["s0"], teacher["t0"])
    cad, vr = _explicit_terms(student["s0"], teacher["t0"], direction)
    torch.testing.assert_close(terms["cad"], cad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["vr"], vr, rtol=1e-4, atol=1e-6)


def test_relation_heads_resplit_matches_hand_reshape():
    x = torch.arange(B * 3 * N * 4, dtype=torch.float32).reshape(B, 3, N, 4)
    torch.testing.assert_close(relation_heads(x, 6), _concat_resplit(x, 6))
    torch.testing.assert_close(relation_heads(x, 2), _concat_resplit(x, 2))
    assert relation_heads(x, 6).shape == (B, 6, N, 2)


def test_relation_heads_let_head_counts_differ():
    loss = _loss(relation_heads=4)
    student, teacher = _taps(student=(2, 6), teacher=(3, 8))
    loss.check(student, teacher)
    terms = loss.relations(PAIRS[1], student["s1"], teacher["t1"])
    cad, vr = _explicit_terms(student["s1"], teacher["t1"], heads=4)
    torch.testing.assert_close(terms["cad"], cad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["vr"], vr, rtol=1e-4, atol=1e-6)


def _task_losses(student, teacher, granularity: str) -> torch.Tensor:
    per_pair = [_explicit_terms(student[p.student], teacher[p.teacher]) for p in PAIRS]
    if granularity == "layer":
        return torch.stack([cad + vr for cad, vr in per_pair])
    return torch.stack([term for terms in per_pair for term in terms])


@pytest.mark.parametrize("granularity", ["layer_kind", "layer"])
@pytest.mark.parametrize("weighting", ["uniform", "manual", "learnable", "uncertainty"])
def test_weighting_total_matches_formula(weighting, granularity):
    count = 2 if granularity == "layer" else 4
    manual = [0.5, 2.0, 1.5, 0.25][:count]
    loss = _loss(weighting=weighting, granularity=granularity, manual_weights=manual)
    set_to = torch.tensor([0.7, 1.3, 0.4, 2.0, 0.9][: count + 1])
    with torch.no_grad():
        if weighting == "learnable":
            loss.task_logits.copy_(set_to)
        if weighting == "uncertainty":
            loss.task_w.copy_(set_to)
    student, teacher = _taps()
    logits = _logits()
    total, parts = loss(*logits, student, teacher)

    ce = _task_loss(logits[0], logits[2])
    tasks = _task_losses(student, teacher, granularity)
    every = torch.cat([ce.reshape(1), tasks])
    if weighting == "uniform":
        coefficients = torch.ones(count + 1)
        expected = ce + tasks.sum()
    elif weighting == "manual":
        coefficients = torch.tensor([1.0, *manual])
        expected = ce + (torch.tensor(manual) * tasks).sum()
    elif weighting == "learnable":
        coefficients = torch.exp(set_to) / torch.exp(set_to).sum()
        expected = (coefficients * every).sum()
    else:
        coefficients = 1 / (2 * set_to**2)
        expected = (every / (2 * set_to**2) + torch.log(1 + set_to**2)).sum()
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    assert "kd" not in parts
    torch.testing.assert_close(parts["ce"], ce, rtol=1e-5, atol=1e-6)
    cads, vrs = zip(*(_explicit_terms(student[p.student], teacher[p.teacher]) for p in PAIRS), strict=True)
    torch.testing.assert_close(parts["cad"], sum(cads), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts["vr"], sum(vrs), rtol=1e-5, atol=1e-6)
    supervised_share = coefficients[0] * ce
    if weighting == "uncertainty":
        supervised_share = supervised_share + math.log(1 + set_to[0].item() ** 2)
    torch.testing.assert_close(parts["total_distill"], expected - supervised_share, rtol=1e-5, atol=1e-6)
    logged = [parts["w_supervised"], *(parts[f"w_{name}"] for name in loss.tasks)]
    torch.testing.assert_close(torch.stack(logged), coefficients, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weighting", ["learnable", "uncertainty"])
def test_gradients_reach_student_producers_and_weights_not_teacher(weighting):
    g = torch.Generator().manual_seed(3)
    tokens_s = torch.randn(B, N, 8, generator=g)
    tokens_t = torch.randn(B, N, 12, generator=g)
    student_proj = nn.ModuleDict({r: nn.Linear(8, 8) for r in "qkv"})
    teacher_proj = nn.ModuleDict({r: nn.Linear(12, 12) for r in "qkv"})

    def qkv(proj: nn.ModuleDict, tokens: torch.Tensor) -> QKV:
        return QKV(*(proj[r](tokens).reshape(B, N, 2, -1).transpose(1, 2) for r in "qkv"))

    loss = _loss(pairs=PAIRS[:1], weighting=weighting)
    student_logits, teacher_logits, targets = _logits()
    student_logits.requires_grad_(True)
    teacher_logits.requires_grad_(True)
    total, _ = loss(
        student_logits,
        teacher_logits,
        targets,
        {"s0": qkv(student_proj, tokens_s)},
        {"t0": qkv(teacher_proj, tokens_t)},
    )
    total.backward()
    for r in "qkv":
        assert student_proj[r].weight.grad is not None and student_proj[r].weight.grad.abs().sum() > 0, r
        assert teacher_proj[r].weight.grad is None, r
    learned = loss.task_logits if weighting == "learnable" else loss.task_w
    assert [p for p in loss.parameters()] == [learned]
    assert learned.grad is not None and learned.grad.abs().sum() > 0
    assert student_logits.grad is not None and teacher_logits.grad is None


def test_fixed_weightings_have_no_parameters():
    assert list(_loss(weighting="uniform").parameters()) == []


def test_check_rejects_taps_that_cannot_be_matched():
    loss = _loss()
    student, teacher = _taps(student=(2, 4), teacher=(3, 4))
    with pytest.raises(UsageError, match="2 heads and teacher 3.*relation_heads"):
        loss.check(student, teacher)
    g = torch.Generator().manual_seed(0)
    student, teacher = _taps()
    teacher["t1"] = tap_qkv(g, 2, 6, tokens=N + 1)
    with pytest.raises(UsageError, match="same batch and token count"):
        loss.check(student, teacher)
    with pytest.raises(UsageError, match="relation_heads=4 does not divide the teacher's .* 6"):
        _loss(relation_heads=4).check(*_taps(student=(2, 4), teacher=(2, 3)))
    student, teacher = _taps()
    student["s0"] = torch.zeros(B, N, 8)
    with pytest.raises(UsageError, match="student tap 's0' gave no Q, K, V"):
        loss.check(student, teacher)


def test_constructor_rejects_bad_pairs_and_manual_weights():
    with pytest.raises(ConfigError, match="loss.mtd.manual_weights with 4 values"):
        _loss(weighting="manual", manual_weights=[1.0])
    with pytest.raises(ConfigError, match="loss.mtd.pairs\\[0\\].teacher names no teacher tap 'nope'"):
        _loss(pairs=[MTDPairConfig(student="s0", teacher="nope")])


def _tiny_vit(depth: int, dim: int, heads: int) -> nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        depth=depth,
        embed_dim=dim,
        num_heads=heads,
        num_classes=3,
    )


def test_cad_with_relation_heads_at_the_students_count_is_the_students_own_attention():
    # DeiT-S under DeiT-B as the paper config pairs them, scaled down: a student of 6 heads x 8 against a
    # teacher of 12 heads x 8, relation_heads 6. CAD_s must be the attention the student computes, read
    # from inside its timm Attention (the softmax entering attn_drop, fused attention off); CAD_t the
    # teacher's Q, K concatenated and cut into 6 heads of 16 (MiniLMv2), from its qkv Linear output, float64
    torch.manual_seed(0)
    taps = {"a": TapConfig(path="blocks.0.attn", kind="attention")}
    student_vit, teacher_vit = _tiny_vit(1, 48, 6), _tiny_vit(1, 96, 12).eval()
    student_vit.blocks[0].attn.fused_attn = False
    seen = {}
    student_vit.blocks[0].attn.attn_drop.register_forward_hook(lambda m, i, o: seen.update(student=i[0]))
    teacher_vit.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.update(teacher=o))
    student, teacher = Taps(student_vit, taps), Taps(teacher_vit, taps)
    pair = MTDPairConfig(student="a", teacher="a")
    loss = MTDLoss(MTDConfig(pairs=[pair], relation_heads=6), taps, taps, kernels_impl="reference")
    images = torch.randn(B, 3, 16, 16)
    with torch.no_grad():
        student_out, teacher_out = student(images)[1], teacher(images)[1]
    loss.check(student_out, teacher_out)
    cad_s = seen["student"].double()  # (B, 6, 17, 17)
    tokens = seen["teacher"].shape[1]
    # timm's qkv layout: q | k | v, the heads side by side inside each
    q, k, _ = seen["teacher"].double().reshape(B, tokens, 3, 96).unbind(2)
    q_r, k_r = (x.reshape(B, tokens, 6, 16).transpose(1, 2) for x in (q, k))
    cad_t = torch.softmax(q_r @ k_r.transpose(-1, -2) / math.sqrt(16), dim=-1)
    expected = (cad_s * (cad_s.log() - cad_t.log())).sum(-1).mean()  # KL(CAD_s || CAD_t) per row, mean
    got = loss.relations(pair, student_out["a"], teacher_out["a"])["cad"]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    assert expected > 0 and cad_s.shape == (B, 6, tokens, tokens)


def test_mtd_loss_end_to_end_on_timm_vits():
    torch.manual_seed(0)
    teacher_taps = {
        "t0": TapConfig(path="blocks.0.attn", kind="attention"),
        "t1": TapConfig(path="blocks.2.attn", kind="attention"),
    }
    student_taps = {
        "s0": TapConfig(path="blocks.0.attn", kind="attention"),
        "s1": TapConfig(path="blocks.1.attn", kind="attention"),
    }
    teacher = Taps(_tiny_vit(3, 48, 3), teacher_taps).eval()
    student = Taps(_tiny_vit(2, 32, 2), student_taps)
    loss = MTDLoss(
        MTDConfig(pairs=PAIRS, relation_heads=4), student_taps, teacher_taps, kernels_impl="reference"
    )
    images, targets = torch.randn(B, 3, 16, 16), torch.tensor([0, 2])
    with torch.no_grad():
        teacher_logits, teacher_out = teacher(images)
    student_logits, student_out = student(images)
    loss.check(student_out, teacher_out)
    total, parts = loss(student_logits, teacher_logits, targets, student_out, teacher_out)
    assert torch.isfinite(total) and parts["cad"] > 0 and parts["vr"] > 0
    total.backward()
    assert all(p.grad is not None for p in student.model.blocks[0].attn.qkv.parameters())
    assert loss.task_w.grad is not None
    ((student_map, teacher_map),) = loss.maps(student_out, teacher_out)
    assert student_map.shape == teacher_map.shape == (B, 4, 4)
    torch.testing.assert_close(student_map.flatten(1).norm(dim=1), torch.ones(B))


def test_mtd_digits_config_loads_and_its_models_match():
    cfg = load_config(CONFIG)
    section = cfg.loss.sections["mtd"]
    assert (
        cfg.loss.method == ["mtd"] and section.weighting == "uncertainty" and section.relation_heads is None
    )
    teacher = Taps(build_model(cfg.teacher.arch, num_classes=10), cfg.teacher.taps).eval()
    student = Taps(build_model(cfg.student.arch, num_classes=10), cfg.student.taps)
    # each model's own attention: the same head count, different head widths (32 and 24)
    assert teacher.model.blocks[0].attn.num_heads == student.model.blocks[0].attn.num_heads == 4
    loss = CompositeLoss(cfg.loss, cfg.student.taps, cfg.teacher.taps, kernels_impl="reference")
    images = torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        teacher_logits, teacher_out = teacher(images)
    student_logits, student_out = student(images)
    loss.check(student_out, teacher_out)
    labels = torch.tensor([1, 7])
    total, parts = loss(student_logits, teacher_logits, labels, student_out, teacher_out)
    # uncertainty weighting with w = 1 at the start over L_0 = CE and CAD, VR of both layer pairs
    relations = [
        term
        for s, t in (("s0", "t1"), ("s1", "t3"))
        for term in _explicit_terms(student_out[s], teacher_out[t])
    ]
    expected = sum(task / 2 + math.log(2) for task in [_task_loss(student_logits, labels), *relations])
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-6)
    assert "ce" not in parts  # MTD computes the supervised term; the run adds none
    torch.testing.assert_close(parts["mtd"], total)


def test_uniform_weighting_gives_every_task_weight_one():
    loss = _loss(weighting="uniform")
    student, teacher = _taps()
    logits = _logits()
    total, parts = loss(*logits, student, teacher)
    weights = [parts["w_supervised"], *(parts[f"w_{name}"] for name in loss.tasks)]
    assert len(weights) == 5 and all(w.item() == 1.0 for w in weights)
    cad_vr = [term for p in PAIRS for term in _explicit_terms(student[p.student], teacher[p.teacher])]
    torch.testing.assert_close(total, _task_loss(logits[0], logits[2]) + sum(cad_vr), rtol=1e-5, atol=1e-6)


def test_logit_kd_is_a_separate_composable_term():
    """[kd, mtd]: kd's weight * tau^2 KL beside MTD's weighted tasks (uniform: CE + CAD + VR), not in L_0."""
    cfg = LossConfig(
        method=["kd", "mtd"],
        sections={
            "kd": KDConfig(weight=0.5, temperature=2.0),
            "mtd": MTDConfig(pairs=PAIRS, weighting="uniform"),
        },
    )
    loss = CompositeLoss(cfg, STUDENT_TAPS, TEACHER_TAPS, kernels_impl="reference")
    student, teacher = _taps()
    student_logits, teacher_logits, targets = _logits()
    total, parts = loss(student_logits, teacher_logits, targets, student, teacher)
    kl = F.kl_div(
        F.log_softmax(student_logits / 2, 1), F.softmax(teacher_logits / 2, 1), reduction="batchmean"
    )
    cad_vr = [term for p in PAIRS for term in _explicit_terms(student[p.student], teacher[p.teacher])]
    mtd = _task_loss(student_logits, targets) + sum(cad_vr)
    torch.testing.assert_close(parts["kd"], 0.5 * 4.0 * kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, 0.5 * 4.0 * kl + mtd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("weighting", "name"), [("uncertainty", "task_w"), ("learnable", "task_logits")])
def test_the_no_decay_group_holds_exactly_the_task_weights(weighting, name):
    cfg = LossConfig(method=["mtd"], sections={"mtd": MTDConfig(pairs=PAIRS, weighting=weighting)})
    loss = CompositeLoss(cfg, STUDENT_TAPS, TEACHER_TAPS)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    stage = StageConfig(optimizer=OptimizerConfig(name="adamw", lr=0.1, weight_decay=0.5))
    optimizer = make_optimizer(param_groups(model, loss), stage, torch.device("cpu"))
    decayed, free = optimizer.param_groups
    task_weights = getattr(loss.members["mtd"], name)
    assert free["weight_decay"] == 0.0 and decayed["weight_decay"] == 0.5
    assert [id(p) for p in free["params"]] == [id(task_weights)]
    assert {id(p) for p in decayed["params"]} == {id(p) for p in model.parameters()}
    # a step with zero gradients: AdamW decays the model's weights by lr * wd and leaves the task weights
    before = task_weights.detach().clone(), model[0].weight.detach().clone()
    for p in [*model.parameters(), task_weights]:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(task_weights.detach(), before[0])
    torch.testing.assert_close(model[0].weight.detach(), before[1] * (1 - 0.1 * 0.5))


def test_fixed_weightings_leave_one_optimizer_group():
    loss = CompositeLoss(
        LossConfig(
            method=["mtd"],
            sections={"mtd": MTDConfig(pairs=PAIRS, weighting="manual", manual_weights=[1.0] * 4)},
        ),
        STUDENT_TAPS,
        TEACHER_TAPS,
    )
    assert loss.no_weight_decay() == set()
    assert len(param_groups(nn.Linear(2, 2), loss)) == 1


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.mtd.pairs=[]", "needs loss.mtd.pairs"),
        ("loss.mtd.pairs=[{student: s9, teacher: t3}]", "names no student tap 's9'"),
        ("loss.mtd.pairs=[{student: s0, teacher: t7}]", "names no teacher tap 't7'"),
        ("teacher.taps.t3.kind=feature", "teacher tap 't3' must have kind 'attention'"),
        ("loss.mtd.relations=[]", "relations is empty"),
        ("loss.mtd.relations=[cad, qk]", "loss.mtd.relations\\[1\\]"),
        ("loss.mtd.weighting=manual", "manual_weights with 4 values"),
        ("loss.mtd.relation_heads=0", "relation_heads' must be > 0"),
        ("loss.mtd.granularity=block", "loss.mtd.granularity"),
        ("loss.mtd.alpha=0.5", "unknown config key 'loss.mtd.alpha'"),
    ],
)
def test_mtd_config_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


def test_manual_weights_per_layer_count_through_config():
    cfg = load_config(
        CONFIG, ["loss.mtd.weighting=manual", "loss.mtd.granularity=layer", "loss.mtd.manual_weights=[1, 2]"]
    )
    assert cfg.loss.sections["mtd"].manual_weights == [1.0, 2.0]


def test_deit_paper_config_distills_every_block_as_25_tasks_on_the_students_own_heads(tmp_path):
    weights = tmp_path / "deit_b.pth"
    weights.write_bytes(b"stand-in: load_config only checks that the file exists")
    cfg = load_config(
        CONFIG_DIR / "mtd_deit_b_to_deit_s_imagenet.yaml",
        [f"data.root={tmp_path}", f"teacher.weights={weights}"],
    )
    section = cfg.loss.sections["mtd"]
    assert cfg.loss.method == ["mtd"] and section.weighting == "uncertainty"
    assert [(p.student, p.teacher) for p in section.pairs] == [(f"s{i}", f"t{i}") for i in range(12)]
    loss = MTDLoss(section, cfg.student.taps, cfg.teacher.taps, kernels_impl="reference")
    assert len(loss.tasks) + 1 == 25 and loss.task_w.shape == (25,)  # the paper's "25D"
    # DeiT-S's Q (6 heads x 64) re-split into 6 relation heads is DeiT-S's own heads, the attention it
    # computes; DeiT-B's 12 x 64 becomes 6 relation heads of 128
    q_teacher, q_student = torch.randn(2, 12, 197, 64), torch.randn(2, 6, 197, 64)
    assert torch.equal(relation_heads(q_student, section.relation_heads), q_student)
    assert relation_heads(q_teacher, section.relation_heads).shape == (2, 6, 197, 128)
    assert (
        cfg.data.augment.rand_augment is not None and cfg.data.augment.cutmix + cfg.data.augment.mixup == 1.0
    )
