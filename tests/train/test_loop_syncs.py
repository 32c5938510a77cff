"""The training loop reads values back from the device at most once per ``runtime.log_every`` steps plus twice
at the end of an epoch (its loss sums, and validation), with the teacher run live or read from the cache.

A host sync is any call that makes the host wait for a device value: ``Tensor.item``, ``tolist``, ``cpu``,
``numpy``, ``float()``, ``int()``, ``bool()`` of a tensor, ``torch.cuda.synchronize``. On a CPU every tensor
is on the host, so the count leaves out what is host data on a GPU too: the batches the DataLoader returns and
what it computes (its sampler), and the optimizer's step counters, which ``torch.optim`` keeps on the CPU (on
CUDA the fused optimizer keeps them on the device)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from support.runs import TINY
from torch.utils.data import dataloader

import kdfast.train.loop as loop
from kdfast.config import load_config

STEPS, LOG_EVERY, EPOCHS = 8, 4, 2  # 64 training images in batches of 8


class SyncCounter:
    """Counts host syncs while ``active``, except inside the DataLoader, inside ``Optimizer.step`` and on the
    tensors the DataLoader returned."""

    METHODS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active, self.count, self.host_side = False, 0, 0
        self.loaded: set[int] = set()
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.cuda, "synchronize", self._counted(torch.cuda.synchronize))
        next_batch = dataloader._BaseDataLoaderIter.__next__

        def keep_batch(iterator):
            batch = next_batch(iterator)
            self.loaded.update(t.untyped_storage().data_ptr() for t in batch if isinstance(t, torch.Tensor))
            return batch

        monkeypatch.setattr(dataloader._BaseDataLoaderIter, "__next__", self._host(keep_batch))
        monkeypatch.setattr(dataloader.DataLoader, "__iter__", self._host(dataloader.DataLoader.__iter__))
        monkeypatch.setattr(torch.optim.Optimizer, "step", self._host(torch.optim.Optimizer.step))
        for cls in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD):
            monkeypatch.setattr(cls, "step", self._host(cls.step))

    def _counted(self, original):
        def call(*args, **kwargs):
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            loaded = tensor is not None and tensor.untyped_storage().data_ptr() in self.loaded
            if self.active and not self.host_side and not loaded:
                self.count += 1
            return original(*args, **kwargs)

        return call

    def _host(self, original):
        def call(*args, **kwargs):
            self.host_side += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.host_side -= 1

        return call


@pytest.mark.slow
@pytest.mark.parametrize("teacher_cache", ["false", "true"])
def test_host_syncs_per_epoch_are_at_most_one_per_log_every_steps_plus_two(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, teacher_cache: str
) -> None:
    monkeypatch.setenv("KDFAST_CACHE_DIR", str(tmp_path / "cache"))
    counter = SyncCounter(monkeypatch)
    per_epoch: list[int] = []
    train_stage, validate_model = loop.train_stage, loop.validate_model

    def distill_only(stage, *args, **kwargs):
        counter.active = stage == "distill"
        try:
            return train_stage(stage, *args, **kwargs)
        finally:
            counter.active = False

    def validation_ends_the_epoch(*args, **kwargs):
        metrics = validate_model(*args, **kwargs)
        if counter.active:
            per_epoch.append(counter.count - sum(per_epoch))
        return metrics

    monkeypatch.setattr(loop, "train_stage", distill_only)
    monkeypatch.setattr(loop, "validate_model", validation_ends_the_epoch)
    cfg = load_config(
        None,
        [
            *TINY,
            "data.batch_size=8",
            f"runtime.log_every={LOG_EVERY}",
            "teacher.train.epochs=0",
            "baseline=false",
            f"student.train.epochs={EPOCHS}",
            "runtime.threads=1",
            "runtime.compile=false",
            f"runtime.teacher_cache={teacher_cache}",
        ],
    )
    cfg.out = str(tmp_path / "run")
    results = loop.run_training(cfg, resume=False)
    assert results["runtime"]["teacher_cache"]["mode"] == ("replay" if teacher_cache == "true" else "off")
    bound = math.ceil(STEPS / LOG_EVERY) + 2
    assert len(per_epoch) == EPOCHS
    # every epoch reads back at each log_every-th step and at its end: the bound is met, and reached
    assert per_epoch == [bound] * EPOCHS, per_epoch
