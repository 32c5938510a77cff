"""INT8 on the trained default student: the TensorRT file tracks PyTorch and passes TensorRT's rules, the
calibration method is honoured, the ONNX Runtime CPU file fuses into QLinear kernels and carries 7-bit weights
that keep ONNX Runtime's fast kernels and exact, a thin conv stays float unless a
MaxPool reads it, and accuracy control finds and keeps in float the one layer a planted activation outlier
ruins."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from onnxruntime.quantization.qdq_loss_debug import compute_signal_to_quantization_noice_ratio

from export.accuracy_control import Quality, sqnr_db
from export.int8 import ControlSet, make_int8
from export.onnx_export import export_onnx
from export.ort_backend import EXACT_INT8_KERNELS, weight_types
from export.qdq_rules import check_tensorrt_qdq
from export.quantize import MIN_INT8_CONV_CHANNELS, ORT_CPU, TENSORRT, Int8Quantizer

# The projection conv of edge_cnn's third block reads the depthwise conv's 128 channels.
PLANTED_LAYER = "blocks.2.block.2.0"
OUTLIER_CHANNEL, OUTLIER_GAIN = 5, 300.0


def _logits(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def _session(
    model: onnx.ModelProto | str, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, dump=None, exact=True
):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    if exact:
        options.add_session_config_entry(EXACT_INT8_KERNELS, "1")  # the same integers on every x86 CPU
    if dump is not None:
        options.optimized_model_filepath = str(dump)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _run(model, images: np.ndarray) -> np.ndarray:
    return _session(model).run(None, {"input": images})[0]


@pytest.fixture(scope="module")
def quantizer(trained_student, tmp_path_factory):
    _, model, images, _ = trained_student
    root = tmp_path_factory.mktemp("int8")
    fp32 = export_onnx(model, torch.from_numpy(images[:2]), root / "fp32.onnx", max_batch=8, metadata={})
    return Int8Quantizer(fp32, images[:64], method="minmax", batch=8, workdir=root)


def test_sqnr_matches_onnxruntime_debug_tool():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 10)).astype(np.float32)
    y = x + 0.01 * rng.standard_normal(x.shape).astype(np.float32)
    assert sqnr_db(x, y) == pytest.approx(compute_signal_to_quantization_noice_ratio(x, y), rel=1e-6)
    # A hand-worked case: ||x|| = 5, ||x - y|| = 0.05 -> 20 log10(100) = 40 dB.
    assert sqnr_db(np.array([3.0, 4.0]), np.array([3.03, 4.04])) == pytest.approx(40.0, abs=1e-9)


def test_tensorrt_file_tracks_pytorch_on_real_images(trained_student, quantizer, tmp_path):
    # Gates with room: on 128 images the all-INT8 file disagrees with PyTorch on one (a Sapphire Rapids
    # core), so 0.99 sat at the edge: CI on another x86 CPU missed it and accuracy control kept a layer
    # in float there and not here.
    # What is tested here is that every layer quantized tracks PyTorch; keeping layers is the next test.
    _, model, images, labels = trained_student
    control = ControlSet(images, _logits(model, images), labels)
    made = make_int8(
        quantizer,
        TENSORRT,
        tmp_path / "student.int8.onnx",
        metadata={"k": "v"},
        control_set=control,
        min_agreement=0.95,
        max_drop=2.0,
        threads=1,
        batch=8,
    )
    assert check_tensorrt_qdq(onnx.load(made.path)) == []
    assert made.control.met and made.control.keep_float == []
    whole = _run(str(made.path), images)
    quality = Quality.of(whole, control.reference, labels)
    assert quality.agreement >= 0.95 and quality.accuracy_drop <= 2.0
    assert made.control.final.agreement == pytest.approx(quality.agreement)
    # The batch is dynamic: 1 and 3 images give the rows of the 128-image batch.
    for batch in (1, 3):
        np.testing.assert_allclose(
            _run(str(made.path), images[10 : 10 + batch]), whole[10 : 10 + batch], atol=1e-4
        )
    # One SQNR per weighted layer (17 in edge_cnn) and the logits, each within int8's reach.
    assert len(made.layers) == 18 and made.layers[-1]["op"] == "logits"
    for layer in made.layers[:-1]:
        assert (
            not layer["float"]
            and 10 < layer["sqnr_db"] < 80
            and layer["sqnr_db"] == layer["sqnr_all_int8_db"]
        )
    assert onnx.load(made.path).metadata_props[0].key == "k"


def _activation_scales(model: onnx.ModelProto) -> dict[str, float]:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_calibration_method_is_honoured(trained_student, tmp_path):
    """Percentile (99.999) clips the tails min/max keeps, so no activation range can be wider; entropy
    picks its own thresholds."""
    _, model, images, _ = trained_student
    fp32 = export_onnx(model, torch.from_numpy(images[:2]), tmp_path / "fp32.onnx", max_batch=8, metadata={})
    scales = {}
    for method in ("minmax", "percentile", "entropy"):
        work = tmp_path / method
        work.mkdir()
        qdq = Int8Quantizer(fp32, images[:64], method=method, batch=8, workdir=work).quantize(TENSORRT)
        assert check_tensorrt_qdq(qdq) == []
        scales[method] = _activation_scales(qdq)
    assert scales["minmax"].keys() == scales["percentile"].keys() == scales["entropy"].keys()
    pairs = [(scales["percentile"][t], scales["minmax"][t]) for t in scales["minmax"]]
    assert all(p <= m * (1 + 1e-6) for p, m in pairs) and any(p < 0.999 * m for p, m in pairs)
    assert any(
        abs(scales["entropy"][t] - scales["minmax"][t]) > 1e-3 * scales["minmax"][t] for t in scales["minmax"]
    )


def test_ort_cpu_file_fuses_every_wide_conv_into_qlinearconv(quantizer, tmp_path):
    model = quantizer.quantize(ORT_CPU)
    graph = quantizer.float_model.graph
    weights = {i.name: i.dims for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    channels = [
        weights[n.input[1]][1] * next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs
    ]
    wide = sum(c >= MIN_INT8_CONV_CHANNELS for c in channels)
    assert 0 < wide < len(channels), channels  # edge_cnn has both kinds: the test sees both paths
    _session(model, dump=tmp_path / "optimized.onnx")
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)
    assert ops["QLinearConv"] == wide
    assert ops["Conv"] + ops["FusedConv"] == len(channels) - wide
    assert ops["Relu"] == 0, "a ReLU left between Q/DQ pairs blocks the QLinearConv fusion"


def _int8_weights(model: onnx.ModelProto) -> np.ndarray:
    return np.concatenate(
        [
            numpy_helper.to_array(i).ravel()
            for i in model.graph.initializer
            if i.data_type == onnx.TensorProto.INT8
        ]
    )


def test_ort_cpu_file_has_7_bit_weights_and_keeps_the_fast_kernels_exact(
    trained_student, quantizer, tmp_path
):
    """ONNX Runtime's U8S8 kernels on x86 without VNNI sum pairs of uint8 x int8 products in int16:
    255 * 127 * 2 overflows it, 255 * 64 * 2 = 32640 does not. The TensorRT file keeps full-range weights;
    the ONNX Runtime file holds every weight in -64..64, so ``session.x64quantprecision`` leaves them int8
    (the fast kernels) and both kernel choices compute the same numbers."""
    images = trained_student[2][:32]
    assert np.abs(_int8_weights(quantizer.quantize(TENSORRT))).max() == 127
    model = quantizer.quantize(ORT_CPU)
    weights = _int8_weights(model)
    assert weights.min() >= -64 and weights.max() <= 64 and np.abs(weights).max() == 64
    exact = _session(model, dump=tmp_path / "optimized.onnx")
    ops = weight_types(onnx.load(tmp_path / "optimized.onnx").graph)
    assert ops.get("int8", 0) > 0 and "uint8" not in ops, ops  # not rewritten to the U8U8 kernels
    default = _session(model, exact=False)
    np.testing.assert_array_equal(
        exact.run(None, {"input": images})[0], default.run(None, {"input": images})[0]
    )


class _Stem(torch.nn.Module):
    """An RGB stem conv (3 input channels: thin) and a wide conv after it, with or without a MaxPool."""

    def __init__(self, pool: bool):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(3, 2, 1) if pool else torch.nn.Identity()
        self.body = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        return self.head(torch.relu(self.body(x)).mean((2, 3)))


@pytest.mark.parametrize("pool", [False, True])
def test_a_thin_conv_stays_float_unless_a_maxpool_reads_it(tmp_path, pool):
    torch.manual_seed(0)
    model = _Stem(pool).eval()
    images = torch.randn(16, 3, 16, 16)
    fp32 = export_onnx(model, images[:2], tmp_path / "fp32.onnx", max_batch=4, metadata={})
    quantizer = Int8Quantizer(fp32, images.numpy(), method="minmax", batch=4, workdir=tmp_path)
    stem = next(n.name for n in quantizer.float_model.graph.node if n.op_type == "Conv")
    assert (stem in quantizer.candidates(ORT_CPU)) is pool
    assert stem in quantizer.candidates(TENSORRT)  # only the ONNX Runtime layout keeps thin convs float
    written = quantizer.quantize(ORT_CPU)
    producers = {o: n.op_type for n in written.graph.node for o in n.output}
    conv = next(n for n in written.graph.node if n.name == stem)
    assert (producers.get(conv.input[1]) == "DequantizeLinear") is pool


def _plant_outlier(model: torch.nn.Module) -> torch.nn.Module:
    """Make one channel of the depthwise conv's output OUTLIER_GAIN times larger and undo it in the
    projection conv's weights: the same function (ReLU is positively homogeneous), but the projection's
    input, quantized per tensor, now spends its whole int8 range on that one channel."""
    planted = copy.deepcopy(model)
    block = planted.blocks[2].block
    bn, projection = block[1][1], block[2][0]
    with torch.no_grad():
        bn.weight[OUTLIER_CHANNEL] *= OUTLIER_GAIN
        bn.bias[OUTLIER_CHANNEL] *= OUTLIER_GAIN
        projection.weight[:, OUTLIER_CHANNEL] /= OUTLIER_GAIN
    return planted


def test_accuracy_control_keeps_the_planted_layer_in_float(trained_student, tmp_path):
    _, model, images, labels = trained_student
    planted = _plant_outlier(model)
    np.testing.assert_allclose(_logits(planted, images), _logits(model, images), atol=2e-3)
    fp32 = export_onnx(
        planted, torch.from_numpy(images[:2]), tmp_path / "fp32.onnx", max_batch=8, metadata={}
    )
    quantizer = Int8Quantizer(fp32, images[:64], method="minmax", batch=8, workdir=tmp_path)
    control = ControlSet(images, _logits(planted, images), labels)
    made = make_int8(
        quantizer,
        TENSORRT,
        tmp_path / "student.int8.onnx",
        metadata={},
        control_set=control,
        min_agreement=0.99,
        max_drop=1.0,
        threads=1,
        batch=8,
    )
    planted_node = next(
        n.name for n in quantizer.float_model.graph.node if n.input[1:2] == [f"{PLANTED_LAYER}.weight"]
    )
    result = made.control
    assert result.initial.agreement < 0.99, "the planted outlier should break the all-INT8 model"
    assert result.ranking[0]["node"] == planted_node
    assert planted_node in result.keep_float and result.met
    assert result.final.agreement >= 0.99 and result.final.accuracy_drop <= 1.0
    # What was written: the layers kept in float read float weights and inputs, the others are quantized.
    written = onnx.load(made.path)
    assert check_tensorrt_qdq(written) == []
    producers = {o: n.op_type for n in written.graph.node for o in n.output}
    layer = next(n for n in written.graph.node if n.name == planted_node)
    assert producers.get(layer.input[1]) is None and producers.get(layer.input[0]) != "DequantizeLinear"
    weighted = [n for n in written.graph.node if n.op_type in ("Conv", "Gemm")]
    quantized = {n.name for n in weighted if producers.get(n.input[1]) == "DequantizeLinear"}
    assert quantized == {n.name for n in weighted} - set(result.keep_float)
    # Damage localization sees the SQNR collapse exactly at the planted layer when everything is INT8.
    sqnr = {layer["node"]: layer["sqnr_all_int8_db"] for layer in made.layers}
    nodes = [layer["node"] for layer in made.layers]
    before = sqnr[nodes[nodes.index(planted_node) - 1]]
    assert sqnr[planted_node] < before - 10, (before, sqnr[planted_node])
    assert next(x for x in made.layers if x["node"] == planted_node)["float"]
