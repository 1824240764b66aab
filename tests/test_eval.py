"""`fastairl eval`: the protocols' lr rules against independent formulas, and kNN / linear (augmented
and cached) / fine-tuning runs on the bundled real digits, from random init and from a checkpoint."""
from __future__ import annotations

import json
import math
import dataclasses

import pytest
import torch

from fastairl.config import EvalConfig
from fastairl.eval.protocols import eval_lr, peak_lr, topk_correct, train_head_on_features
from tiny_runs import REPO, one_line_error, run, small_folder, train_cmd, write_recipe

EVAL_CMD = ["-m", "fastairl.cli", "eval"]


def _e(**kw):
    return dataclasses.replace(EvalConfig(), **kw)  # defaults: protocol A


def test_protocol_a_step_rule():
    e, spe = _e(), 10
    # lr 30 until epoch 60, 3 until 80, 0.3 after: checked on the first and last step of each stage
    for step, want in [(0, 30.0), (599, 30.0), (600, 3.0), (799, 3.0), (800, 0.3), (999, 0.3)]:
        assert eval_lr(e, step, spe) == pytest.approx(want)
    assert peak_lr(_e(batch_size=512)) == 60.0  # linear scaling with the batch


def test_protocol_b_cosine_rule():
    e, spe = _e(base_lr=0.2, batch_size=1024, schedule="cosine", milestones=(), epochs=80), 7
    total = 80 * 7
    for step in (0, 1, total // 3, total // 2, total - 1, total):
        assert eval_lr(e, step, spe) == pytest.approx(0.8 * (1 + math.cos(math.pi * step / total)) / 2)
    assert eval_lr(e, total // 2, spe) == pytest.approx(0.4)


def test_topk_correct_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0],   # top1 = 1
                           [0.6, 0.1, 0.2, 0.3, 0.4, 0.5],   # label 5: second
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])  # label 0: last (not in top 5)
    top1, top5 = topk_correct(logits, torch.tensor([1, 5, 0]))
    assert (int(top1), int(top5)) == (1, 2)


def test_head_on_features_learns_a_separable_problem():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(400) % 4
    x = centres[y] + torch.randn(400, 16, generator=g)
    head = train_head_on_features(_e(base_lr=0.1, epochs=5, milestones=(3,)), x, y, 4)
    assert (head(x).argmax(1) == y).float().mean() > 0.95


# ------------------------------------------------------------------------------------ real runs
def _tiny_eval_recipe(tmp_path, digits_root, **eval_keys):
    import yaml

    raw = {"base": str(REPO / "recipes" / "linear_a.yaml"), "name": "tiny_eval",
           "model": {"arch": "resnet10", "cifar_stem": True},
           "aug": {"crop_size": 32},
           "data": {"train": str(digits_root / "train"), "val": str(digits_root / "val"), "workers": 0,
                    "eval_resize": 32, "class_fraction": 0.5},
           "eval": {"epochs": 2, "batch_size": 64, "base_lr": 1.0, "milestones": [1], **eval_keys}}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _eval(tmp_path, recipe, *args):
    import sys

    return run([sys.executable, *EVAL_CMD, recipe, "--run-dir", tmp_path / "ev", *args], cwd=tmp_path)


@pytest.fixture(scope="module")
def pretrained(digits_root, tmp_path_factory):
    """A fastairl checkpoint from 3 steps of BYOL on the digits (cifar stem, resnet10)."""
    tmp = tmp_path_factory.mktemp("pre")
    recipe = write_recipe(tmp / "tiny.yaml", digits_root / "train", model={"cifar_stem": True})
    proc = run(train_cmd(recipe, "train.max_steps=3", "--run-dir", tmp / "run"), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run" / "last.pt"


def test_training_ends_by_evaluating_both_encoders_with_all_and_with_few_labels(tmp_path, digits_root):
    from fastairl.config import load_config
    from fastairl.trainer import train

    train_dir = small_folder(digits_root / "train", tmp_path / "train", 12)
    val_dir = small_folder(digits_root / "val", tmp_path / "val", 5)
    recipe = write_recipe(tmp_path / "r.yaml", train_dir, base="byol_sgd.yaml", data={"val": str(val_dir)},
                          train={"epochs": 1},
                          probe={"final_eval": True, "final_linear_epochs": 5, "final_labels_per_class": [3, 13],
                                 "final_label_draws": 2})
    summary = train(load_config(recipe), tmp_path / "run")
    fe = summary["final_eval"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final_eval"] == fe
    for enc in ("pretrained", "random_init"):
        few = fe[enc]["3_per_class"]
        assert (few["labelled"], few["draws"]) == (30, 2)
        assert 0.0 <= few["knn_top1"] <= 100.0 and 0.0 <= few["linear_top1"] <= 100.0
        # 13 per class is more than the 12 a class holds: said, and the rest of the evaluation is kept
        assert "probe.final_labels_per_class" in fe[enc]["13_per_class"]["error"]
        assert "only 12 samples" in fe[enc]["13_per_class"]["error"]
    gain = fe["gain_over_random_init"]
    for k in ("knn_top1", "linear_top1"):
        assert gain[k] == pytest.approx(fe["pretrained"][k] - fe["random_init"][k])
        assert gain["3_per_class"][k] == pytest.approx(fe["pretrained"]["3_per_class"][k] - fe["random_init"]["3_per_class"][k])
    assert "13_per_class" not in gain
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "[random_init], 3 labels per class (2 draws)" in log and "warning: probe.final_labels_per_class" in log


@pytest.mark.slow
def test_knn_from_random_init(tmp_path, digits_root):
    proc = _eval(tmp_path, _tiny_eval_recipe(tmp_path, digits_root, protocol="knn", knn_k=[5, 20]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["protocol"] == "knn" and s["backbone"]["kind"] == "random" and s["backbone"]["arch"] == "resnet10"
    assert set(s["knn_top1"]) == {"5", "20"}
    classes = {c.name for c in (digits_root / "val").iterdir()}
    n_val = sum(1 for c in (digits_root / "val").iterdir() for _ in c.glob("*.jpg"))
    assert len(classes) == 10 and 0.4 * n_val < s["val_samples"] < 0.6 * n_val  # class_fraction 0.5
    assert all(10.0 < v <= 100.0 for v in s["knn_top1"].values())  # random features beat chance on digits
    for f in ("config.yaml", "env.json", "metrics.jsonl"):
        assert (tmp_path / "ev" / f).is_file()


def _evaluate(recipe, run_dir, *overrides):
    """In-process `fastairl eval` (the CLI itself is exercised by the kNN and bad-input tests)."""
    from fastairl.config import load_config
    from fastairl.eval.run import evaluate

    evaluate(load_config(recipe, list(overrides)), str(run_dir))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return json.loads((run_dir / "summary.json").read_text()), rows


@pytest.mark.slow
def test_linear_from_a_checkpoint_and_cached(tmp_path, digits_root, pretrained):
    recipe = _tiny_eval_recipe(tmp_path, digits_root)
    s, rows = _evaluate(recipe, tmp_path / "ev", f"eval.checkpoint={pretrained}")
    assert s["backbone"]["kind"] == "fastairl" and s["backbone"]["path"] == str(pretrained)
    assert 20 < s["top1"] <= s["top5"] <= 100  # 5 classes: chance is 20 %
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["lr"] == pytest.approx(0.25 * 0.1)
    # cached features: the same protocol on centre-crop features extracted once
    c, rows = _evaluate(recipe, tmp_path / "cached", "eval.cache_features=true", f"eval.checkpoint={pretrained}")
    assert c["cache_features"] is True and c["train_samples"] > 0 and 20 < c["top1"] <= c["top5"] <= 100
    assert len(rows) == 2


@pytest.mark.slow
def test_linear_on_two_processes_equals_one(tmp_path, digits_root, pretrained):
    """torchrun, 2 processes (gloo): each reads half of every global batch (the keyed augmentations
    make the halves the same images and views as one process's batch) and DDP averages the head's
    gradients, so losses and accuracy match a one-process run of the same global batch."""
    import sys

    recipe = _tiny_eval_recipe(tmp_path, digits_root, val_every_epochs=1, epochs=3, milestones=[2],
                              base_lr=0.1)
    one, rows1 = _evaluate(recipe, tmp_path / "one", f"eval.checkpoint={pretrained}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *EVAL_CMD,
           recipe, f"eval.checkpoint={pretrained}", "--run-dir", tmp_path / "two"]
    proc = run(cmd, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    rows2 = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert one["num_processes"] == 1 and two["num_processes"] == 2 and two["batch_size"] == 64
    assert json.loads((tmp_path / "two" / "env.json").read_text())["num_processes"] == 2
    assert [r["epoch"] for r in rows2] == [1, 2, 3]  # rank 0 alone writes
    for a, b in zip(rows1, rows2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["lr"] == a["lr"]
        assert b["images"] == a["images"] > 0 and a["images"] % 64 == 0  # halves of each batch, not copies
    assert rows1[0]["val_samples"] == two["val_samples"] > 0
    assert rows1[0]["val_top1"] == pytest.approx(rows2[0]["val_top1"], abs=0.6)  # at most one image apart
    assert abs(one["top1"] - two["top1"]) < 0.6 and one["val_samples"] == two["val_samples"]
    assert rows1[-1]["loss"] < rows1[0]["loss"]  # the head learned
    # fine-tuning: DDP over the backbone too, BN statistics broadcast from rank 0 before evaluating
    ft = _tiny_eval_recipe(tmp_path, digits_root, protocol="finetune", epochs=1, milestones=[], base_lr=0.1)
    proc = run([*cmd[:-4], ft, "--run-dir", tmp_path / "ft"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert s["protocol"] == "finetune" and s["num_processes"] == 2 and 0 <= s["top1"] <= 100


@pytest.mark.slow
def test_accelerate_launch_runs_eval(tmp_path, digits_root):
    """`accelerate launch -m fastairl.cli eval ...` (one CPU process here: more need torchrun, above)."""
    import sys

    recipe = _tiny_eval_recipe(tmp_path, digits_root, protocol="knn", knn_k=[5])
    proc = run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--num_processes", "1",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "-m",
                "fastairl.cli", "eval", recipe, "--run-dir", tmp_path / "ev"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["protocol"] == "knn" and s["num_processes"] == 1 and 10.0 < s["knn_top1"]["5"] <= 100.0


@pytest.mark.slow
def test_knn_and_cached_linear_on_two_processes_equal_one(tmp_path, digits_root, pretrained):
    """torchrun, 2 processes: each encodes half of the bank and of the validation split; the gathered
    features, back in sample order, give what one process gives (the cached probe's shuffles depend on
    that order)."""
    import sys

    runs = {"knn": ["eval.protocol=knn", "eval.knn_k=[5,20]"], "cached": ["eval.cache_features=true"]}
    for name, overrides in runs.items():
        recipe = _tiny_eval_recipe(tmp_path, digits_root)
        one, _ = _evaluate(recipe, tmp_path / f"{name}1", f"eval.checkpoint={pretrained}", *overrides)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *EVAL_CMD,
               recipe, f"eval.checkpoint={pretrained}", *overrides, "--run-dir", tmp_path / f"{name}2"]
        proc = run(cmd, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        two = json.loads((tmp_path / f"{name}2" / "summary.json").read_text())
        assert two["num_processes"] == 2 and (two["train_samples"], two["val_samples"]) == \
            (one["train_samples"], one["val_samples"])
        for key in ("knn_top1",) if name == "knn" else ("top1", "top5"):
            assert two[key] == pytest.approx(one[key], abs=1e-3), key


def test_eval_leaves_the_precision_free_for_a_later_train(tmp_path, digits_root):
    """evaluate() sets up processes without fixing accelerate's mixed precision: a bf16 Accelerator
    (what train() builds on a GPU) can still follow it in the same process."""
    import sys

    recipe = _tiny_eval_recipe(tmp_path, digits_root, protocol="knn", knn_k=[5])
    code = ("import sys; from accelerate import Accelerator; from fastairl.config import load_config; "
            "from fastairl.eval.run import evaluate; evaluate(load_config(sys.argv[1]), sys.argv[2]); "
            "Accelerator(cpu=True, mixed_precision='bf16'); print('ok')")
    proc = run([sys.executable, "-c", code, recipe, tmp_path / "ev"], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.slow
def test_finetune_trains_the_backbone(tmp_path, digits_root):
    recipe = _tiny_eval_recipe(tmp_path, digits_root, protocol="finetune", epochs=1, milestones=[], base_lr=0.1)
    s, _ = _evaluate(recipe, tmp_path / "ev")
    assert s["protocol"] == "finetune" and 0 <= s["top1"] <= 100


def test_a_finished_run_dir_is_not_overwritten(tmp_path, digits_root):
    from fastairl.config import ConfigError

    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "summary.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a finished evaluation"):
        _evaluate(_tiny_eval_recipe(tmp_path, digits_root, protocol="knn"), tmp_path / "ev")
    assert (tmp_path / "ev" / "summary.json").read_text() == "{}"


def test_bad_inputs_are_one_line(tmp_path, digits_root):
    recipe = _tiny_eval_recipe(tmp_path, digits_root)
    proc = _eval(tmp_path, recipe, "--checkpoint", tmp_path / "nope.pt")
    line = one_line_error(proc)
    assert "nope.pt" in line and "does not exist" in line
    proc = _eval(tmp_path, recipe, "data.val=null")
    assert "data.val" in one_line_error(proc)
    proc = _eval(tmp_path, recipe, "eval.protocol=svm")
    assert "eval.protocol" in one_line_error(proc) and "'knn'" in one_line_error(proc)


def test_val_classes_unlike_train_are_one_line(tmp_path, digits_root):
    """kNN / cached features (bank vs val) and the augmented protocols (training loader vs val) both
    refuse a val split whose classes differ: its labels would be shifted class indices."""
    import shutil

    from tiny_runs import small_folder

    val = small_folder(digits_root / "val", tmp_path / "val", per_class=2)
    shutil.rmtree(val / "0")
    for protocol in ("knn", "linear"):
        recipe = _tiny_eval_recipe(tmp_path, digits_root, protocol=protocol)
        proc = _eval(tmp_path, recipe, f"data.val={val}", "data.class_fraction=1.0", "--checkpoint", "random")
        assert "only in data.train: 0" in one_line_error(proc, "data.val has 9 classes"), protocol
        assert not (tmp_path / "ev" / "summary.json").exists()


def test_an_unreadable_eval_image_is_one_line(tmp_path, digits_root):
    """Evaluation reads every image once, in order: a damaged one stops it, naming the file, not a traceback."""
    from tiny_runs import small_folder

    val = small_folder(digits_root / "val", tmp_path / "val", per_class=3)
    bad = val / "3" / "zz_truncated.jpg"
    bad.write_bytes(next((val / "3").glob("*.jpg")).read_bytes()[:40])
    recipe = _tiny_eval_recipe(tmp_path, digits_root, protocol="knn")
    proc = _eval(tmp_path, recipe, f"data.val={val}", "data.class_fraction=1.0", "--checkpoint", "random")
    assert str(bad) in one_line_error(proc)


def _tiny_cifar(root, n_train=300, n_test=60):
    """A CIFAR-10-format pickle folder of 32x32 crops of real photos (class = photo x position)."""
    import numpy as np
    from skimage import data as skdata

    from fastairl.data.cifar import write_cifar

    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket(), skdata.camera()]
    rng = np.random.default_rng(0)

    def crops(n):
        y = np.arange(n) % 10
        out = []
        for c in y:
            p = photos[c % 5]
            p = p if p.ndim == 3 else np.repeat(p[..., None], 3, axis=2)
            t = rng.integers(0, 60) + (0 if c < 5 else 140)
            l = rng.integers(0, 100) + (0 if c < 5 else 250)
            out.append(p[t: t + 96: 3, l: l + 96: 3])
        return np.stack(out), y

    return write_cifar(root, "cifar10", crops(n_train), crops(n_test), [f"class{i}" for i in range(10)])


def test_cifar_lt_folder_and_a_knn_eval_on_it(tmp_path):
    import sys

    from fastairl.data.cifar import lt_counts

    _tiny_cifar(tmp_path / "src")
    proc = run([sys.executable, "-m", "fastairl.cli", "data", "cifar", "--src", tmp_path / "src",
                "--out", tmp_path / "lt", "--lt-ratio", "10"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "lt" / "manifest.json").read_text())
    folders = sorted(p.name for p in (tmp_path / "lt" / "train").iterdir())
    assert folders == manifest["classes"] and folders[0] == "0_class0" and folders[-1] == "9_class9"
    got = [len(list((tmp_path / "lt" / "train" / c).glob("*.png"))) for c in folders]
    assert got == lt_counts(30, 10, 10.0)  # the exponential profile, head class first
    assert [len(list((tmp_path / "lt" / "val" / c).glob("*.png"))) for c in folders] == [6] * 10  # balanced

    import yaml

    recipe = tmp_path / "knn.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(REPO / "recipes" / "knn.yaml"), "name": "lt_knn",
        "model": {"arch": "resnet10", "cifar_stem": True}, "aug": {"crop_size": 32},
        "data": {"train": str(tmp_path / "lt" / "train"), "val": str(tmp_path / "lt" / "val"),
                 "workers": 0, "eval_resize": 32},
        "eval": {"knn_k": [5]}}))
    s, _ = _evaluate(recipe, tmp_path / "ev")
    assert s["train_samples"] == sum(got) and s["val_samples"] == 60 and 0 <= s["knn_top1"]["5"] <= 100
    proc = run([sys.executable, "-m", "fastairl.cli", "data", "cifar", "--out", tmp_path / "x"], cwd=tmp_path)
    assert "--src" in one_line_error(proc)


def test_quickstart_eval_recipe_matches_the_quickstart():
    from fastairl.config import load_config

    q, e = load_config(REPO / "recipes" / "quickstart.yaml"), load_config(REPO / "recipes" / "quickstart_eval.yaml")
    assert (e.model.arch, e.model.cifar_stem, e.aug.crop_size) == (q.model.arch, q.model.cifar_stem, q.aug.crop_size)
    assert (e.data.train, e.data.val) == (q.data.train, q.data.val)
    assert e.eval.protocol == "linear" and e.eval.cache_features and e.eval.momentum == 0.9 and e.eval.weight_decay == 0
