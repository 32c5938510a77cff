"""attention_kl benchmarks: Triton vs the eager reference vs torch.compile(reference), forward and
forward + backward, at ViT shapes (B=64, H=12, D=64, N = 197 / 577 / 1024) and a long sequence
(B=8, N=4096) from ``bench/shapes.py``, with the memory one call adds. GPU only (or a dry run)."""

from __future__ import annotations

import pytest
import shapes
import torch
from conftest import BENCH_DEVICE, COMPILE_BACKEND, requires_bench_device

from kernels.attention_kl import attention_kl, attention_kl_reference

SHAPES = shapes.pick(shapes.ATTENTION_KL, shapes.ATTENTION_KL_HEADLINE, shapes.ATTENTION_KL_DRY)
IMPLS = ("triton", "reference") + (("compiled_reference",) if shapes.COMPILED_BASELINE_EVERYWHERE else ())


def _loss_fn(impl: str):
    if impl == "triton":
        return lambda *x: attention_kl(*x, impl="triton")
    if impl == "reference":
        return attention_kl_reference
    # Every shape and grad mode is a new specialization; a fresh cache keeps them under the recompile limit.
    torch._dynamo.reset()
    return torch.compile(attention_kl_reference, backend=COMPILE_BACKEND)


@requires_bench_device
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_H{}_N{}_D{}".format(*s))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_attention_kl(bench_op, mode, shape, impl):
    """Student bf16 with grad, teacher bf16 detached: the MTD training case."""
    b, h, n, d = shape
    q_s, k_s, q_t, k_t = (
        torch.randn(b, h, n, d, device=BENCH_DEVICE, dtype=torch.bfloat16) for _ in range(4)
    )
    q_s.requires_grad_()
    k_s.requires_grad_()
    loss_fn = _loss_fn(impl)

    def forward():
        return loss_fn(q_s, k_s, q_t, k_t)

    def fwd():
        with torch.no_grad():
            return forward()

    def fwd_bwd():
        loss = forward()
        loss.backward()
        return loss

    try:
        bench_op(
            fwd if mode == "fwd" else fwd_bwd,
            BENCH_DEVICE,
            forward=forward if mode == "fwd+bwd" else None,
            grads_of=[q_s, k_s] if mode == "fwd+bwd" else [],
            group=f"attention_kl {mode} B{b} H{h} N{n} D{d}",
            impl=impl,
            case=f"B{b} H{h} N{n} D{d} bf16",
        )
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} runs out of GPU memory at {shape}: the N x N matrices do not fit")
