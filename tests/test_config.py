"""Strict configuration: every mistake in a recipe or an override is a one-line ConfigError that names
the key, where it was set, and what would be valid."""
from __future__ import annotations

import pytest

from fastairl.config import Config, ConfigError, build_config, config_to_dict, dump_config, load_config


def write(tmp_path, name: str, text: str):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def error(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg, f"error must be one line: {msg!r}"
    return msg


# ------------------------------------------------------------------------------- recipe files
def test_defaults_load(tmp_path):
    cfg = load_config(write(tmp_path, "empty.yaml", ""))
    assert isinstance(cfg, Config)
    assert cfg.name == "empty"  # the name defaults to the file stem


def test_unknown_top_level_key_names_key_file_and_valid_keys(tmp_path):
    p = write(tmp_path, "r.yaml", "optimizer:\n  name: sgd\n")
    msg = error(p)
    assert "'optimizer'" in msg and str(p) in msg
    for valid in ("method", "model", "optim", "aug", "data", "probe", "train"):
        assert valid in msg


def test_unknown_nested_key_lists_the_sections_keys(tmp_path):
    p = write(tmp_path, "r.yaml", "method:\n  temprature: 0.1\n")
    msg = error(p)
    assert "'method.temprature'" in msg and str(p) in msg
    assert "under 'method'" in msg and "temperature" in msg and "queue_size" in msg


def test_unknown_key_deep_inside(tmp_path):
    msg = error(write(tmp_path, "r.yaml", "method:\n  ema:\n    start: 0.99\n"))
    assert "'method.ema.start'" in msg and "schedule" in msg and "base" in msg


@pytest.mark.parametrize("text, key, expected", [
    ("train:\n  epochs: ten\n", "train.epochs", "an integer"),
    ("train:\n  epochs: 100.0\n", "train.epochs", "an integer"),
    ("train:\n  epochs: true\n", "train.epochs", "an integer"),  # a bool is not an int
    ("method:\n  symmetric: 1\n", "method.symmetric", "true or false"),  # an int is not a bool
    ("method:\n  symmetric: 'yes please'\n", "method.symmetric", "true or false"),
    ("optim:\n  base_lr: fast\n", "optim.base_lr", "a number"),
    ("optim:\n  base_lr: true\n", "optim.base_lr", "a number"),
    ("data:\n  train: 3\n", "data.train", "a string"),
    ("aug:\n  crop_scale: [0.2]\n", "aug.crop_scale", "a list of 2 numbers"),
    ("method: 3\n", "method", "must be a section"),
])
def test_wrong_type(tmp_path, text, key, expected):
    p = write(tmp_path, "r.yaml", text)
    msg = error(p)
    assert f"'{key}'" in msg and expected in msg and str(p) in msg


def test_int_is_accepted_for_float(tmp_path):
    cfg = load_config(write(tmp_path, "r.yaml", "optim:\n  base_lr: 1\n"))
    assert cfg.optim.base_lr == 1.0 and isinstance(cfg.optim.base_lr, float)


def test_yaml11_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string; float keys must still take it.
    cfg = load_config(write(tmp_path, "r.yaml", "optim:\n  weight_decay: 1e-4\n  base_lr: 3e-2\n"))
    assert cfg.optim.weight_decay == pytest.approx(1e-4) and cfg.optim.base_lr == pytest.approx(0.03)


def test_bad_literal_lists_choices(tmp_path):
    msg = error(write(tmp_path, "r.yaml", "method:\n  loss: nce\n"))
    assert "'method.loss'" in msg and "'nce'" in msg
    for choice in ("'infonce'", "'byol'", "'ce'"):
        assert choice in msg


def test_crop_scale_tuple(tmp_path):
    cfg = load_config(write(tmp_path, "r.yaml", "aug:\n  crop_scale: [0.2, 1]\n"))
    assert cfg.aug.crop_scale == (0.2, 1.0)


def test_bad_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path, "r.yaml", "train:\n  epochs: 10\n  seed: [1, 2\n")
    msg = error(p)
    assert "bad YAML" in msg and str(p) in msg and "line 4" in msg  # the unclosed list ends at EOF


def test_bad_yaml_line_of_a_tab(tmp_path):
    p = write(tmp_path, "r.yaml", "train:\n  epochs: 10\n\tseed: 1\n")
    msg = error(p)
    assert str(p) in msg and "line 3" in msg


def test_recipe_must_be_a_mapping(tmp_path):
    p = write(tmp_path, "r.yaml", "- a\n- b\n")
    msg = error(p)
    assert str(p) in msg and "must be a mapping" in msg


def test_missing_recipe(tmp_path):
    p = tmp_path / "nope.yaml"
    msg = error(p)
    assert "not found" in msg and str(p) in msg


def test_missing_base_names_the_child(tmp_path):
    child = write(tmp_path, "child.yaml", "base: gone.yaml\n")
    msg = error(child)
    assert "gone.yaml" in msg and str(child.resolve()) in msg


def test_base_cycle(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    msg = error(tmp_path / "a.yaml")
    assert "loops" in msg and "a.yaml" in msg and "b.yaml" in msg


def test_base_self_cycle(tmp_path):
    msg = error(write(tmp_path, "a.yaml", "base: a.yaml\n"))
    assert "loops" in msg


def test_base_diamond_is_not_a_cycle(tmp_path):
    write(tmp_path, "root.yaml", "train:\n  epochs: 7\n")
    write(tmp_path, "l.yaml", "base: root.yaml\n")
    write(tmp_path, "r.yaml", "base: root.yaml\n")
    cfg = load_config(write(tmp_path, "top.yaml", "base: [l.yaml, r.yaml]\n"))
    assert cfg.train.epochs == 7


def test_base_list_merges_in_order_and_child_wins(tmp_path):
    write(tmp_path, "a.yaml", "train:\n  epochs: 10\n  seed: 1\nmethod:\n  ema:\n    base: 0.9\n")
    write(tmp_path, "b.yaml", "train:\n  epochs: 20\nmethod:\n  ema:\n    schedule: constant\n")
    cfg = load_config(write(tmp_path, "c.yaml", "base: [a.yaml, b.yaml]\ntrain:\n  seed: 3\n"))
    assert cfg.train.epochs == 20  # later base wins
    assert cfg.train.seed == 3  # the child wins
    assert (cfg.method.ema.schedule, cfg.method.ema.base) == ("constant", 0.9)  # sections deep-merge
    assert cfg.name == "c"  # a base's name or stem never leaks into the child


def test_base_paths_are_relative_to_the_recipe(tmp_path):
    write(tmp_path, "base.yaml", "train:\n  epochs: 11\n")
    write(tmp_path, "parts/p.yaml", "model:\n  arch: resnet18\n")
    cfg = load_config(write(tmp_path, "runs/x.yaml", "base: [../base.yaml, ../parts/p.yaml]\nname: xx\n"))
    assert (cfg.train.epochs, cfg.model.arch, cfg.name) == (11, "resnet18", "xx")


def test_error_names_the_base_file_that_set_the_key(tmp_path):
    parent = write(tmp_path, "parent.yaml", "method:\n  loss: nce\n")
    write(tmp_path, "child.yaml", "base: parent.yaml\ntrain:\n  epochs: 5\n")
    msg = error(tmp_path / "child.yaml")
    assert str(parent) in msg and "child.yaml" not in msg


def test_child_value_overrides_a_bad_base_value(tmp_path):
    write(tmp_path, "parent.yaml", "method:\n  loss: nce\n")
    cfg = load_config(write(tmp_path, "child.yaml", "base: parent.yaml\nmethod:\n  loss: byol\n"))
    assert cfg.method.loss == "byol"


# ------------------------------------------------------------------------------------ overrides
def test_override_sets_nested_values(tmp_path):
    p = write(tmp_path, "r.yaml", "method:\n  ema:\n    schedule: constant\n    base: 0.999\n")
    cfg = load_config(p, ["method.ema.base=0.996", "train.epochs=3", "method.symmetric=false",
                          "aug.crop_scale=[0.2, 1.0]", "data.val=null", "name=exp1"])
    assert cfg.method.ema.base == pytest.approx(0.996)
    assert cfg.method.ema.schedule == "constant"  # the sibling from the recipe is kept
    assert cfg.train.epochs == 3 and cfg.method.symmetric is False
    assert cfg.aug.crop_scale == (0.2, 1.0) and cfg.data.val is None and cfg.name == "exp1"


@pytest.mark.parametrize("ov, value", [
    ("optim.weight_decay=1e-4", 1e-4),
    ("optim.weight_decay=1.5e-6", 1.5e-6),
    ("optim.weight_decay=0", 0.0),
    ("optim.base_lr=.3", 0.3),
    ("optim.base_lr=2", 2.0),
])
def test_override_floats(tmp_path, ov, value):
    cfg = load_config(write(tmp_path, "r.yaml", ""), [ov])
    got = getattr(cfg.optim, ov.split("=")[0].split(".")[1])
    assert isinstance(got, float) and got == pytest.approx(value)


def test_override_unknown_key(tmp_path):
    msg = error(write(tmp_path, "r.yaml", ""), ["optim.lr=0.1"])
    assert "'optim.lr'" in msg and "override 'optim.lr=0.1'" in msg and "base_lr" in msg


def test_override_unknown_top_level_key(tmp_path):
    msg = error(write(tmp_path, "r.yaml", ""), ["optimizer=sgd"])
    assert "'optimizer'" in msg and "override 'optimizer=sgd'" in msg and "optim" in msg


@pytest.mark.parametrize("ov, key, expected", [
    ("train.epochs=abc", "train.epochs", "an integer"),
    ("train.epochs=1e2", "train.epochs", "an integer"),
    ("train.epochs=2.5", "train.epochs", "an integer"),
    ("method.symmetric=1", "method.symmetric", "true or false"),
    ("optim.base_lr=fast", "optim.base_lr", "a number"),
    ("method.bn=batch", "method.bn", "'shuffle', 'sync', 'plain'"),
    ("train=3", "train", "must be a section"),
])
def test_override_is_validated(tmp_path, ov, key, expected):
    msg = error(write(tmp_path, "r.yaml", ""), [ov])
    assert f"'{key}'" in msg and expected in msg and f"override '{ov}'" in msg


def test_override_into_a_scalar(tmp_path):
    msg = error(write(tmp_path, "r.yaml", "train:\n  epochs: 5\n"), ["train.epochs.x=3"])
    assert "override 'train.epochs" in msg and "'epochs' is not a section" in msg


def test_override_needs_equals(tmp_path):
    msg = error(write(tmp_path, "r.yaml", ""), ["train.epochs"])
    assert "train.epochs" in msg and "key.sub=value" in msg


def test_override_value_is_checked_too(tmp_path):
    msg = error(write(tmp_path, "r.yaml", ""), ["data.class_fraction=0"])
    assert "'data.class_fraction'" in msg and "(0, 1]" in msg and "override 'data.class_fraction=0'" in msg


# ----------------------------------------------------------------------------- impossible values
@pytest.mark.parametrize("text, key", [
    ("data:\n  class_fraction: 0\n", "data.class_fraction"),
    ("data:\n  class_fraction: 1.5\n", "data.class_fraction"),
    ("optim:\n  base_lr: -0.1\n", "optim.base_lr"),
    ("optim:\n  base_lr: 0\n", "optim.base_lr"),
    ("optim:\n  weight_decay: -1.0e-4\n", "optim.weight_decay"),
    ("optim:\n  momentum: 1.0\n", "optim.momentum"),
    ("optim:\n  warmup_epochs: -1\n", "optim.warmup_epochs"),
    ("train:\n  epochs: 0\n", "train.epochs"),
    ("train:\n  batch_size: -8\n", "train.batch_size"),
    ("train:\n  max_steps: -1\n", "train.max_steps"),
    ("method:\n  temperature: 0\n", "method.temperature"),
    ("method:\n  ema:\n    base: 1.5\n", "method.ema.base"),
    ("method:\n  queue_size: 512\n", "method.queue_size"),  # smaller than the 1024 global batch
    ("aug:\n  crop_scale: [0.8, 0.2]\n", "aug.crop_scale"),
    ("aug:\n  crop_size: 4\n", "aug.crop_size"),
    ("data:\n  workers: -1\n", "data.workers"),
    ("method:\n  loss: infonce\n  symmetric: true\n  enqueue: both\n  queue_size: 1536\n", "method.queue_size"),
    ("model:\n  projector:\n    out_dim: 0\n", "model.projector.out_dim"),
    ("model:\n  predictor:\n    hidden_dim: -4\n", "model.predictor.hidden_dim"),
    ("optim:\n  trust_coef: 0\n", "optim.trust_coef"),
    ("optim:\n  min_lr: -1.0e-3\n", "optim.min_lr"),
    ("train:\n  resume: /no/such/ckpt.pt\n", "train.resume"),
    ("probe:\n  knn_max_bank: 0\n", "probe.knn_max_bank"),  # an empty bank, found only after an epoch
    ("probe:\n  knn_k: 0\n", "probe.knn_k"),
    ("probe:\n  knn_temperature: 0\n", "probe.knn_temperature"),
    ("probe:\n  knn_every_epochs: -1\n", "probe.knn_every_epochs"),
    ("probe:\n  final_linear_epochs: 0\n", "probe.final_linear_epochs"),
    ("probe:\n  lr: 0\n", "probe.lr"),
    ("eval:\n  knn_temperature: -0.1\n", "eval.knn_temperature"),
    ("train:\n  ckpt_every_epochs: -1\n", "train.ckpt_every_epochs"),
    ("train:\n  ckpt_every_minutes: -5\n", "train.ckpt_every_minutes"),
])
def test_impossible_values(tmp_path, text, key):
    p = write(tmp_path, "r.yaml", text)
    msg = error(p)
    assert f"'{key}'" in msg and str(p) in msg


def test_queue_check_only_applies_to_infonce(tmp_path):
    cfg = load_config(write(tmp_path, "r.yaml", "method:\n  loss: byol\n  queue_size: 512\n"))
    assert cfg.method.queue_size == 512


# ------------------------------------------------------------------------------- round trips
def test_dump_and_build_round_trip(tmp_path):
    cfg = load_config(write(tmp_path, "r.yaml", "aug:\n  crop_scale: [0.2, 1.0]\noptim:\n  name: lars\n"))
    text = dump_config(cfg)
    again = load_config(write(tmp_path, "dumped.yaml", text))
    assert config_to_dict(again) == config_to_dict(cfg)


def test_build_config_from_dict_is_strict():
    with pytest.raises(ConfigError, match="unknown key 'method.los'"):
        build_config({"method": {"los": "byol"}})


# ---------------------------------------------------------------- known gaps (see the report)
@pytest.mark.parametrize("ov", ["optimizer.name=sgd", "train.epochs.x=3"])
def test_override_creating_a_section_names_the_override(tmp_path, ov):
    msg = error(write(tmp_path, "r.yaml", ""), [ov])
    assert f"override '{ov}'" in msg


def test_mapping_override_merges_into_the_section(tmp_path):
    p = write(tmp_path, "r.yaml", "method:\n  ema:\n    schedule: constant\n    base: 0.999\n")
    cfg = load_config(p, ["method.ema={base: 0.99}"])
    assert cfg.method.ema.schedule == "constant"


def test_bad_base_type_is_a_config_error(tmp_path):
    error(write(tmp_path, "r.yaml", "base: 3\n"))


def test_duplicate_key_is_an_error(tmp_path):
    error(write(tmp_path, "r.yaml", "optim:\n  base_lr: 0.1\n  base_lr: 0.2\n"))
