"""KL divergence between attention distributions (MTD's CAD and VR; MiniLM's direction), flash-style.

Reference first (explicit softmax, the specification), then the Triton kernels that never store N x N.

Notation of the kernels: the row distributions are p = softmax(a) and q = softmax(b), with logits
a = q_a k_a^T * scale_a and b = q_b k_b^T * scale_b; they compute KL(p || q) per row. The direction
is chosen by which pair is passed as ``a``: the student for "student_teacher", the teacher otherwise.
"""

from __future__ import annotations

import torch

from kernels._dispatch import interpreting, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS / Windows: the reference still runs, use_triton never picks Triton there
    triton = None

DIRECTIONS = ("student_teacher", "teacher_student")
REDUCTIONS = ("mean", "none")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634


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


def _check_inputs(
    q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor, direction: str, reduction: str
) -> None:
    """Raise a ValueError naming what to change when the inputs do not fit the contract."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    named = {"q_s": q_s, "k_s": k_s, "q_t": q_t, "k_t": k_t}
    for name, t in named.items():
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    for name, t in named.items():
        if t.shape[:3] != q_s.shape[:3]:
            raise ValueError(
                f"{name} has (B, H, N) = {tuple(t.shape[:3])}, expected {tuple(q_s.shape[:3])} as in q_s"
            )
    for q_name, k_name in (("q_s", "k_s"), ("q_t", "k_t")):
        q, k = named[q_name], named[k_name]
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(
                f"{q_name} and {k_name} must share a head dim, got {q.shape[-1]} and {k.shape[-1]}"
            )
        if q.dtype != k.dtype:
            raise ValueError(f"{q_name} and {k_name} must share a dtype, got {q.dtype} and {k.dtype}")


def _dot_modes(dtype: torch.dtype) -> tuple[str, str]:
    """How the forward and the backward kernels multiply tiles of this input dtype.

    fp32 stays exact ("ieee": no TF32 rounding of the logits). The backward's dS tile carries the
    upstream gradient (1 / (B*H*N) under "mean"), which underflows fp16's range at training shapes,
    so fp16 backward products run on fp32 tiles ("tf32": fp16's mantissa with fp32's exponent);
    bf16 already has fp32's exponent and stays native.
    """
    if dtype == torch.float32:
        return "ieee", "ieee"
    if dtype == torch.float16:
        return "native", "tf32"
    if interpreting():
        # The CPU interpreter's tl.dot on bf16 tiles returns garbage (triton 3.8); upcast there only.
        return "tf32", "tf32"
    return "native", "native"


if triton is not None:

    def _configs(pairs: list[tuple[int, int, int, int]]) -> list[triton.Config]:
        """Autotune candidates; the CPU interpreter gets one small config, as it does not benchmark."""
        if interpreting():
            pairs = [(32, 32, 1, 1)]
        return [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs
        ]

    # Hopper: 64-128 query rows per program keep two logit tiles plus both Q tiles in registers at D=128.
    _FWD_CONFIGS = _configs([(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 2), (64, 32, 4, 2)])
    _BWD_CONFIGS = _configs([(64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (128, 64, 8, 2)])

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
    def _logit_grads(a, b, lse_a, lse_b, kl, g, valid):
        """dL/da and dL/db for L = g * KL(p || q), a, b and lse in log2 units, outputs in natural units:
        dKL/da_j = p_j (log p_j - log q_j - KL), dKL/db_j = q_j - p_j."""
        log2_p = a - lse_a[:, None]
        log2_q = b - lse_b[:, None]
        p = tl.exp2(log2_p)
        ds_a = g[:, None] * p * ((log2_p - log2_q) * 0.6931471805599453 - kl[:, None])
        ds_b = g[:, None] * (tl.exp2(log2_q) - p)
        return tl.where(valid, ds_a, 0.0), tl.where(valid, ds_b, 0.0)

    @triton.autotune(configs=_FWD_CONFIGS, key=["N", "DA", "DB"])
    @triton.jit
    def _attention_kl_fwd_kernel(
        qa_ptr, ka_ptr, qb_ptr, kb_ptr, kl_ptr, lse_a_ptr, lse_b_ptr,
        s_qa_b, s_qa_h, s_qa_n, s_qa_d, s_ka_b, s_ka_h, s_ka_n, s_ka_d,
        s_qb_b, s_qb_h, s_qb_n, s_qb_d, s_kb_b, s_kb_h, s_kb_n, s_kb_d,
        H, N, DA, DB, scale2_a, scale2_b,
        BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, MODE_A: tl.constexpr, MODE_B: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """One program per (b, h, query block): online log-sum-exp of both logit sets and the online
        sum_j p_j (a_j - b_j), so KL(p || q) = sum_j p_j (a_j - b_j) - (lse_a - lse_b) per row."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b_idx = bh // H
        h_idx = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_da = tl.arange(0, BLOCK_DA)
        offs_db = tl.arange(0, BLOCK_DB)
        qa = _load_tile(qa_ptr + b_idx * s_qa_b + h_idx * s_qa_h, offs_m, offs_da, s_qa_n, s_qa_d, N, DA)
        qb = _load_tile(qb_ptr + b_idx * s_qb_b + h_idx * s_qb_h, offs_m, offs_db, s_qb_n, s_qb_d, N, DB)
        ka_base = ka_ptr + b_idx * s_ka_b + h_idx * s_ka_h
        kb_base = kb_ptr + b_idx * s_kb_b + h_idx * s_kb_h
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
        row = bh * N + offs_m
        tl.store(kl_ptr + row, kl, mask=offs_m < N)
        tl.store(lse_a_ptr + row, lse_a, mask=offs_m < N)
        tl.store(lse_b_ptr + row, lse_b, mask=offs_m < N)

    @triton.autotune(configs=_BWD_CONFIGS, key=["N", "DA", "DB"])
    @triton.jit
    def _attention_kl_bwd_dq_kernel(
        qa_ptr, ka_ptr, qb_ptr, kb_ptr, g_ptr, kl_ptr, lse_a_ptr, lse_b_ptr, dqa_ptr, dqb_ptr,
        s_qa_b, s_qa_h, s_qa_n, s_qa_d, s_ka_b, s_ka_h, s_ka_n, s_ka_d,
        s_qb_b, s_qb_h, s_qb_n, s_qb_d, s_kb_b, s_kb_h, s_kb_n, s_kb_d,
        H, N, DA, DB, scale2_a, scale2_b, scale_a, scale_b,
        BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, MODE_A: tl.constexpr, MODE_B: tl.constexpr,
        BWD_MODE_A: tl.constexpr, BWD_MODE_B: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """dq = dS @ k * scale for one (b, h, query block), logits recomputed key block by key block;
        the gradients are written contiguous (B, H, N, D)."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b_idx = bh // H
        h_idx = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_da = tl.arange(0, BLOCK_DA)
        offs_db = tl.arange(0, BLOCK_DB)
        qa = _load_tile(qa_ptr + b_idx * s_qa_b + h_idx * s_qa_h, offs_m, offs_da, s_qa_n, s_qa_d, N, DA)
        qb = _load_tile(qb_ptr + b_idx * s_qb_b + h_idx * s_qb_h, offs_m, offs_db, s_qb_n, s_qb_d, N, DB)
        ka_base = ka_ptr + b_idx * s_ka_b + h_idx * s_ka_h
        kb_base = kb_ptr + b_idx * s_kb_b + h_idx * s_kb_h
        row = bh * N + offs_m
        row_ok = offs_m < N
        g = tl.load(g_ptr + row, mask=row_ok, other=0.0)
        kl = tl.load(kl_ptr + row, mask=row_ok, other=0.0)
        lse_a = tl.load(lse_a_ptr + row, mask=row_ok, other=0.0)
        lse_b = tl.load(lse_b_ptr + row, mask=row_ok, other=0.0)
        dqa = tl.zeros([BLOCK_M, BLOCK_DA], tl.float32)
        dqb = tl.zeros([BLOCK_M, BLOCK_DB], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            valid = row_ok[:, None] & (offs_n < N)[None, :]
            ka = _load_tile(ka_base, offs_n, offs_da, s_ka_n, s_ka_d, N, DA)
            kb = _load_tile(kb_base, offs_n, offs_db, s_kb_n, s_kb_d, N, DB)
            a = _dot(qa, tl.trans(ka), MODE_A) * scale2_a
            b = _dot(qb, tl.trans(kb), MODE_B) * scale2_b
            ds_a, ds_b = _logit_grads(a, b, lse_a, lse_b, kl, g, valid)
            if NEED_A:
                dqa += _dot(ds_a, ka, BWD_MODE_A)
            if NEED_B:
                dqb += _dot(ds_b, kb, BWD_MODE_B)
        if NEED_A:
            out = dqa_ptr + (bh * N + offs_m[:, None]) * DA + offs_da[None, :]
            tl.store(out, dqa * scale_a, mask=row_ok[:, None] & (offs_da[None, :] < DA))
        if NEED_B:
            out = dqb_ptr + (bh * N + offs_m[:, None]) * DB + offs_db[None, :]
            tl.store(out, dqb * scale_b, mask=row_ok[:, None] & (offs_db[None, :] < DB))

    @triton.autotune(configs=_BWD_CONFIGS, key=["N", "DA", "DB"])
    @triton.jit
    def _attention_kl_bwd_dk_kernel(
        qa_ptr, ka_ptr, qb_ptr, kb_ptr, g_ptr, kl_ptr, lse_a_ptr, lse_b_ptr, dka_ptr, dkb_ptr,
        s_qa_b, s_qa_h, s_qa_n, s_qa_d, s_ka_b, s_ka_h, s_ka_n, s_ka_d,
        s_qb_b, s_qb_h, s_qb_n, s_qb_d, s_kb_b, s_kb_h, s_kb_n, s_kb_d,
        H, N, DA, DB, scale2_a, scale2_b, scale_a, scale_b,
        BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr, MODE_A: tl.constexpr, MODE_B: tl.constexpr,
        BWD_MODE_A: tl.constexpr, BWD_MODE_B: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """dk = dS^T @ q * scale for one (b, h, key block), looping over query blocks (the
        FlashAttention-2 dK/dV order): each program owns its rows of dk, so no atomics and the
        result is deterministic."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b_idx = bh // H
        h_idx = bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_da = tl.arange(0, BLOCK_DA)
        offs_db = tl.arange(0, BLOCK_DB)
        ka = _load_tile(ka_ptr + b_idx * s_ka_b + h_idx * s_ka_h, offs_n, offs_da, s_ka_n, s_ka_d, N, DA)
        kb = _load_tile(kb_ptr + b_idx * s_kb_b + h_idx * s_kb_h, offs_n, offs_db, s_kb_n, s_kb_d, N, DB)
        qa_base = qa_ptr + b_idx * s_qa_b + h_idx * s_qa_h
        qb_base = qb_ptr + b_idx * s_qb_b + h_idx * s_qb_h
        col_ok = offs_n < N
        dka = tl.zeros([BLOCK_N, BLOCK_DA], tl.float32)
        dkb = tl.zeros([BLOCK_N, BLOCK_DB], tl.float32)
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            row = bh * N + offs_m
            g = tl.load(g_ptr + row, mask=row_ok, other=0.0)
            kl = tl.load(kl_ptr + row, mask=row_ok, other=0.0)
            lse_a = tl.load(lse_a_ptr + row, mask=row_ok, other=0.0)
            lse_b = tl.load(lse_b_ptr + row, mask=row_ok, other=0.0)
            qa = _load_tile(qa_base, offs_m, offs_da, s_qa_n, s_qa_d, N, DA)
            qb = _load_tile(qb_base, offs_m, offs_db, s_qb_n, s_qb_d, N, DB)
            a = _dot(qa, tl.trans(ka), MODE_A) * scale2_a
            b = _dot(qb, tl.trans(kb), MODE_B) * scale2_b
            ds_a, ds_b = _logit_grads(a, b, lse_a, lse_b, kl, g, row_ok[:, None] & col_ok[None, :])
            if NEED_A:
                dka += _dot(tl.trans(ds_a), qa, BWD_MODE_A)
            if NEED_B:
                dkb += _dot(tl.trans(ds_b), qb, BWD_MODE_B)
        if NEED_A:
            out = dka_ptr + (bh * N + offs_n[:, None]) * DA + offs_da[None, :]
            tl.store(out, dka * scale_a, mask=col_ok[:, None] & (offs_da[None, :] < DA))
        if NEED_B:
            out = dkb_ptr + (bh * N + offs_n[:, None]) * DB + offs_db[None, :]
            tl.store(out, dkb * scale_b, mask=col_ok[:, None] & (offs_db[None, :] < DB))


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()]


def _shape_args(q_a: torch.Tensor, q_b: torch.Tensor) -> tuple[dict, dict]:
    """Launch arguments shared by the three kernels: head dims padded to a power of two (>= 16, the
    smallest tl.dot operand) and the forward dot mode of each pair's dtype; then the backward modes."""
    (fwd_a, bwd_a), (fwd_b, bwd_b) = _dot_modes(q_a.dtype), _dot_modes(q_b.dtype)
    return {
        "H": q_a.shape[1],
        "N": q_a.shape[2],
        "DA": q_a.shape[3],
        "DB": q_b.shape[3],
        "BLOCK_DA": max(16, triton.next_power_of_2(q_a.shape[3])),
        "BLOCK_DB": max(16, triton.next_power_of_2(q_b.shape[3])),
        "MODE_A": fwd_a,
        "MODE_B": fwd_b,
    }, {"BWD_MODE_A": bwd_a, "BWD_MODE_B": bwd_b}


@torch.library.custom_op("kdfast::attention_kl_fwd", mutates_args=())
def _attention_kl_fwd(
    q_a: torch.Tensor, k_a: torch.Tensor, q_b: torch.Tensor, k_b: torch.Tensor, scale_a: float, scale_b: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row KL(softmax(a) || softmax(b)) as (B, H, N) fp32, with lse_a and lse_b in log2 units."""
    batch, heads, n = q_a.shape[:3]
    kl, lse_a, lse_b = (q_a.new_empty((batch, heads, n), dtype=torch.float32) for _ in range(3))
    if kl.numel() == 0:
        return kl, lse_a, lse_b
    shape, _ = _shape_args(q_a, q_b)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    _attention_kl_fwd_kernel[grid](
        q_a, k_a, q_b, k_b, kl, lse_a, lse_b, *_strides(q_a, k_a, q_b, k_b),
        scale2_a=scale_a * LOG2E, scale2_b=scale_b * LOG2E, **shape,
    )  # fmt: skip
    return kl, lse_a, lse_b


@_attention_kl_fwd.register_fake
def _(q_a, k_a, q_b, k_b, scale_a, scale_b):
    return tuple(q_a.new_empty(q_a.shape[:3], dtype=torch.float32) for _ in range(3))


def _grad_buffers(
    q_a: torch.Tensor, k_a: torch.Tensor, q_b: torch.Tensor, k_b: torch.Tensor, need_a: bool, need_b: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uninitialized contiguous gradients (every element gets written), empty for a pair not needed."""
    return tuple(
        x.new_empty(x.shape if needed else (0,))
        for x, needed in ((q_a, need_a), (k_a, need_a), (q_b, need_b), (k_b, need_b))
    )


@torch.library.custom_op("kdfast::attention_kl_bwd", mutates_args=())
def _attention_kl_bwd(
    grad: torch.Tensor,
    q_a: torch.Tensor,
    k_a: torch.Tensor,
    q_b: torch.Tensor,
    k_b: torch.Tensor,
    kl: torch.Tensor,
    lse_a: torch.Tensor,
    lse_b: torch.Tensor,
    scale_a: float,
    scale_b: float,
    need_a: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq_a, dk_a, dq_b, dk_b) for the per-row upstream gradient ``grad``; a pair not needed comes
    back as an empty tensor and its work is skipped (usually the detached teacher)."""
    dq_a, dk_a, dq_b, dk_b = _grad_buffers(q_a, k_a, q_b, k_b, need_a, need_b)
    if kl.numel() == 0 or not (need_a or need_b):
        return dq_a, dk_a, dq_b, dk_b
    batch, heads, n = q_a.shape[:3]
    shape, bwd_modes = _shape_args(q_a, q_b)
    common = (q_a, k_a, q_b, k_b, grad.contiguous(), kl, lse_a, lse_b)
    flags = {"NEED_A": need_a, "NEED_B": need_b, **bwd_modes, **shape, "scale_a": scale_a, "scale_b": scale_b}
    flags.update(scale2_a=scale_a * LOG2E, scale2_b=scale_b * LOG2E)
    strides = _strides(q_a, k_a, q_b, k_b)
    grid_q = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    grid_k = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), batch * heads)  # noqa: E731
    _attention_kl_bwd_dq_kernel[grid_q](*common, dq_a, dq_b, *strides, **flags)
    _attention_kl_bwd_dk_kernel[grid_k](*common, dk_a, dk_b, *strides, **flags)
    return dq_a, dk_a, dq_b, dk_b


@_attention_kl_bwd.register_fake
def _(grad, q_a, k_a, q_b, k_b, kl, lse_a, lse_b, scale_a, scale_b, need_a, need_b):
    return _grad_buffers(q_a, k_a, q_b, k_b, need_a, need_b)


def _setup_context(ctx, inputs, output) -> None:
    q_a, k_a, q_b, k_b, scale_a, scale_b = inputs
    ctx.save_for_backward(q_a, k_a, q_b, k_b, *output)
    ctx.scales = (scale_a, scale_b)


def _backward(ctx, grad_kl, _grad_lse_a, _grad_lse_b):
    q_a, k_a, q_b, k_b, kl, lse_a, lse_b = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_a, need_b = need[0] or need[1], need[2] or need[3]
    dq_a, dk_a, dq_b, dk_b = torch.ops.kdfast.attention_kl_bwd(
        grad_kl, q_a, k_a, q_b, k_b, kl, lse_a, lse_b, *ctx.scales, need_a, need_b
    )
    return (
        dq_a if need[0] else None,
        dk_a if need[1] else None,
        dq_b if need[2] else None,
        dk_b if need[3] else None,
        None,
        None,
    )


_attention_kl_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    path streams over key blocks in forward and backward, so no N x N tensor is ever stored.
    """
    _check_inputs(q_s, k_s, q_t, k_t, direction, reduction)
    if not use_triton(impl, q_s, k_s, q_t, k_t):
        return attention_kl_reference(
            q_s, k_s, q_t, k_t, scale_s=scale_s, scale_t=scale_t, direction=direction, reduction=reduction
        )
    scale_s = q_s.shape[-1] ** -0.5 if scale_s is None else float(scale_s)
    scale_t = q_t.shape[-1] ** -0.5 if scale_t is None else float(scale_t)
    if direction == "student_teacher":
        kl = torch.ops.kdfast.attention_kl_fwd(q_s, k_s, q_t, k_t, scale_s, scale_t)[0]
    else:
        kl = torch.ops.kdfast.attention_kl_fwd(q_t, k_t, q_s, k_s, scale_t, scale_s)[0]
    return kl.mean() if reduction == "mean" else kl
