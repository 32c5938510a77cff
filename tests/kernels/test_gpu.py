"""Every kernel op on CUDA, forward and backward, against its reference evaluated in float64
(``pytest -m gpu``; skipped without a CUDA GPU).

Inputs are fresh random numbers every run (the ``seed`` fixture of tests/kernels/conftest.py: each test's seed
is listed in the summary and printed with any failure); every buffer the ops
allocate is filled with NaN before their kernels run, so an element a kernel fails to write fails the test;
each dtype has its own tolerance, relative to the largest reference entry (gradients span decades); sizes are
odd. A compiled (``torch.compile(fullgraph=True)``, Inductor) AGKD and MTD loss step closes the file.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Sequence
from unittest import mock

import pytest
import torch

import kernels

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (forward, gradient) tolerance relative to the largest reference entry. fp32: IEEE or tf32x3 dots, so
# only summation order differs. fp16 / bf16: inputs are rounded before the reference sees them, so the
# tolerance covers the kernels' own low-precision steps (bf16 dots in attention_kl, outputs and gradients
# stored in the input dtype: 2^-11 and 2^-8 relative).
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 5e-3), torch.bfloat16: (1.6e-2, 3e-2)}
# attention_kl multiplies fp32 inputs on TF32 tensor cores: 10 mantissa bits, as fp16, so fp16's tolerance.
TF32_TOL = TOL[torch.float16]


@contextlib.contextmanager
def nan_poisoned_allocations() -> Iterator[None]:
    """While active, ``torch.empty``, ``torch.empty_like`` and ``Tensor.new_empty`` return floating tensors
    filled with NaN: the ops allocate their outputs and gradients with these, so any element a kernel leaves
    unwritten stays NaN."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            with torch.no_grad():
                t.fill_(float("nan"))
        return t

    with (
        mock.patch.object(torch, "empty", lambda *a, **k: poison(empty(*a, **k))),
        mock.patch.object(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k))),
        mock.patch.object(torch.Tensor, "new_empty", lambda self, *a, **k: poison(new_empty(self, *a, **k))),
    ):
        yield


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, seed: int) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(1e-30).item()
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        rtol=tol,
        atol=tol * scale,
        msg=lambda m: f"{what} (seed {seed}): {m}",
    )


def check_against_float64(
    op: Callable[..., torch.Tensor],
    reference: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    dtype: torch.dtype,
    seed: int,
    grad_weight: bool = True,
    tol: tuple[float, float] | None = None,
) -> None:
    """``op`` on the CUDA inputs (NaN-poisoned allocations) against ``reference`` on float64 copies: the
    output, then the gradient of every input that requires one, for a random upstream gradient; ``tol``
    (forward, gradient) replaces the dtype's tolerance."""
    fwd_tol, grad_tol = tol or TOL[dtype]
    wide = [x.detach().double().requires_grad_(x.requires_grad) for x in inputs]
    expected = reference(*wide)
    with nan_poisoned_allocations():
        out = op(*inputs)
    _close(out, expected, fwd_tol, "forward", seed)
    leaves = [x for x in inputs if x.requires_grad]
    if not leaves:
        return
    upstream = torch.randn(expected.shape, dtype=torch.float64, device=DEVICE) if grad_weight else None
    wide_leaves = [w for w, x in zip(wide, inputs, strict=True) if x.requires_grad]
    expected_grads = torch.autograd.grad(expected, wide_leaves, upstream)
    with nan_poisoned_allocations():
        grads = torch.autograd.grad(out, leaves, None if upstream is None else upstream.to(out.dtype))
    for k, (g, e, x) in enumerate(zip(grads, expected_grads, leaves, strict=True)):
        assert g.dtype == x.dtype, f"gradient {k}: dtype {g.dtype} != input dtype {x.dtype}"
        _close(g, e, grad_tol, f"gradient of input {k}", seed)


def test_poisoning_reaches_the_ops_buffers():
    # A launcher whose kernel writes nothing must hand back NaN: the poison is what the ops allocate with.
    ssim_module = importlib.import_module("kernels.ssim")
    x = torch.rand(2, 1, 9, 9, device=DEVICE)
    noop = mock.MagicMock()
    with nan_poisoned_allocations(), mock.patch.object(ssim_module, "_ssim_fwd_kernel", noop):
        stats = ssim_module._launch_forward(x, x, 3, 1.5, 1.0, 0.01, 0.03, False, 0.5, 0.5)[2]
    assert noop.__getitem__.called and torch.isnan(stats).all()


# The cases below are chosen for what they exercise per compiled kernel: every new dtype, tile size or grad
# mode is one more Triton specialization (an autotuned attention_kl one is 4 configs x 3 kernels), and
# compiling them, not running them, is what this file spends its time on.

# --- ssim, ssim_cosine_loss --------------------------------------------------------------------------------


def _maps(shape, dtype, grad: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A student map in [0, 1] and a teacher that is a noisy copy of it: SSIM well inside (0, 1)."""
    x = torch.rand(shape, device=DEVICE, dtype=torch.float64)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    return x.to(dtype).requires_grad_(grad in ("student", "both")), y.to(dtype).requires_grad_(grad == "both")


def _check_hybrid(seed, dtype, shape, window, grad) -> None:
    x, y = _maps(shape, dtype, grad)
    kw = dict(alpha=0.3, beta=0.7, window_size=window)
    check_against_float64(
        lambda a, b: kernels.ssim_cosine_loss(a, b, impl="triton", **kw),
        lambda a, b: kernels.ssim_cosine_loss_reference(a, b, **kw),
        [x, y],
        dtype,
        seed,
        grad_weight=False,
    )


@pytest.mark.parametrize("grad", ["student", "both"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ssim_cosine_loss_dtypes(seed, dtype, grad):
    _check_hybrid(seed, dtype, (5, 1, 13, 15), 3, grad)  # AGKD's window on odd-sized maps


@pytest.mark.parametrize(
    ("shape", "window"),
    [
        ((3, 2, 29, 31), 11),  # 32 x 32 tiles
        ((2, 3, 7, 9), 11),  # both sides shorter than the window: no smoothing
        ((1, 1, 70, 21), 11),  # rows walked in tiles with a halo
    ],
    ids=str,
)
def test_ssim_cosine_loss_sizes(seed, shape, window):
    _check_hybrid(seed, torch.float32, shape, window, "both")


@pytest.mark.parametrize(
    ("dtype", "nonnegative"),
    [(torch.float32, False), (torch.float16, False), (torch.bfloat16, False), (torch.float32, True)],
    ids=str,
)
def test_ssim_per_sample(seed, dtype, nonnegative):
    x, y = _maps((7, 3, 13, 15), dtype, "both")
    if nonnegative:  # anti-correlated planes: negative SSIM, clamped to 0 with no gradient
        y = (1 - y.detach()).requires_grad_()
    kw = dict(window_size=5, data_range=1.0, k=(0.02, 0.05), nonnegative=nonnegative)
    check_against_float64(
        lambda a, b: kernels.ssim(a, b, impl="triton", **kw),
        lambda a, b: kernels.ssim_reference(a, b, **kw),
        [x, y],
        dtype,
        seed,
    )


# --- attention_kl ------------------------------------------------------------------------------------------


def _check_kl(seed, dtype, shape, direction="student_teacher", grad="student") -> None:
    b, h, n, d_s, d_t = shape

    def qk(d: int, requires: bool) -> list[torch.Tensor]:
        # Scaled so rows are peaked, as trained attention is: where low-precision logits differ most.
        return [
            (1.5 * torch.randn(b, h, n, d, device=DEVICE)).to(dtype).requires_grad_(requires) for _ in "qk"
        ]

    check_against_float64(
        lambda *x: kernels.attention_kl(*x, direction=direction, reduction="none", impl="triton"),
        lambda *x: kernels.attention_kl_reference(*x, direction=direction, reduction="none"),
        qk(d_s, True) + qk(d_t, grad == "both"),
        dtype,
        seed,
        tol=TF32_TOL if dtype == torch.float32 else None,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_kl_dtypes(seed, dtype):
    _check_kl(seed, dtype, (2, 3, 197, 64, 64))  # ViT-B/16 heads, the benchmark's specialization


@pytest.mark.parametrize(("direction", "grad"), [("teacher_student", "student"), ("student_teacher", "both")])
def test_attention_kl_grad_modes(seed, direction, grad):
    _check_kl(seed, torch.bfloat16, (2, 3, 67, 64, 64), direction, grad)


def test_attention_kl_head_dims_differ(seed):
    _check_kl(seed, torch.bfloat16, (2, 2, 301, 24, 40))


def test_attention_kl_mean_value_relation(seed):
    v_s = torch.randn(3, 4, 45, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    v_t = torch.randn(3, 4, 45, 64, device=DEVICE, dtype=torch.bfloat16)
    check_against_float64(
        lambda s, t: kernels.attention_kl(s, s, t, t, impl="triton"),
        lambda s, t: kernels.attention_kl_reference(s, s, t, t),
        [v_s, v_t],
        torch.bfloat16,
        seed,
        grad_weight=False,
    )


# --- attention_map, resize ---------------------------------------------------------------------------------

MAP_CASES = [
    ((3, 5, 7, 7), (14, 14)),
    ((2, 40, 56, 56), (14, 14)),
    ((2, 112, 13, 9), (5, 11)),
    ((4, 1280, 14, 14), None),
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("shape", "size"), MAP_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_map(seed, dtype, shape, size, channels_last):
    features = torch.randn(shape, device=DEVICE).to(dtype)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    features.requires_grad_()
    check_against_float64(
        lambda f: kernels.attention_map(f, size, impl="triton"),
        lambda f: kernels.attention_map_reference(f, size),
        [features],
        dtype,
        seed,
    )


@pytest.mark.parametrize(("p", "normalize"), [(1, True), (3, True), (2, False)])
def test_attention_map_p_and_normalize(seed, p, normalize):
    features = torch.randn(3, 17, 11, 13, device=DEVICE, requires_grad=True)
    check_against_float64(
        lambda f: kernels.attention_map(f, (6, 9), p=p, normalize=normalize, impl="triton"),
        lambda f: kernels.attention_map_reference(f, (6, 9), p=p, normalize=normalize),
        [features],
        torch.float32,
        seed,
    )


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("shape", "size"), [((2, 3, 7, 7), (14, 14)), ((2, 3, 13, 9), (5, 11))], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_resize(seed, dtype, shape, size, channels_last):
    maps = torch.randn(shape, device=DEVICE).to(dtype)
    if channels_last:
        maps = maps.contiguous(memory_format=torch.channels_last)
    maps.requires_grad_()
    check_against_float64(
        lambda m: kernels.resize(m, size, impl="triton"),
        lambda m: kernels.resize_reference(m, size),
        [maps],
        dtype,
        seed,
    )


# --- compiled loss steps -----------------------------------------------------------------------------------


def agkd_attention_loss(student_feature, teacher_feature, cls_map, impl: str) -> torch.Tensor:
    """AGKD's attention term as ``kdfast`` computes it (eq. 2-3): student and VGG maps on the 14x14 grid, the
    ViT CLS map resized to it and added, both divided by the teacher's per-sample max, the hybrid loss."""
    grid = (14, 14)
    student = kernels.attention_map(student_feature, grid, impl=impl)[:, None]
    vgg = kernels.attention_map(teacher_feature, grid, impl=impl)
    vit = kernels.resize(cls_map, grid, impl=impl)[:, 0]
    summed = vgg + torch.nn.functional.normalize(vit.flatten(1), dim=1).view_as(vit)
    teacher = torch.nn.functional.normalize(summed.flatten(1), dim=1).view_as(summed)[:, None]
    scale = teacher.detach().flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return kernels.ssim_cosine_loss(student / scale, teacher / scale, window_size=3, impl=impl)


def mtd_loss(q_s, k_s, v_s, q_t, k_t, v_t, impl: str) -> torch.Tensor:
    """MTD's CAD + VR: KL(student || teacher) of softmax(Q K^T / sqrt d) and of softmax(V V^T / sqrt d).
    The reference path calls ``attention_kl_reference`` itself: the public op takes no float64."""
    if impl == "reference":
        return kernels.attention_kl_reference(q_s, k_s, q_t, k_t) + kernels.attention_kl_reference(
            v_s, v_s, v_t, v_t
        )
    cad = kernels.attention_kl(q_s, k_s, q_t, k_t, impl=impl)
    vr = kernels.attention_kl(v_s, v_s, v_t, v_t, impl=impl)
    return cad + vr


def _compiled_step_matches(loss_fn, inputs, dtype, seed) -> None:
    compiled = torch.compile(lambda *x: loss_fn(*x, impl="triton"), fullgraph=True)
    check_against_float64(
        compiled, lambda *x: loss_fn(*x, impl="reference"), inputs, dtype, seed, grad_weight=False
    )


def test_compiled_agkd_step(seed):
    # EfficientNet-B0 blocks.4 (bf16, channels_last under autocast), VGG19 features.35, ViT-B/16 CLS row.
    student = torch.randn(6, 112, 14, 14, device=DEVICE, dtype=torch.bfloat16)
    student = student.contiguous(memory_format=torch.channels_last).requires_grad_()
    teacher = torch.relu(torch.randn(6, 512, 14, 14, device=DEVICE)).to(torch.bfloat16)
    cls_map = torch.softmax(torch.randn(6, 196, device=DEVICE), -1).view(6, 1, 14, 14)
    _compiled_step_matches(agkd_attention_loss, [student, teacher, cls_map], torch.bfloat16, seed)


def test_compiled_mtd_step(seed):
    # Relation heads of D=24 (student) and D=40 (teacher), 65 tokens, teacher detached.
    student = [
        torch.randn(4, 4, 65, 24, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in "qkv"
    ]
    teacher = [torch.randn(4, 4, 65, 40, device=DEVICE, dtype=torch.bfloat16) for _ in "qkv"]
    _compiled_step_matches(mtd_loss, student + teacher, torch.bfloat16, seed)
