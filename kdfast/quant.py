"""Fake quantization of a student at exactly the Q/DQ placement of its TensorRT INT8 file, for
quantization-aware distillation (the QAD stage, :func:`kdfast.train.loop.qad_stage`).

``python -m export.trt`` writes ``student.int8.onnx`` through ONNX Runtime's static quantizer in the layout
:data:`export.quantize.TENSORRT`: Q/DQ on the inputs of the weighted ops (Conv, ConvTranspose, Gemm, MatMul
with a constant weight) and on their weights, nothing else. In numbers:

- **weights**: per output channel, symmetric, ``s_c = max|W_c| / 127``, ``q = clamp(round(W / s_c), -127,
  127)`` (ONNX Runtime's ``WeightSymmetric`` int8 range), after BatchNorm is folded into the convolution. A
  per-output-channel grid is unchanged by the per-channel factor ``gamma / sigma`` folding multiplies a
  channel by, so quantizing the unfolded weight of a conv followed by a frozen BatchNorm is the same;
- **activations**: per tensor, symmetric, ``s = max(|min|, |max|) / 127`` with ``min``/``max`` over the
  calibration images run through the float model (ONNX Runtime's MinMax calibrator, ``ActivationSymmetric``);
- biases and everything else stay float (``QuantizeBias: False``).

:class:`FakeQuant` reproduces that in PyTorch on every ``nn.Conv*``/``nn.Linear`` module: a weight
parametrization and an input pre-hook, both straight-through estimators (``torch.fake_quantize_per_*``,
whose gradient is the identity inside the range and zero outside). Weighted ops that are not such modules
(``F.linear`` on a bare parameter, as ``nn.MultiheadAttention`` does) are not covered and are listed by
:func:`uncovered_weighted_ops`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

QMAX = 127  # symmetric int8: -127..127, zero-point 0
WEIGHTED = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


def _output_axis(module: nn.Module) -> int:
    """The weight axis of the output channels: 1 for transposed convs (C_in, C_out/g, ...), else 0."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def weight_scales(weight: Tensor, axis: int = 0) -> Tensor:
    """``max|W_c| / 127`` per channel along ``axis`` (float32); an all-zero channel gets scale 1."""
    dims = [d for d in range(weight.dim()) if d != axis]
    absmax = weight.detach().abs().amax(dim=dims).float()
    return torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))


def fake_quant_weight(weight: Tensor, axis: int = 0) -> Tensor:
    """``weight`` on its per-channel symmetric int8 grid, with a straight-through gradient."""
    scales = weight_scales(weight, axis)
    zeros = torch.zeros_like(scales, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scales, zeros, axis, -QMAX, QMAX)


def activation_scale(absmax: float) -> float:
    """The per-tensor scale of a symmetric int8 activation whose calibrated range reaches ``absmax``."""
    return absmax / QMAX if absmax > 0 else 1.0


class _WeightGrid(nn.Module):
    def __init__(self, axis: int, owner: FakeQuant):
        super().__init__()
        self.axis, self.owner = axis, [owner]  # a list: not a submodule, so not in the state dict

    def forward(self, weight: Tensor) -> Tensor:
        return fake_quant_weight(weight, self.axis) if self.owner[0].weights_on else weight


class FakeQuant:
    """Fake-quantize every weighted module of ``model`` as its TensorRT INT8 file will be computed.

    ``calibrate(batches)`` runs the float model and sets each input's scale from its MinMax range;
    afterwards the model's forward computes what the Q/DQ file computes (up to float rounding), and its
    backward is straight-through. ``remove()`` takes the parametrizations off and, with ``bake=True``, leaves
    the weights on their int8 grid, so the saved fp32 student is what its INT8 file holds.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, WEIGHTED)}
        self.absmax: dict[str, float] = {}
        self.weights_on = True
        self.activations_on = False  # on after calibrate()
        self._observing = False
        self._hooks = []
        for name, module in self.layers.items():
            parametrize.register_parametrization(module, "weight", _WeightGrid(_output_axis(module), self))
            self._hooks.append(module.register_forward_pre_hook(self._input_hook(name)))

    def _input_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            if self._observing:
                seen = float(x.detach().abs().amax()) if x.numel() else 0.0
                self.absmax[name] = max(self.absmax.get(name, 0.0), seen)
                return None
            if not self.activations_on:
                return None
            scale = activation_scale(self.absmax[name])
            return (torch.fake_quantize_per_tensor_affine(x, scale, 0, -QMAX, QMAX), *args[1:])

        return hook

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside: the float model (weights and activations unquantized)."""
        saved = self.weights_on, self.activations_on
        self.weights_on = self.activations_on = False
        try:
            yield
        finally:
            self.weights_on, self.activations_on = saved

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Tensor]) -> dict[str, float]:
        """Each quantized input's ``max(|min|, |max|)`` over ``batches`` through the float model in eval
        mode (what ONNX Runtime's MinMax calibrator measures on the float file); turns activations on."""
        was_training = self.model.training
        self.model.eval()
        self.absmax = {}
        with self.disabled():
            self._observing = True
            try:
                for x in batches:
                    self.model(x)
            finally:
                self._observing = False
        self.model.train(was_training)
        missing = sorted(set(self.layers) - set(self.absmax))
        if missing:
            raise ValueError(f"calibration never reached {', '.join(missing[:3])}: they take no input")
        self.activations_on = True
        return dict(self.absmax)

    def remove(self, *, bake: bool) -> None:
        """Take the fake quantization off; ``bake`` leaves each weight on its int8 grid (else the latent
        float weight)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.weights_on = bake
        for module in self.layers.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=bake)


def uncovered_weighted_ops(model: nn.Module) -> list[str]:
    """Parameters of ``model`` that look like the weight of a weighted op (2-D or more) but belong to no
    module :class:`FakeQuant` covers (nor to a normalization or embedding), so their Q/DQ would not be
    simulated: e.g. ``nn.MultiheadAttention.in_proj_weight``."""
    covered = {
        id(p)
        for m in model.modules()
        if isinstance(
            m, (*WEIGHTED, nn.Embedding, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
        )
        for p in m.parameters(recurse=False)
    }
    return [
        name
        for name, p in model.named_parameters()
        if p.dim() >= 2 and name.rsplit(".", 1)[-1].endswith("weight") and id(p) not in covered
    ]


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers in eval mode: their statistics stay those the export folds into the convolutions."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
