"""The launch script end to end, as a user runs it: every bad input is ONE line on stderr naming the key
or path and the fix (exit code 2, no traceback); a tiny real run leaves a self-describing run dir; the
three entry points (`python fastairl/train.py`, `python -m fastairl.cli train`, `accelerate launch`)
all train."""
from __future__ import annotations

import json
import math
import os
import re
import sys

import pytest
import yaml

from tiny_runs import REPO, TRAIN_PY, losses, one_line_error, run, small_folder, train_cmd, write_recipe

RUN_FILES = ("config.yaml", "env.json", "metrics.jsonl", "summary.json", "classes.txt", "last.pt")


@pytest.fixture(scope="module")
def recipe(digits_root, tmp_path_factory):
    return write_recipe(tmp_path_factory.mktemp("cli") / "tiny.yaml", digits_root / "train")


# ------------------------------------------------------------------------------------- bad inputs
def test_missing_recipe(tmp_path):
    proc = run(train_cmd(tmp_path / "nope.yaml"), cwd=tmp_path)
    one_line_error(proc, "recipe not found", "nope.yaml")


def test_bad_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntrain:\n  epochs: [1,\n")
    proc = run(train_cmd(bad), cwd=tmp_path)
    one_line_error(proc, f"bad YAML in {bad}", "line 4")


def test_unknown_key_lists_the_valid_keys(recipe, tmp_path):
    proc = run(train_cmd(recipe, "train.batch_sise=32"), cwd=tmp_path)
    line = one_line_error(proc, "unknown key 'train.batch_sise'", "valid keys under 'train'")
    for key in ("batch_size", "epochs", "max_steps", "resume"):
        assert key in line


def test_unknown_key_in_a_recipe_names_the_file(recipe, tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {recipe}\nmethod:\n  lossy: byol\n")
    proc = run(train_cmd(child), cwd=tmp_path)
    one_line_error(proc, str(child), "unknown key 'method.lossy'", "loss")


@pytest.mark.parametrize("override, expected", [
    ("train.batch_size=abc", "'train.batch_size' must be an integer, got 'abc'"),
    ("train.progress=maybe", "'train.progress' must be true or false"),
    ("method.bn=batch", "'method.bn' must be one of 'shuffle', 'sync', 'plain'"),
])
def test_wrong_type(recipe, tmp_path, override, expected):
    proc = run(train_cmd(recipe, override), cwd=tmp_path)
    one_line_error(proc, f"override '{override}'", expected)


def test_missing_data_dir_names_the_key_and_the_fix(recipe, tmp_path):
    missing = tmp_path / "no_such_dir"
    proc = run(train_cmd(recipe, f"data.train={missing}", "--run-dir", tmp_path / "run"), cwd=tmp_path)
    one_line_error(proc, "data.train", str(missing), "does not exist", "fastairl data digits")
    assert not (tmp_path / "run").exists()  # no half-made run dir left behind to trip a rerun


def test_empty_class_folder_is_named(digits_root, recipe, tmp_path):
    root = small_folder(digits_root / "train", tmp_path / "train", per_class=2)
    (root / "zz_empty").mkdir()
    proc = run(train_cmd(recipe, f"data.train={root}", "--run-dir", tmp_path / "run"), cwd=tmp_path)
    one_line_error(proc, "data.train", str(root / "zz_empty"), "has no images")
    assert not (tmp_path / "run").exists()


def test_val_classes_unlike_train_are_refused_before_training(digits_root, recipe, tmp_path):
    """Labels are class indices within each split: a val folder without class 3 would label its 4s
    as 3s. The kNN monitor would report on shifted labels after an epoch; the run refuses at once."""
    import shutil

    val = small_folder(digits_root / "val", tmp_path / "val", per_class=2)
    shutil.rmtree(val / "3")
    proc = run(train_cmd(recipe, f"data.val={val}", "probe.knn_every_epochs=1", "--run-dir", tmp_path / "run"),
               cwd=tmp_path)
    one_line_error(proc, "data.val has 9 classes and data.train 10", "only in data.train: 3")
    assert not (tmp_path / "run").exists()


def test_final_eval_without_val_is_refused_before_training(recipe, tmp_path):
    proc = run(train_cmd(recipe, "probe.final_eval=true", "--run-dir", tmp_path / "run"), cwd=tmp_path)
    one_line_error(proc, "probe.final_eval needs data.val")
    assert not (tmp_path / "run").exists()  # refused before the first step, not after training


# Put on PYTHONPATH, this makes `nvidia.dali` unimportable in the child, whether DALI is installed or not.
NO_DALI = """import sys


class _NoDali:
    def find_spec(self, name, path=None, target=None):
        if name == "nvidia.dali" or name.startswith("nvidia.dali."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, _NoDali())
"""


def test_dali_without_dali_says_how_to_install(recipe, tmp_path, monkeypatch):
    blocker = tmp_path / "no_dali"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_DALI)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(blocker), os.environ.get("PYTHONPATH")) if p))
    proc = run(train_cmd(recipe, "data.pipeline=dali", "--run-dir", tmp_path / "run"), cwd=tmp_path)
    line = one_line_error(proc)
    assert line == "error: DALI is not installed: pip install 'fastairl[dali]'"


def test_print_config_shows_the_resolved_recipe_and_does_not_train(recipe, tmp_path):
    run_dir = tmp_path / "run"
    proc = run(train_cmd(recipe, "optim.base_lr=0.5", "--print-config", "--run-dir", run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["optim"]["base_lr"] == 0.5  # the override
    assert cfg["model"]["arch"] == "resnet10"  # the tiny recipe
    assert cfg["method"]["loss"] == "infonce" and cfg["optim"]["momentum"] == 0.9  # its bases
    assert cfg["train"]["resume"] == "none"  # and the defaults
    assert not run_dir.exists() and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def fraction_run(recipe, tmp_path_factory):
    """`python fastairl/train.py` on half of the digit classes."""
    tmp = tmp_path_factory.mktemp("fraction")
    run_dir = tmp / "run"
    proc = run(train_cmd(recipe, "data.class_fraction=0.5", "train.max_steps=2", "--run-dir", run_dir), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_a_tiny_run_leaves_a_self_describing_run_dir(fraction_run):
    for name in RUN_FILES:
        assert (fraction_run / name).is_file(), name
    cfg = yaml.safe_load((fraction_run / "config.yaml").read_text())
    assert cfg["data"]["class_fraction"] == 0.5 and cfg["train"]["max_steps"] == 2
    env = json.loads((fraction_run / "env.json").read_text())
    assert env["num_processes"] == 1 and env["torch"] and env["global_batch"] == 16
    summary = json.loads((fraction_run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["global_batch"] == 16
    logged = losses(fraction_run)
    assert sorted(logged) == [1, 2] and all(math.isfinite(v) for v in logged.values())
    classes = (fraction_run / "classes.txt").read_text().split()
    assert len(classes) == 5 and set(classes) <= {str(d) for d in range(10)}
    assert "warmup_epochs" not in (fraction_run / "log.txt").read_text()  # 1 warm-up epoch of 2


@pytest.mark.slow
def test_module_entry_point_and_class_subset_is_repeatable(recipe, fraction_run, tmp_path):
    run_dir = tmp_path / "run"
    # overrides may also follow the options
    proc = run([sys.executable, "-m", "fastairl.cli", "train", recipe, "--run-dir", run_dir,
                "data.class_fraction=0.5", "train.max_steps=1", "optim.warmup_epochs=3",
                "probe.final_labels_per_class=[2]", "train.keep_iterations=true", "train.ckpt_every_epochs=1"],
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "classes.txt").read_text() == (fraction_run / "classes.txt").read_text()
    assert sorted(losses(run_dir)) == [1]
    # a warm-up longer than the run is allowed, and said
    log = (run_dir / "log.txt").read_text()
    assert "warning: optim.warmup_epochs=3 covers all 2 epochs" in log
    # half the classes, the full run's iterations: twice the epochs, and twice the warm-up epochs
    assert re.search(r"class_fraction=0.5: 4 epochs of (\d+) steps, warm-up 6 epochs \((\d+) steps\)", log)
    # the epoch intervals are not scaled: what they give is said, with the value that keeps the cadence
    assert ("note: train.ckpt_every_epochs=1 gives 4 times in 4 epochs (2 in the full recipe's 2; "
            "train.ckpt_every_epochs=2 keeps that)") in log
    # few-label evaluation asked for without the final evaluation: said, not silently dropped
    assert "warning: probe.final_labels_per_class=[2] is ignored: probe.final_eval is false" in log


@pytest.mark.slow
def test_accelerate_launch(recipe, tmp_path):
    run_dir = tmp_path / "run"
    proc = run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--num_processes", "1",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
                TRAIN_PY, recipe, "train.max_steps=1", "--run-dir", run_dir], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert len((run_dir / "classes.txt").read_text().split()) == 10
    assert json.loads((run_dir / "env.json").read_text())["num_processes"] == 1
