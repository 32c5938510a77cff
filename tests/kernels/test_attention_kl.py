"""attention_kl: the reference against explicit F.kl_div rows and a hand-computed case, then the Triton
kernels (the CPU interpreter here) against the reference, forward and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from support.devices import KERNEL_DEVICE

from kernels._dispatch import interpreting
from kernels.attention_kl import _plan_of, attention_kl, attention_kl_reference

DIRECTIONS = ("student_teacher", "teacher_student")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _qk(b: int, h: int, n: int, d: int, dtype=torch.float32, grad: bool = True, gen=None) -> list:
    """(q, k) on the kernel test device."""
    return [
        torch.randn(b, h, n, d, generator=gen).to(KERNEL_DEVICE, dtype).requires_grad_(grad) for _ in range(2)
    ]


def _kl_div_rows(q_s, k_s, q_t, k_t, direction: str) -> torch.Tensor:
    """Per-row KL from torch.nn.functional.kl_div on explicit log-softmax rows, scales 1/sqrt(D)."""
    log_s = F.log_softmax(q_s @ k_s.transpose(-1, -2) / math.sqrt(q_s.shape[-1]), -1)
    log_t = F.log_softmax(q_t @ k_t.transpose(-1, -2) / math.sqrt(q_t.shape[-1]), -1)
    # kl_div(input, target) = KL(target || input) with log_target.
    inp, target = (log_t, log_s) if direction == "student_teacher" else (log_s, log_t)
    return F.kl_div(inp, target, log_target=True, reduction="none").sum(-1)


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """Entrywise closeness relative to the largest entry of ``expected`` (gradients span decades)."""
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(actual.float() / scale, expected.float() / scale, rtol=0, atol=tol)


# --- the reference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_reference_matches_kl_div_rows(direction):
    q_s, k_s = _qk(2, 3, 9, 8, torch.float64, grad=False)
    q_t, k_t = _qk(2, 3, 9, 12, torch.float64, grad=False)
    expected = _kl_div_rows(q_s, k_s, q_t, k_t, direction)
    got = attention_kl_reference(q_s, k_s, q_t, k_t, direction=direction, reduction="none")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    got_mean = attention_kl_reference(q_s, k_s, q_t, k_t, direction=direction)
    torch.testing.assert_close(got_mean.double(), expected.mean(), rtol=1e-5, atol=1e-6)


def test_reference_hand_computed_2x2():
    # Student logits rows [0, log 3] and [0, 0] -> p = (1/4, 3/4), (1/2, 1/2); teacher uniform.
    # Built as q k^T with D = 1 and scale 1: q = [[1], [0]], k = [[0], [log 3]].
    q_s = torch.tensor([[1.0], [0.0]]).view(1, 1, 2, 1)
    k_s = torch.tensor([[0.0], [math.log(3.0)]]).view(1, 1, 2, 1)
    q_t, k_t = torch.zeros(1, 1, 2, 1), torch.zeros(1, 1, 2, 1)
    kl_st = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl_ts = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    got = attention_kl_reference(q_s, k_s, q_t, k_t, scale_s=1.0, scale_t=1.0, reduction="none")
    torch.testing.assert_close(got.view(2), torch.tensor([kl_st, 0.0]))
    got = attention_kl_reference(q_s, k_s, q_t, k_t, scale_s=1.0, scale_t=1.0, direction="teacher_student")
    torch.testing.assert_close(got, torch.tensor(kl_ts / 2))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_reference_gradcheck_float64(direction):
    inputs = _qk(1, 1, 4, 3, torch.float64) + _qk(1, 1, 4, 2, torch.float64)
    assert torch.autograd.gradcheck(
        lambda *x: attention_kl_reference(*x, direction=direction, reduction="none"), inputs
    )


# --- the Triton kernels vs the reference --------------------------------------------------------------


def _check_triton(
    inputs, *, direction="student_teacher", reduction="none", tol=TOL[torch.float32], grad_scale=1.0, **kw
):
    """Forward and every input gradient of the Triton path against the reference on the same inputs."""
    out = attention_kl(*inputs, direction=direction, reduction=reduction, impl="triton", **kw)
    ref = attention_kl_reference(*inputs, direction=direction, reduction=reduction, **kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    _close(out, ref, tol)
    leaves = [x for x in dict.fromkeys(inputs) if x.requires_grad]
    weight = torch.randn(ref.shape, device=KERNEL_DEVICE) * grad_scale
    got = torch.autograd.grad((out * weight).sum(), leaves)
    expected = torch.autograd.grad((ref * weight).sum(), leaves)
    for g, e, x in zip(got, expected, leaves, strict=True):
        assert g.dtype == x.dtype and g.shape == x.shape
        _close(g, e, 4 * tol)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize(("n", "d_s", "d_t"), [(1, 16, 32), (17, 24, 16), (67, 16, 32), (9, 128, 48)])
def test_triton_matches_reference(n, d_s, d_t, direction):
    _check_triton(_qk(1, 2, n, d_s) + _qk(1, 2, n, d_t), direction=direction)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_triton_mean_and_custom_scales(direction):
    inputs = _qk(2, 1, 33, 16) + _qk(2, 1, 33, 24)
    _check_triton(inputs, direction=direction, reduction="mean", scale_s=0.3, scale_t=0.15)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_triton_detached_teacher(direction):
    q_s, k_s = _qk(1, 2, 40, 32)
    q_t, k_t = _qk(1, 2, 40, 16, grad=False)
    _check_triton([q_s, k_s, q_t, k_t], direction=direction)
    attention_kl(q_s, k_s, q_t, k_t, direction=direction, impl="triton").backward()
    assert q_t.grad is None and k_t.grad is None


def test_triton_value_relation_same_tensor_twice():
    v_s = _qk(1, 2, 45, 16)[0]
    v_t = torch.randn(1, 2, 45, 32, device=KERNEL_DEVICE)
    _check_triton([v_s, v_s, v_t, v_t])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(dtype):
    # Scaled so attention rows are peaked: that is where bf16 logits and the backward products differ.
    raw = _qk(1, 2, 37, 32, dtype) + _qk(1, 2, 37, 16, dtype)
    inputs = [x.detach().mul(1.5).requires_grad_() for x in raw]
    _check_triton(inputs, tol=TOL[dtype])


def test_triton_mixed_dtypes_bf16_student_fp32_teacher():
    q_s, k_s = _qk(1, 2, 20, 16, torch.bfloat16)
    q_t, k_t = _qk(1, 2, 20, 32, grad=False)
    _check_triton([q_s, k_s, q_t, k_t], tol=TOL[torch.bfloat16])


def test_triton_fp16_small_upstream_gradient_does_not_underflow():
    # "mean" at B=64, H=12, N=197 sends 1/(B*H*N) ~ 7e-6 per row; times p ~ 1/N, fp16 dS tiles flush
    # that to zero. A 1e-6 upstream weight reproduces it at a small shape.
    inputs = _qk(1, 2, 40, 16, torch.float16) + _qk(1, 2, 40, 16, torch.float16)
    _check_triton(inputs, tol=TOL[torch.float16], grad_scale=1e-6)


def test_triton_non_contiguous():
    # (B, N, H, D) projections viewed as (B, H, N, D), as attention layers produce them.
    q_s, k_s = (x.detach().transpose(1, 2).requires_grad_() for x in _qk(2, 19, 3, 16))
    q_t, k_t = (x.detach().transpose(1, 2).requires_grad_() for x in _qk(2, 19, 3, 24))
    assert not q_s.is_contiguous()
    _check_triton([q_s, k_s, q_t, k_t])


def test_triton_gradients_of_every_block_pair_sum_across_key_blocks():
    # dq of a query row sums one term per key block (atomics into fp32): 150 tokens are 5 key blocks of the
    # interpreter's 32, the last one ragged; the teacher's gradients too, and the upstream gradient of a mean.
    inputs = _qk(1, 2, 150, 16) + _qk(1, 2, 150, 24)
    _check_triton(inputs)
    _check_triton(inputs, reduction="mean", direction="teacher_student")


def test_slice_offsets_beyond_32_bits_are_refused():
    # Offsets inside one (b, h) slice are 32-bit; a strided view whose slice spans 2^31 elements would wrap.
    base = torch.empty(2**31 + 64, device="meta")
    wide = base.as_strided((1, 1, 2, 16), (0, 0, 2**31, 1))
    small = torch.empty(1, 1, 2, 16, device="meta")
    for inputs in ((wide, small, small, small), (small, small, small, wide)):
        with pytest.raises(ValueError, match="spans 2\\^31 elements"):
            _plan_of(*inputs)
    assert _plan_of(small, small, small, small).strides == (32, 32, 16, 1) * 4


def test_triton_constant_logits():
    # q = 0 makes every row uniform: KL(uniform || uniform) = 0 exactly, and against a peaked teacher
    # KL(uniform || q) = -log N - mean_j log q_j.
    zeros = [torch.zeros(1, 2, 21, 16, device=KERNEL_DEVICE, requires_grad=True) for _ in range(2)]
    assert attention_kl(*zeros, *zeros, impl="triton").abs().item() < 1e-6
    _check_triton(zeros + _qk(1, 2, 21, 16))
    _check_triton(_qk(1, 2, 21, 16) + zeros, direction="teacher_student")


# --- integration ---------------------------------------------------------------------------------------


def test_opcheck():
    q_s, k_s = _qk(1, 1, 20, 16)
    q_t, k_t = _qk(1, 1, 20, 32, grad=False)
    for mean in (True, False):
        torch.library.opcheck(torch.ops.kdfast.attention_kl.default, (q_s, k_s, q_t, k_t, 0.25, 0.2, mean))
    # The backward op has no double-backward formula: checked on detached inputs.
    q_s, k_s = q_s.detach(), k_s.detach()
    loss, kl, lse = torch.ops.kdfast.attention_kl(q_s, k_s, q_t, k_t, 0.25, 0.2, False)
    assert loss.shape == (0,) and kl.shape == (1, 1, 20) and lse.shape == (2, 1, 1, 20)
    rows = torch.rand(1, 1, 20, device=KERNEL_DEVICE)
    for grads, mean in (((None, rows), False), ((torch.tensor(0.7, device=KERNEL_DEVICE), None), True)):
        bwd_args = (*grads, q_s, k_s, q_t, k_t, kl, lse, 0.25, 0.2, mean, True, True, False, False)
        torch.library.opcheck(torch.ops.kdfast.attention_kl_backward.default, bwd_args)


def test_compile_fullgraph_no_graph_break():
    # On CPU the interpreter cannot run under Inductor's generated code, so the graph is captured and
    # run by AOTAutograd (aot_eager): fullgraph=True still fails on any graph break around the op.
    backend = "aot_eager" if interpreting() else "inductor"
    q_s, k_s = _qk(1, 2, 24, 16)
    q_t, k_t = _qk(1, 2, 24, 16, grad=False)

    def loss(q_s, k_s, q_t, k_t):
        return 2.0 * attention_kl(q_s, k_s, q_t, k_t, impl="triton") + attention_kl(q_s, q_s, q_t, q_t)

    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    got = compiled(q_s, k_s, q_t, k_t)
    expected = 2.0 * attention_kl_reference(q_s, k_s, q_t, k_t) + attention_kl_reference(q_s, q_s, q_t, q_t)
    _close(got, expected, 1e-5)
    grads = torch.autograd.grad(got, [q_s, k_s])
    for g, e in zip(grads, torch.autograd.grad(expected, [q_s, k_s]), strict=True):
        _close(g, e, 4e-5)


# --- bad input -----------------------------------------------------------------------------------------


def _good():
    return [torch.randn(2, 3, 5, d) for d in (8, 8, 4, 4)]


@pytest.mark.parametrize(
    ("change", "kwargs", "match"),
    [
        (lambda x: x.__setitem__(0, torch.randn(3, 5, 8)), {}, "q_s must be 4-D"),
        (lambda x: x.__setitem__(3, torch.randn(2, 3, 6, 4)), {}, r"k_t has \(B, H, N\)"),
        (lambda x: x.__setitem__(2, torch.randn(1, 3, 5, 4)), {}, r"q_t has \(B, H, N\)"),
        (lambda x: x.__setitem__(1, torch.randn(2, 3, 5, 6)), {}, "q_s and k_s must share a head dim"),
        (lambda x: x.__setitem__(2, x[2].double()), {}, "q_t must be float32, float16 or bfloat16"),
        (lambda x: x.__setitem__(3, x[3].half()), {}, "q_t and k_t must share a dtype"),
        (lambda x: None, {"direction": "forward"}, "direction must be one of"),
        (lambda x: None, {"reduction": "sum"}, "reduction must be one of"),
        (lambda x: None, {"impl": "cuda"}, "impl must be one of"),
    ],
)
def test_bad_input_raises_value_error(change, kwargs, match):
    inputs = _good()
    change(inputs)
    with pytest.raises(ValueError, match=match):
        attention_kl(*inputs, **kwargs)


def test_grid_is_one_dimensional_past_65535_heads_and_refused_past_2_31_programs():
    # B * H used to be grid axis y (at most 65,535); the grid is now 1-D, up to 2^31 - 1 programs.
    def heads(b, h, n):
        return torch.empty(1, 1, 1, 16, device="meta").expand(b, h, n, 16)

    many = heads(2**16, 1, 197)
    plan = _plan_of(many, many, many, many)
    assert plan.fwd_grid({"BLOCK_M": 16}) == (13 * 2**16,) and plan.bwd_grid({"BLOCK_N": 128}) == (2 * 2**16,)
    # At the smallest block, 2^27 slices of 256 rows are 2^31 programs: one more than axis x holds.
    assert _plan_of(*[heads(2**27 - 1, 1, 256)] * 4).fwd_grid({"BLOCK_M": 16}) == (2**31 - 16,)
    too_many = heads(2**27, 1, 256)
    with pytest.raises(ValueError, match="2147483648 programs along grid axis x.*; split the batch"):
        _plan_of(too_many, too_many, too_many, too_many)
