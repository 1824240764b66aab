"""Fault injection: the faults are real, not mocked away. Training subprocesses are SIGKILLed at random
points and resumed; checkpoints are truncated and bit-flipped; SIGTERM / SIGUSR1 are sent; the loss
is poisoned with NaN; training folders hold truncated, empty and non-image files; the disk fills up (a
tiny tmpfs, a file-size limit); the run dir is read-only; one of two torchrun processes is killed or
frozen. Every resumed run is compared, bit for bit on CPU, with the run that was never interrupted.
(Graceful mid-epoch resume and damaged-checkpoint fallback of a whole run: tests/test_resume.py.)"""
from __future__ import annotations

import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastairl import checkpoint, cli, trainer
from fastairl.config import load_config
from fastairl.data.augment import sample_rng, spec_from_config
from fastairl.data.datasets import scan_folder
from fastairl.methods import Siamese
from fastairl.pipelines.torch_ref import DualViewDataset, TorchTrainLoader
from tiny_runs import (TRAIN_PY, losses, one_intra_op_thread, one_line_error, small_folder, train_cmd,
                       write_recipe)

TOTAL = 8  # 4 epochs of 2 steps (40 images, batch 16)
NOISY = ("img_per_s", "data_wait_frac")  # wall-clock measurements


fixed_threads = pytest.fixture(scope="module", autouse=True)(one_intra_op_thread)


@pytest.fixture(scope="module")
def images(digits_root, tmp_path_factory):
    return small_folder(digits_root / "train", tmp_path_factory.mktemp("faults") / "train", per_class=4)


@pytest.fixture(scope="module")
def recipe(images, tmp_path_factory):
    # a checkpoint after every step: a SIGKILL anywhere loses at most the step in flight; a log row
    # every 2 steps: a resume inside a log interval must still log the same means
    return write_recipe(tmp_path_factory.mktemp("recipe") / "tiny.yaml", images,
                        train={"epochs": TOTAL // 2, "ckpt_every_steps": 1, "log_every": 2})


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    """The uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _train(recipe, run_dir)
    return run_dir


def _train(recipe, run_dir, *overrides):
    return trainer.train(load_config(recipe, list(overrides)), run_dir)


def _rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in NOISY} for r in rows]


def _same_final_state(run_dir, reference) -> None:
    ref, got = checkpoint.load(reference / "last.pt"), checkpoint.load(run_dir / "last.pt")
    assert got["step"] == ref["step"] == TOTAL
    for k in ref["model"]:  # student, teacher, probe, BN statistics, queue
        assert torch.equal(ref["model"][k], got["model"][k]), k
    for p, s in ref["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], got["optimizer"]["state"][p]["momentum_buffer"]), p


def _start(recipe, run_dir, tmp_path, *overrides) -> subprocess.Popen:
    """`python fastairl/train.py` in the background, in a process group of its own (its loader workers
    included); stdout / stderr go to files next to the run dir."""
    out = open(tmp_path / "stdout.txt", "w")
    err = open(tmp_path / "stderr.txt", "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [str(c) for c in train_cmd(recipe, "--run-dir", run_dir, *overrides)]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=err, start_new_session=True)


def _logged_step(run_dir) -> int:
    try:
        rows = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(r)["step"] for r in rows if r.endswith("}")]
    return max(steps, default=0)


def _wait_for_step(run_dir, proc, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _logged_step(run_dir) < step:
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s"
        time.sleep(0.05)


def _cli(capsys, *argv) -> SimpleNamespace:
    """`fastairl train ARGV` in this process: (returncode, stderr), like a finished subprocess."""
    capsys.readouterr()
    code = cli.train_main([str(a) for a in argv])
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


# ------------------------------------------------------------------------------ checkpoint files
def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(64, 64, generator=g), "queue_ptr": torch.tensor(3)},
            "optimizer": {"state": {0: {"momentum_buffer": torch.randn(64, generator=g)}},
                          "param_groups": [{"lr": 0.1, "params": [0]}]},
            "step": seed, "config": {"name": "x", "crop_scale": [0.2, 1.0], "val": None},
            "rng": checkpoint.rng_state(), "knn": [{"epoch": 1, "top1": 12.5}]}


def test_checkpoint_loads_weights_only_and_verified(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save(_state(), path)
    raw = torch.load(path, weights_only=True)  # no pickled code: tensors, numbers, strings only
    assert raw["digest"] == checkpoint.content_digest(raw)
    got = checkpoint.load(path)
    assert torch.equal(got["model"]["w"], _state()["model"]["w"]) and got["knn"] == _state()["knn"]
    checkpoint.set_rng_state(got["rng"])  # the RNG states round-trip in a weights_only form
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("how", ["truncate", "flip_tensor_byte", "flip_number_bit", "zero_bytes"])
def test_damaged_checkpoint_is_refused(tmp_path, how):
    path = tmp_path / "c.pt"
    checkpoint.save(_state(), path)
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "flip_tensor_byte":
        data[len(data) // 2] ^= 0x01
    elif how == "flip_number_bit":  # kNN top-1 12.5 -> 12.500000000000002 inside the pickled metadata
        data[data.index(struct.pack(">d", 12.5)) + 7] ^= 0x01
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    if how.startswith("flip"):  # torch alone loads it, silently wrong: the digest is what catches it
        assert torch.load(path, weights_only=True)["step"] == 0
    with pytest.raises(checkpoint.CheckpointError, match=f"cannot load checkpoint {path}"):
        checkpoint.load(path)


def test_last_is_rotated_and_periodic_ones_pruned(tmp_path):
    ckpts = checkpoint.RunCheckpoints(tmp_path)
    for step in (1, 2, 3):
        ckpts.save_last(_state(step))
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 3
    assert checkpoint.load(tmp_path / "last.prev.pt")["step"] == 2
    for epoch in (1, 2, 3, 4):
        ckpts.save_periodic(_state(epoch), epoch, keep_last_k=2)
    assert sorted(p.name for p in tmp_path.glob("epoch_*")) == ["epoch_003.pt", "epoch_004.pt"]


def test_background_writes_keep_the_state_of_the_save_one_at_a_time_and_report_failures(tmp_path):
    """The state is copied when `submit` returns (training then changes it in place); a write waits for
    the one before it; a failed write is raised by the next submit or wait, once."""
    writer, events = checkpoint.BackgroundWriter(), []
    state = _state(1)

    def slow(copy):
        events.append(("start", copy["step"]))
        time.sleep(0.3)
        checkpoint.save(copy, tmp_path / f"s{copy['step']}.pt")
        events.append(("end", copy["step"]))

    writer.submit(slow, state)
    w = state["model"]["w"].clone()
    state["model"]["w"].add_(1.0)  # the next training step, in place, while step 1 is being written
    state["step"] = 2
    writer.submit(slow, state)
    writer.wait()
    assert events == [("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    assert torch.equal(checkpoint.load(tmp_path / "s1.pt")["model"]["w"], w)
    assert torch.equal(checkpoint.load(tmp_path / "s2.pt")["model"]["w"], w + 1)

    def full(copy):
        raise checkpoint.CheckpointError("cannot write checkpoint x (No space left on device)")

    writer.submit(full, state)  # returns: the failure is the background thread's
    with pytest.raises(checkpoint.CheckpointError, match="No space left"):
        writer.submit(slow, state)
    assert events[-1] == ("end", 2)  # the submit that raised wrote nothing
    writer.submit(full, state)
    with pytest.raises(checkpoint.CheckpointError, match="No space left"):
        writer.wait()
    writer.wait()  # reported once


def test_latest_falls_back_to_the_newest_good_checkpoint(tmp_path):
    ckpts = checkpoint.RunCheckpoints(tmp_path)
    ckpts.save_last(_state(4))
    ckpts.save_last(_state(6))  # last.prev.pt: step 4
    checkpoint.save(_state(5), tmp_path / "epoch_005.pt")
    (tmp_path / "last.pt").write_bytes((tmp_path / "last.pt").read_bytes()[:1000])
    warnings = []
    path, state = checkpoint.RunCheckpoints(tmp_path).latest(warnings.append)
    assert (path.name, state["step"]) == ("epoch_005.pt", 5)  # newer than last.prev.pt
    assert len(warnings) == 1 and "last.pt" in warnings[0]
    # a damaged last.pt is not rotated into last.prev.pt, which keeps the older good state
    ckpts = checkpoint.RunCheckpoints(tmp_path)
    ckpts.save_last(_state(7))
    assert checkpoint.load(tmp_path / "last.prev.pt")["step"] == 4


def _tmpfs(path: Path, size: str, *flags: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    opts = ",".join((f"size={size}",) + flags)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")


@pytest.fixture
def mounts():
    made: list[Path] = []
    yield made
    for m in made:
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def test_full_tmpfs_keeps_the_previous_checkpoint(tmp_path, mounts):
    """A real ENOSPC: room for one checkpoint, not for the second one's temporary file."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2 ** 20), "step": 1}, buf)
    size = len(buf.getvalue())  # about one checkpoint of this state
    disk = tmp_path / "disk"
    _tmpfs(disk, str(size * 3 // 2))
    mounts.append(disk)
    ckpts = checkpoint.RunCheckpoints(disk)
    ckpts.save_last({"w": torch.ones(2 ** 20), "step": 1})
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        ckpts.save_last({"w": torch.full((2 ** 20,), 2.0), "step": 2})
    assert checkpoint.load(disk / "last.pt")["step"] == 1
    assert sorted(p.name for p in disk.iterdir()) == ["last.pt"]  # the temporary file is gone


# ----------------------------------------------------------------------------- kills and signals
@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_random_points_then_resume_is_exact(recipe, reference, tmp_path, seed):
    """Two SIGKILLs at random moments (inside a step, a checkpoint write, start-up), each followed by
    train.resume=auto; the finished run equals the uninterrupted one, every logged value and weight."""
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    first = rng.randint(1, 3)
    for target in (first, rng.randint(first + 2, TOTAL - 2)):
        proc = _start(recipe, run_dir, tmp_path, "train.resume=auto")
        _wait_for_step(run_dir, proc, target)
        time.sleep(rng.uniform(0.0, 0.5))  # somewhere in the next step or its checkpoint write
        proc.kill()
        assert proc.wait(60) == -signal.SIGKILL

    summary = _train(recipe, run_dir, "train.resume=auto")
    assert summary["steps"] == TOTAL
    # a leg killed before its first checkpoint was complete starts afresh; the last one resumes
    assert "resumed from" in (run_dir / "log.txt").read_text()
    assert _rows(run_dir) == _rows(reference)  # no row lost, none duplicated, every value equal
    _same_final_state(run_dir, reference)
    assert not list(run_dir.glob("*.tmp"))


@pytest.mark.slow
def test_sigterm_saves_then_exits_75_and_resume_is_exact(recipe, reference, tmp_path):
    """SIGTERM to the whole process group, as a scheduler or a terminal sends it: the loader's worker
    process dies at once, the trainer still stops cleanly after its step."""
    run_dir = tmp_path / "run"
    # only the signal saves mid-epoch
    proc = _start(recipe, run_dir, tmp_path, "train.ckpt_every_steps=0", "data.workers=1")
    _wait_for_step(run_dir, proc, 3)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(120) == cli.EXIT_PREEMPTED == 75
    err = (tmp_path / "stderr.txt").read_text().strip().splitlines()
    step = checkpoint.load(run_dir / "last.pt")["step"]
    assert err[-1] == (f"stopped by SIGTERM at step {step}; checkpoint saved to {run_dir / 'last.pt'}; "
                       f"continue with train.resume=auto (--resume)")
    assert step == max(losses(run_dir)) >= 3  # the state after the last step it logged

    assert _train(recipe, run_dir, "train.resume=auto")["steps"] == TOTAL
    assert _rows(run_dir) == _rows(reference)
    _same_final_state(run_dir, reference)


def _after_step(monkeypatch, at: int, action) -> None:
    """Run `action()` right after the trainer's step `at` (0-based)."""
    step_fn = trainer.train_step

    def wrapped(*args, **kwargs):
        out = step_fn(*args, **kwargs)
        if args[7] == at:
            action()
        return out

    monkeypatch.setattr(trainer, "train_step", wrapped)


def test_sigusr1_saves_then_exits_75_and_resume_is_exact(recipe, reference, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    before = signal.getsignal(signal.SIGUSR1)
    with monkeypatch.context() as m:
        _after_step(m, 2, lambda: os.kill(os.getpid(), signal.SIGUSR1))
        proc = _cli(capsys, recipe, "--run-dir", run_dir, "train.ckpt_every_steps=0")
    assert proc.returncode == cli.EXIT_PREEMPTED
    assert f"stopped by SIGUSR1 at step 3; checkpoint saved to {run_dir / 'last.pt'}" in proc.stderr
    assert checkpoint.load(run_dir / "last.pt")["step"] == 3  # mid-epoch: saved by the signal alone
    assert signal.getsignal(signal.SIGUSR1) is before  # the handlers live only as long as the loop
    # step 3 sits inside the log interval of steps 3-4: the resumed run logs the same mean
    _train(recipe, run_dir, "train.resume=auto")
    assert _rows(run_dir) == _rows(reference)
    _same_final_state(run_dir, reference)


def test_a_signal_at_an_epoch_end_saves_before_the_knn_monitor(recipe, images, tmp_path, monkeypatch, capsys):
    """The epoch-end kNN can outlast a scheduler's grace period: after a signal it is skipped, and the
    epoch-end checkpoint is written at once."""
    run_dir = tmp_path / "run"
    with monkeypatch.context() as m:
        _after_step(m, 1, lambda: os.kill(os.getpid(), signal.SIGUSR1))  # step 2: the end of epoch 1
        m.setattr(trainer, "knn_monitor", lambda *a, **kw: pytest.fail("the kNN monitor ran after the signal"))
        proc = _cli(capsys, recipe, "--run-dir", run_dir, "train.ckpt_every_steps=0", f"data.val={images}",
                    "probe.knn_every_epochs=1")
    assert proc.returncode == cli.EXIT_PREEMPTED, proc.stderr
    assert checkpoint.load(run_dir / "last.pt")["step"] == 2


# Runs the launch script with `extract` wrapped: after the first batch of the first feature extraction
# (the epoch-end kNN monitor's bank) the whole process group gets SIGTERM, as from a scheduler.
SIGNAL_IN_KNN = """
import os, runpy, signal, sys, time
import fastairl.eval.features as features

real, calls = features.extract, []

def extract(encoder, loader, *args, **kwargs):
    calls.append(1)

    class Signalling:
        def __iter__(self):
            for i, batch in enumerate(loader):
                if i == 0 and len(calls) == 1:
                    os.killpg(os.getpgid(0), signal.SIGTERM)
                    time.sleep(1.0)  # the signal reaches the loader's workers while they are alive
                yield batch

        def __getattr__(self, name):
            return getattr(loader, name)

    return real(encoder, Signalling(), *args, **kwargs)

features.extract = extract
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_signal_during_the_knn_monitor_still_saves_the_epoch(digits_root, tmp_path):
    """The monitor's loader workers outlive the process-group SIGTERM: the kNN of the epoch ends, the
    epoch-end checkpoint is written, and the run stops with 75 (the workers used to die, and the run
    with them: exit 1, no checkpoint). 300 images: the bank takes two batches of 256."""
    images = small_folder(digits_root / "train", tmp_path / "train", per_class=30)
    recipe = write_recipe(tmp_path / "tiny.yaml", images, method={"queue_size": 200},
                          train={"epochs": 2, "batch_size": 100, "ckpt_every_steps": 0},
                          data={"val": str(images), "workers": 1}, probe={"knn_every_epochs": 1})
    (tmp_path / "harness.py").write_text(SIGNAL_IN_KNN)
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, tmp_path / "harness.py", *train_cmd(recipe, "--run-dir", run_dir)[1:]],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode == cli.EXIT_PREEMPTED, proc.stderr[-3000:]
    assert checkpoint.load(run_dir / "last.pt")["step"] == 3  # the end of epoch 1
    assert [r["knn_top1"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "knn_top1" in r]  # the epoch's kNN was logged


# --------------------------------------------------------------------------------------- NaN / inf
def _nan_at(monkeypatch, bad_step: int) -> None:
    """Poison the loss of step `bad_step` (0-based): loss and every gradient become NaN."""
    forward = Siamese.forward

    def poisoned(self, views, labels, step):
        loss, metrics = forward(self, views, labels, step)
        return (loss * float("nan") if step == bad_step else loss), metrics

    monkeypatch.setattr(Siamese, "forward", poisoned)


def test_nan_stop_names_the_step_and_keeps_the_last_good_checkpoint(recipe, tmp_path, monkeypatch):
    """log_every is large, so the check before the step-4 checkpoint is the one that catches step 3."""
    run_dir = tmp_path / "run"
    _nan_at(monkeypatch, 2)
    with pytest.raises(trainer.NonFiniteError) as e:
        _train(recipe, run_dir, "train.log_every=100", "train.ckpt_every_steps=0")
    # the NaN update of step 3 made step 4 non-finite too
    assert str(e.value).startswith("non-finite loss or gradients at step 3 (2 bad step(s) up to step 4)")
    assert f"last good checkpoint is {run_dir / 'last.pt'} (step 2)" in str(e.value)
    state = checkpoint.load(run_dir / "last.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nan_stop_after_a_failed_background_write_still_stops_for_the_nan(recipe, tmp_path, monkeypatch):
    """The step-2 checkpoint write fails on the writer's thread; the NaN found before the step-4 save is
    still the error (exit 3), it names no checkpoint as good, and says the write failed too."""
    run_dir = tmp_path / "run"
    _nan_at(monkeypatch, 2)

    def full(self, state):
        raise checkpoint.CheckpointError("cannot write checkpoint last.pt (No space left on device)")

    monkeypatch.setattr(checkpoint.RunCheckpoints, "save_last", full)
    with pytest.raises(trainer.NonFiniteError) as e:
        _train(recipe, run_dir, "train.log_every=100", "train.ckpt_every_steps=0")
    assert "last good checkpoint is none (no checkpoint written yet)" in str(e.value)
    assert str(e.value).endswith("; the last checkpoint write failed too: cannot write checkpoint last.pt "
                                 "(No space left on device)")


def test_diverging_run_exits_3_with_one_line(recipe, tmp_path, capsys):
    """A real divergence, nothing injected: lr 1e30 makes the step-2 loss NaN."""
    proc = _cli(capsys, recipe, "--run-dir", tmp_path / "run", "optim.base_lr=1e30")
    assert proc.returncode == cli.EXIT_NONFINITE == 3
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite loss or gradients at step 2") and "train.nan_policy=skip" in line


def test_nan_skip_leaves_no_trace(recipe, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _nan_at(monkeypatch, 2)
    after: list = []  # the whole state after each step: model (incl. BN statistics, queue), optimizer

    def record(model, unwrapped, optimizer, *args, **kwargs):
        out = step_fn(model, unwrapped, optimizer, *args, **kwargs)
        after.append(({k: v.clone() for k, v in unwrapped.state_dict().items()},
                      [s["momentum_buffer"].clone() for s in optimizer.state_dict()["state"].values()]))
        return out

    step_fn = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", record)
    summary = _train(recipe, run_dir, "train.nan_policy=skip", "train.max_steps=4", "train.log_every=1")

    (m1, o1), (m2, o2), (m3, _) = after[1], after[2], after[3]
    assert "queue" in m2 and all(torch.equal(m1[k], m2[k]) for k in m1)  # step 3 changed nothing
    assert all(torch.equal(a, b) for a, b in zip(o1, o2))
    assert not torch.equal(m2["queue"], m3["queue"])  # step 4 trained again
    assert all(torch.isfinite(v).all() for v in m3.values() if v.is_floating_point())
    rows = {r["step"]: r for r in _rows(run_dir)}
    assert rows[3]["nonfinite_skipped"] == 1 and "loss_ssl" not in rows[3]
    assert rows[4]["nonfinite_skipped"] == 0 and rows[4]["loss_ssl"] == rows[4]["loss_ssl"]
    assert summary["nonfinite_skipped"] == 1
    assert "step 3: non-finite loss or gradients, step skipped" in (run_dir / "log.txt").read_text()


# ------------------------------------------------------------------------------------ bad images
BAD = ("truncated.jpg", "empty.jpg", "notes.png")


@pytest.fixture(scope="module")
def bad_folder(digits_root, tmp_path_factory):
    """16 files, one global batch: 13 real digits and a truncated JPEG, a zero-byte one, a text file."""
    root = small_folder(digits_root / "train", tmp_path_factory.mktemp("bad") / "train", per_class=1)
    extra = sorted((digits_root / "train" / "1").iterdir())[1:4]
    for f in extra:
        shutil.copy(f, root / "1" / f.name)
    real = (root / "1" / extra[0].name).read_bytes()
    (root / "0" / BAD[0]).write_bytes(real[: len(real) // 2])
    (root / "0" / BAD[1]).write_bytes(b"")
    (root / "2" / BAD[2]).write_text("not an image\n")
    assert len(list(root.rglob("*.*"))) == 16
    return root


@pytest.fixture(scope="module")
def bad_recipe(bad_folder, tmp_path_factory):
    return write_recipe(tmp_path_factory.mktemp("bad_recipe") / "tiny.yaml", bad_folder,
                        train={"epochs": 2, "batch_size": 16})


def test_bad_images_are_replaced_deterministically(bad_recipe, bad_folder):
    samples, classes = scan_folder(bad_folder)
    spec = spec_from_config(load_config(bad_recipe).aug, num_views=2)
    bad = [i for i, (p, _) in enumerate(samples) if Path(p).name in BAD]
    warm, fresh = DualViewDataset(samples, spec), DualViewDataset(samples, spec)
    for i in range(len(samples)):
        warm[(0, i)]  # `warm` has met every bad file (flagged), `fresh` has not: same items either way
    for i in bad:
        views, label = fresh[(0, i)]
        again, label_again = warm[(0, i)]
        assert label == label_again and all(torch.equal(a, b) for a, b in zip(views, again))
        # a real other image of the folder with this sample's augmentation stream, not zeros
        source = [j for j, (p, _) in enumerate(samples) if j not in bad
                  and torch.equal(fresh.make_views(p, sample_rng(0, 0, i))[0], views[0])]
        assert source and samples[source[0]][1] == label

    # a loader worker process flags the files; the trainer's process reads them; batches do not depend
    # on who loaded them
    batches = []
    for workers in (0, 1):
        loader = TorchTrainLoader(samples, classes, spec, 16, workers=workers)
        loader.set_epoch(0)
        batches.append(next(iter(loader)))
        assert sorted(Path(p).name for p in loader.bad_files()) == sorted(BAD)
    assert all(torch.equal(a, b) for a, b in zip(batches[0][0], batches[1][0]))


def test_bad_images_are_logged_once_and_training_goes_on(bad_recipe, bad_folder, tmp_path):
    run_dir = tmp_path / "run"
    summary = _train(bad_recipe, run_dir, "data.max_bad_fraction=0.25")  # 3 of 16 are bad: tolerated
    assert summary["steps"] == 2  # two epochs, every file met twice
    log = (run_dir / "log.txt").read_text()
    for name in BAD:
        path = next(bad_folder.rglob(name))
        assert log.count(f"warning: unreadable image {path} in data.train: replaced by another sample") == 1
    assert log.count("unreadable image") == 3


def test_too_many_bad_images_stop_the_run_with_the_list(bad_recipe, bad_folder, tmp_path, capsys):
    proc = _cli(capsys, bad_recipe, "--run-dir", tmp_path / "run", "data.max_bad_fraction=0.1")
    paths = [str(next(bad_folder.rglob(name))) for name in BAD]
    one_line_error(proc, "3 of the 16 images in data.train are unreadable", "data.max_bad_fraction=0.1",
                   *paths)


# ---------------------------------------------------------------------------- disks and run dirs
@pytest.mark.parametrize("kind", ["below_a_file", "read_only"])
def test_unwritable_run_dir_is_a_clear_error_before_training(recipe, tmp_path, kind, monkeypatch, capsys,
                                                             mounts):
    if kind == "below_a_file":
        (tmp_path / "file").write_text("x")
        run_dir = tmp_path / "file" / "run"
    elif os.geteuid() == 0:  # root writes through file modes: a read-only mount is the real thing
        _tmpfs(tmp_path / "ro", "1m", "ro")
        mounts.append(tmp_path / "ro")
        run_dir = tmp_path / "ro" / "run"
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        run_dir = tmp_path / "ro" / "run"
    _after_step(monkeypatch, 0, lambda: pytest.fail("training started"))
    proc = _cli(capsys, recipe, "--run-dir", run_dir)
    one_line_error(proc, f"run dir {run_dir} is not writable", "train.out_dir or --run-dir")


@pytest.mark.slow
def test_failed_checkpoint_write_keeps_the_previous_one_and_resume_is_exact(recipe, reference, tmp_path,
                                                                            capsys):
    """A file-size limit makes every checkpoint write fail (EFBIG, like a full disk) while logs still
    fit; the checkpoint of the earlier leg survives, and the run goes on from it exactly."""
    run_dir = tmp_path / "run"
    _train(recipe, run_dir, "train.max_steps=4")  # at a log step: max_steps also logs the step it stops at
    size = (run_dir / "last.pt").stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, hard))
    try:
        proc = _cli(capsys, recipe, "--run-dir", run_dir, "--resume")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    one_line_error(proc, f"cannot write checkpoint {run_dir / 'last.pt'} (File too large)",
                   "the previous checkpoint is intact")
    assert checkpoint.load(run_dir / "last.pt")["step"] == 4
    assert not list(run_dir.glob("*.tmp"))

    _train(recipe, run_dir, "train.resume=auto")
    assert _rows(run_dir) == _rows(reference)
    _same_final_state(run_dir, reference)


# ----------------------------------------------------------------------------------- distributed
def _torchrun(recipe, run_dir, tmp_path, *overrides) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           TRAIN_PY, recipe, "--run-dir", run_dir, *overrides]
    err = open(tmp_path / "stderr.txt", "w")
    return subprocess.Popen([str(c) for c in cmd], cwd=tmp_path, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.DEVNULL, stderr=err)


def _rank_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes (its children with RANK in their environment)."""
    pids = {}
    for d in Path("/proc").iterdir():
        try:
            if not d.name.isdigit() or int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError):
            continue
        if "RANK" in env:
            pids[int(env["RANK"])] = int(d.name)
    return pids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _dist_recipe(images, tmp_path):
    return write_recipe(tmp_path / "tiny.yaml", images, train={"epochs": 100, "ckpt_every_steps": 2,
                                                               "dist_timeout_minutes": 0.25})


@pytest.mark.slow
def test_killing_one_of_two_processes_ends_the_run_and_it_resumes(images, tmp_path):
    run_dir = tmp_path / "run"
    recipe = _dist_recipe(images, tmp_path)
    launcher = _torchrun(recipe, run_dir, tmp_path)
    try:
        _wait_for_step(run_dir, launcher, 3)
        pids = _rank_pids(launcher.pid)
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        assert launcher.wait(120) != 0
        assert time.monotonic() - t0 < 30, "the surviving process outlived its dead peer by 30 s"
    finally:
        launcher.kill()
    step = checkpoint.load(run_dir / "last.pt")["step"]  # rank 0 wrote it; it verifies
    assert step >= 2

    proc = _torchrun(recipe, run_dir, tmp_path, "train.resume=auto", f"train.max_steps={step + 2}")
    assert proc.wait(300) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert f"resumed from {run_dir / 'last.pt'} at step {step}" in (run_dir / "log.txt").read_text()
    assert checkpoint.load(run_dir / "last.pt")["step"] == step + 2


@pytest.mark.slow
def test_a_hung_process_makes_the_other_fail_after_the_timeout(images, tmp_path):
    """SIGSTOP keeps the frozen process's sockets open: only the process-group timeout
    (train.dist_timeout_minutes=0.25, 15 s) can end the wait of its peer."""
    run_dir = tmp_path / "run"
    launcher = _torchrun(_dist_recipe(images, tmp_path), run_dir, tmp_path)
    pids = {}
    try:
        _wait_for_step(run_dir, launcher, 3)
        pids = _rank_pids(launcher.pid)
        os.kill(pids[1], signal.SIGSTOP)
        t0 = time.monotonic()
        while _alive(pids[0]) and time.monotonic() - t0 < 120:
            time.sleep(0.2)
        waited = time.monotonic() - t0
    finally:
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.kill()
        launcher.wait(60)
    assert waited < 60, waited
    assert "Timed out waiting 15000ms" in (tmp_path / "stderr.txt").read_text()  # gloo, with our timeout
    assert checkpoint.load(run_dir / "last.pt")["step"] >= 2
