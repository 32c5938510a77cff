"""Seeded weights, a probe input and tensor fingerprints, shared by ``test_cifar_zoo.py`` and the script that
runs the reference models (``data/make_cifar_zoo_reference.py``); torch only, so the script never imports
kdfast."""

from __future__ import annotations

import hashlib
import math
import zlib

import torch


def seeded_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights in trained-network ranges, a function of each entry's name and shape only (so the reference and
    kdfast get the same ones): conv/linear weights N(0, 2 / fan_in), BN scales U(0.2, 0.6), biases and running
    means N(0, 0.1^2), running variances U(0.5, 1.5)."""
    out = {}
    for key, value in state.items():
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        if key.endswith("num_batches_tracked"):
            out[key] = value.clone()
        elif key.endswith("running_var"):
            out[key] = torch.rand(value.shape, generator=g) + 0.5
        elif key.endswith("weight") and value.ndim == 1:
            out[key] = 0.4 * torch.rand(value.shape, generator=g) + 0.2
        elif key.endswith(("running_mean", "bias")):
            out[key] = 0.1 * torch.randn(value.shape, generator=g)
        else:
            out[key] = torch.randn(value.shape, generator=g) * math.sqrt(2.0 / math.prod(value.shape[1:]))
    return out


def probe_input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def fingerprint(tensor: torch.Tensor) -> dict:
    """Shape, mean, mean absolute value and five evenly spaced entries of ``tensor``."""
    flat = tensor.detach().double().flatten()
    picks = torch.linspace(0, flat.numel() - 1, 5).long()
    return {
        "shape": list(tensor.shape),
        "mean": flat.mean().item(),
        "abs_mean": flat.abs().mean().item(),
        "samples": flat[picks].tolist(),
    }


def layout_sha256(state: dict[str, torch.Tensor]) -> str:
    """The state dict's names and shapes, one sorted line each, hashed."""
    lines = "".join(sorted(f"{key} {list(value.shape)}\n" for key, value in state.items()))
    return hashlib.sha256(lines.encode()).hexdigest()
