"""The method registry (discovery by file, one METHOD per file) and the composite loss: a list of methods sums
their weighted terms and the supervised CE, reaches every member's hooks, holds every member's parameters
and round-trips its state."""

from __future__ import annotations

import dataclasses
import importlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdfast.methods
from kdfast.config import LossConfig, TapConfig
from kdfast.methods import registry
from kdfast.methods.agkd import AGKDConfig, AGKDLoss, AttentionPairConfig
from kdfast.methods.base import DistillationLoss
from kdfast.methods.cakd import CAKDConfig
from kdfast.methods.compose import CompositeLoss
from kdfast.methods.kd import KDConfig, KDLoss
from kdfast.methods.registry import discover, methods
from kdfast.methods.sokd import SoKDConfig
from kdfast.taps import QKV

B, CLASSES = 2, 5
STUDENT_TAPS = {"s": TapConfig(path="a", kind="feature")}
TEACHER_TAPS = {
    "ta": TapConfig(path="b", kind="attention"),
    "tt": TapConfig(path="c", kind="feature"),
    "t": TapConfig(path="d", kind="feature"),
}


def _taps(seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    student = {"s": torch.randn(B, 6, 4, 4, generator=g).relu()}
    teacher = {
        "ta": QKV(*(torch.randn(B, 2, 10, 4, generator=g) for _ in range(3))),  # CLS + 3 x 3 patches
        "tt": torch.randn(B, 10, 8, generator=g),
        "t": torch.randn(B, 5, 4, 4, generator=g).relu(),
    }
    return student, teacher


def _logits(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        2 * torch.randn(B, CLASSES, generator=g),
        4 * torch.randn(B, CLASSES, generator=g),
        torch.tensor([1, 4]),
    )


def _side_networks(**cakd) -> LossConfig:
    """CAKD and SoKD together: both have sub-networks sized by check() and trained in after_step."""
    return LossConfig(
        method=["cakd", "sokd"],
        sections={
            "cakd": CAKDConfig(
                weight=0.5,
                student="s",
                teacher_attention="ta",
                teacher_tokens="tt",
                discriminator_every=1,
                **cakd,
            ),
            "sokd": SoKDConfig(weight=2.0, student="s", teacher="t", search_epochs=1, search_lr=0.05),
        },
    )


class Validated(Exception):
    pass


def test_every_method_file_is_registered_under_its_name(monkeypatch):
    package = Path(kdfast.methods.__file__).parent
    helpers = {"__init__", "base", "compose", "features", "logits", "registry"}
    files = {path.stem for path in package.glob("*.py")} - helpers
    registered = methods()
    papers = {"agkd", "cakd", "mtd", "sokd", "titn"}
    baselines = {"kd", "dkd", "dist", "rkd", "crd", "fitnet", "at", "reviewkd", "ofa"}
    # every file is a method; a new method's file is registered without editing this test
    assert set(registered) == files and papers | baselines <= files
    for name, entry in registered.items():
        assert issubclass(entry.loss, DistillationLoss) and entry.paper, name
        assert entry.schema().weight == 1.0, name
        # one validator: the loss module's constructor runs the very function the config loader runs, the
        # one the registry holds
        module = importlib.import_module(f"kdfast.methods.{name}")
        assert entry.validate is module.validate and registry.declaring(entry.loss) is entry, name

        def seen(*args, **kwargs):
            raise Validated

        patched = {**registered, name: dataclasses.replace(entry, validate=seen)}
        monkeypatch.setattr(registry, "methods", lambda patched=patched: patched)
        with pytest.raises(Validated):
            entry.loss(entry.schema(), {}, {})
        monkeypatch.undo()
    assert {name for name, entry in registered.items() if entry.supervised} == {"mtd", "titn"}


def test_discovery_finds_a_new_method_file_without_any_list(tmp_path, monkeypatch):
    package = tmp_path / "more_methods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("SCALE = 2.0\n")
    (package / "plain.py").write_text(
        "from dataclasses import dataclass\n"
        "from kdfast.methods.base import DistillationLoss\n"
        "from kdfast.methods.registry import Method\n\n"
        "@dataclass\nclass PlainConfig:\n    weight: float = 1.0\n\n"
        "def validate(cfg, student_taps, teacher_taps, where='loss.plain'):\n    pass\n\n"
        "METHOD = Method(\n"
        "    name='plain', schema=PlainConfig, validate=validate, loss=DistillationLoss, paper='-'\n"
        ")\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = discover(package, "more_methods")
    assert list(found) == ["plain"] and found["plain"].schema.__name__ == "PlainConfig"
    (package / "renamed.py").write_text((package / "plain.py").read_text())
    with pytest.raises(TypeError, match="more_methods.renamed.METHOD must be Method\\(name='renamed'"):
        discover(package, "more_methods")


def test_kd_plus_agkd_is_the_sum_of_the_two_computed_separately():
    kd = KDConfig(weight=0.7, temperature=3.0)
    agkd = AGKDConfig(weight=1.5, metric="cosine", pairs=[AttentionPairConfig("s", ["t", "ta"])])
    cfg = LossConfig(method=["kd", "agkd"], ce=0.25, sections={"kd": kd, "agkd": agkd})
    composite = CompositeLoss(cfg, STUDENT_TAPS, TEACHER_TAPS, kernels_impl="reference", label_smoothing=0.1)
    student_taps, teacher_taps = _taps()
    logits, teacher_logits, labels = _logits()
    total, parts = composite(logits, teacher_logits, labels, student_taps, teacher_taps)

    args = (logits, teacher_logits, labels, student_taps, teacher_taps)
    kd_term = KDLoss(kd)(*args)[0]
    agkd_term = AGKDLoss(agkd, STUDENT_TAPS, TEACHER_TAPS, kernels_impl="reference")(*args)[0]
    ce = F.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(total, 0.25 * ce + 0.7 * kd_term + 1.5 * agkd_term)
    assert parts.keys() == {"ce", "kd", "agkd"}
    torch.testing.assert_close(parts["kd"], 0.7 * kd_term)
    torch.testing.assert_close(parts["agkd"], 1.5 * agkd_term)
    # one method alone: the run's CE defaults to weight 1
    alone = CompositeLoss(LossConfig(method="kd"))
    torch.testing.assert_close(
        alone(*args)[0], F.cross_entropy(logits, labels) + KDLoss(KDConfig())(*args)[0]
    )


def test_hooks_reach_every_member_and_their_maps_and_parts_are_merged():
    torch.manual_seed(0)
    composite = CompositeLoss(
        _side_networks(view_prob=1.0), STUDENT_TAPS, TEACHER_TAPS, kernels_impl="reference"
    )
    cakd, sokd = composite.members["cakd"], composite.members["sokd"]
    student_taps, teacher_taps = _taps()
    composite.check(student_taps, teacher_taps)
    assert cakd.pca is not None and sokd.adapter is not None  # check reached both

    images = torch.randn(3, 3, 8, 8)
    composite.eval()
    assert torch.equal(composite.student_view(images), images)
    composite.train()
    assert ((composite.student_view(images) - images).flatten(1).abs().amax(1) > 0).all()  # CAKD's views

    composite.start_epoch(0, 2)
    assert sokd.searching and composite.held_out_share() == sokd.cfg.search_split
    composite.use_held_out(lambda: _taps(seed=7))  # the loop's held-out batches
    dafa_before = [p.detach().clone() for p in sokd.dafa.parameters()]
    disc_before = [p.detach().clone() for p in cakd.discriminator.parameters()]
    total, parts = composite(*_logits(), student_taps, teacher_taps)
    composite.after_step()
    assert cakd.steps == 1
    assert not all(
        torch.equal(a, b) for a, b in zip(disc_before, cakd.discriminator.parameters(), strict=True)
    )
    assert not all(torch.equal(a, b) for a, b in zip(dafa_before, sokd.dafa.parameters(), strict=True))
    composite.start_epoch(1, 2)
    assert not sokd.searching

    torch.testing.assert_close(total, parts["ce"] + parts["cakd"] + parts["sokd"])
    torch.testing.assert_close(
        parts["cakd"], 0.5 * (parts["cakd/pca"] + parts["cakd/gl"] + parts["cakd/adv"])
    )
    torch.testing.assert_close(parts["sokd"], 2.0 * (parts["sokd/dam"] + parts["sokd/areas"]))
    maps = composite.maps(student_taps, teacher_taps)
    assert len(maps) == 2 and [s.shape for s, _ in maps] == [(B, 3, 3), (B, 4, 4)]


def test_members_parameters_are_the_composites_and_state_round_trips(tmp_path):
    torch.manual_seed(0)
    composite = CompositeLoss(_side_networks(), STUDENT_TAPS, TEACHER_TAPS, kernels_impl="reference")
    student_taps, teacher_taps = _taps()
    composite.check(student_taps, teacher_taps)
    cakd, sokd = composite.members["cakd"], composite.members["sokd"]
    assert set(composite.parameters()) == set(cakd.parameters()) | set(sokd.parameters())
    trainable = {p for p in composite.parameters() if p.requires_grad}  # what the loop's optimizer gets
    assert trainable == {p for m in (cakd.pca, cakd.gl, sokd.adapter, sokd.head) for p in m.parameters()}
    composite.train()
    composite.start_epoch(0, 2)
    composite.use_held_out(lambda: _taps(seed=7))
    for seed in range(2):
        composite(*_logits(), *_taps(seed))
        composite.after_step()

    torch.save(composite.state_dict(), tmp_path / "extra.pt")
    restored = CompositeLoss(_side_networks(), STUDENT_TAPS, TEACHER_TAPS, kernels_impl="reference")
    restored.check(student_taps, teacher_taps)
    restored.load_state_dict(torch.load(tmp_path / "extra.pt", weights_only=True))
    saved, loaded = composite.state_dict(), restored.state_dict()
    assert saved.keys() == loaded.keys() and any(k.startswith("members.sokd.dafa.") for k in saved)
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    assert restored.members["cakd"].steps == 2
    assert restored.members["sokd"].dafa_optimizer.state_dict()["state"].keys() == (
        sokd.dafa_optimizer.state_dict()["state"].keys()
    )


def test_weights_multiply_whole_terms_and_zero_switches_a_term_off():
    student_taps, teacher_taps = _taps()
    args = (*_logits(), student_taps, teacher_taps)
    pair = [AttentionPairConfig("s", ["t"])]

    def total(kd_weight: float, agkd_weight: float) -> torch.Tensor:
        sections = {
            "kd": KDConfig(weight=kd_weight),
            "agkd": AGKDConfig(weight=agkd_weight, metric="mse", pairs=pair),
        }
        cfg = LossConfig(method=["kd", "agkd"], ce=0.0, sections=sections)
        return CompositeLoss(cfg, STUDENT_TAPS, TEACHER_TAPS, kernels_impl="reference")(*args)[0]

    kd_only, agkd_only = total(1.0, 0.0), total(0.0, 1.0)
    torch.testing.assert_close(total(2.0, 3.0), 2 * kd_only + 3 * agkd_only)
    assert kd_only > 0 and agkd_only > 0 and math.isfinite(total(0.0, 0.0).item())
    assert dataclasses.fields(KDConfig)[0].name == "weight"


def test_compiled_composite_has_no_graph_break_and_equals_eager():
    pair = [AttentionPairConfig("s", ["t", "ta"])]
    sections = {"kd": KDConfig(weight=0.5, standardize=True), "agkd": AGKDConfig(pairs=pair)}
    cfg = LossConfig(method=["kd", "agkd"], ce=0.5, sections=sections)
    composite = CompositeLoss(cfg, STUDENT_TAPS, TEACHER_TAPS, kernels_impl="reference")
    args = (*_logits(), *_taps())
    eager_total, eager_parts = composite(*args)
    total, parts = torch.compile(composite, fullgraph=True, backend="eager")(*args)
    torch.testing.assert_close(total, eager_total)
    assert parts.keys() == eager_parts.keys() == {"ce", "kd", "agkd"}
