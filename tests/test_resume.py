"""Stop a run mid-epoch, resume it, and get exactly the run that never stopped (CPU is deterministic):
same per-step metrics, same final weights, queue, optimizer state and kNN history. Plus the resume
edge cases a user meets: a finished run, an existing run dir, a damaged checkpoint (resume falls back
to the previous one, exactly), every checkpoint damaged, a mismatched checkpoint.
(Kills, signals, NaN, bad data, full disks and dead processes: tests/test_faults.py.)"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastairl import checkpoint
from fastairl.config import load_config
from fastairl.trainer import train
from tiny_runs import losses, one_intra_op_thread, one_line_error, run, small_folder, train_cmd, write_recipe

pytestmark = pytest.mark.slow  # every test here needs a real training run

TOTAL = 4  # 2 epochs of 2 steps (40 images, batch 16)
NOISY = ("img_per_s", "data_wait_frac")  # wall-clock measurements


fixed_threads = pytest.fixture(scope="module", autouse=True)(one_intra_op_thread)


@pytest.fixture(scope="module")
def images(digits_root, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return (small_folder(digits_root / "train", root / "train", per_class=4),
            small_folder(digits_root / "val", root / "val", per_class=3))


@pytest.fixture(scope="module")
def recipe(images, tmp_path_factory):
    train_dir, val_dir = images
    # shuffle-BN (step-seeded permutation), random-view enqueue, online probe and the epoch-end kNN
    # monitor: every piece of state that a resume has to restore
    return write_recipe(tmp_path_factory.mktemp("recipe") / "tiny.yaml", train_dir,
                        method={"bn": "shuffle", "enqueue": "random_view"},
                        data={"val": str(val_dir)}, probe={"online": True, "knn_every_epochs": 1})


def _train(recipe, run_dir, *overrides):
    return train(load_config(recipe, list(overrides)), run_dir)


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in NOISY} for r in rows]


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    """The uninterrupted run (workers=0)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _train(recipe, run_dir, "data.workers=0")
    return run_dir


@pytest.mark.parametrize("workers, stop, second_max_steps", [(0, 3, 0), (1, 1, TOTAL)])
def test_resume_mid_epoch_is_exact(recipe, reference, tmp_path, workers, stop, second_max_steps):
    run_dir = tmp_path / "run"
    _train(recipe, run_dir, f"data.workers={workers}", f"train.max_steps={stop}")
    assert checkpoint.load(run_dir / "last.pt")["step"] == stop
    assert sorted(losses(run_dir)) == list(range(1, stop + 1))

    summary = _train(recipe, run_dir, f"data.workers={workers}", f"train.max_steps={second_max_steps}",
                     "train.resume=auto")
    assert summary["steps"] == TOTAL
    assert "resumed from" in (run_dir / "log.txt").read_text()
    # every logged value of every step, bit for bit (loss, probe loss/acc, feature std, lr, momentum)
    assert _rows(run_dir) == _rows(reference)

    ref = checkpoint.load(reference / "last.pt")  # weights_only=True, digest verified
    got = checkpoint.load(run_dir / "last.pt")
    assert got["step"] == ref["step"] == TOTAL
    assert ref["model"].keys() == got["model"].keys() and "queue" in got["model"]
    for k in ref["model"]:  # student, teacher, probe, BN statistics, queue and its pointer
        assert torch.equal(ref["model"][k], got["model"][k]), k
    for opt in ("optimizer", "probe_optimizer"):
        for p, state in ref[opt]["state"].items():
            assert torch.equal(state["momentum_buffer"], got[opt]["state"][p]["momentum_buffer"]), (opt, p)
    # the epoch-end kNN history spans both legs
    ref_summary = json.loads((reference / "summary.json").read_text())
    assert [e["epoch"] for e in summary["knn"]] == [1, 2]
    assert summary["knn"] == ref_summary["knn"]


def _copy(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    return run_dir


def test_resuming_a_finished_run_trains_nothing(reference, tmp_path):
    run_dir = _copy(reference, tmp_path)
    before = {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "last.pt")}
    # the run's own config.yaml is a complete recipe
    proc = run(train_cmd(run_dir / "config.yaml", "--resume", "--run-dir", run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for name, data in before.items():
        assert (run_dir / name).read_bytes() == data, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == TOTAL and [e["epoch"] for e in summary["knn"]] == [1, 2]


def test_resume_none_on_an_existing_run_is_refused(reference, tmp_path):
    run_dir = _copy(reference, tmp_path)
    proc = run(train_cmd(run_dir / "config.yaml", "--run-dir", run_dir, "train.resume=none"), cwd=tmp_path)
    one_line_error(proc, str(run_dir), "already holds a run", "train.resume=auto")


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        del data[len(data) // 3:]
    else:  # one flipped byte inside the tensor data: torch.load alone would not notice
        data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_damaged_last_checkpoint_falls_back_to_the_previous_one(recipe, reference, tmp_path, how):
    run_dir = _copy(reference, tmp_path)
    assert checkpoint.load(run_dir / "last.prev.pt")["step"] == 2  # the epoch-1 state, kept as fallback
    _damage(run_dir / "last.pt", how)

    summary = _train(recipe, run_dir, "data.workers=0", "train.resume=auto")
    log = (run_dir / "log.txt").read_text()
    assert f"warning: cannot load checkpoint {run_dir / 'last.pt'}" in log
    assert f"resumed from {run_dir / 'last.prev.pt'} at step 2" in log
    # steps 3-4 trained again, exactly; their old rows were dropped, not duplicated
    assert summary["steps"] == TOTAL and _rows(run_dir) == _rows(reference)
    ref, got = checkpoint.load(reference / "last.pt"), checkpoint.load(run_dir / "last.pt")
    for k in ref["model"]:
        assert torch.equal(ref["model"][k], got["model"][k]), k


def test_every_checkpoint_damaged_is_a_clear_error(reference, tmp_path):
    run_dir = _copy(reference, tmp_path)
    _damage(run_dir / "last.pt", "truncate")
    _damage(run_dir / "last.prev.pt", "flip")
    proc = run(train_cmd(run_dir / "config.yaml", "train.resume=auto", "--run-dir", run_dir), cwd=tmp_path)
    one_line_error(proc, f"no loadable checkpoint in {run_dir}", "last.pt, last.prev.pt", "remove them")


def test_damaged_named_checkpoint_is_a_clear_error(reference, tmp_path):
    run_dir = _copy(reference, tmp_path)
    _damage(run_dir / "last.pt", "flip")
    proc = run(train_cmd(run_dir / "config.yaml", f"train.resume={run_dir / 'last.pt'}", "--run-dir", run_dir),
               cwd=tmp_path)
    one_line_error(proc, f"cannot load checkpoint {run_dir / 'last.pt'}", "digest mismatch", "remove it")


def test_checkpoint_of_another_model_is_a_clear_error(reference, tmp_path):
    run_dir = _copy(reference, tmp_path)
    proc = run(train_cmd(run_dir / "config.yaml", "train.resume=auto", "model.projector.hidden_dim=48",
                         "--run-dir", run_dir), cwd=tmp_path)
    one_line_error(proc, f"{run_dir / 'last.pt'} does not fit this config", "size mismatch", "config.yaml")
