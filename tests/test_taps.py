"""Taps by module path: features, Q/K/V of timm Attention and nn.MultiheadAttention, compile, bad paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from kdfast.config import CONFIG_DIR, TapConfig, load_config
from kdfast.errors import ConfigError
from kdfast.methods.compose import CompositeLoss
from kdfast.models import build_model
from kdfast.taps import QKV, Taps

X = torch.randn(2, 3, 32, 32)


def _output_of(module: nn.Module, model: nn.Module, x: torch.Tensor):
    """The module's own output in a forward of ``model`` (the test's hook, not the code under test)."""
    seen = {}
    handle = module.register_forward_hook(lambda _m, _a, out: seen.setdefault("out", out))
    model(x)
    handle.remove()
    return seen["out"]


def _attend(qkv: QKV) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V with the explicit matrix, heads merged back: (B, N, heads * d)."""
    scores = qkv.q @ qkv.k.transpose(-1, -2) * qkv.q.shape[-1] ** -0.5
    out = scores.softmax(-1) @ qkv.v
    return out.transpose(1, 2).flatten(2)


def test_feature_tap_on_a_timm_cnn_matches_the_stem_to_layer3():
    model = build_model({"source": "timm", "name": "resnet18"}, num_classes=10).eval()
    taps = Taps(model, {"l3": TapConfig(path="layer3")})
    with torch.no_grad():
        logits, out = taps(X)
        m = model
        expected = m.layer3(m.layer2(m.layer1(m.maxpool(m.act1(m.bn1(m.conv1(X)))))))
        torch.testing.assert_close(logits, model(X))
    assert taps.model is model
    torch.testing.assert_close(out["l3"], expected)


@pytest.mark.parametrize("path", ["blocks.1.attn", "blocks.1.attn.qkv"])
def test_timm_vit_qkv_rebuild_the_attention_output(path):
    kwargs = {"img_size": 32, "patch_size": 4, "depth": 2, "qk_norm": True}
    model = build_model({"source": "timm", "name": "vit_tiny_patch16_224", "kwargs": kwargs}, num_classes=10)
    model.eval()
    taps = Taps(model, {"attn": TapConfig(path=path, kind="attention")})
    attn = model.blocks[1].attn
    with torch.no_grad():
        qkv = taps(X)[1]["attn"]
        expected = _output_of(attn, model, X)
        rebuilt = attn.proj(_attend(qkv))
    assert qkv.q.shape == (2, 3, 65, 64)  # 192 wide, 3 heads, 8 x 8 patches + CLS
    torch.testing.assert_close(rebuilt, expected, atol=1e-5, rtol=1e-4)


def _tiny_torchvision_vit() -> VisionTransformer:
    return VisionTransformer(
        32, 8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10
    ).eval()


def test_torchvision_vit_mha_qkv_rebuild_the_attention_output():
    model = _tiny_torchvision_vit()
    path = "encoder.layers.encoder_layer_1.self_attention"
    taps = Taps(model, {"attn": TapConfig(path=path, kind="attention")})
    mha = model.encoder.layers.encoder_layer_1.self_attention
    with torch.no_grad():
        qkv = taps(X)[1]["attn"]
        expected = _output_of(mha, model, X)[0]
        rebuilt = mha.out_proj(_attend(qkv))
    assert qkv.k.shape == (2, 4, 17, 8)
    torch.testing.assert_close(rebuilt, expected, atol=1e-5, rtol=1e-4)


class _SeqFirst(nn.Module):
    """An MHA with batch_first=False called with keyword arguments, as some models do."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.transpose(0, 1)
        return self.attn(query=tokens, key=tokens, value=tokens, need_weights=False)[0].transpose(0, 1)


def test_sequence_first_mha_called_with_keywords():
    model = _SeqFirst().eval()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        out, taps = Taps(model, {"a": TapConfig(path="attn", kind="attention")})(x)
        rebuilt = model.attn.out_proj(_attend(taps["a"]))
    assert taps["a"].q.shape == (3, 2, 5, 8)
    torch.testing.assert_close(rebuilt, out, atol=1e-5, rtol=1e-4)


def test_compiled_taps_equal_eager_without_graph_breaks():
    model = _tiny_torchvision_vit()
    specs = {
        "mlp": TapConfig(path="encoder.layers.encoder_layer_0.mlp"),
        "attn": TapConfig(path="encoder.layers.encoder_layer_1.self_attention", kind="attention"),
    }
    with torch.no_grad():
        eager_logits, eager = Taps(model, specs)(X)
        # fullgraph=True fails on any graph break; the "eager" backend keeps the check to Dynamo's tracing,
        # which is where hooks are captured, at a cost a shared 2-core CI can pay.
        outer = torch.compile(Taps(model, specs), fullgraph=True, backend="eager")
        inner = Taps(torch.compile(model, fullgraph=True, backend="eager"), specs)
        for logits, out in (outer(X), inner(X)):
            torch.testing.assert_close(logits, eager_logits)
            torch.testing.assert_close(out["mlp"], eager["mlp"])
            assert isinstance(out["attn"], QKV)
            for got, want in zip(out["attn"], eager["attn"], strict=True):
                torch.testing.assert_close(got, want)


def test_bad_path_names_the_closest_module_paths():
    model = build_model({"source": "kdfast", "name": "edge_cnn"}, num_classes=10)
    with pytest.raises(
        ConfigError, match="tap path 'block.2' is not a module of EdgeCNN: did you mean 'blocks.2'"
    ):
        Taps(model, {"mid": TapConfig(path="block.2")})
    with pytest.raises(ConfigError, match="has no 'qkv' Linear"):
        Taps(model, {"mid": TapConfig(path="blocks.2", kind="attention")})
    # nothing close: the first five module paths in the model's order
    first = [name for name, _ in model.named_modules() if name][:5]
    with pytest.raises(ConfigError) as raised:
        Taps(model, {"mid": TapConfig(path="zzqqxx")})
    assert str(raised.value) == f"tap path 'zzqqxx' is not a module of EdgeCNN: valid paths include {first}"


def test_feature_tap_of_tokens_and_removal():
    model = _tiny_torchvision_vit()
    taps = Taps(model, {"tokens": TapConfig(path="encoder.layers.encoder_layer_0")})
    with torch.no_grad():
        tokens = taps(X)[1]["tokens"]
        expected = model.encoder.layers[0](model.encoder.dropout(_embed(model, X)))
    torch.testing.assert_close(tokens, expected)
    taps._store["tokens"] = None
    model(X)  # a plain forward of the model (its CE stage) records nothing
    assert taps._store == {"tokens": None}
    taps.remove()
    assert not model.encoder.layers[0]._forward_hooks


def _embed(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    patches = model._process_input(x)
    cls = model.class_token.expand(x.shape[0], -1, -1)
    return torch.cat([cls, patches], 1) + model.encoder.pos_embedding


@pytest.mark.parametrize(
    ("config", "size", "shapes"),
    [
        ("default.yaml", 32, {"vgg": (2, 128, 8, 8), "vit": (2, 4, 65, 16), "mid": (2, 32, 8, 8)}),
        (
            "agkd_vgg19_vitb16_to_effb0.yaml",
            224,
            {"vgg": (2, 512, 14, 14), "vit": (2, 12, 197, 64), "mid": (2, 112, 14, 14)},
        ),
    ],
)
def test_shipped_config_taps_fit_their_models(config, size, shapes, tmp_path):
    cfg = load_config(CONFIG_DIR / config, [f"data.root={tmp_path}"])
    # Shapes only: the meta device runs VGG19 + ViT-B/16 without allocating or computing anything.
    with torch.device("meta"):
        _, teacher = Taps(build_model(cfg.teacher.arch, num_classes=10), cfg.teacher.taps)(
            torch.empty(2, 3, size, size)
        )
        _, student = Taps(build_model(cfg.student.arch, num_classes=10), cfg.student.taps)(
            torch.empty(2, 3, size, size)
        )
        loss_fn = CompositeLoss(cfg.loss, cfg.student.taps, cfg.teacher.taps)
        loss_fn.check(student, teacher)
        maps = loss_fn.maps(student, teacher)
    got = {"vgg": teacher["vgg"].shape, "vit": teacher["vit"].q.shape, "mid": student["mid"].shape}
    assert got == shapes
    grid = cfg.loss.sections["agkd"].grid
    assert [(s.shape, t.shape) for s, t in maps] == [((2, grid, grid), (2, grid, grid))]


def test_taps_through_ddp_hook_the_inner_module(tmp_path):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )
    try:
        model = build_model({"source": "kdfast", "name": "edge_cnn"}, num_classes=10).eval()
        ddp = nn.parallel.DistributedDataParallel(model)
        logits, out = Taps(ddp, {"mid": TapConfig(path="blocks.2")})(X)
        with torch.no_grad():
            expected = model.blocks[:3](model.stem(X))
        torch.testing.assert_close(out["mid"], expected)
        torch.testing.assert_close(logits, model(X))
    finally:
        torch.distributed.destroy_process_group()
