"""Validation: top-1 / top-5 accuracy and cross-entropy, summed over DDP ranks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from kdfast.distributed import DistInfo, all_reduce_sum


def topk_correct(
    logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> list[torch.Tensor]:
    """How many samples have their label among the ``k`` largest logits, for each ``k`` (capped at the
    number of classes, so top-5 of a 3-class problem is top-3)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels[:, None]
    return [hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    dist: DistInfo | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1, top-5 (percent) and mean cross-entropy of ``forward(images) -> logits`` over ``batches``.

    Each rank sees its own shard; counts and loss sums are all-reduced so every rank returns the metrics
    of the whole validation set.
    """
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum, count
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    )
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = forward(images)
        logits = logits.float()
        top1, top5 = topk_correct(logits, labels)
        sums += torch.stack(
            [
                top1.double(),
                top5.double(),
                F.cross_entropy(logits, labels, reduction="sum").double(),
                torch.tensor(float(labels.numel()), dtype=torch.float64, device=device),
            ]
        )
    all_reduce_sum(sums, dist or DistInfo())
    top1, top5, loss, count = sums.tolist()
    count = max(count, 1.0)
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "loss": loss / count}
