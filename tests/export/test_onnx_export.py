"""Clean ONNX files: the attention rewrites on a timm ViT (fewer nodes, same function), --opset, and the
preprocessing contract in the metadata checked against an independent PIL implementation of it."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from PIL import Image

from export.graph_rewrites import simplify
from export.onnx_export import export_onnx, read_metadata
from kdfast.checkpoint import preprocessing
from kdfast.data import dataset_from_record


@pytest.fixture(scope="module")
def vit():
    """A two-block timm ViT at 32x32 with non-zero biases and LayerNorm affines (as after training)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _raw_export(model) -> onnx.ModelProto:
    batch = torch.export.Dim("batch", min=1, max=4)
    program = torch.onnx.export(
        model, (torch.randn(2, 3, 32, 32),), dynamo=True, dynamic_shapes=({0: batch},), verbose=False
    )
    return program.model_proto


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_attention_rewrites_remove_the_shape_subgraphs_and_keep_the_function(vit):
    raw = _raw_export(vit)
    simplified = simplify(raw)
    # Constant nodes (the Gather indices) become initializers when export_onnx folds constants
    before = Counter(n.op_type for n in raw.graph.node if n.op_type != "Constant")
    after = Counter(n.op_type for n in simplified.graph.node if n.op_type != "Constant")
    # per block: k^T through Shape/3 Slice/2 Concat/2 Reshape/Transpose becomes one Transpose (-8), and
    # unbind's 3 Slice + 3 Squeeze become 3 Gather (-3)
    assert before.total() - after.total() == 2 * (8 + 3), (before, after)
    assert after["Squeeze"] == 0 and after["Gather"] >= 6 and after["Shape"] < before["Shape"]
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        with torch.no_grad():
            ref = vit(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(_run(simplified, x), ref, atol=1e-4, rtol=1e-3)
        np.testing.assert_allclose(_run(simplified, x), _run(raw, x), atol=1e-5)


def test_opset_is_honoured_and_the_file_is_clean(vit, tmp_path):
    path = export_onnx(
        vit, torch.randn(2, 3, 32, 32), tmp_path / "vit.onnx", max_batch=4, metadata={"a": [1]}, opset=18
    )
    proto = onnx.load(path)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 18)]
    assert not any(n.metadata_props or n.doc_string for n in proto.graph.node)
    assert read_metadata(path) == {"a": "[1]"}


def test_preprocessing_contract_matches_the_pipeline(tmp_path):
    """An ImageFolder student: apply the contract from its metadata with PIL and numpy only, and compare
    with the images kdfast itself feeds the student."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (48, 60, 3), dtype=np.uint8)).save(
                tmp_path / split / c / "0.png"
            )
    record = {
        "name": "imagefolder", "root": str(tmp_path), "image_size": 32, "val_fraction": 0.2, "seed": 0,
        "max_val_samples": None, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "classes": ["a", "b"],
    }  # fmt: skip
    ckpt = {"data": record, "input": {"size": [3, 32, 32], "mean": record["mean"], "std": record["std"]}}
    contract = json.loads(json.dumps(preprocessing(ckpt)))
    assert (
        contract["channel_order"] == "RGB" and contract["layout"] == "NCHW" and contract["dtype"] == "float32"
    )
    short, crop = contract["resize"]["shorter_side_to"], contract["resize"]["then_center_crop"]
    assert (short, crop) == (37, [32, 32])  # 32 * 256 / 224, ImageNet's evaluation geometry
    data = dataset_from_record(record, "val")
    image = Image.open(tmp_path / "val" / "a" / "0.png").convert(contract["channel_order"])
    w, h = image.size
    resized = image.resize(
        (round(w * short / min(w, h)), short), Image.BILINEAR
    )  # PIL's bilinear antialiases
    left, top = (resized.size[0] - crop[1]) // 2, (resized.size[1] - crop[0]) // 2
    pixels = np.asarray(resized.crop((left, top, left + crop[1], top + crop[0])), dtype=np.float32) / 255.0
    mine = ((pixels - contract["mean"]) / contract["std"]).transpose(2, 0, 1)
    theirs = data[0][0].numpy()
    assert mine.shape == theirs.shape == (3, 32, 32)
    # PIL and torchvision round the resampled pixels differently: within a grey level or two of 255
    assert np.abs(mine - theirs).max() < 3 / 255 / min(contract["std"])
