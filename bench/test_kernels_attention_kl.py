"""attention_kl benchmarks: Triton vs the eager reference vs torch.compile(reference), forward and
forward + backward, at ViT shapes (B=64, H=12, D=64, N = 197 / 577 / 1024) and a long sequence
(B=8, N=4096), with the extra peak memory of one call. GPU only."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

from kernels.attention_kl import attention_kl, attention_kl_reference

SHAPES = [(64, 12, 197, 64), (64, 12, 577, 64), (64, 12, 1024, 64), (8, 12, 4096, 64)]
IMPLS = ("triton", "eager", "compiled")


def _loss_fn(impl: str):
    if impl == "triton":
        return lambda *x: attention_kl(*x, impl="triton")
    if impl == "eager":
        return attention_kl_reference
    # Every shape and grad mode is a new specialization; a fresh cache keeps them under the recompile limit.
    torch._dynamo.reset()
    return torch.compile(attention_kl_reference)


@requires_cuda
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_H{}_N{}_D{}".format(*s))
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_attention_kl(bench_op, mode, shape, impl):
    """Student bf16 with grad, teacher bf16 detached: the MTD training case."""
    b, h, n, d = shape
    device = torch.device("cuda")
    q_s, k_s, q_t, k_t = (torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16) for _ in range(4))
    q_s.requires_grad_()
    k_s.requires_grad_()
    loss_fn = _loss_fn(impl)

    def fwd():
        with torch.no_grad():
            return loss_fn(q_s, k_s, q_t, k_t)

    def fwd_bwd():
        loss_fn(q_s, k_s, q_t, k_t).backward()
        q_s.grad = k_s.grad = None

    try:
        bench_op(
            fwd if mode == "fwd" else fwd_bwd,
            device,
            group=f"attention_kl {mode} B{b} H{h} N{n} D{d}",
            impl=impl,
            shape=f"B{b} H{h} N{n} D{d}",
        )
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        pytest.skip(f"{impl} runs out of GPU memory at {shape}: the N x N matrices do not fit")
