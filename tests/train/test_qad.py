"""Quantization-aware distillation: the PyTorch simulation (kdfast.quant) against what ONNX Runtime computes
from the INT8 file the export writes, and the ``python -m kdfast.train --qad`` command (the QAD stage of the
loop run from a checkpoint). Post-training INT8 against QAD on the INT8 file:
tests/export/test_qad_export.py."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnxruntime.quantization.quant_utils import quantize_data
from support.runs import run_module
from support.students import qad_source, train_on_digits
from torch import nn

from export.int8_damage import run_tensors
from export.onnx_export import export_onnx
from export.qdq_rules import check_tensorrt_qdq
from export.quantize import TENSORRT, Int8Quantizer, quantize_file
from kdfast.checkpoint import build_from_checkpoint, load_checkpoint, load_split
from kdfast.models import build_model
from kdfast.quant import FakeQuant, fake_quant_weight, uncovered_weighted_ops, weight_scales

ROOT = Path(__file__).resolve().parents[2]
TINY_DEIT = {
    "source": "timm",
    "name": "deit_tiny_patch16_224",
    "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2},
}


def test_weight_grid_is_onnxruntimes_symmetric_int8_per_channel():
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3) * torch.linspace(0.01, 2.0, 6)[:, None, None, None]
    weight[2] = 0.0  # an all-zero channel keeps its zeros
    got = fake_quant_weight(weight, 0).numpy()
    for c in range(6):
        # ONNX Runtime's own per-channel weight quantizer, symmetric int8 (range -127..127)
        zero, scale, q = quantize_data(weight[c].numpy().ravel(), onnx.TensorProto.INT8, symmetric=True)
        assert int(zero) == 0
        np.testing.assert_allclose(
            got[c].ravel(), q.astype(np.float32) * np.float32(scale), rtol=0, atol=1e-7
        )
    # the same by hand: absmax / 127 per output channel, rounded half to even
    s = np.abs(weight.numpy()).reshape(6, -1).max(1) / 127
    s[s == 0] = 1
    hand = np.clip(np.round(weight.numpy() / s[:, None, None, None]), -127, 127) * s[:, None, None, None]
    np.testing.assert_allclose(got, hand, rtol=0, atol=1e-6)


def test_weight_gradient_is_straight_through():
    weight = torch.randn(5, 7, requires_grad=True)
    (fake_quant_weight(weight, 0) * torch.arange(7.0)).sum().backward()
    np.testing.assert_array_equal(weight.grad.numpy(), np.broadcast_to(np.arange(7.0), (5, 7)))


def test_transposed_conv_is_quantized_along_its_output_channels():
    layer = nn.ConvTranspose2d(3, 5, 2)
    FakeQuant(layer)
    grid = layer.weight.detach()  # (C_in=3, C_out=5, 2, 2): one scale per output channel, axis 1
    s = weight_scales(layer.parametrizations.weight.original, 1)
    assert s.shape == (5,)
    np.testing.assert_allclose(
        (grid / s[None, :, None, None]).numpy(), np.round((grid / s[None, :, None, None]).numpy()), atol=1e-4
    )


def test_weights_outside_linear_and_conv_modules_are_listed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4), nn.MultiheadAttention(4, 2))
    assert uncovered_weighted_ops(model) == ["2.in_proj_weight"]
    assert uncovered_weighted_ops(build_model(TINY_DEIT, num_classes=10)) == []


def _quantized_layer_inputs(path: Path, images: np.ndarray) -> tuple[list, list[float], np.ndarray]:
    """What each weighted op with a constant weight reads in the Q/DQ file (its dequantized input) and that
    input's scale, in graph order, and the file's logits, from ONNX Runtime without graph optimizations (Q/DQ
    semantics, unfused)."""
    model = onnx.load(path)
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    weight_dq = {
        n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
    }
    layers = [
        n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in weight_dq
    ]
    names = [n.input[0] for n in layers]
    scales = [float(onnx.numpy_helper.to_array(inits[producers[name].input[1]])) for name in names]
    logits = model.graph.output[0].name
    tensors = run_tensors(model, [*names, logits], images, len(images), 1)
    return [tensors[name] for name in names], scales, tensors[logits]


@pytest.fixture(scope="module")
def tiny_deit() -> nn.Module:
    """A 2-block DeiT (8x8 patches on 32x32 digits) trained for 2 epochs: LayerNorms, GELUs, attention."""
    torch.manual_seed(0)
    return train_on_digits(build_model(TINY_DEIT, num_classes=10), epochs=2, images=720, lr=1e-3)


@pytest.mark.parametrize("which", ["edge_cnn", "deit"])
def test_fake_quant_computes_what_the_int8_file_computes(which, trained_student, tiny_deit, tmp_path):
    """The PyTorch simulation against ONNX Runtime running ``student.int8.onnx`` as the export writes it:
    every quantized layer reads the same tensor (up to a rare one-step rounding flip from float sums taken
    in another order), so the logits agree far better than the float model's do."""
    _, edge, images, _ = trained_student
    model = copy.deepcopy(edge if which == "edge_cnn" else tiny_deit)
    calibration, batch = images[:64], images[64:128]
    fp32 = export_onnx(
        model.eval(), torch.from_numpy(images[:2]), tmp_path / "fp32.onnx", max_batch=8, metadata={}
    )
    int8 = quantize_file(fp32, tmp_path / "int8.onnx", calibration)
    assert check_tensorrt_qdq(onnx.load(int8)) == []
    ort_inputs, ort_scales, file_logits = _quantized_layer_inputs(int8, batch)
    float_logits = model(torch.from_numpy(batch)).detach().numpy()

    fq = FakeQuant(model)
    try:
        fq.calibrate(torch.from_numpy(calibration).split(8))
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            m.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].detach()))
            for name, m in fq.layers.items()
        ]
        with torch.no_grad():
            fake_logits = model(torch.from_numpy(batch)).numpy()
        for h in hooks:
            h.remove()
    finally:
        fq.remove(bake=False)
    assert len(ort_inputs) == len(fq.layers)
    # the same tensors quantized with the same scales (calibrated independently: ONNX Runtime's MinMax)
    np.testing.assert_allclose([fq.absmax[name] / 127 for name in fq.layers], ort_scales, rtol=1e-5)
    # The first layer reads the same int8 values; deeper, float sums taken in another order straddle a
    # rounding boundary now and then, and each such one-step flip echoes downstream, so the comparison
    # there is on the logits.
    first = next(iter(seen))
    np.testing.assert_allclose(seen[first].numpy().reshape(ort_inputs[0].shape), ort_inputs[0], atol=1e-6)
    # no reader but a weighted op sees a dequantized activation (a residual Add reads the float tensor)
    graph = onnx.load(int8).graph
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul", "QuantizeLinear", "DequantizeLinear"):
            for name in node.input:
                source = producers.get(name)
                assert source is None or source.op_type != "DequantizeLinear", f"{node.name} reads {name}"
    assert np.abs(fake_logits - file_logits).max() < 0.5 * np.abs(float_logits - file_logits).max()
    # 64 images cannot tell 99% from one borderline image: on an AVX2 EPYC one of the DeiT's 64 flips (float
    # sums of another order in MLAS's kernels), on AVX512-VNNI Xeons none; the logit bound above is the test.
    assert np.mean(fake_logits.argmax(1) == file_logits.argmax(1)) >= 0.95


def test_attention_matmuls_stay_float_in_the_tensorrt_layout(tiny_deit, tmp_path):
    """ONNX Runtime's quantizer ignores MatMulConstBOnly: without the export's own exclusion, q @ k^T and
    softmax @ v got Q/DQ on both inputs, outside accuracy control's candidates and outside the QAD
    simulation."""
    calib = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    fp32 = export_onnx(
        tiny_deit.eval(), torch.from_numpy(calib[:2]), tmp_path / "vit.onnx", max_batch=4, metadata={}
    )
    quantizer = Int8Quantizer(fp32, calib, method="minmax", batch=8, workdir=tmp_path)
    qdq = quantizer.quantize(TENSORRT)
    producers = {o: n for n in qdq.graph.node for o in n.output}
    inits = {i.name for i in qdq.graph.initializer}
    weighted, activations_only = 0, 0
    for node in (n for n in qdq.graph.node if n.op_type == "MatMul"):
        b = producers.get(node.input[1])
        if b is not None and b.op_type == "DequantizeLinear" and b.input[0] in inits:
            weighted += 1
        else:
            activations_only += 1
            assert all(
                producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input
            )
    assert weighted == 8 and activations_only == 4  # 2 blocks: qkv, proj, fc1, fc2; q@k^T, attn@v
    assert len(quantizer.candidates(TENSORRT)) == 10  # + the patch conv and the head


def test_bake_leaves_each_weight_on_its_grid(trained_student):
    path, _, images, _ = trained_student
    model = build_from_checkpoint(load_checkpoint(path))
    fq = FakeQuant(model)
    fq.calibrate(torch.from_numpy(images[:16]).split(8))
    fq.remove(bake=True)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    for name, layer in fq.layers.items():
        w = layer.weight.detach()
        np.testing.assert_allclose(fake_quant_weight(w, 0).numpy(), w.numpy(), atol=1e-7, err_msg=name)


def _qad(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_module("kdfast.train", *args, cwd=cwd)


@pytest.fixture(scope="module")
def digits_student(tmp_path_factory) -> Path:
    return qad_source(tmp_path_factory.mktemp("qad") / "student.pt")


@pytest.mark.slow
def test_qad_command_writes_a_student_on_the_int8_grid_and_resumes(digits_student, tmp_path):
    out = tmp_path / "qad"
    done = _qad(
        "--qad",
        str(digits_student),
        "--out",
        str(out),
        "--set",
        "qad.epochs=1",
        "--set",
        "qad.batch_size=32",
        "--set",
        "qad.lr=5e-5",  # YAML 1.1 reads this as a string; the float key takes it
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("student.pt", "qad.json", "qad.md", "qad.png", "qad.yaml", "metrics.jsonl", "state_qad.pt"):
        assert (out / name).is_file(), name
    ckpt = load_checkpoint(out / "student.pt")
    model = build_from_checkpoint(ckpt)
    for name, layer in model.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            w = layer.weight.detach()
            np.testing.assert_allclose(fake_quant_weight(w, 0).numpy(), w.numpy(), atol=1e-7, err_msg=name)
    summary = json.loads((out / "qad.json").read_text())
    assert ckpt["metrics"]["qad"]["qad_fp32"] == summary["qad_fp32"]

    # The fp32 accuracies the run reports, measured here independently on the validation split.
    source_ckpt = load_checkpoint(digits_student)
    val, labels = load_split(source_ckpt, "val")
    with torch.no_grad():
        source = build_from_checkpoint(source_ckpt)
        source_top1 = 100 * float((source(val).argmax(1) == labels).double().mean())
        qad_top1 = 100 * float((model(val).argmax(1) == labels).double().mean())
    # percentages of 96 images: equal up to float32 rounding of the mean
    assert summary["source_fp32_top1"] == pytest.approx(source_top1, abs=1e-4)
    assert summary["qad_fp32"]["top1"] == pytest.approx(qad_top1, abs=1e-4)
    assert ckpt["metrics"]["top1"] == pytest.approx(qad_top1, abs=1e-4)
    assert "| QAD student, fake INT8 (PyTorch) |" in (out / "qad.md").read_text()

    # --resume continues from state_qad.pt: with one more epoch asked for, only epoch 2 runs.
    settings = yaml.safe_load((out / "qad.yaml").read_text())
    settings["qad"]["epochs"] = 2
    (out / "qad.yaml").write_text(yaml.safe_dump(settings))
    done = _qad("--resume", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "qad epoch 1/2:" not in done.stdout and "qad epoch 2/2:" in done.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in rows if r["split"] == "val"]
    assert epochs == [1, 2]
    assert [e["epoch"] for e in json.loads((out / "qad.json").read_text())["epochs"]] == [1, 2]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--qad", "missing.pt"], "no such file"),
        (["--qad", "{student}", "--set", "qad.epochs=0"], "config key 'qad.epochs' must be > 0"),
        (["--qad", "{student}", "--set", "qad.lr=fast"], "config key 'qad.lr' must be float"),
        (["--qad", "{student}", "--set", "data.batch_size=8"], "only qad.<key>=<value> applies"),
        (
            ["--qad", "{student}", "--set", "qad.epoch=2"],
            "unknown config key 'qad.epoch': did you mean 'epochs'",
        ),
        (["--qad", "{student}", "--set", "qad.lr=[1"], "is not valid YAML"),
        (["--qad", "{student}", "--config", "configs/default.yaml"], "drop --config"),
        (["--qad", "{student}", "--resume", "runs/x"], "drop --qad"),
        (["--qad", "{student}", "--set", "qad.teacher=nowhere.pt"], "nowhere.pt"),
    ],
)
def test_qad_bad_input_is_one_line_and_exit_2(args, says, digits_student, tmp_path):
    args = [a.format(student=digits_student) for a in args]
    done = (
        _qad(*args, "--out", str(tmp_path / "out"), cwd=ROOT)
        if "--resume" not in args
        else _qad(*args, cwd=ROOT)
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ("not: [valid", "is not the settings file a QAD run writes"),
        ("student: gone.pt\nstudent_sha256: abc\nqad: {}\n", "is gone or has changed"),
    ],
)
def test_qad_resume_of_a_broken_folder_is_one_line_and_exit_2(settings, says, tmp_path):
    (tmp_path / "qad.yaml").write_text(settings)
    done = _qad("--resume", str(tmp_path), cwd=ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], done.stderr


def test_qad_objective_is_hintons_kd_plus_the_weighted_ce():
    """The QAD stage's loss, by hand in float64: T^2 KL(softmax(z_t / T) || softmax(z_s / T)), batch mean,
    plus ce_weight times the cross-entropy with the labels."""
    from kdfast.config import QadConfig
    from kdfast.train.loop import qad_loss

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 10, generator=gen) * 3, torch.randn(6, 10, generator=gen) * 3
    labels = torch.tensor([0, 3, 9, 2, 2, 7])
    loss, parts = qad_loss(QadConfig(temperature=2.0, ce_weight=0.5))(student, teacher, labels, {}, {})
    t, s, y = teacher.double().numpy() / 2, student.double().numpy() / 2, labels.numpy()
    p_t = np.exp(t) / np.exp(t).sum(1, keepdims=True)
    log_p_s = s - np.log(np.exp(s).sum(1, keepdims=True))
    kl = (p_t * (np.log(p_t) - log_p_s)).sum(1).mean() * 4
    z = student.double().numpy()
    ce = -(z[np.arange(6), y] - np.log(np.exp(z).sum(1))).mean()
    assert float(loss) == pytest.approx(kl + 0.5 * ce, rel=1e-5)
    assert float(parts["kd"]) == pytest.approx(kl, rel=1e-5) and float(parts["ce"]) == pytest.approx(0.5 * ce)
