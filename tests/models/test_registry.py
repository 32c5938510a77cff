"""The model registry (timm, torchvision, kdfast names; no downloads; local weights) and the kdfast models."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from kdfast.config import ArchSpec
from kdfast.errors import CheckpointError, ConfigError, UsageError
from kdfast.models import EdgeCNN, HybridTeacher, build_model, hybrid
from kdfast.models.students import MBConv

X = torch.randn(2, 3, 32, 32)


def test_timm_torchvision_and_kdfast_names_build_with_num_classes():
    resnet = build_model({"source": "timm", "name": "resnet18"}, num_classes=10)
    assert isinstance(resnet, timm.models.ResNet) and resnet.fc.out_features == 10
    tv = build_model(ArchSpec(source="torchvision", name="resnet18"), num_classes=7)
    assert isinstance(tv, torchvision.models.ResNet) and tv.fc.out_features == 7
    edge = build_model({"source": "kdfast", "name": "edge_cnn"}, num_classes=4)
    assert isinstance(edge, EdgeCNN) and edge(X).shape == (2, 4)


def test_num_classes_in_kwargs_wins():
    model = build_model({"source": "timm", "name": "resnet18", "kwargs": {"num_classes": 3}}, num_classes=10)
    assert model.fc.out_features == 3


@pytest.mark.parametrize(
    ("source", "name", "suggestion"),
    [
        ("timm", "resnet181", "resnet18"),
        ("torchvision", "resnt18", "resnet18"),
        ("kdfast", "edge_cn", "edge_cnn"),
    ],
)
def test_unknown_name_names_the_closest(source, name, suggestion):
    with pytest.raises(ConfigError, match=f"unknown {source} model '{name}'.*'{suggestion}'"):
        build_model({"source": source, "name": name})


def test_a_name_like_none_says_so_instead_of_listing_every_model():
    with pytest.raises(ConfigError, match="unknown timm model 'zzqqxx': no similar name exists$"):
        build_model({"source": "timm", "name": "zzqqxx"})


def test_bad_kwargs_is_a_config_error():
    with pytest.raises(ConfigError, match="arch.kwargs for kdfast edge_cnn"):
        build_model({"source": "kdfast", "name": "edge_cnn", "kwargs": {"widht": 3}})


@pytest.mark.parametrize(
    "arch",
    [
        {"source": "timm", "name": "resnet18", "kwargs": {"pretrained": True}},
        {"source": "torchvision", "name": "resnet18", "kwargs": {"weights": "IMAGENET1K_V1"}},
    ],
)
def test_pretrained_download_is_refused(arch):
    with pytest.raises(
        UsageError, match="would need a download; download the file elsewhere.*weights: <file>"
    ):
        build_model(arch, num_classes=10)


def test_weights_file_raw_and_kdfast_checkpoint(tmp_path):
    source = build_model({"source": "kdfast", "name": "edge_cnn"}, num_classes=5)
    raw, ckpt = tmp_path / "raw.pt", tmp_path / "student.pt"
    torch.save(source.state_dict(), raw)
    torch.save(
        {"format": "kdfast.student/1", "state_dict": source.state_dict(), "classes": list("abcde")}, ckpt
    )
    for path in (raw, ckpt):
        loaded = build_model({"source": "kdfast", "name": "edge_cnn"}, num_classes=5, weights=str(path))
        for key, value in source.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_weights_mismatch_names_the_first_bad_key(tmp_path):
    arch = {"source": "kdfast", "name": "edge_cnn"}
    wrong_head = tmp_path / "five.pt"
    torch.save(build_model(arch, num_classes=5).state_dict(), wrong_head)
    with pytest.raises(
        CheckpointError, match="shape mismatch at 'classifier.weight'.*\\(5, 128\\).*\\(10, 128\\)"
    ):
        build_model(arch, num_classes=10, weights=str(wrong_head))
    state = build_model(arch, num_classes=10).state_dict()
    state.pop("stem.0.weight")
    missing = tmp_path / "missing.pt"
    torch.save(state, missing)
    with pytest.raises(CheckpointError, match="missing key 'stem.0.weight'"):
        build_model(arch, num_classes=10, weights=str(missing))
    with pytest.raises(CheckpointError, match="not found"):
        build_model(arch, num_classes=10, weights=str(tmp_path / "nope.pt"))
    pickled = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), pickled)
    with pytest.raises(CheckpointError, match="weights file .*module.pt was refused: it would load torch.nn"):
        build_model(arch, num_classes=10, weights=str(pickled))


def test_hybrid_teacher_is_linear_of_concatenated_branch_logits():
    teacher = build_model({"source": "kdfast", "name": "hybrid_teacher_small"}, num_classes=10).eval()
    assert isinstance(teacher, HybridTeacher)
    with torch.no_grad():
        out = teacher(X)
        expected = F.linear(
            torch.cat([teacher.vgg(X), teacher.vit(X)], 1), teacher.head.weight, teacher.head.bias
        )
        vgg_map = teacher.vgg.features[:14](X)
    assert out.shape == (2, 10) and teacher.head.in_features == 20
    torch.testing.assert_close(out, expected)
    assert vgg_map.shape == (2, 128, 8, 8)  # the default tap, before the last pool


def test_edge_cnn_is_small_and_has_an_8x8_tap():
    model = build_model({"source": "kdfast", "name": "edge_cnn"}, num_classes=10)
    params = sum(p.numel() for p in model.parameters())
    teacher = build_model({"source": "kdfast", "name": "hybrid_teacher_small"}, num_classes=10)
    assert 50_000 <= params <= 150_000 < sum(p.numel() for p in teacher.parameters())
    assert model.blocks[:3](model.stem(X)).shape[-2:] == (8, 8)
    assert {type(m) for m in model.modules()} <= {
        EdgeCNN,
        MBConv,
        nn.Sequential,
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.AdaptiveAvgPool2d,
        nn.Dropout,
        nn.Linear,
    }


def _tiny_vgg(weights=None):
    features = torchvision.models.vgg.make_layers([8, "M"])
    model = torchvision.models.VGG(features, num_classes=1000, init_weights=False)
    model.classifier = nn.Sequential(nn.Linear(8 * 7 * 7, 16), nn.ReLU(), nn.Linear(16, 1000))
    return model


def _tiny_vit(weights=None, image_size=224):
    return VisionTransformer(image_size, 16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16)


def test_hybrid_vgg19_vitb16_loads_local_torchvision_files_then_replaces_heads(tmp_path, monkeypatch):
    # The real VGG19 + ViT-B/16 take ~1 GB and tens of seconds here: the same code path runs on tiny
    # torchvision VGG / VisionTransformer instances with 1000-class heads, as ImageNet files have.
    monkeypatch.setattr(hybrid, "vgg19", _tiny_vgg)
    monkeypatch.setattr(hybrid, "vit_b_16", _tiny_vit)
    vgg, vit = _tiny_vgg(), _tiny_vit()
    torch.save(vgg.state_dict(), tmp_path / "vgg.pt")
    torch.save(vit.state_dict(), tmp_path / "vit.pt")
    kwargs = {
        "vgg_weights": str(tmp_path / "vgg.pt"),
        "vit_weights": str(tmp_path / "vit.pt"),
        "image_size": 32,
    }
    teacher = build_model(
        {"source": "kdfast", "name": "hybrid_vgg19_vitb16", "kwargs": kwargs}, num_classes=3
    )
    assert torch.equal(teacher.vgg.features[0].weight, vgg.features[0].weight)
    assert torch.equal(teacher.vit.encoder.layers[0].mlp[0].weight, vit.encoder.layers[0].mlp[0].weight)
    # 224 -> 32 at patch 16: 196 + 1 position embeddings interpolated to 4 + 1, the class token's kept
    assert teacher.vit.encoder.pos_embedding.shape == (1, 5, 8)
    torch.testing.assert_close(teacher.vit.encoder.pos_embedding[:, 0], vit.encoder.pos_embedding[:, 0])
    assert teacher.vgg.classifier[-1].out_features == 3 and teacher.vit.heads.head.out_features == 3
    assert teacher(X).shape == (2, 3)


def test_edge_cnn_exports_to_plain_onnx_ops_and_matches_onnx_runtime(tmp_path):
    model = build_model({"source": "kdfast", "name": "edge_cnn"}, num_classes=10).eval()
    path = tmp_path / "edge.onnx"
    torch.onnx.export(model, (X,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "b"}})
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ops <= {"Conv", "Relu", "Add", "GlobalAveragePool", "Flatten", "Gemm", "Identity"}, ops
    batch = torch.randn(5, 3, 32, 32)
    got = ort.InferenceSession(str(path)).run(None, {"x": batch.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(batch), atol=1e-4, rtol=1e-4)
