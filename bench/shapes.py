"""The shapes the kernel benchmarks time: one table, read by the benchmarks (``bench/test_kernels_*.py``), by
the compile harness (``bench/compile_targets.py``, which compiles every launch they make for sm_80 and
sm_90 beside the ones training makes) and by ``bench/gpu.sh`` (the headline subset).

``KDFAST_BENCH_HEADLINE=1`` narrows the benchmarks to the headline shapes (``bench/gpu.sh``).
``KDFAST_BENCH_DRY=1`` (``bash bench/gpu.sh --dry-run``) swaps every shape for a tiny one of the same
structure, so the benchmark code runs on CPU under the Triton interpreter in seconds.
"""

from __future__ import annotations

import os


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


DRY_RUN = _flag("KDFAST_BENCH_DRY")
HEADLINE = _flag("KDFAST_BENCH_HEADLINE")

# Hybrid SSIM + cosine loss, (B, C, H, W): attention maps of one channel from 7x7 to 56x56 at batch 128, and
# a 16-channel batch of 256 (AGKD "concat" of many teacher maps). Window 11, the pytorch-msssim default.
SSIM = [(128, 1, 7, 7), (128, 1, 14, 14), (128, 1, 28, 28), (128, 1, 56, 56), (256, 16, 56, 56)]
SSIM_HEADLINE = [(128, 1, 14, 14)]
SSIM_DRY = [(2, 1, 9, 9)]

# Attention KL, (B, H, N, D): ViT-B/16 at 224 (N=197), 384 (577), a 1024-token sequence, and a long one.
ATTENTION_KL = [(64, 12, 197, 64), (64, 12, 577, 64), (64, 12, 1024, 64), (8, 12, 4096, 64)]
ATTENTION_KL_HEADLINE = [(64, 12, 197, 64), (64, 12, 1024, 64), (8, 12, 4096, 64)]
ATTENTION_KL_DRY = [(1, 2, 19, 16)]

# Attention maps, (B, C, H = W): EfficientNet-B0 stages at batch 128, resized to the 14x14 teacher grid.
ATTENTION_MAP = [(128, 112, 56), (128, 320, 28), (128, 1280, 14)]
ATTENTION_MAP_HEADLINE = [(128, 112, 56), (128, 1280, 14)]
ATTENTION_MAP_DRY = [(2, 5, 9)]
ATTENTION_MAP_SIZE = (4, 4) if DRY_RUN else (14, 14)


# The AGKD paper pair's batch in the training-step benchmark (bench/test_train_step.py): 128 as in the paper;
# bench/gpu.sh's compiled step sets KDFAST_BENCH_PAPER_BATCH=32 to keep Inductor's compile inside its slot.
PAPER_PAIR_BATCH = int(os.environ.get("KDFAST_BENCH_PAPER_BATCH", "128"))

# torch.compile of the reference is a baseline in every run but the headline one (bench/gpu.sh), which keeps
# it where a target names it (the hybrid loss): each compile costs tens of seconds of an 8-minute budget.
COMPILED_BASELINE_EVERYWHERE = DRY_RUN or not HEADLINE


def pick(full: list, headline: list, dry: list) -> list:
    """The shapes this run benchmarks: tiny ones in a dry run, the headline ones for gpu.sh, else all."""
    if DRY_RUN:
        return dry
    return headline if HEADLINE else full
