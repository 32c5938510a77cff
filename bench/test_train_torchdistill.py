"""kdfast against torchdistill (Matsubara 2021) on the same KD recipe and models, side by side in one process.

The recipe is ``configs/kd_digits.yaml``'s: 0.1 CE + 0.9 tau^2 KL(p_T || p_S) at tau = 4 (Hinton et al. 2015),
AdamW (lr 3e-3, weight decay 0.01), gradient clipping at 5, the embedded default pair (hybrid_teacher_small ->
edge_cnn) at batch 64 on one batch of real digits images (``bench/step_cases.py``). torchdistill runs it
through its ``DistillationBox`` with its own ``KDLoss`` inside a ``WeightedSumLoss`` (``forward_process``: the
teacher under ``no_grad``, then the student and the loss; ``post_forward_process``: backward, clipping, the
optimizer step); kdfast eager (the teacher under ``inference_mode``), compiled (teacher and student compiled
apart), and reading the teacher's logits from its teacher-output cache, eager and compiled, each with the
student laid out as a run lays it out (channels_last for edge_cnn on a CPU, ``bench/step_cases.py``; one eager
row keeps it NCHW as torchdistill gets it). Before timing, one step of each on the same weights and dropout
draws must give the same loss: both run one recipe. Every round runs each case once
(``bench/alternating.py``); the ratios are torchdistill's time over each case's, per round. CPU: torch pinned
to 1 thread; CUDA (``*_cuda``) when there is a GPU.

torchdistill is an optional bench dependency, installed without touching torch: ``pip install --no-deps
torchdistill`` (its other requirements, numpy, PyYAML and scipy, are kdfast's already; cython is needed only
by parts this case does not import). Without it the cases skip with that line.
"""

from __future__ import annotations

import copy

import pytest
import torch
from alternating import alternate, pin_threads, table
from step_cases import BATCH, GRAD_CLIP, SIZE, DefaultPair

from kdfast.train import distill_step

torchdistill = pytest.importorskip(
    "torchdistill", reason="torchdistill is not installed: pip install --no-deps torchdistill"
)
from torchdistill.core.distillation import DistillationBox  # noqa: E402

KD = {"temperature": 4.0, "alpha": 0.1}  # kd_digits: loss.ce 0.1, loss.kd {weight: 0.9, temperature: 4}


def _box(pair: DefaultPair) -> tuple[DistillationBox, torch.nn.Module]:
    """torchdistill's DistillationBox over a fresh copy of the student, configured as its sample configs
    configure KD; returns the box and that student."""
    student = copy.deepcopy(pair.student)
    kd_loss = {
        "key": "KDLoss",
        "kwargs": {
            "student_module_path": ".",
            "student_module_io": "output",
            "teacher_module_path": ".",
            "teacher_module_io": "output",
            "reduction": "batchmean",
            **KD,
        },
    }
    train_config = {
        "num_epochs": 1,
        "teacher": {"forward_proc": "forward_batch_only", "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only"},
        "criterion": {
            "key": "WeightedSumLoss",
            "kwargs": {"sub_terms": {"kd": {"criterion": kd_loss, "weight": 1.0}}},
        },
        "optimizer": {
            "key": "AdamW",
            "kwargs": {"lr": 3e-3, "weight_decay": 0.01},
            "max_grad_norm": GRAD_CLIP,
        },
    }
    box = DistillationBox(pair.teacher, student, {}, train_config, pair.device, None, False, 1)
    box.pre_epoch_process(epoch=0)
    return box, student


def _same_recipe(pair: DefaultPair) -> None:
    """torchdistill's first loss equals kdfast's on the same weights, batch and dropout draws."""
    box, _ = _box(pair)
    _, student_taps, teacher_taps, loss_fn = pair.distill_parts("kd", layout="NCHW")
    torch.manual_seed(1)
    theirs = box.forward_process(pair.images, pair.labels)
    torch.manual_seed(1)
    ours, _ = distill_step(student_taps, teacher_taps, loss_fn)(pair.images, pair.labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _cases(pair: DefaultPair) -> dict:
    box, _ = _box(pair)

    def torchdistill_step() -> None:
        box.post_forward_process(box.forward_process(pair.images, pair.labels))

    return {
        "torchdistill DistillationBox": torchdistill_step,
        "kdfast eager, NCHW student": pair.distill("kd", cached=False, layout="NCHW"),
        "kdfast eager": pair.distill("kd", cached=False),
        "kdfast compiled": pair.distill("kd", cached=False, compile=True),
        "kdfast cached": pair.distill("kd", cached=True),
        "kdfast cached compiled": pair.distill("kd", cached=True, compile=True),
    }


def _compare(benchmark, pair: DefaultPair, device: str) -> None:
    _same_recipe(pair)
    results = alternate(
        benchmark,
        _cases(pair),
        baseline="torchdistill DistillationBox",
        images=BATCH,
        warmup=3,
        group=f"kd vs torchdistill {device}",
        case=f"KD B{BATCH} 3x{SIZE}x{SIZE} fp32",
        torchdistill=torchdistill.__version__,
    )
    print("\n" + table(results))


def test_kd_step_vs_torchdistill_cpu(benchmark, tmp_path) -> None:
    """Targets: kdfast >= 1.5x torchdistill without the cache, >= 2x with it."""
    pin_threads()
    _compare(benchmark, DefaultPair(tmp_path, torch.device("cpu")), "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kd_step_vs_torchdistill_cuda(benchmark, tmp_path) -> None:
    _compare(benchmark, DefaultPair(tmp_path, torch.device("cuda")), "cuda")
