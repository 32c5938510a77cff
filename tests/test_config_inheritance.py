"""Config inheritance: ``base: FILE`` (relative to the file's folder), overridden mapping by mapping; errors
in a base name the base file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kdfast.config import dump_config, load_config
from kdfast.errors import ConfigError

PAIR = {
    "seed": 3,
    "data": {"name": "digits", "batch_size": 16, "augment": {"crop_padding": 4, "hflip": True}},
    "teacher": {"arch": {"source": "kdfast", "name": "resnet8"}, "train": {"epochs": 2}},
    "student": {
        "arch": {"source": "kdfast", "name": "resnet8"},
        "train": {
            "epochs": 5,
            "optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 5e-4},
            "schedule": {"name": "multistep", "milestones": [2, 3, 4]},
        },
    },
}


def _write(path: Path, mapping: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


def test_a_child_overrides_its_bases_key_by_key(tmp_path: Path) -> None:
    _write(tmp_path / "pair.yaml", PAIR)
    _write(tmp_path / "kd" / "mid.yaml", {"base": "../pair.yaml", "student": {"train": {"epochs": 7}}})
    child = {
        "base": "mid.yaml",
        "data": {"augment": {"hflip": False}},
        "student": {"train": {"schedule": {"milestones": [3]}, "optimizer": {"lr": 0.01}}},
        "loss": {"method": "kd", "ce": 0.1, "kd": {"weight": 0.9}},
    }
    cfg = load_config(_write(tmp_path / "kd" / "child.yaml", child))

    # the same run written out by hand as one flat file
    flat = yaml.safe_load(yaml.safe_dump(PAIR))
    flat["data"]["augment"]["hflip"] = False
    flat["student"]["train"]["epochs"] = 7
    flat["student"]["train"]["schedule"]["milestones"] = [3]
    flat["student"]["train"]["optimizer"]["lr"] = 0.01
    flat["loss"] = child["loss"]
    assert cfg.to_dict() == load_config(_write(tmp_path / "flat.yaml", flat)).to_dict()
    assert cfg.data.augment.crop_padding == 4 and cfg.student.train.optimizer.weight_decay == 5e-4

    dump_config(cfg, tmp_path / "resolved.yaml")
    resolved = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert "base" not in resolved and load_config(tmp_path / "resolved.yaml").to_dict() == cfg.to_dict()


def test_null_and_lists_replace(tmp_path: Path) -> None:
    base = {**PAIR, "data": {**PAIR["data"], "max_train_samples": 100, "mean": [0.1, 0.2, 0.3]}}
    _write(tmp_path / "pair.yaml", base)
    child = _write(tmp_path / "child.yaml", {"base": "pair.yaml", "data": {"max_train_samples": None}})
    cfg = load_config(child, ["data.mean=[0.5, 0.5, 0.5]"])
    assert cfg.data.max_train_samples is None and cfg.data.mean == [0.5, 0.5, 0.5]


def test_set_overrides_apply_after_the_bases(tmp_path: Path) -> None:
    _write(tmp_path / "pair.yaml", PAIR)
    child = _write(tmp_path / "child.yaml", {"base": "pair.yaml", "student": {"train": {"epochs": 9}}})
    assert load_config(child, ["student.train.epochs=11"]).student.train.epochs == 11


def test_a_missing_base_names_the_file_that_names_it(tmp_path: Path) -> None:
    child = _write(tmp_path / "child.yaml", {"base": "nope.yaml"})
    with pytest.raises(
        ConfigError, match=re.escape(f"config file {child}: base file not found: {tmp_path / 'nope.yaml'}")
    ):
        load_config(child)


def test_a_bad_key_in_a_base_names_the_base(tmp_path: Path) -> None:
    pair = _write(tmp_path / "pair.yaml", {**PAIR, "data": {"batch_sise": 3}})
    child = _write(tmp_path / "sub" / "child.yaml", {"base": "../pair.yaml"})
    with pytest.raises(
        ConfigError, match=re.escape(f"in base config {pair}: unknown config key 'data.batch_sise'")
    ):
        load_config(child)
    _write(pair, {"loss": {"dkd_typo": {}}})
    with pytest.raises(
        ConfigError, match=re.escape(f"in base config {pair}: unknown config key 'loss.dkd_typo'")
    ):
        load_config(child)


def test_bad_yaml_in_a_base_names_the_base(tmp_path: Path) -> None:
    (tmp_path / "pair.yaml").write_text("data: [unclosed\n")
    child = _write(tmp_path / "child.yaml", {"base": "pair.yaml"})
    with pytest.raises(
        ConfigError, match=re.escape(f"config file {tmp_path / 'pair.yaml'} is not valid YAML")
    ):
        load_config(child)


def test_a_cycle_of_bases_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", {"base": "b.yaml"})
    b = _write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match=re.escape(f"config file {b}: base a.yaml leads back")):
        load_config(tmp_path / "a.yaml")
    selfish = _write(tmp_path / "self.yaml", {"base": "self.yaml"})
    with pytest.raises(ConfigError, match="leads back"):
        load_config(selfish)


def test_base_must_be_a_file_name(tmp_path: Path) -> None:
    child = _write(tmp_path / "child.yaml", {"base": ["a.yaml", "b.yaml"]})
    with pytest.raises(ConfigError, match="'base' must name one config file"):
        load_config(child)
