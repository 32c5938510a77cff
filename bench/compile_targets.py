"""Compile every Triton launch of ``kernels`` for A100 (sm_80) and H100/H200 (sm_90) without a GPU, check
each against the target's limits, and write the resource report of the Triton version that runs it:
``bench/RESOURCES.md`` for the project's Triton (3.8), ``bench/RESOURCES-triton3.6.md`` for the GPU machine's
(scripts/triton36.sh puts Triton 3.6 in front of the project's environment).

    python bench/compile_targets.py [--out FILE] [--json FILE] [--workers 2] [--targets 80 90] [--check]

``--check`` (CI) compiles and checks the same way but leaves the committed report alone: it also fails when
that report covers other specializations than the kernels launch today (regenerate it without ``--check``).

1. Capture. The public ops (``ssim``, ``ssim_cosine_loss``, ``attention_kl``, ``attention_map``, ``resize``)
   run forward and backward through their real launch code on CPU tensors of the shapes, dtypes and grad
   modes that the benchmarks (``bench/shapes.py``) and training (``TRAINING`` below) use. Each Triton launch
   is recorded instead of run: Triton's own binder turns its arguments into the specialization the GPU
   would compile (pointer dtypes, 16-byte alignment, integers divisible by 16 or equal to 1, constexprs,
   ``num_warps`` / ``num_stages``), and an autotuned kernel records every config it would benchmark.
2. Compile. Each distinct specialization goes through ``triton.compile`` for each target, in worker
   processes; ``ptxas -v`` (Triton runs it) gives registers and spills, Triton's metadata the shared memory,
   the PTX whether tensor cores are used (``mma.sync``: Ampere/Hopper; ``wgmma``: Hopper only).
3. Check. A compile error, shared memory above the per-block limit, spilled bytes above the kernel's budget
   for this Triton version (``SPILL_BUDGETS``, zero unless a reason is written there) or a grid past CUDA's
   limits fails the run: exit 1, each problem on one line. The report is written either way. Resources
   differ between Triton versions (their LLVM and ptxas), so each version has its own report and budgets;
   what is judged is the same for all.

Nothing here needs a GPU; everything needs ``TRITON_INTERPRET`` unset (the script unsets it).
"""

from __future__ import annotations

import os

# Before anything imports triton: Triton decides on import, and @triton.jit when kernels defines its kernels,
# whether to interpret (real JITFunctions are needed here); bench/shapes.py reads the benchmark switches when
# imported (the real shapes are needed here).
for switch in ("TRITON_INTERPRET", "KDFAST_BENCH_DRY", "KDFAST_BENCH_HEADLINE"):
    os.environ.pop(switch, None)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable, Iterator  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from tqdm import tqdm  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import shapes  # noqa: E402

import kernels  # noqa: E402
from kdfast.atomic import atomic_write  # noqa: E402
from kernels._launch import GRID_LIMITS  # noqa: E402

# The Triton versions checked, each with its committed report: the project's (torch 2.14's) and the GPU
# machine's (torch 2.11's).
REPORTS = {"3.8": "RESOURCES.md", "3.6": "RESOURCES-triton3.6.md"}
TRITON = ".".join(triton.__version__.split(".")[:2])


def report_path(version: str = TRITON) -> Path:
    """The committed report of a Triton version (``RESOURCES-triton<version>.md`` for one not listed)."""
    return ROOT / "bench" / REPORTS.get(version, f"RESOURCES-triton{version}.md")


COMMAND = "python bench/compile_targets.py"
TARGETS = {80: "A100 (sm_80)", 90: "H100 / H200 (sm_90)"}

# CUDA C++ Programming Guide, "Technical Specifications per Compute Capability" (table in the "Compute
# Capabilities" appendix): maximum shared memory per thread block (opt-in) 163 KB on 8.0 and 227 KB on 9.0;
# per SM 164 KB and 228 KB (1 KB of it reserved per resident block); 64K 32-bit registers per SM; at most
# 2048 resident threads and 32 resident blocks per SM on both.
SHARED_PER_BLOCK = {80: 163 * 1024, 90: 227 * 1024}
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
SHARED_RESERVED_PER_BLOCK = 1024
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32


@dataclass(frozen=True)
class SpillBudget:
    """Spill stores (bytes per thread) that the specializations of ``kernel`` matching ``when`` may show under
    a Triton version on a target (``bytes[version][arch]``; a version not listed gets none), and why. A
    specialization no budget covers may not spill at all."""

    kernel: str
    when: str
    applies: Callable[[dict[str, object]], bool]
    bytes: dict[str, dict[int, int]]
    reason: str


SPILL_BUDGETS = [
    SpillBudget(
        "_ssim_bwd_kernel",
        "row strips of 32 x 64 (56x56 maps)",
        lambda c: c["BI_H"] * c["BI_W"] >= 32 * 64,
        {"3.8": {80: 512, 90: 512}, "3.6": {80: 128, 90: 128}},
        "the strip's x and y, four moment maps, the carried dLoss/dmoments of the previous strip and two"
        " 64 x 64 banded windows (tf32x3 operands) outgrow 255 registers at 8 warps: 244-260 B under Triton"
        " 3.8, 36-64 B under 3.6. 4 warps spill 1.4-1.6 KB, 16 warps (128 registers) 1.3-2.7 KB (3.8).",
    ),
    SpillBudget(
        "_attention_kl_bwd_kernel",
        "every specialization",
        lambda c: True,
        {"3.8": {80: 128, 90: 128}, "3.6": {80: 128, 90: 128}},
        "four logit-sized tiles (a, b, dS_a, dS_b), the dk accumulators and a dq partial take all 255"
        " registers in the larger configs, and the 1-D grid and the separate kl / lse pointers added a few"
        " scalars: 4-96 B per thread spill there (sm_80 most, fp32 most). On the GPU the autotuner times"
        " every config, these included, and keeps the fastest; shared memory, which a launch cannot exceed,"
        " is within the limit for every config.",
    ),
    SpillBudget(
        "_ssim_fwd_kernel",
        "32 x 32 tiles (tiled rows, columns up to 32)",
        lambda c: c["BI_H"] * c["BI_W"] == 32 * 32 and not (c["ID_H"] or c["ID_W"]),
        {"3.6": {80: 0, 90: 64}},
        "Triton 3.6 on sm_90 only: the tile's x and y, four moment maps and two 16 x 32 banded windows take"
        " all 255 registers at 4 warps and spill 60 B per thread (3.8 spills nothing on the same code, 3.6"
        " nothing on sm_80); a few stores per strip, each program reads its plane once.",
    ),
]


def spill_budget(launch: Launch, arch: int, version: str = TRITON) -> int:
    """The largest budget any rule grants this specialization on this target under this Triton version
    (0: it may not spill)."""
    consts = launch.named_constexprs()
    budgets = [
        b.bytes.get(version, {}).get(arch, 0)
        for b in SPILL_BUDGETS
        if b.kernel == launch.kernel and b.applies(consts)
    ]
    return max(budgets, default=0)


# ------------------------------------------------------------------------------------------------ capture


@dataclass(frozen=True, order=True)
class Launch:
    """One distinct compiled specialization of a kernel: what ``triton.compile`` receives."""

    kernel: str
    module: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[tuple[int, ...], object], ...]
    attrs: tuple[tuple[tuple[int, ...], tuple], ...]
    options: tuple[tuple[str, int], ...]
    ones: tuple[str, ...]  # integer arguments equal to 1, which Triton compiles as constants

    def source(self) -> ASTSource:
        fn = importlib.import_module(self.module)
        for name in self.kernel.split("."):
            fn = getattr(fn, name)
        while not isinstance(fn, JITFunction):  # an Autotuner (or Heuristics) wraps the JITFunction
            fn = fn.fn
        attrs = {path: [list(a) for a in value] for path, value in self.attrs}
        return ASTSource(fn, dict(self.signature), dict(self.constexprs), attrs)

    def named_constexprs(self) -> dict[str, object]:
        """The declared constexprs by name (the integers specialized to 1 left out)."""
        names = [name for name, _ in self.signature]
        return {names[p[0]]: v for p, v in self.constexprs if names[p[0]] not in self.ones}

    def describe(self) -> str:
        """Pointer dtypes, constexprs, the integers specialized to 1, and the sizes (the kernels' upper-case
        integer arguments) specialized as multiples of 16: ``*bf16 *fp32; BLOCK_M=64; =1: C; %16: N``."""
        names = [name for name, _ in self.signature]
        pointers = " ".join(sorted({t for _, t in self.signature if t.startswith("*")}))
        consts = " ".join(f"{k}={v}" for k, v in self.named_constexprs().items())
        ones = "=1: " + " ".join(self.ones) if self.ones else ""
        sizes = [names[p[0]] for p, _ in self.attrs if names[p[0]].isupper()]
        divisible = "%16: " + " ".join(sizes) if sizes else ""
        return "; ".join(part for part in (pointers, consts, ones, divisible) if part)


@dataclass
class Capture:
    """Every launch of every case: specialization -> the cases that produce it, and the largest grid."""

    cases: dict[Launch, list[str]] = field(default_factory=dict)
    programs: dict[Launch, int] = field(default_factory=dict)
    grids: dict[Launch, tuple[int, ...]] = field(default_factory=dict)  # the largest size along each axis
    launches: int = 0
    case_names: list[str] = field(default_factory=list)
    current: str = ""
    _binders: dict[int, Callable] = field(default_factory=dict)
    _backend: object = None

    def record(self, fn: JITFunction, args: tuple, kwargs: dict, grid) -> None:
        """What ``JITFunction.run`` does up to the compile, with a CUDA backend in place of the driver's."""
        if self._backend is None:
            self._backend = make_backend(GPUTarget("cuda", 90, 32))
        binder = self._binders.get(id(fn))
        if binder is None:
            binder = self._binders[id(fn)] = create_function_from_signature(
                fn.signature, fn.params, self._backend
            )
        bound, specialization, options = binder(*args, **kwargs)
        _, signature, constexprs, attrs = fn._pack_args(self._backend, kwargs, bound, specialization, options)
        launch = Launch(
            kernel=fn.fn.__name__,
            module=fn.fn.__module__,
            signature=tuple(signature.items()),
            constexprs=tuple(sorted(constexprs.items())),
            attrs=tuple(sorted((path, tuple(map(tuple, value))) for path, value in attrs.items() if value)),
            options=tuple(
                sorted(
                    (k, kwargs[k]) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in kwargs
                )
            ),
            ones=tuple(
                p.name
                for p, s in zip(fn.params, specialization, strict=False)
                if not p.is_constexpr and s[0] == "constexpr"
            ),
        )
        grid = tuple(int(size) for size in (grid(bound) if callable(grid) else grid))
        self.launches += 1
        names = self.cases.setdefault(launch, [])
        if self.current not in names:
            names.append(self.current)
        self.programs[launch] = max(self.programs.get(launch, 0), math.prod(grid))
        seen = self.grids.get(launch, ())
        self.grids[launch] = tuple(max(a, b) for a, b in itertools.zip_longest(grid, seen, fillvalue=0))

    @contextlib.contextmanager
    def intercepting(self) -> Iterator[Capture]:
        """Launches are recorded, not run; ``impl="triton"`` accepts CPU tensors (no interpreter needed)."""
        capture = self

        def run(self, *args, grid, warmup, **kwargs):
            capture.record(self, args, kwargs, grid)

        def autotuned_run(self, *args, **kwargs):
            self.nargs = dict(zip(self.arg_names, args, strict=False))
            for config in self.prune_configs(kwargs):  # the autotuner would compile and time every one
                self.fn.run(*args, **kwargs, **config.all_kwargs())

        with (
            mock.patch.object(JITFunction, "run", run),
            mock.patch.object(Autotuner, "run", autotuned_run),
            mock.patch("kernels._dispatch.interpreting", lambda: True),
        ):
            yield self

    def run_cases(self, cases: Iterable[tuple[str, Callable[[], None]]]) -> None:
        with self.intercepting():
            for name, case in cases:
                self.current = name
                self.case_names.append(name)
                case()


# -------------------------------------------------------------------------------------------------- cases

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _empty(shape, dtype, grad: bool = False, channels_last: bool = False) -> torch.Tensor:
    # Values do not matter: nothing runs. Strides do, and the allocator aligns like CUDA's (>= 16 bytes).
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, memory_format=fmt).requires_grad_(grad)


def ssim_case(shape, dtype=torch.float32, *, window=11, grad="student", nonnegative=False, per_sample=False):
    """``ssim_cosine_loss`` (or per-sample ``ssim``) forward, then backward into the student, or into both
    inputs when ``grad="both"``."""

    def run() -> None:
        x = _empty(shape, dtype, grad in ("student", "both"))
        y = _empty(shape, dtype, grad == "both")
        kw = dict(window_size=window, nonnegative=nonnegative, impl="triton")
        out = kernels.ssim(x, y, **kw).sum() if per_sample else kernels.ssim_cosine_loss(x, y, **kw)
        out.backward()

    return run


def attention_kl_case(shape, dtype=torch.bfloat16, *, d_t=None, direction="student_teacher", grad="student"):
    """``attention_kl`` forward and backward; ``d_t`` gives the teacher its own head dim."""
    b, h, n, d = shape

    def run() -> None:
        student = [_empty((b, h, n, d), dtype, grad in ("student", "both")) for _ in range(2)]
        teacher = [_empty((b, h, n, d_t or d), dtype, grad == "both") for _ in range(2)]
        kernels.attention_kl(*student, *teacher, direction=direction, impl="triton").backward()

    return run


def attention_map_case(
    shape, size, dtype=torch.float32, *, grad=True, channels_last=False, p=2, normalize=True
):
    """``attention_map`` forward, and backward when the features require grad."""

    def run() -> None:
        features = _empty(shape, dtype, grad, channels_last)
        out = kernels.attention_map(features, size, p=p, normalize=normalize, impl="triton")
        if grad:
            out.sum().backward()

    return run


def resize_case(shape, size, dtype=torch.float32, *, grad=True, channels_last=False):
    """``resize`` forward, and backward when the maps require grad."""

    def run() -> None:
        maps = _empty(shape, dtype, grad, channels_last)
        out = kernels.resize(maps, size, impl="triton")
        if grad:
            out.float().sum().backward()

    return run


def _shape(s: tuple[int, ...]) -> str:
    return "x".join(map(str, s))


def benchmark_cases() -> list[tuple[str, Callable[[], None]]]:
    """What ``bench/test_kernels_*.py`` times (the student requires grad, the teacher does not)."""
    cases = [(f"bench ssim {_shape(s)}", ssim_case(s)) for s in shapes.SSIM]
    cases += [(f"bench attention_kl {_shape(s)} bf16", attention_kl_case(s)) for s in shapes.ATTENTION_KL]
    for dtype in (torch.float32, torch.bfloat16):
        for b, c, hw in shapes.ATTENTION_MAP:
            shape = (b, c, hw, hw)
            name = f"bench attention_map {_shape(shape)} {DTYPE_NAMES[dtype]}"
            cases.append((name, attention_map_case(shape, shapes.ATTENTION_MAP_SIZE, dtype)))
    return cases


# What training feeds the kernels (batch 128, bf16 autocast and channels_last on a GPU), and the other grad
# modes and dtypes of the public API.
TRAINING: list[tuple[str, Callable[[], None]]] = [
    # AGKD paper pair: EfficientNet-B0 blocks.4 and VGG19 features.35 (cast to fp32, channels_last) to the
    # 14x14 grid, the ViT-B/16 CLS map resized to it, the hybrid loss (window 3) on the fp32 maps.
    ("agkd student map", attention_map_case((128, 112, 14, 14), (14, 14), channels_last=True)),
    ("agkd teacher map", attention_map_case((128, 512, 14, 14), (14, 14), grad=False, channels_last=True)),
    ("agkd ViT CLS map", resize_case((128, 1, 14, 14), (14, 14), grad=False)),
    ("agkd hybrid loss", ssim_case((128, 1, 14, 14), window=3)),
    ("agkd hybrid loss, concat", ssim_case((128, 2, 14, 14), window=3)),
    ("agkd ssim metric", ssim_case((128, 1, 14, 14), window=3, per_sample=True)),
    # The embedded default (digits, 32x32): 8x8 maps, a 4x4 ViT patch grid resized to 8x8.
    ("default student map", attention_map_case((64, 64, 8, 8), (8, 8))),
    ("default ViT CLS map", resize_case((64, 1, 4, 4), (8, 8), grad=False)),
    ("default hybrid loss", ssim_case((64, 1, 8, 8), window=3)),
    # MTD: ViT-B/16 CAD/VR both directions and both sides; the digits pair (D_s = 24 != D_t = 32, N = 17).
    ("mtd ViT-B fp32", attention_kl_case((64, 12, 197, 64), torch.float32)),
    ("mtd ViT-B fp16", attention_kl_case((64, 12, 197, 64), torch.float16)),
    ("mtd ViT-B teacher_student", attention_kl_case((64, 12, 197, 64), direction="teacher_student")),
    ("mtd ViT-B both sides", attention_kl_case((64, 12, 197, 64), grad="both")),
    ("mtd digits D24/D32 bf16", attention_kl_case((32, 4, 17, 24), d_t=32)),
    ("mtd CLS map", resize_case((32, 1, 4, 4), (8, 8))),
    # CAKD resizes the bf16 student feature (channels_last) and takes its attention map without a cast.
    ("cakd resize", resize_case((128, 112, 14, 14), (7, 7), torch.bfloat16, channels_last=True)),
    ("cakd student map", attention_map_case((128, 112, 14, 14), (7, 7), torch.bfloat16, channels_last=True)),
    # The rest of the API: other dtypes, both sides, nonnegative, large (tiled) planes, p != 2, no norm.
    ("api ssim fp16 both", ssim_case((128, 1, 14, 14), torch.float16, grad="both")),
    ("api ssim bf16 both", ssim_case((128, 1, 14, 14), torch.bfloat16, grad="both")),
    ("api ssim nonnegative both", ssim_case((128, 1, 14, 14), grad="both", nonnegative=True)),
    # Rows longer than 64 are walked in 32-row tiles with a halo; the 20 columns stay whole.
    ("api ssim tiled rows", ssim_case((8, 1, 70, 20), grad="both")),
    ("api attention_map p=3", attention_map_case((8, 32, 14, 14), (7, 7), p=3)),
    ("api attention_map no norm", attention_map_case((8, 32, 14, 14), (28, 28), normalize=False)),
    ("api resize fp16", resize_case((8, 4, 14, 14), (28, 28), torch.float16)),
    # The most channels the Triton path takes (kernels/ssim.py MAX_CHANNELS): the reductions' widest tile.
    ("api ssim 4096 channels", ssim_case((2, 4096, 14, 14), grad="both")),
    # A bf16 student of head dim 64 against an fp32 teacher of 128: the pruning's heaviest-operand rule.
    ("mtd bf16 D64 / fp32 D128", attention_kl_case((8, 12, 197, 64), torch.bfloat16, d_t=128)),
]

# Attention shapes (B, H, N, D) of the transformers kdfast distills: DeiT-S and DeiT-B (N = 198, class and
# distillation tokens), ViT-B/16 and ViT-L/16 at 224 (N = 197), and the head dims 32, 80, 96 and 128 at
# ViT-B's sequence. Each in every dtype and grad mode, so that every config the autotuner may pick for them
# is compiled (80, 96 and 128 share one padded tile, 128; N = 197 and 198 one specialization).
ATTENTION_MODELS = {
    "DeiT-S": (64, 6, 198, 64),
    "DeiT-B": (64, 12, 198, 64),
    "ViT-B/16": (64, 12, 197, 64),
    "ViT-L/16": (32, 16, 197, 64),
    **{f"head dim {d}": (64, 12, 197, d) for d in (32, 80, 96, 128)},
}
GRAD_MODES = {
    "student": ("student", "student_teacher"),
    "both": ("both", "student_teacher"),
    "teacher_student": ("student", "teacher_student"),
}


def attention_matrix() -> list[tuple[str, Callable[[], None]]]:
    return [
        (
            f"{model} {DTYPE_NAMES[dtype]} {mode}",
            attention_kl_case(shape, dtype, grad=grad, direction=direction),
        )
        for model, shape in ATTENTION_MODELS.items()
        for dtype in DTYPE_NAMES
        for mode, (grad, direction) in GRAD_MODES.items()
    ]


def all_cases() -> list[tuple[str, Callable[[], None]]]:
    return benchmark_cases() + TRAINING + attention_matrix()


# -------------------------------------------------------------------------------------------------- compile

PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class Compiled:
    """One specialization compiled for one target (``error`` set when it did not compile)."""

    arch: int
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    tensor_cores: str = "-"
    seconds: float = 0.0
    error: str | None = None

    def ctas_per_sm(self, num_warps: int) -> int:
        """Resident blocks per SM allowed by registers, shared memory, threads and the block limit."""
        threads = 32 * num_warps
        per_warp = -(-self.registers * 32 // 256) * 256  # registers are allocated per warp in units of 256
        by_regs = (REGISTERS_PER_SM // per_warp) // num_warps if per_warp else BLOCKS_PER_SM
        by_smem = SHARED_PER_SM[self.arch] // (self.shared + SHARED_RESERVED_PER_BLOCK)
        return min(by_regs, by_smem, THREADS_PER_SM // threads, BLOCKS_PER_SM)


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """``triton.compile`` for ``sm_<arch>``, with the ptxas log captured for registers and spills."""
    result = Compiled(arch=arch)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                launch.source(), target=GPUTarget("cuda", arch, 32), options=dict(launch.options)
            )
    except Exception as exc:  # the report names every failure; one bad kernel must not hide the others
        message = str(exc).strip().splitlines()
        result.error = f"{type(exc).__name__}: {message[-1] if message else ''}"[:400]
        return result
    result.seconds = time.perf_counter() - start
    text = log.getvalue()
    if match := PTXAS_REGISTERS.search(text):
        result.registers = int(match[1])
    if match := PTXAS_SPILLS.search(text):
        result.stack, result.spill_stores, result.spill_loads = map(int, match.groups())
    result.shared = int(kernel.metadata.shared)
    ptx = kernel.asm["ptx"]
    result.tensor_cores = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "-"
    return result


# Relative compile cost per tile element, for scheduling only: SSIM's banded tf32x3 dots unroll into far
# more code than the other kernels (its 64 x 64 tiles take minutes for ptxas, the others seconds).
COST_WEIGHT = {"_ssim_bwd_kernel": 16, "_ssim_fwd_kernel": 8}


def _cost(job: tuple[Launch, int]) -> float:
    """A guess at how long a job compiles, so the longest start first and no worker idles at the end."""
    launch, arch = job
    consts = launch.named_constexprs()
    tile = 1
    for pair in (("BI_H", "BI_W"), ("BLOCK_M", "BLOCK_N"), ("BLOCK_C", "BLOCK_HW")):
        if all(isinstance(consts.get(k), int) for k in pair):
            tile = consts[pair[0]] * consts[pair[1]]
            break
    return COST_WEIGHT.get(launch.kernel, 1) * tile * (2 if arch == 80 else 1)


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    triton.knobs.nvidia.dump_ptxas_log = True


def compile_all(
    launches: list[Launch], archs: list[int], workers: int, progress: bool = True
) -> dict[tuple[Launch, int], Compiled]:
    """Every (specialization, target) in ``workers`` processes, with a private Triton cache so ptxas runs."""
    jobs = sorted(((launch, arch) for launch in launches for arch in archs), key=_cost, reverse=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="kdfast-triton-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init) as pool:
            futures = {pool.submit(compile_launch, *job): job for job in jobs}
            bar = tqdm(as_completed(futures), total=len(jobs), unit="kernel", disable=not progress)
            for future in bar:
                results[futures[future]] = future.result()
    return results


# ---------------------------------------------------------------------------------------------- the checks


def problems(results: dict[tuple[Launch, int], Compiled], capture: Capture) -> list[str]:
    """One line per compile error, shared-memory overflow and spill over budget."""
    found = []
    for (launch, arch), r in sorted(results.items()):
        where = f"{launch.kernel} sm_{arch} [{launch.describe()}] ({capture.cases[launch][0]})"
        if r.error:
            found.append(f"{where}: does not compile: {r.error}")
            continue
        if r.shared > SHARED_PER_BLOCK[arch]:
            found.append(f"{where}: {r.shared} B shared memory > {SHARED_PER_BLOCK[arch]} B per block")
        budget = spill_budget(launch, arch)
        if r.spill_stores > budget:
            found.append(f"{where}: spills {r.spill_stores} B per thread (budget {budget} B)")
    for launch, grid in sorted(capture.grids.items()):
        for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS, strict=False)):
            if size > limit:
                where = f"{launch.kernel} [{launch.describe()}] ({capture.cases[launch][0]})"
                found.append(f"{where}: {size} programs along grid axis {'xyz'[axis]} > {limit}")
    return found


def coverage(report_text: str) -> set[tuple[str, str, str]]:
    """(kernel, dtypes; constexprs, warps/stages) of every row of a report's "Every specialization" table."""
    rows = report_text.split("## Every specialization", 1)[-1].splitlines()
    cells = [row.split(" | ") for row in rows if row.startswith("| `")]
    return {(c[0].strip("| `"), c[1], c[2]) for c in cells}


# ---------------------------------------------------------------------------------------------- the report


def _options(launch: Launch) -> str:
    opts = dict(launch.options)
    return f"{opts.get('num_warps', 4)}/{opts.get('num_stages', 3)}"


def report(results: dict[tuple[Launch, int], Compiled], capture: Capture, archs: list[int], found) -> str:
    """Markdown: the limits, one summary row per kernel, then every specialization with both targets."""
    launches = sorted(capture.cases)
    kernel_names = list(dict.fromkeys(launch.kernel for launch in launches))
    lines = [
        "# Triton kernel resources: every launch compiled for the target GPUs",
        "",
        f"Generated by `{COMMAND}` (no GPU needed) under Triton {triton.__version__}; do not edit by hand."
        f" {len(capture.cases)} distinct specializations per target,"
        f" captured from {capture.launches} launches of {len(capture.case_names)} cases (the shapes in"
        " `bench/shapes.py` and `TRAINING` in the script, forward and backward; autotuned kernels count every"
        " config).",
        "",
        "Limits checked (CUDA C++ Programming Guide, technical specifications per compute capability):"
        f" shared memory per block {SHARED_PER_BLOCK[80]} B on sm_80, {SHARED_PER_BLOCK[90]} B on sm_90;"
        " spill stores 0 B per thread unless a budget below allows more (under Triton"
        f" {TRITON}); grids within CUDA's 2^31 - 1 x 65535 x 65535. Registers are per thread"
        " (ptxas -v); CTAs/SM is the resident-block bound from registers, shared memory and threads; MMA is"
        " `mma` (mma.sync, tensor cores on sm_80 and sm_90), `wgmma` (Hopper warpgroup MMA) or `-` (none).",
        "",
    ]
    target_names = " / ".join(f"sm_{a}" for a in archs)
    if found:
        lines += ["## Problems", ""] + [f"- {p}" for p in found] + [""]
    lines += [
        "## Per kernel",
        "",
        f"Each pair of figures is {target_names}.",
        "",
        "| kernel | specializations | registers (max) | spill stores (max B) | shared (max B) | MMA |",
        "| --- | ---: | --- | --- | --- | --- |",
    ]
    for name in kernel_names:
        mine = [launch for launch in launches if launch.kernel == name]
        cols = []
        for attr in ("registers", "spill_stores", "shared"):
            cols.append(
                " / ".join(str(max(getattr(results[launch, a], attr) for launch in mine)) for a in archs)
            )
        mma = " / ".join(
            ",".join(sorted({results[launch, a].tensor_cores for launch in mine})) for a in archs
        )
        lines.append(f"| `{name}` | {len(mine)} | {' | '.join(cols)} | {mma} |")
    lines += [
        "",
        "## Spill budgets",
        "",
        "A specialization may spill only what a budget of its kernel grants (spill stores per thread).",
        "",
        f"| kernel | applies to | budget (B, {target_names}) | measured max (B) | reason |",
        "| --- | --- | --- | --- | --- |",
    ]
    for budget in SPILL_BUDGETS:
        covered = [
            launch
            for launch in launches
            if launch.kernel == budget.kernel and budget.applies(launch.named_constexprs())
        ]
        measured = " / ".join(
            str(max((results[launch, a].spill_stores for launch in covered), default=0)) for a in archs
        )
        granted = " / ".join(str(budget.bytes.get(TRITON, {}).get(a, 0)) for a in archs)
        lines.append(f"| `{budget.kernel}` | {budget.when} | {granted} | {measured} | {budget.reason} |")
    lines += [
        "",
        "## Every specialization",
        "",
        "| kernel | dtypes; constexprs | warps/stages | registers | spill stores (B) | shared (B) | CTAs/SM"
        " | MMA | largest grid | used by |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | ---: | --- |",
    ]
    for launch in launches:
        warps = dict(launch.options).get("num_warps", 4)
        rs = [results[launch, a] for a in archs]
        if any(r.error for r in rs):
            cells = ["error"] * 5
        else:
            cells = [
                " / ".join(str(r.registers) for r in rs),
                " / ".join(str(r.spill_stores) for r in rs),
                " / ".join(str(r.shared) for r in rs),
                " / ".join(str(r.ctas_per_sm(warps)) for r in rs),
                " / ".join(r.tensor_cores for r in rs),
            ]
        used = capture.cases[launch]
        used_by = "; ".join(used[:3]) + (f"; +{len(used) - 3} more" if len(used) > 3 else "")
        lines.append(
            f"| `{launch.kernel}` | {launch.describe()} | {_options(launch)} | "
            + " | ".join(cells)
            + f" | {capture.programs[launch]} | {used_by} |"
        )
    return "\n".join(lines) + "\n"


def to_json(
    results: dict[tuple[Launch, int], Compiled], capture: Capture, found: list[str], wall: float
) -> dict:
    return {
        "triton": triton.__version__,
        "launches": capture.launches,
        "specializations": len(capture.cases),
        "wall_s": round(wall, 1),
        "problems": found,
        "results": [
            {
                "kernel": launch.kernel,
                "spec": launch.describe(),
                "options": dict(launch.options),
                "cases": capture.cases[launch],
                "programs": capture.programs[launch],
                **asdict(r),
            }
            for (launch, _), r in sorted(results.items())
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None,
        help="the Markdown report (default: this Triton version's in bench/; with --check: none)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write every result as JSON here")
    parser.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--targets", type=int, nargs="+", default=sorted(TARGETS), choices=sorted(TARGETS))
    parser.add_argument(
        "--check",
        action="store_true",
        help="also fail when the committed report covers other specializations",
    )
    args = parser.parse_args(argv)
    if args.workers < 1:
        print("error: --workers must be >= 1", file=sys.stderr)
        return 2
    start = time.perf_counter()
    capture = Capture()
    capture.run_cases(all_cases())
    launches = sorted(capture.cases)
    print(
        f"captured {capture.launches} launches: {len(launches)} specializations x {len(args.targets)} targets"
    )
    results = compile_all(launches, args.targets, args.workers)
    found = problems(results, capture)
    wall = time.perf_counter() - start
    text = report(results, capture, args.targets, found)
    out = args.out or (None if args.check else report_path())
    if out is not None:
        atomic_write(out, text)
    if args.json:
        atomic_write(args.json, json.dumps(to_json(results, capture, found, wall), indent=1))
    if args.check:
        found += stale(report_path(), text)
    for line in found:
        print(f"problem: {line}", file=sys.stderr)
    print(
        f"Triton {triton.__version__}: {len(launches)} specializations per target, {len(found)} problems,"
        f" {wall:.0f} s" + (f"; wrote {out}" if out else "")
    )
    return 1 if found else 0


def stale(committed: Path, fresh: str) -> list[str]:
    """One line when the committed report does not cover exactly the specializations of ``fresh``."""
    regenerate = f"regenerate it with `{COMMAND}` under Triton {TRITON}"
    if not committed.exists():
        return [f"{committed.name} is missing: {regenerate}"]
    now, then = coverage(fresh), coverage(committed.read_text())
    if now == then:
        return []
    return [
        f"{committed.name} is out of date: {len(now - then)} specializations launched today are not in it,"
        f" {len(then - now)} in it are no longer launched; {regenerate}"
    ]


if __name__ == "__main__":
    sys.exit(main())
