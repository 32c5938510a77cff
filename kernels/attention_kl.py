"""KL divergence between attention distributions (MTD's CAD and VR; MiniLM's direction), flash-style.

Reference first (explicit softmax, the specification), then the Triton kernels that never store N x N.

Notation of the kernels: the row distributions are p = softmax(a) and q = softmax(b), with logits
a = q_a k_a^T * scale_a and b = q_b k_b^T * scale_b; they compute KL(p || q) per row. The direction
is chosen by which pair is passed as ``a``: the student for "student_teacher", the teacher otherwise.

Precision: every product runs on tensor cores. fp16 / bf16 tiles multiply natively; fp32 inputs multiply as
TF32 (10-bit mantissa: logits carry a relative error of about 2^-11 times |q| |k|, the precision of fp16
inputs, not of fp32). Accumulation, the softmax statistics and the KL are fp32 throughout.

Launches: forward 1 (one pass over the key blocks per query block: online log-sum-exp of both logit sets and
the KL term; 3 floats per row saved). Backward 1 kernel, single pass in the FlashAttention-2 order: one
program per key block walks the query blocks, recomputes both logit tiles once per block pair, keeps dk in
registers and adds each block pair's dq contribution to an fp32 buffer with atomics (so dq sums in an order
that varies from run to run, at fp32 rounding); plus a memset of that buffer and, for fp16 / bf16 inputs, its
cast to the input dtype. Offsets that can pass 2^31 elements (batch and head bases, the contiguous outputs)
are 64-bit; within one (b, h) slice they stay 32-bit (a slice is checked to span fewer than 2^31 elements).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

from kernels._dispatch import interpreting, signature_check, use_triton
from kernels._launch import Pinned, check_grid
from kernels._op import FusedOp

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS / Windows: the reference still runs, use_triton never picks Triton there
    triton = None

DIRECTIONS = ("student_teacher", "teacher_student")
REDUCTIONS = ("mean", "none")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_SPAN = 2**31
# Triton picks interpreted or compiled kernels when they are defined, at import: so do the dot modes.
_INTERPRETED = interpreting()


def attention_kl_reference(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    *,
    scale_s: float | None = None,
    scale_t: float | None = None,
    direction: str = "student_teacher",
    reduction: str = "mean",
) -> torch.Tensor:
    """Row-wise KL between softmax(q_s k_s^T * scale_s) and softmax(q_t k_t^T * scale_t).

    direction "student_teacher": KL(A_s || A_t) (MTD, L_CAD and L_VR); "teacher_student": KL(A_t || A_s).
    """
    scale_s = q_s.shape[-1] ** -0.5 if scale_s is None else scale_s
    scale_t = q_t.shape[-1] ** -0.5 if scale_t is None else scale_t
    # At least fp32 (fp16 / bf16 inputs are upcast), float64 kept so the reference can be gradchecked.
    wide = torch.promote_types(torch.promote_types(q_s.dtype, q_t.dtype), torch.float32)
    log_s = torch.log_softmax((q_s.to(wide) @ k_s.to(wide).transpose(-1, -2)) * scale_s, dim=-1)
    log_t = torch.log_softmax((q_t.to(wide) @ k_t.to(wide).transpose(-1, -2)) * scale_t, dim=-1)
    if direction == "student_teacher":
        kl = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl.mean() if reduction == "mean" else kl


@signature_check
def _check_signature(
    shapes: tuple[torch.Size, ...], dtypes: tuple[torch.dtype, ...], direction: str, reduction: str
) -> None:
    """Raise a ValueError naming what to change when the inputs do not fit the contract."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    names = ("q_s", "k_s", "q_t", "k_t")
    for name, shape, dtype in zip(names, shapes, dtypes, strict=True):
        if len(shape) != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(shape)}")
        if dtype not in DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {dtype}")
    for name, shape in zip(names, shapes, strict=True):
        if shape[:3] != shapes[0][:3]:
            raise ValueError(
                f"{name} has (B, H, N) = {tuple(shape[:3])}, expected {tuple(shapes[0][:3])} as in q_s"
            )
    for q, k in ((0, 1), (2, 3)):
        if shapes[q][-1] != shapes[k][-1]:
            raise ValueError(
                f"{names[q]} and {names[k]} must share a head dim, got {shapes[q][-1]} and {shapes[k][-1]}"
            )
        if dtypes[q] != dtypes[k]:
            raise ValueError(f"{names[q]} and {names[k]} must share a dtype, got {dtypes[q]} and {dtypes[k]}")


def _dot_modes(dtype: torch.dtype, interpreted: bool) -> tuple[str, str]:
    """How the forward and the backward kernels multiply tiles of this input dtype.

    fp32 runs on TF32 tensor cores (see the module docstring). The backward's dS tile carries the upstream
    gradient (1 / (B*H*N) under "mean"), which underflows fp16's range at training shapes, so fp16
    backward products run on fp32 tiles as TF32 (fp16's mantissa with fp32's exponent); bf16 already has
    fp32's exponent and stays native.
    """
    if dtype == torch.float32:
        return "tf32", "tf32"
    if dtype == torch.float16:
        return "native", "tf32"
    if interpreted:
        # The CPU interpreter's tl.dot on bf16 tiles returns garbage (triton 3.8); upcast there only.
        return "tf32", "tf32"
    return "native", "native"


if triton is not None:
    # (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates, by the padded head dim (up to 64, or 128: head
    # dims 80, 96 and 128) and the heaviest operand kind of the pairs (fp32 tiles multiply as TF32; fp16's
    # backward multiplies fp32 tiles; bf16 stays native). Every entry compiles for sm_80 and sm_90 under
    # Triton 3.6 and 3.8 within the per-block shared memory and without spills (bench/RESOURCES*.md): at 128
    # the fp32 forward's 3-stage 64-key blocks need 196-262 KB of shared memory (sm_80 allows 163 KB), and the
    # backward's 16 x 128 blocks with both pairs' gradients 221-312 KB.
    # Hopper: 64-128 query rows per program keep two logit tiles plus both Q tiles in registers at D=64.
    _FWD_CHOICES = {
        (64, "bf16"): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 2), (64, 32, 4, 2)],
        (128, "bf16"): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 2), (64, 32, 4, 2)],
        (128, "fp32"): [(128, 32, 8, 2), (64, 64, 4, 2), (128, 32, 4, 2), (64, 32, 4, 2)],
    }
    _FWD_CHOICES[64, "fp32"] = _FWD_CHOICES[64, "bf16"]
    # The backward holds four logit-sized tiles (a, b, dS_a, dS_b), the dk accumulator and a dq partial: at
    # 64 x 64 blocks that outgrows the registers of 4 warps, and 8 warps spill on sm_80 with fp32 inputs or
    # D = 32. Long sequences want 128 keys per program: half the dq atomics of 64. Both pairs' gradients
    # (dk_a and dk_b in registers, two dq partials) leave room for 16 query rows per block pair at D = 64,
    # and at D = 128 for 32 keys (fp32) or 8 warps.
    _BWD_CHOICES = {
        (64, "bf16", False): [(32, 64, 4, 2), (64, 32, 4, 2), (16, 128, 4, 2)],
        (64, "bf16", True): [(16, 128, 4, 2)],
        (128, "bf16", False): [(16, 128, 8, 2), (32, 32, 4, 2), (64, 32, 8, 2), (16, 64, 4, 2)],
        (128, "bf16", True): [(16, 128, 8, 2), (16, 32, 4, 2)],
        (128, "fp16", True): [(16, 32, 4, 2), (32, 64, 8, 2)],
        (128, "fp32", False): [(32, 32, 4, 2), (16, 64, 4, 2), (32, 64, 8, 2)],
        (128, "fp32", True): [(16, 32, 4, 2)],
    }
    # fp32 and fp16 tiles with both pairs' gradients: 16 x 128 needs 172 KB of shared memory at D = 64.
    _BWD_CHOICES[64, "fp16", True] = _BWD_CHOICES[64, "fp32", True] = [(16, 64, 4, 2), (16, 32, 4, 2)]
    _BWD_CHOICES[64, "fp16", False] = _BWD_CHOICES[64, "fp32", False] = _BWD_CHOICES[64, "bf16", False]
    _BWD_CHOICES[128, "fp16", False] = _BWD_CHOICES[128, "bf16", False]

    def _configs(choices: dict) -> list[triton.Config]:
        """Every candidate of a table; the CPU interpreter gets one small config, as it does not benchmark."""
        pairs = [(32, 32, 1, 1)] if interpreting() else sorted({c for cs in choices.values() for c in cs})
        return [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs
        ]

    def _operands(kwargs: dict) -> tuple[int, str]:
        """The padded head dim class (64 or 128) and the heaviest operand kind of the two pairs."""
        block = 64 if max(kwargs["BLOCK_DA"], kwargs["BLOCK_DB"]) <= 64 else 128
        kinds = []
        for pair in "AB":
            fwd, bwd = kwargs[f"MODE_{pair}"], kwargs.get(f"BWD_MODE_{pair}", kwargs[f"MODE_{pair}"])
            kinds.append("fp32" if fwd != "native" else "fp16" if bwd != "native" else "bf16")
        return block, max(kinds, key=("bf16", "fp16", "fp32").index)

    def _pick(configs: list, allowed: list[tuple[int, int, int, int]]) -> list:
        if interpreting():
            return configs
        return [c for c in configs if (*c.kwargs.values(), c.num_warps, c.num_stages) in allowed]

    def _prune_forward(configs: list, named_args: dict, **kwargs) -> list:
        return _pick(configs, _FWD_CHOICES[_operands(kwargs)])

    def _prune_backward(configs: list, named_args: dict, **kwargs) -> list:
        block, kind = _operands(kwargs)
        return _pick(configs, _BWD_CHOICES[block, kind, bool(kwargs["NEED_A"] and kwargs["NEED_B"])])

    _FWD_CONFIGS = _configs(_FWD_CHOICES)
    _BWD_CONFIGS = _configs(_BWD_CHOICES)
    # The autotuner caches its pick by these values (and the argument dtypes): everything the pruning reads.
    _FWD_KEY = ["N", "DA", "DB", "BLOCK_DA", "BLOCK_DB", "MODE_A", "MODE_B"]
    _BWD_KEY = [*_FWD_KEY, "BWD_MODE_A", "BWD_MODE_B", "NEED_A", "NEED_B"]

    @triton.jit
    def _dot(x, y, MODE: tl.constexpr):
        if MODE == "native":
            return tl.dot(x.to(y.dtype), y)
        else:
            return tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision=MODE)

    @triton.jit
    def _load_tile(ptr, offs_r, offs_d, stride_r, stride_d, n_rows, D):
        mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < D)
        return tl.load(ptr + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d, mask=mask, other=0.0)

    @triton.jit
    def _head(ptr, b_idx, h_idx, stride_b, stride_h):
        """The (b, h) slice of a 4-D tensor: 64-bit, as B * H * N * D may pass 2^31."""
        return ptr + b_idx.to(tl.int64) * stride_b + h_idx.to(tl.int64) * stride_h

    @triton.jit
    def _logit_grads(a, b, lse_a, lse_b, kl, g, valid):
        """dL/da and dL/db for L = g * KL(p || q), a, b and lse in log2 units, outputs in natural units:
        dKL/da_j = p_j (log p_j - log q_j - KL), dKL/db_j = q_j - p_j."""
        log2_p = a - lse_a[:, None]
        log2_q = b - lse_b[:, None]
        p = tl.exp2(log2_p)
        ds_a = g[:, None] * p * ((log2_p - log2_q) * 0.6931471805599453 - kl[:, None])
        ds_b = g[:, None] * (tl.exp2(log2_q) - p)
        return tl.where(valid, ds_a, 0.0), tl.where(valid, ds_b, 0.0)

    @triton.autotune(
        configs=_FWD_CONFIGS, key=_FWD_KEY, prune_configs_by={"early_config_prune": _prune_forward}
    )
    @triton.jit
    def _attention_kl_fwd_kernel(
        qa_ptr, ka_ptr, qb_ptr, kb_ptr, kl_ptr, lse_ptr, rows,
        s_qa_b, s_qa_h, s_qa_n, s_qa_d, s_ka_b, s_ka_h, s_ka_n, s_ka_d,
        s_qb_b, s_qb_h, s_qb_n, s_qb_d, s_kb_b, s_kb_h, s_kb_n, s_kb_d,
        H, N, DA, DB, scale_a, scale_b,
        BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, MODE_A: tl.constexpr, MODE_B: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """One program per (b, h, query block): online log-sum-exp of both logit sets and the online
        sum_j p_j (a_j - b_j), so KL(p || q) = sum_j p_j (a_j - b_j) - (lse_a - lse_b) per row. The grid is
        1-D (axis 0 holds 2^31 - 1 programs, axes 1 and 2 only 65,535): the query blocks of one (b, h) slice
        are consecutive programs, so they share its keys in L2."""
        blocks = tl.cdiv(N, BLOCK_M)
        bh = tl.program_id(0) // blocks
        pid_m = tl.program_id(0) % blocks
        b_idx = bh // H
        h_idx = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_da = tl.arange(0, BLOCK_DA)
        offs_db = tl.arange(0, BLOCK_DB)
        qa = _load_tile(_head(qa_ptr, b_idx, h_idx, s_qa_b, s_qa_h), offs_m, offs_da, s_qa_n, s_qa_d, N, DA)
        qb = _load_tile(_head(qb_ptr, b_idx, h_idx, s_qb_b, s_qb_h), offs_m, offs_db, s_qb_n, s_qb_d, N, DB)
        ka_base = _head(ka_ptr, b_idx, h_idx, s_ka_b, s_ka_h)
        kb_base = _head(kb_ptr, b_idx, h_idx, s_kb_b, s_kb_h)
        scale2_a = scale_a * 1.4426950408889634  # logits in log2 units: exp2 instead of exp
        scale2_b = scale_b * 1.4426950408889634
        m_a = tl.full([BLOCK_M], float("-inf"), tl.float32)
        m_b = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_a = tl.zeros([BLOCK_M], tl.float32)
        l_b = tl.zeros([BLOCK_M], tl.float32)
        cross = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            col = (offs_n < N)[None, :]
            ka = _load_tile(ka_base, offs_n, offs_da, s_ka_n, s_ka_d, N, DA)
            kb = _load_tile(kb_base, offs_n, offs_db, s_kb_n, s_kb_d, N, DB)
            # Logits of padded columns are 0 (zero-filled k): finite, so (a - b) there is a finite
            # number times p = 0; only the max and the exponentials see them as -inf.
            a = _dot(qa, tl.trans(ka), MODE_A) * scale2_a
            b = _dot(qb, tl.trans(kb), MODE_B) * scale2_b
            a_masked = tl.where(col, a, float("-inf"))
            b_masked = tl.where(col, b, float("-inf"))
            m_a_new = tl.maximum(m_a, tl.max(a_masked, 1))
            m_b_new = tl.maximum(m_b, tl.max(b_masked, 1))
            alpha_a = tl.exp2(m_a - m_a_new)
            p = tl.exp2(a_masked - m_a_new[:, None])
            l_a = l_a * alpha_a + tl.sum(p, 1)
            cross = cross * alpha_a + tl.sum(p * (a - b), 1)
            l_b = l_b * tl.exp2(m_b - m_b_new) + tl.sum(tl.exp2(b_masked - m_b_new[:, None]), 1)
            m_a = m_a_new
            m_b = m_b_new
        lse_a = m_a + tl.log2(l_a)
        lse_b = m_b + tl.log2(l_b)
        kl = (cross / l_a - (lse_a - lse_b)) * 0.6931471805599453
        # kl is (B, H, N); lse is (2, B, H, N): lse_a, lse_b, rows = B * H * N floats apart (64-bit sums).
        row = bh.to(tl.int64) * N + offs_m
        tl.store(kl_ptr + row, kl, mask=offs_m < N)
        tl.store(lse_ptr + row, lse_a, mask=offs_m < N)
        tl.store(lse_ptr + rows + row, lse_b, mask=offs_m < N)

    @triton.autotune(
        configs=_BWD_CONFIGS,
        key=_BWD_KEY,
        reset_to_zero=["dqa_ptr", "dqb_ptr"],
        prune_configs_by={"early_config_prune": _prune_backward},
    )
    @triton.jit
    def _attention_kl_bwd_kernel(
        qa_ptr, ka_ptr, qb_ptr, kb_ptr, g_ptr, kl_ptr, lse_ptr, rows,
        dqa_ptr, dka_ptr, dqb_ptr, dkb_ptr,
        s_qa_b, s_qa_h, s_qa_n, s_qa_d, s_ka_b, s_ka_h, s_ka_n, s_ka_d,
        s_qb_b, s_qb_h, s_qb_n, s_qb_d, s_kb_b, s_kb_h, s_kb_n, s_kb_d,
        g_stride, g_scale, H, N, DA, DB, scale_a, scale_b,
        BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, MODE_A: tl.constexpr, MODE_B: tl.constexpr,
        BWD_MODE_A: tl.constexpr, BWD_MODE_B: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """One program per (b, h, key block), walking the query blocks (FlashAttention-2's order): both
        logit tiles are recomputed once per block pair; dk = dS^T @ q * scale stays in registers and is
        written once; dq = dS @ k * scale is added block pair by block pair to the zeroed fp32 dq buffers
        with atomics. The upstream gradient of row r is g_ptr[r * g_stride] * g_scale (g_stride 0: one
        value for every row, as the backward of a mean). 1-D grid, key blocks of a slice consecutive, as in
        the forward."""
        blocks = tl.cdiv(N, BLOCK_N)
        bh = tl.program_id(0) // blocks
        pid_n = tl.program_id(0) % blocks
        b_idx = bh // H
        h_idx = bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_da = tl.arange(0, BLOCK_DA)
        offs_db = tl.arange(0, BLOCK_DB)
        ka = _load_tile(_head(ka_ptr, b_idx, h_idx, s_ka_b, s_ka_h), offs_n, offs_da, s_ka_n, s_ka_d, N, DA)
        kb = _load_tile(_head(kb_ptr, b_idx, h_idx, s_kb_b, s_kb_h), offs_n, offs_db, s_kb_n, s_kb_d, N, DB)
        qa_base = _head(qa_ptr, b_idx, h_idx, s_qa_b, s_qa_h)
        qb_base = _head(qb_ptr, b_idx, h_idx, s_qb_b, s_qb_h)
        head_rows = bh.to(tl.int64) * N
        lse_b_ptr = lse_ptr + rows  # lse is (2, B, H, N): lse_a, lse_b, rows = B * H * N apart
        col_ok = offs_n < N
        scale2_a = scale_a * 1.4426950408889634
        scale2_b = scale_b * 1.4426950408889634
        dka = tl.zeros([BLOCK_N, BLOCK_DA], tl.float32)
        dkb = tl.zeros([BLOCK_N, BLOCK_DB], tl.float32)
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            row = head_rows + offs_m
            g = tl.load(g_ptr + row * g_stride, mask=row_ok, other=0.0).to(tl.float32) * g_scale
            kl = tl.load(kl_ptr + row, mask=row_ok, other=0.0)
            lse_a = tl.load(lse_ptr + row, mask=row_ok, other=0.0)
            lse_b = tl.load(lse_b_ptr + row, mask=row_ok, other=0.0)
            qa = _load_tile(qa_base, offs_m, offs_da, s_qa_n, s_qa_d, N, DA)
            qb = _load_tile(qb_base, offs_m, offs_db, s_qb_n, s_qb_d, N, DB)
            a = _dot(qa, tl.trans(ka), MODE_A) * scale2_a
            b = _dot(qb, tl.trans(kb), MODE_B) * scale2_b
            ds_a, ds_b = _logit_grads(a, b, lse_a, lse_b, kl, g, row_ok[:, None] & col_ok[None, :])
            if NEED_A:
                dka += _dot(tl.trans(ds_a), qa, BWD_MODE_A)
                dqa = _dot(ds_a, ka, BWD_MODE_A) * scale_a
                at = dqa_ptr + row[:, None] * DA + offs_da[None, :]
                tl.atomic_add(at, dqa, mask=row_ok[:, None] & (offs_da[None, :] < DA), sem="relaxed")
            if NEED_B:
                dkb += _dot(tl.trans(ds_b), qb, BWD_MODE_B)
                dqb = _dot(ds_b, kb, BWD_MODE_B) * scale_b
                at = dqb_ptr + row[:, None] * DB + offs_db[None, :]
                tl.atomic_add(at, dqb, mask=row_ok[:, None] & (offs_db[None, :] < DB), sem="relaxed")
        key_rows = (head_rows + offs_n)[:, None]
        if NEED_A:
            out = dka_ptr + key_rows * DA + offs_da[None, :]
            tl.store(out, dka * scale_a, mask=col_ok[:, None] & (offs_da[None, :] < DA))
        if NEED_B:
            out = dkb_ptr + key_rows * DB + offs_db[None, :]
            tl.store(out, dkb * scale_b, mask=col_ok[:, None] & (offs_db[None, :] < DB))

    _forward_kernel = Pinned(_attention_kl_fwd_kernel)
    _backward_kernel = Pinned(_attention_kl_bwd_kernel)


def _pow2(n: int) -> int:
    """Head dims padded to a power of two >= 16, the smallest tl.dot operand."""
    return max(16, 1 << (n - 1).bit_length())


def _grid(blocks: int, rows: int, block: str, meta: dict) -> tuple[int]:
    return (-(-blocks // meta[block]) * rows,)


# The smallest block of any config: the most programs a launch can need.
MIN_BLOCK = 16


class _Plan(NamedTuple):
    """Everything a launch needs that depends on the signature only, computed once per signature."""

    signature: tuple  # the forward's Pinned key (the backward's adds the two need flags)
    rows: int  # B * H * N: lse holds lse_a and lse_b this many floats apart
    strides: tuple[int, ...]  # the four inputs' 16 strides, checked
    shape: dict  # the forward's launch constants
    backward: dict  # (need_a, need_b) -> the backward's launch constants
    fwd_grid: Callable[[dict], tuple[int]]
    bwd_grid: Callable[[dict], tuple[int]]


@functools.lru_cache(maxsize=256)
def _plan(
    shape_a: torch.Size, shape_b: torch.Size, dtype_a: torch.dtype, dtype_b: torch.dtype, strides: tuple
) -> _Plan:
    """The launch constants of one signature: head dims padded to a power of two, the dot modes of each
    pair's dtype, the strides (a (b, h) slice must span fewer than 2^31 elements, the reach of the kernels'
    32-bit offsets within a slice), the grids and their size (within CUDA's limits at the smallest block)."""
    for i, shape in enumerate((shape_a, shape_a, shape_b, shape_b)):
        s = strides[4 * i : 4 * i + 4]
        if (shape[2] - 1) * s[2] + (shape[3] - 1) * s[3] >= INT32_SPAN:
            raise ValueError(
                f"one (b, h) slice of a {tuple(shape)} input with strides {s} spans 2^31 elements or more;"
                " make the input contiguous"
            )
    rows, n = shape_a[0] * shape_a[1], shape_a[2]
    check_grid(
        _grid(n, rows, "BLOCK", {"BLOCK": MIN_BLOCK}), f"attention_kl of {tuple(shape_a)} inputs",
        "split the batch",
    )  # fmt: skip
    (fwd_a, bwd_a), (fwd_b, bwd_b) = _dot_modes(dtype_a, _INTERPRETED), _dot_modes(dtype_b, _INTERPRETED)
    shape = {
        "H": shape_a[1],
        "N": n,
        "DA": shape_a[3],
        "DB": shape_b[3],
        "BLOCK_DA": _pow2(shape_a[3]),
        "BLOCK_DB": _pow2(shape_b[3]),
        "MODE_A": fwd_a,
        "MODE_B": fwd_b,
    }
    return _Plan(
        (shape_a, shape_b, dtype_a, dtype_b),
        rows * n,
        strides,
        shape,
        {
            (need_a, need_b): {
                **shape,
                "BWD_MODE_A": bwd_a,
                "BWD_MODE_B": bwd_b,
                "NEED_A": need_a,
                "NEED_B": need_b,
            }
            for need_a, need_b in ((True, False), (False, True), (True, True))
        },
        functools.partial(_grid, n, rows, "BLOCK_M"),
        functools.partial(_grid, n, rows, "BLOCK_N"),
    )


def _plan_of(q_a: torch.Tensor, k_a: torch.Tensor, q_b: torch.Tensor, k_b: torch.Tensor) -> _Plan:
    strides = q_a.stride() + k_a.stride() + q_b.stride() + k_b.stride()
    return _plan(q_a.shape, q_b.shape, q_a.dtype, q_b.dtype, strides)


def _forward(
    q_a: torch.Tensor,
    k_a: torch.Tensor,
    q_b: torch.Tensor,
    k_b: torch.Tensor,
    scale_a: float,
    scale_b: float,
    mean: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, lse): the per-row KL(softmax(a) || softmax(b)) as a (B, H, N) fp32 tensor, its mean over the
    rows as ``loss`` when ``mean`` (else an empty tensor: the rows are the result), and lse_a, lse_b in log2
    units as (2, B, H, N), saved for the backward."""
    batch, heads, n = q_a.shape[:3]
    kl = torch.empty((batch, heads, n), device=q_a.device, dtype=torch.float32)
    lse = torch.empty((2, batch, heads, n), device=q_a.device, dtype=torch.float32)
    if batch * heads * n:
        plan = _plan_of(q_a, k_a, q_b, k_b)
        _forward_kernel(
            plan.signature, plan.fwd_grid, plan.shape, q_a, k_a, q_b, k_b, kl, lse, plan.rows, *plan.strides,
            scale_a=scale_a, scale_b=scale_b,
        )  # fmt: skip
    return kl.mean() if mean else kl.new_empty((0,)), kl, lse


def _forward_fake(q_a, k_a, q_b, k_b, scale_a, scale_b, mean):
    rows = q_a.shape[:3]
    loss = q_a.new_empty(() if mean else (0,), dtype=torch.float32)
    return loss, q_a.new_empty(rows, dtype=torch.float32), q_a.new_empty((2, *rows), dtype=torch.float32)


def _backward(
    grad_loss: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    q_a: torch.Tensor,
    k_a: torch.Tensor,
    q_b: torch.Tensor,
    k_b: torch.Tensor,
    kl: torch.Tensor,
    lse: torch.Tensor,
    scale_a: float,
    scale_b: float,
    mean: bool,
    need_q_a: bool,
    need_k_a: bool,
    need_q_b: bool,
    need_k_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq_a, dk_a, dq_b, dk_b) contiguous in the input dtypes, for the upstream gradient of the loss (a
    scalar the kernel reads with stride 0 and scales by 1 / rows) or of the per-row KL (a (B, H, N) tensor,
    or one value for every row: expanded). A pair not needed comes back as empty tensors, with no work
    (usually the detached teacher)."""
    need_a, need_b = need_q_a or need_k_a, need_q_b or need_k_b
    # dq sums one term per key block: in fp32, with atomics (for fp32 inputs the sum is the gradient).
    dq_a = torch.zeros(q_a.shape, device=q_a.device, dtype=torch.float32) if need_a else q_a.new_empty((0,))
    dk_a = k_a.new_empty(k_a.shape if need_a else (0,))
    dq_b = torch.zeros(q_b.shape, device=q_b.device, dtype=torch.float32) if need_b else q_b.new_empty((0,))
    dk_b = k_b.new_empty(k_b.shape if need_b else (0,))
    if kl.numel():
        if not mean:  # the loss output is empty, so is its gradient
            grad_loss = None
        if grad_loss is not None and grad_kl is not None:  # both outputs reached the loss
            grad_kl, grad_loss = grad_kl + grad_loss / kl.numel(), None
        if grad_loss is not None:
            grad, grad_stride, grad_scale = grad_loss, 0, 1.0 / kl.numel()
        elif grad_kl is None:  # neither output reached the loss: zero gradients
            grad, grad_stride, grad_scale = kl, 0, 0.0
        elif not any(grad_kl.stride()):  # expanded from one value (the backward of a mean outside)
            grad, grad_stride, grad_scale = grad_kl[(0,) * grad_kl.dim()], 0, 1.0
        else:
            grad, grad_stride, grad_scale = grad_kl.contiguous(), 1, 1.0
        plan = _plan_of(q_a, k_a, q_b, k_b)
        # The pair not needed is never written (NEED_A / NEED_B): the needed pair's buffers stand in for it.
        _backward_kernel(
            (plan.signature, need_a, need_b), plan.bwd_grid, plan.backward[need_a, need_b],
            q_a, k_a, q_b, k_b, grad, kl, lse, plan.rows,
            dq_a if need_a else dq_b, dk_a if need_a else dk_b,
            dq_b if need_b else dq_a, dk_b if need_b else dk_a,
            *plan.strides, grad_stride, grad_scale,
            scale_a=scale_a, scale_b=scale_b,
        )  # fmt: skip
    return _cast(dq_a, q_a.dtype), dk_a, _cast(dq_b, q_b.dtype), dk_b


def _backward_fake(grad_loss, grad_kl, q_a, k_a, q_b, k_b, kl, lse, scale_a, scale_b, mean, *needs):
    need_a, need_b = needs[0] or needs[1], needs[2] or needs[3]
    return tuple(
        x.new_empty(x.shape if needed else (0,))
        for x, needed in ((q_a, need_a), (k_a, need_a), (q_b, need_b), (k_b, need_b))
    )


def _cast(dq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dq if dq.dtype == dtype else dq.to(dtype)


# Both autograd paths (eager autograd.Function, torch.compile custom ops) from one description (_op.py).
_attention_kl = FusedOp(
    "attention_kl",
    forward=_forward,
    forward_fake=_forward_fake,
    backward=_backward,
    backward_fake=_backward_fake,
    grad_inputs=4,
    grad_outputs=(0, 1),
    save=lambda inputs, outputs: ((*inputs[:4], *outputs[1:]), inputs[4:]),
)


def attention_kl(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    *,
    scale_s: float | None = None,
    scale_t: float | None = None,
    direction: str = "student_teacher",
    reduction: str = "mean",
    impl: str = "auto",
) -> torch.Tensor:
    """KL between attention rows A = softmax(q k^T * scale) of the (B, H, N, D_s) student and the
    (B, H, N, D_t) teacher: MTD's L_CAD = KL(CAD_s || CAD_t) with CAD = softmax(Q K^T / sqrt(d_q))
    ("student_teacher"; its L_VR = KL(VR_s || VR_t) is ``attention_kl(v_s, v_s, v_t, v_t)``), or
    MiniLM's KL(A_t || A_s) ("teacher_student").

    "mean" averages the per-row KL over B*H*N rows, "none" returns it as (B, H, N) fp32. The Triton
    path streams over key blocks in forward and backward, so no N x N tensor is ever stored; its products
    run on tensor cores, fp32 inputs as TF32 (module docstring). Teacher gradients are computed only when
    the teacher requires grad.
    """
    _check_signature(
        (q_s.shape, k_s.shape, q_t.shape, k_t.shape), (q_s.dtype, k_s.dtype, q_t.dtype, k_t.dtype),
        direction, reduction,
    )  # fmt: skip
    if not use_triton(impl, q_s, k_s, q_t, k_t):
        return attention_kl_reference(
            q_s, k_s, q_t, k_t, scale_s=scale_s, scale_t=scale_t, direction=direction, reduction=reduction
        )
    scale_s = q_s.shape[-1] ** -0.5 if scale_s is None else float(scale_s)
    scale_t = q_t.shape[-1] ** -0.5 if scale_t is None else float(scale_t)
    if direction == "student_teacher":
        args = (q_s, k_s, q_t, k_t, scale_s, scale_t)
    else:
        args = (q_t, k_t, q_s, k_s, scale_t, scale_s)
    mean = reduction == "mean"
    return _attention_kl(0 if mean else 1, *args, mean)
