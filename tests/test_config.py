"""kdfast.config: the embedded default, --set overrides, and one clear ConfigError per bad value."""

import pytest
import yaml

from kdfast.config import (
    CONFIG_DIR,
    DEFAULT_CONFIG,
    Config,
    LossConfig,
    TapConfig,
    config_from_dict,
    dump_config,
    load_config,
)
from kdfast.errors import ConfigError, UsageError
from kdfast.methods.kd import KDConfig


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
    assert cfg.loss.method == raw["loss"]["method"] == ["kd", "agkd"]
    assert cfg.loss.sections["agkd"].pairs[0].teacher == raw["loss"]["agkd"]["pairs"][0]["teacher"]
    assert cfg.loss.sections["kd"].temperature == raw["loss"]["kd"]["temperature"]


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
            "loss.agkd.metric=ssim",
        ],
    )
    assert cfg.data.batch_size == 32 and type(cfg.data.batch_size) is int
    lr, warmup = cfg.teacher.train.optimizer.lr, cfg.student.train.schedule.warmup_epochs
    assert lr == pytest.approx(1e-3) and type(lr) is float
    assert cfg.runtime.compile is False and cfg.runtime.grad_clip is None
    assert cfg.data.mean == [0.5, 0.4, 0.3]
    assert warmup == 2.0 and type(warmup) is float
    assert cfg.loss.sections["agkd"].metric == "ssim"


def test_set_changes_one_key_of_a_mapping_that_a_yaml_alias_shares(tmp_path):
    # zoo_digits.yaml's ``train: &recipe`` / ``train: *recipe``: one mapping under two keys once loaded
    path = tmp_path / "run.yaml"
    path.write_text(
        "teacher:\n  train: &recipe\n    epochs: 8\n"
        "student:\n  arch: {source: kdfast, name: edge_cnn}\n  train: *recipe\n"
    )
    cfg = load_config(path, ["teacher.train.epochs=0", "student.train.epochs=1"])
    assert (cfg.teacher.train.epochs, cfg.student.train.epochs) == (0, 1)
    cfg = load_config(CONFIG_DIR / "zoo_digits.yaml", ["teacher.train.epochs=0"])
    assert (cfg.teacher.train.epochs, cfg.student.train.epochs) == (0, 8)


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
    names = " \\| ".join(f"'{n}'" for n in ("digits", "fashion_mnist", "imagefolder", "cifar10", "cifar100"))
    with pytest.raises(ConfigError, match=f"'data.name' must be one of {names}, got 'mnist'"):
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
        load_config(None, ["loss.agkd.pairs=[{student: mid, teacher: [vgx]}]"])
    with pytest.raises(ConfigError, match=r"\.student names no student tap 'mdi': did you mean 'mid'"):
        load_config(None, ["loss.agkd.pairs=[{student: mdi, teacher: [vgg]}]"])


def test_cross_key_validation():
    with pytest.raises(ConfigError, match="needs data.root"):
        load_config(None, ["data.name=cifar10"])
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(None, ["data.val_fraction=1.5"])
    with pytest.raises(ConfigError, match="window_size"):
        load_config(None, ["loss.agkd.window_size=4"])


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = load_config(None, ["data.max_val_samples=10", "runtime.compile=true", "seed=7"])
    assert config_from_dict(cfg.to_dict()) == cfg
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    written = yaml.safe_load((tmp_path / "resolved.yaml").read_text())["loss"]
    assert list(written) == ["method", "ce", "kd", "agkd"]
    assert written["kd"] == {"weight": 0.5, "temperature": 4.0, "standardize": False}


def test_loss_method_is_a_name_or_a_list_and_unset_sections_take_their_defaults():
    single = load_config(None, ["loss={method: kd}"]).loss
    assert single.method == ["kd"] and single.ce is None and single.ce_weight() == 1.0
    assert single.sections == {"kd": KDConfig()}
    both = load_config(None, ["loss.method=[agkd, kd]"]).loss
    assert both.method == ["agkd", "kd"] and list(both.sections) == ["agkd", "kd"]
    assert LossConfig(method="kd", ce=0.25).ce_weight() == 0.25


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("loss.agdk={}", "unknown config key 'loss.agdk': did you mean 'agkd'"),
        ("loss.method=agdk", "'loss.method' names no method 'agdk': did you mean 'agkd'"),
        ("loss.method=[kd, agkd, cakdd]", r"'loss.method\[2\]' names no method 'cakdd': did you mean 'cakd'"),
        ("loss.method=kd", r"'loss.agkd' configures a method that loss.method \(kd\) does not use"),
        ("loss.method=[]", "'loss.method' is empty"),
        ("loss.method=[kd, kd, agkd]", "lists 'kd' twice"),
        ("loss.agkd.weight=-1", "'loss.agkd.weight' must be >= 0"),
        ("loss.ce=.inf", "'loss.ce' must be >= 0"),
        ("loss.kd.temperature=0", "'loss.kd.temperature' must be > 0"),
        ("loss.agkd.pairs=[]", "loss.agkd.pairs is empty"),
        ("loss.agkd.pairz=[]", "unknown config key 'loss.agkd.pairz': did you mean 'pairs'"),
    ],
)
def test_loss_section_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_the_supervised_term_has_one_owner():
    mtd = CONFIG_DIR / "mtd_digits.yaml"
    assert load_config(mtd).loss.ce_weight() is None  # MTD weighs its own supervised task
    with pytest.raises(ConfigError, match="'loss.ce' is set, but mtd computes the supervised term itself"):
        load_config(mtd, ["loss.ce=0.5"])
    with pytest.raises(ConfigError, match="combines mtd and titn, which each compute the supervised term"):
        load_config(mtd, ["loss.method=[mtd, titn]"])


@pytest.mark.parametrize(
    "override",
    [
        "teacher.train.optimizer.lr=.nan",
        "loss.kd.temperature=.nan",
        "data.max_train_samples=0",
        "data.max_val_samples=-5",
        "data.augment.crop_padding=-3",
        "data.augment.cutmix_beta=0",
        "data.augment.mixup_alpha=0",
        "data.augment.mixup=1.5",
        "data.augment.rand_augment.magnitude=31",
        "data.augment.rand_augment.num_ops=0",
    ],
)
def test_out_of_range_values_are_rejected(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(None, [override])


def test_numeric_looking_root_is_a_path():
    # a folder named 2024 given as --set data.root=2024 (or root: 2024 in YAML) reads as an int
    assert load_config(None, ["data.root=2024"]).data.root == "2024"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.augment.auto_augment=cifar10", "data.augment.trivial_augment=true"],
            "'data.augment.auto_augment' and 'trivial_augment' both set a policy: keep one",
        ),
        (["data.augment.auto_augment=cifar100"], "'data.augment.auto_augment' must be"),
        (
            ["data.augment.cutmix=0.6", "data.augment.mixup=0.6"],
            "cutmix' \\+ 'data.augment.mixup' are the chances of either mix per batch and sum to 1.2",
        ),
    ],
)
def test_augmentation_policies_and_mixes_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
