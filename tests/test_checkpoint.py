"""kdfast.checkpoint: the student.pt contract (weights_only loading, validation, rebuilding, data split)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch
from support.students import CLASSES, MEAN, write_student
from torch import nn

from kdfast.checkpoint import (
    STUDENT_FORMAT,
    TEACHER_FORMAT,
    build_from_checkpoint,
    load_checkpoint,
    load_split,
    rebuilding_data,
)
from kdfast.data import dataset_from_record
from kdfast.errors import CheckpointError, UsageError


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> tuple[Path, nn.Module]:
    return write_student(tmp_path_factory.mktemp("ckpt") / "student.pt")


def test_round_trip_rebuilds_the_same_function(student):
    path, model = student
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == STUDENT_FORMAT
    assert set(ckpt["versions"]) == {"kdfast", "torch", "torchvision", "timm", "python"}
    assert all(isinstance(v, str) for v in ckpt["versions"].values())
    rebuilt = build_from_checkpoint(ckpt)
    assert not rebuilt.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_plain_torch_load_with_weights_only_reads_it(student):
    raw = torch.load(student[0], weights_only=True)
    assert isinstance(raw, dict) and raw["classes"] == CLASSES and raw["input"]["mean"] == MEAN


def test_wrappers_are_stripped_from_keys(tmp_path):
    model = timm.create_model("test_efficientnet", num_classes=10)
    for i, wrapped in enumerate((torch.compile(model), nn.DataParallel(model))):
        path, _ = write_student(tmp_path / f"w{i}.pt", model=wrapped)
        keys = load_checkpoint(path)["state_dict"].keys()
        assert keys == model.state_dict().keys()


def test_save_is_atomic_and_refuses_unloadable_values(tmp_path, student):
    path, _ = write_student(tmp_path / "s.pt")
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=r"metrics.when is a object"):
        write_student(path, metrics={"when": object()})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["s.pt"]


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_that_would_run_code_is_refused_not_executed(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": STUDENT_FORMAT, "payload": _RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match=r"refused: it would load (posix|os)\.mkdir"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_garbage_and_wrong_format_and_bad_fields(tmp_path, student):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(junk)
    ckpt = torch.load(student[0], weights_only=True)
    cases = [
        ({**ckpt, "format": TEACHER_FORMAT}, "expected 'kdfast.student/1'"),
        ({k: v for k, v in ckpt.items() if k != "classes"}, "lacks the field 'classes'"),
        ({**ckpt, "classes": "0123"}, "field 'classes' is a str, expected list"),
        ({**ckpt, "input": {**ckpt["input"], "size": [3, 32]}}, r"input.size"),
        ({**ckpt, "arch": {"name": "x"}}, "'arch' needs str 'source' and 'name'"),
        ([1, 2, 3], "not a kdfast checkpoint"),
    ]
    for i, (bad, message) in enumerate(cases):
        torch.save(bad, tmp_path / f"bad{i}.pt")
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / f"bad{i}.pt")
    torch.save({**ckpt, "format": TEACHER_FORMAT}, tmp_path / "teacher.pt")
    assert load_checkpoint(tmp_path / "teacher.pt", expect=None)["format"] == TEACHER_FORMAT


def test_unknown_arch_and_mismatched_weights(student):
    ckpt = load_checkpoint(student[0])
    with pytest.raises(CheckpointError, match="cannot build arch timm:no_such_net"):
        build_from_checkpoint({**ckpt, "arch": {"source": "timm", "name": "no_such_net", "kwargs": {}}})
    key = next(iter(ckpt["state_dict"]))
    bad = {**ckpt["state_dict"], key: torch.zeros(1)}
    with pytest.raises(CheckpointError, match=f"weight '{key}' has shape \\(1,\\)"):
        build_from_checkpoint({**ckpt, "state_dict": bad})
    missing = {k: v for k, v in ckpt["state_dict"].items() if k != key}
    with pytest.raises(CheckpointError, match=f"missing weight '{key}'"):
        build_from_checkpoint({**ckpt, "state_dict": missing})


def test_load_split_matches_the_dataset(student):
    ckpt = load_checkpoint(student[0])
    images, labels = load_split(ckpt, "val", limit=5)
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    dataset = dataset_from_record(ckpt["data"], "val")
    items = [dataset[i] for i in range(len(dataset))]
    # five distinct items of the split, in split order, not simply its first five
    found = [next(i for i, (x, _) in enumerate(items) if torch.equal(x, image)) for image in images]
    assert found == sorted(set(found)) and found != list(range(5))
    assert [items[i][1] for i in found] == labels.tolist()
    everything, _ = load_split(ckpt, "val")
    assert len(everything) == len(dataset)


def test_data_that_cannot_be_rebuilt_is_one_line_ending_with_the_fix(student):
    """Both readers of a checkpoint's data (the export, QAD) say a broken record the same way."""
    ckpt = load_checkpoint(student[0])
    broken = {**ckpt, "data": {**ckpt["data"], "image_size": None}}
    with pytest.raises(CheckpointError) as caught, rebuilding_data("pass --verify-data DIR"):
        load_split(broken, "val")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("cannot rebuild the checkpoint's data (TypeError: ")
    assert message.endswith("; pass --verify-data DIR")
    # a problem already said in one line passes as it is, not wrapped a second time
    with pytest.raises(UsageError, match="^the train split") as caught, rebuilding_data("unused"):
        raise UsageError("the train split is empty")
    assert type(caught.value) is UsageError
