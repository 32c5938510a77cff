"""Host time of each kernel op, forward and forward+backward, with the GPU work stubbed out: what the Python
launch path costs per call, side by side with the eager reference's host time, on any machine (no GPU).

    python -m pytest bench/test_host_time.py --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

What is stubbed, exactly. Both sides run on tiny CPU tensors of the benchmark shapes' structure (same rank,
dtype, window and grad mode; batch, channels and tokens cut down), so every aten op costs its dispatch,
allocation and autograd bookkeeping plus a few microseconds of arithmetic at most. Triton's launch runs for
real down to the driver call: ``JITFunction.run`` is replaced by :func:`stubbed_run`, which does what Triton
3.x does per launch once the kernel is compiled (bind and specialize every argument with Triton's own
generated binder for a CUDA backend, compute the cache key, look the kernel up, evaluate the grid) and skips
only the compile and the C launcher (``CompiledKernel.run``; on a GPU that is one ``cuLaunchKernel``, a few
microseconds). Autotuned kernels go through the real ``Autotuner.run``; its first call takes the first config
instead of benchmarking, every later call is the cache hit a warm training run sees. The driver's
current-device and current-stream queries are skipped. The kernels' outputs are left as allocated.

"The eager reference's host time" is the reference (``kernels.*_reference``, and pytorch-msssim +
``F.cosine_similarity`` for the hybrid loss) run on the same tiny CPU tensors: each aten op dispatched,
allocated and recorded for autograd, with next to no arithmetic. (``meta`` tensors would remove even that, but
many meta kernels are Python decompositions, milliseconds per call: far slower than the C++ dispatch a CUDA
tensor takes.) On a GPU the reference also pays one kernel launch per op, which is not counted here.

Three Triton paths are timed: ``triton`` (the public function in eager: an ``autograd.Function`` around the
launchers), ``custom_op`` (the ``torch.library`` custom ops the public function takes under
``torch.compile``, called eagerly: what eager calls cost when they went through the dispatcher) and the
reference. A fourth row, ``floor``, is the least any op with its own backward costs under autograd: an
``autograd.Function`` whose forward only allocates an output of the Triton path's shape and whose backward
only allocates the input gradients (no check, no launch), called and reduced as the others are. A target
below the floor cannot be met by any launch path.

Targets: Triton host time per forward+backward at most 1/8 of the eager reference's for
the hybrid loss and the attention map, under 100 us for attention KL.

Time is the process's CPU time (``time.process_time``, one intra-op thread): the development machine is
shared by other jobs, and wall time there counts the time the process waits for a core. Compare figures
within one run only (every group holds both sides).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

import kernels
from kernels._dispatch import interpreting

pytestmark = pytest.mark.skipif(
    interpreting(), reason="TRITON_INTERPRET is set: the interpreter replaces the launch path measured here"
)
DEVICE = "cpu"
_BACKEND = functools.cache(lambda: make_backend(GPUTarget("cuda", 90, 32)))
_STUBS: dict[int, tuple[Callable, dict, dict]] = {}


def stubbed_run(self: JITFunction, *args, grid, warmup, **kwargs):
    """``JITFunction.run`` on a warm kernel cache, without the driver: Triton's binder (argument
    specialization for sm_90), the cache key, the cache lookup and the grid; no compile, no launch."""
    stub = _STUBS.get(id(self))
    if stub is None:
        binder = create_function_from_signature(self.signature, self.params, _BACKEND())
        stub = _STUBS[id(self)] = (binder, {}, {})
    binder, key_cache, compiled = stub
    kwargs["debug"] = kwargs.get("debug", self.debug)
    bound, specialization, options = binder(*args, **kwargs)
    key = compute_cache_key(key_cache, specialization, options)
    compiled.setdefault(key, self)
    if callable(grid):
        grid = grid(bound)
    return compiled[key]


@pytest.fixture
def stubbed_launches():
    def first_config(self, kwargs):
        return self.configs[:1]

    with (
        mock.patch.object(JITFunction, "run", stubbed_run),
        mock.patch.object(Autotuner, "prune_configs", first_config),
        # use_triton() accepts the CPU tensors as it would CUDA ones; nothing else reads this switch there.
        mock.patch("kernels._dispatch.interpreting", lambda: True),
    ):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)


def _msssim_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The hybrid loss as one would write it with pytorch-msssim (bench/test_kernels_ssim.py's baseline)."""
    pytorch_msssim = pytest.importorskip("pytorch_msssim", reason="pytorch-msssim is not installed")
    l_ssim = 1 - pytorch_msssim.ssim(student, teacher, data_range=1.0, size_average=True)
    l_cos = 1 - F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1).mean()
    return 0.5 * l_ssim + 0.5 * l_cos


def _rand(*shape, dtype=torch.float32, grad=False) -> torch.Tensor:
    return (
        torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))).to(dtype).requires_grad_(grad)
    )


def _hybrid_inputs(grad: bool):
    # The headline's 14x14 maps and 11-tap window (every smoothing pass runs), 2 samples instead of 128.
    return _rand(2, 1, 14, 14, grad=grad), _rand(2, 1, 14, 14)


def _kl_inputs(grad: bool):
    # bf16, student with grad, teacher detached as in MTD; 2 heads of 16 tokens instead of 64 x 12 x 197.
    student = [_rand(1, 2, 16, 16, dtype=torch.bfloat16, grad=grad) for _ in "qk"]
    return *student, *(_rand(1, 2, 16, 16, dtype=torch.bfloat16) for _ in "qk")


def _map_inputs(grad: bool):
    # bf16 features on the 14x14 grid they are resized to (the resize runs); 8 channels instead of 1280.
    return (_rand(2, 8, 14, 14, dtype=torch.bfloat16, grad=grad),)


def _resize_inputs(grad: bool):
    return (_rand(2, 1, 14, 14, grad=grad),)


GRID = (14, 14)
# window_size, sigma, data_range, k1, k2, nonnegative: the public functions' defaults.
SSIM_PARAMS = (11, 1.5, 1.0, 0.01, 0.03, False)
# op -> (inputs(grad), {impl: fn}); each fn returns a scalar (a loss) or a map reduced to one by the caller.
OPS: dict[str, tuple[Callable, dict[str, Callable]]] = {
    "ssim_cosine_loss 14x14 fp32": (
        _hybrid_inputs,
        {
            "triton": lambda x, y: kernels.ssim_cosine_loss(x, y, impl="triton"),
            "custom_op": lambda x, y: torch.ops.kdfast.ssim(x, y, *SSIM_PARAMS, 0.5, 0.5)[0],
            "reference": kernels.ssim_cosine_loss_reference,
            "pytorch_msssim": _msssim_cosine,
        },
    ),
    "ssim 14x14 fp32": (
        _hybrid_inputs,
        {
            "triton": lambda x, y: kernels.ssim(x, y, impl="triton"),
            "custom_op": lambda x, y: torch.ops.kdfast.ssim(x, y, *SSIM_PARAMS, 0.0, 0.0)[1],
            "reference": kernels.ssim_reference,
        },
    ),
    "attention_kl bf16": (
        _kl_inputs,
        {
            "triton": lambda *x: kernels.attention_kl(*x, impl="triton"),
            "custom_op": lambda *x: torch.ops.kdfast.attention_kl(*x, 0.25, 0.25, True)[0],
            "reference": kernels.attention_kl_reference,
        },
    ),
    "attention_map 14x14 bf16": (
        _map_inputs,
        {
            "triton": lambda f: kernels.attention_map(f, GRID, impl="triton"),
            "custom_op": lambda f: torch.ops.kdfast.attention_map(f, *GRID, 2.0, True)[0],
            "reference": lambda f: kernels.attention_map_reference(f, GRID),
        },
    ),
    "resize 14x14->28x28 fp32": (
        _resize_inputs,
        {
            "triton": lambda m: kernels.resize(m, (28, 28), impl="triton"),
            "custom_op": lambda m: torch.ops.kdfast.resize(m, 28, 28),
            "reference": lambda m: kernels.resize_reference(m, (28, 28)),
        },
    ),
}


class _Floor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_shape, *inputs):
        ctx.shapes = [t.shape for t in inputs]
        return inputs[0].new_empty(out_shape, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        return None, *(grad.new_empty(shape) for shape in ctx.shapes)


for _make_inputs, _impls in OPS.values():
    _impls["floor"] = None  # built per case: the output shape is the Triton path's
CASES = [(op, impl) for op, (_, impls) in OPS.items() for impl in impls]


@pytest.mark.benchmark(timer=time.process_time)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize(("op", "impl"), CASES, ids=[f"{op.split()[0]}-{impl}" for op, impl in CASES])
def test_host_time(benchmark, stubbed_launches, op, impl, mode):
    make_inputs, impls = OPS[op]
    inputs = make_inputs(mode == "fwd+bwd")
    if impl == "floor":
        with torch.no_grad():
            out_shape = impls["triton"](*inputs).shape
        fn = functools.partial(_Floor.apply, out_shape)
    else:
        fn = impls[impl]
    leaves = [t for t in inputs if t.requires_grad]

    def forward():
        with torch.no_grad():
            return fn(*inputs)

    def forward_backward():
        for t in leaves:
            t.grad = None
        out = fn(*inputs)
        (out if out.dim() == 0 else out.sum()).backward()
        return out

    call = forward if mode == "fwd" else forward_backward
    for _ in range(20):  # warm: dispatcher caches, Triton's binder and key caches, the autotuner's pick
        call()
    benchmark.group = f"host time {mode}: {op}"
    benchmark.extra_info.update(impl=impl, mode=mode, case=op, device=DEVICE)
    benchmark.pedantic(call, rounds=200, iterations=5, warmup_rounds=2)
