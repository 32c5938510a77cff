"""kdfast.train.preflight and kdfast.train.rundir: the checks before a run writes, the probe that leaves no
trace, and where a new run goes when the output folder already holds one."""

from __future__ import annotations

import contextlib
import copy
import json
import random
import shutil

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torchvision.models import VisionTransformer

from kdfast.config import CONFIG_DIR, read_config_file
from kdfast.errors import CheckpointError, UsageError
from kdfast.train import main, preflight, rundir
from kdfast.train.loop import _changed_keys


def yaml_file(path) -> dict:
    return yaml.safe_load(path.read_text())


def _net() -> nn.Module:
    """Conv, BatchNorm and dropout: a training step changes parameters, running statistics and draws."""
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Flatten(),
        nn.Linear(8 * 36, 4),
    )
    net[5].bias.data.uniform_(-0.5, 0.5)
    return net


def _state(net: nn.Module) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_undone_restores_weights_buffers_grads_modes_and_every_generator() -> None:
    net = _net()
    net.eval()
    net[0].weight.grad = torch.full_like(net[0].weight, 0.25)
    before, grad = _state(net), net[0].weight.grad.clone()
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)

    with preflight.undone([net]):
        net.train()
        loss = F.cross_entropy(net(torch.randn(5, 3, 6, 6)), torch.tensor([0, 1, 2, 3, 0]))
        loss.backward()
        optimizer.step()
        random.random(), np.random.rand()
        assert not torch.equal(net[1].running_mean, before["1.running_mean"])  # the step did change things

    after = _state(net)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(net[0].weight.grad, grad) and net[5].weight.grad is None
    assert not any(m.training for m in net.modules())
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert np.array_equal(np.random.get_state()[1], rng[2])


def test_a_probe_step_leaves_the_next_training_step_bit_identical() -> None:
    images, labels = torch.randn(6, 3, 6, 6), torch.tensor([0, 1, 2, 3, 0, 1])

    def train_once(probe_first: bool) -> dict:
        net = _net()
        torch.manual_seed(11)
        step = lambda x, y: (F.cross_entropy(net(x), y), {})  # noqa: E731
        if probe_first:
            preflight.probe_step("teacher", step, [net], images, labels, contextlib.nullcontext)
        net.train()
        optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
        for _ in range(2):
            loss = step(images, labels)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return _state(net)

    plain, probed = train_once(False), train_once(True)
    assert all(torch.equal(plain[k], probed[k]) for k in plain)


def test_probe_failures_are_one_line_naming_the_stage_and_a_nan_loss() -> None:
    net = _net()
    images, labels = torch.randn(4, 3, 5, 5), torch.tensor([0, 1, 2, 3])  # 5x5 does not fit Linear(8 * 36)
    step = lambda x, y: (F.cross_entropy(net(x), y), {})  # noqa: E731
    with pytest.raises(
        UsageError, match=r"^the baseline stage fails on a probe batch of 4 training images: RuntimeError"
    ):
        preflight.probe_step("baseline", step, [net], images, labels, contextlib.nullcontext)
    nan_step = lambda x, y: (net(x).sum() * float("nan"), {})  # noqa: E731
    with pytest.raises(UsageError, match="loss is nan before any training: check data.mean and data.std"):
        preflight.probe_step(
            "teacher", nan_step, [net], torch.randn(4, 3, 6, 6), labels, contextlib.nullcontext
        )


def test_input_size_of_fixed_size_vits_is_checked_against_data_image_size() -> None:
    tv = VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=16)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    flexible = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, dynamic_img_size=True
    )
    assert preflight.built_input_size(tv) == (32, 32, "image_size")
    assert preflight.built_input_size(vit) == (32, 32, "img_size")
    assert preflight.built_input_size(flexible) is None and preflight.built_input_size(_net()) is None
    preflight.check_input_size(vit, 32, "student", "vit_tiny")
    with pytest.raises(
        UsageError,
        match=r"data.image_size=48 does not fit the student \(vit_tiny\), built for 32x32.*"
        r"student.arch.kwargs.img_size=48",
    ):
        preflight.check_input_size(vit, 48, "student", "vit_tiny")
    with pytest.raises(AssertionError):  # what the check spares the user: timm's own assertion mid-run
        vit(torch.randn(1, 3, 48, 48))


def test_data_needs_two_classes_two_training_images_and_a_validation_image() -> None:
    ten = [str(i) for i in range(10)]
    preflight.check_data(range(2), range(1), ten, 64, 1, "digits")
    with pytest.raises(UsageError, match="1 class"):
        preflight.check_data(range(50), range(5), ["cat"], 64, 1, "imagefolder")
    with pytest.raises(UsageError, match="holds 1 image"):
        preflight.check_data(range(1), range(5), ten, 64, 1, "digits")
    with pytest.raises(UsageError, match="validation split is empty"):
        preflight.check_data(range(50), range(0), ten, 64, 1, "digits")
    with pytest.raises(UsageError, match="do not fill one batch on each of 2 processes"):
        preflight.check_data(range(100), range(5), ten, 64, 2, "digits")


def test_metrics_drop_a_torn_last_line_and_refuse_a_damaged_middle(tmp_path) -> None:
    rows = [{"stage": "teacher", "epoch": e, "split": "val"} for e in (1, 2)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "tea')
    assert preflight.read_metrics(path) == rows
    path.write_text(json.dumps(rows[0]) + "\n" + '{"stage": "tea' + "\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(UsageError, match="line 2 is not a kdfast metrics row"):
        preflight.read_metrics(path)


def test_state_files_must_be_kdfast_resume_states_of_their_own_stage(tmp_path) -> None:
    state = {key: 0 for key in preflight.STATE_KEYS} | {"stage": "baseline", "epoch": 2}
    torch.save(state, tmp_path / "state_baseline.pt")
    assert preflight.read_state(tmp_path / "state_baseline.pt")["epoch"] == 2
    torch.save(state, tmp_path / "state_distill.pt")
    with pytest.raises(CheckpointError, match="records stage 'baseline' epoch 2, not its own"):
        preflight.read_state(tmp_path / "state_distill.pt")
    torch.save({"model": {}}, tmp_path / "state_teacher.pt")
    with pytest.raises(CheckpointError, match="not a kdfast resume state"):
        preflight.read_state(tmp_path / "state_teacher.pt")
    net = _net()
    with pytest.raises(CheckpointError, match="has another shape at '0.weight'"):
        preflight.check_fits(
            tmp_path / "x.pt", {**net.state_dict(), "0.weight": torch.zeros(1)}, net, "model"
        )


def test_a_new_run_takes_the_first_free_numbered_folder_and_overwrite_removes_only_run_files(
    tmp_path,
) -> None:
    runs = tmp_path / "runs"
    fresh = runs / "default"
    assert rundir.plan(fresh, overwrite=False) == fresh  # nothing there yet
    fresh.mkdir(parents=True)
    (fresh / "notes.txt").write_text("mine")
    assert rundir.plan(fresh, overwrite=False) == fresh  # a folder without a run's files is free
    (fresh / "state_teacher.pt").write_bytes(b"x")  # a run killed in its first stage is a run
    assert rundir.plan(fresh, overwrite=False) == runs / "default-2"
    (runs / "default-2").mkdir()
    (runs / "default-3").write_text("a file")
    assert rundir.plan(fresh, overwrite=False) == runs / "default-4"
    # another run took default-4 between the plan and the claim: the next number
    planned = rundir.plan(fresh, overwrite=False)
    (runs / "default-4").mkdir()
    assert rundir.claim(planned, fresh, overwrite=False) == runs / "default-5"
    assert sorted(p.name for p in fresh.iterdir()) == ["notes.txt", "state_teacher.pt"]

    (fresh / "tensorboard").mkdir()
    assert rundir.claim(rundir.plan(fresh, overwrite=True), fresh, overwrite=True) == fresh
    assert sorted(p.name for p in fresh.iterdir()) == ["notes.txt"]


def test_output_folders_that_cannot_be_written(tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        rundir.check_writable(tmp_path / "file", "--out")
    with pytest.raises(UsageError, match="file is a file, not a folder"):
        rundir.check_writable(tmp_path / "file" / "run", "--out")
    rundir.check_writable(tmp_path / "new" / "run", "--out")
    assert not (tmp_path / "new").exists()


def test_changed_keys_name_what_a_resumed_run_records() -> None:
    old = {"data": {"batch_size": 64, "mean": None}, "runtime": {"threads": "auto"}}
    new = {"data": {"batch_size": 32, "mean": None}, "runtime": {"threads": 1, "progress": False}}
    assert _changed_keys(old, new) == ["data.batch_size=32", "runtime.threads=1", "runtime.progress=False"]
    assert _changed_keys(new, new) == []


@pytest.mark.parametrize(
    ("load", "world", "threads"), [(0.2, 1, 2), (0.9, 1, 2), (1.4, 1, 1), (8.0, 1, 1), (0.0, 2, 1)]
)
def test_auto_threads_use_the_idle_cores(monkeypatch, load, world, threads) -> None:
    from kdfast.train import loop

    monkeypatch.setattr(loop.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(loop.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(loop, "TORCH_THREADS", 2)
    assert loop.auto_threads(world) == threads


class _WithSideOptimizer(nn.Module):
    """A loss module like CAKD's: a side network whose optimizer state lives in the module's extra state."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Linear(3, 2)
        self.optimizer = torch.optim.Adam(self.side.parameters(), lr=0.1)
        self.steps = 0

    def get_extra_state(self) -> dict:
        return {"steps": self.steps, "optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.steps = state["steps"]
        self.optimizer.load_state_dict(state["optimizer"])


def test_undone_restores_extra_state_such_as_a_side_optimizer() -> None:
    module = _WithSideOptimizer()
    module.side(torch.randn(4, 3)).sum().backward()
    module.optimizer.step()
    module.side.zero_grad(set_to_none=True)
    before = copy.deepcopy(module.state_dict())
    with preflight.undone([module]):
        module.side(torch.randn(4, 3)).sum().backward()
        module.optimizer.step()
        module.steps += 1
    after = module.state_dict()
    assert module.steps == 0
    saved, now = (
        before["_extra_state"]["optimizer"]["state"][0],
        after["_extra_state"]["optimizer"]["state"][0],
    )
    assert all(torch.equal(saved[k], now[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert torch.equal(before["side.weight"], after["side.weight"])


DIGITS_CONFIGS = [
    path.name
    for path in sorted(CONFIG_DIR.glob("*.yaml"))
    if (read_config_file(path).get("data") or {}).get("name") == "digits"
]
# no training epochs, so each stage only validates and saves; a teacher read from another run's file is
# trained (for 0 epochs) instead
ZERO_EPOCHS = [
    "teacher.weights=null",
    "teacher.train.epochs=0",
    "student.train.epochs=0",
    "data.max_train_samples=32",
    "data.max_val_samples=16",
    "runtime.progress=false",
    "runtime.tensorboard=false",
]


@pytest.mark.slow
@pytest.mark.parametrize("config", DIGITS_CONFIGS)
def test_every_digits_config_passes_the_checks_and_runs(config: str, tmp_path, monkeypatch) -> None:
    """The probe must not refuse a working run: every example config on digits (every method, CRD's queue
    included), through every check and every stage."""
    covered = {"default.yaml", "crd_digits.yaml", "sokd_digits.yaml", "zoo_digits_kd.yaml"}
    assert covered <= set(DIGITS_CONFIGS)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # leave this test process's threads alone
    argv = ["--config", str(CONFIG_DIR / config), "--out", str(tmp_path / "run")]
    assert main([*argv, *(a for o in ZERO_EPOCHS for a in ("--set", o))]) == 0
    assert (tmp_path / "run" / "student.pt").is_file()


@pytest.mark.slow
def test_a_run_over_seeds_takes_its_folder_as_a_run_does(tmp_path, monkeypatch, capsys) -> None:
    """``--seeds`` into a folder that holds a run: a fresh numbered folder with the seed folders inside, the
    earlier run untouched; ``--resume`` of it starts the seed that had not started and keeps the finished
    one; ``--overwrite`` replaces the seed folders too."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    sets = [a for o in ZERO_EPOCHS for a in ("--set", o)]
    out = tmp_path / "run"
    out.mkdir()
    earlier = {"config.yaml": b"out: run\n", "metrics.jsonl": b'{"stage": "teacher"}\n'}
    for name, data in earlier.items():
        (out / name).write_bytes(data)

    assert main(["--out", str(out), "--seeds", "0,1", *sets]) == 0
    second = tmp_path / "run-2"
    assert (
        f"{out} holds an earlier run, kept as it is; this run writes to {second}" in capsys.readouterr().out
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    names = ["config.yaml", "results.json", "results.md", "seed0", "seed1"]
    assert sorted(p.name for p in second.iterdir()) == names
    assert json.loads((second / "results.json").read_text())["runs"] == ["seed0", "seed1"]
    top = yaml_file(second / "config.yaml")
    seed1 = yaml_file(second / "seed1" / "config.yaml")
    assert (top["out"], top["seeds"]) == (str(second), [0, 1])
    assert (seed1["out"], seed1["seed"], seed1["seeds"]) == (str(second / "seed1"), 1, None)

    shutil.rmtree(second / "seed1")
    (second / "results.json").unlink()
    finished = (second / "seed0" / "student.pt").stat().st_mtime_ns
    assert main(["--resume", str(second)]) == 0
    assert (second / "seed0" / "student.pt").stat().st_mtime_ns == finished
    assert (second / "seed1" / "student.pt").is_file() and (second / "results.json").is_file()

    assert main(["--out", str(second), "--overwrite", "--seeds", "5", *sets]) == 0
    assert sorted(p.name for p in second.iterdir()) == ["config.yaml", "results.json", "results.md", "seed5"]
    assert not (tmp_path / "run-3").exists()


@pytest.mark.slow
@pytest.mark.parametrize("config", ["crd_digits.yaml", "cakd_digits.yaml"])
def test_the_probe_leaves_a_stateful_method_run_bit_identical(config: str, tmp_path, monkeypatch) -> None:
    """CRD's queue and Z^, CAKD's side networks and their optimizer: a run with the probe steps ends with the
    same student weights, bit for bit, as the same run without them (without the undo, CRD's differ)."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    sets = [
        "teacher.weights=null",
        "teacher.train.epochs=0",
        "student.train.epochs=1",
        "baseline=false",
        "data.max_train_samples=48",
        "data.max_val_samples=16",
        "data.batch_size=16",
        "runtime.progress=false",
        "runtime.tensorboard=false",
    ]
    argv = ["--config", str(CONFIG_DIR / config), *(a for o in sets for a in ("--set", o))]
    assert main([*argv, "--out", str(tmp_path / "probed")]) == 0
    monkeypatch.setattr(preflight, "probe_step", lambda *args: None)
    monkeypatch.setattr(preflight, "probe_distillation", lambda *args: None)
    assert main([*argv, "--out", str(tmp_path / "unprobed")]) == 0

    probed = torch.load(tmp_path / "probed" / "student.pt", weights_only=True)["state_dict"]
    unprobed = torch.load(tmp_path / "unprobed" / "student.pt", weights_only=True)["state_dict"]
    assert probed.keys() == unprobed.keys()
    for key, tensor in probed.items():
        assert torch.equal(unprobed[key], tensor), key
