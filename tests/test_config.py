"""kdfast.config: the embedded default, --set overrides, and one clear ConfigError per bad value."""

import pytest
import yaml

from kdfast.config import (
    DEFAULT_CONFIG,
    Config,
    TapConfig,
    config_from_dict,
    dump_config,
    load_config,
)
from kdfast.errors import ConfigError, UsageError


def test_default_loads_and_matches_the_yaml_file():
    cfg = load_config()
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert isinstance(cfg, Config)
    assert cfg.data.name == raw["data"]["name"] == "digits"
    assert cfg.data.image_size == raw["data"]["image_size"]
    assert cfg.data.augment.crop_padding == raw["data"]["augment"]["crop_padding"]
    assert cfg.teacher.train.optimizer.lr == raw["teacher"]["train"]["optimizer"]["lr"]
    assert set(cfg.teacher.taps) == set(raw["teacher"]["taps"])
    assert all(isinstance(t, TapConfig) for t in cfg.teacher.taps.values())
    assert cfg.loss.attention.pairs[0].teacher == raw["loss"]["attention"]["pairs"][0]["teacher"]


def test_set_overrides_are_typed_by_yaml():
    cfg = load_config(
        None,
        [
            "data.batch_size=32",
            "teacher.train.optimizer.lr=1e-3",
            "runtime.compile=false",
            "runtime.grad_clip=null",
            "data.mean=[0.5, 0.4, 0.3]",
            "student.train.schedule.warmup_epochs=2",
            "loss.attention.metric=ssim",
        ],
    )
    assert cfg.data.batch_size == 32 and type(cfg.data.batch_size) is int
    lr, warmup = cfg.teacher.train.optimizer.lr, cfg.student.train.schedule.warmup_epochs
    assert lr == pytest.approx(1e-3) and type(lr) is float
    assert cfg.runtime.compile is False and cfg.runtime.grad_clip is None
    assert cfg.data.mean == [0.5, 0.4, 0.3]
    assert warmup == 2.0 and type(warmup) is float
    assert cfg.loss.attention.metric == "ssim"


def test_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match="unknown config key 'data.batch_sise': did you mean 'batch_size'"):
        load_config(None, ["data.batch_sise=3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.batch_size=abc", "'data.batch_size' must be int, got 'abc'"),
        ("data.batch_size=true", "'data.batch_size' must be int, got True"),
        ("data.image_size=1.5", "'data.image_size' must be int"),
        ("student.arch=5", "'student.arch' must be a mapping"),
        ("data.mean=0.5", "'data.mean' must be a list of float"),
    ],
)
def test_wrong_type_names_the_key_and_expected_type(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_literal_lists_the_choices():
    with pytest.raises(ConfigError, match="'data.name' must be one of 'digits' \\| 'imagefolder'"):
        load_config(None, ["data.name=mnist"])
    with pytest.raises(ConfigError, match="'teacher.taps.vgg.kind' must be one of 'feature' \\| 'attention'"):
        load_config(None, ["teacher.taps.vgg.kind=attn"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  name: [digits\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["seed"])


def test_config_errors_are_usage_errors():
    assert issubclass(ConfigError, UsageError)


def test_pair_naming_an_unknown_tap():
    with pytest.raises(ConfigError, match=r"\.teacher names no teacher tap 'vgx': did you mean 'vgg'"):
        load_config(None, ["loss.attention.pairs=[{student: mid, teacher: [vgx]}]"])
    with pytest.raises(ConfigError, match=r"\.student names no student tap 'mdi': did you mean 'mid'"):
        load_config(None, ["loss.attention.pairs=[{student: mdi, teacher: [vgg]}]"])


def test_cross_key_validation():
    with pytest.raises(ConfigError, match="needs data.root"):
        load_config(None, ["data.name=cifar10"])
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(None, ["data.val_fraction=1.5"])
    with pytest.raises(ConfigError, match="window_size"):
        load_config(None, ["loss.attention.window_size=4"])


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["data.max_val_samples=10", "runtime.compile=true", "seed=7"])
    assert config_from_dict(cfg.to_dict()) == cfg
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize(
    "override",
    [
        "teacher.train.optimizer.lr=.nan",
        "loss.kd.temperature=.nan",
        "data.max_train_samples=0",
        "data.max_val_samples=-5",
        "data.augment.crop_padding=-3",
        "data.augment.cutmix_beta=0",
    ],
)
def test_out_of_range_values_are_rejected(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


def test_numeric_looking_root_is_a_path():
    # a folder named 2024 given as --set data.root=2024 (or root: 2024 in YAML) reads as an int
    assert load_config(None, ["data.root=2024"]).data.root == "2024"
