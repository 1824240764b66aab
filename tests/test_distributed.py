"""Two real processes (gloo on CPU) through `torchrun fastairl/train.py`: the MoCo queue is
all-gathered, shuffle-BN crosses processes, the processes stay in lock-step and read disjoint shards.

tests/dist_harness.py wraps the launch script and records what each process saw; the run itself is
the product's, unchanged.
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from tiny_runs import REPO, TRAIN_PY, losses, run, small_folder, write_recipe

STEPS, GLOBAL_BATCH, QUEUE = 3, 16, 32  # 3 * 16 keys wrap around the 32-key queue once
WORLD = 2


@pytest.fixture(scope="module")
def images(digits_root, tmp_path_factory):
    return small_folder(digits_root / "train", tmp_path_factory.mktemp("dist") / "train", per_class=5)


def _torchrun(tmp_path, recipe, *overrides):
    run_dir, dump_dir = tmp_path / "run", tmp_path / "dump"
    dump_dir.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", WORLD,
           REPO / "tests" / "dist_harness.py", dump_dir, TRAIN_PY, recipe, f"train.max_steps={STEPS}",
           *overrides, "--run-dir", run_dir]
    proc = run(cmd, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(dump_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    ckpt = torch.load(run_dir / "last.pt", weights_only=False)
    return run_dir, ranks, ckpt


def _check_lockstep_and_shards(run_dir, ranks, ckpt):
    r0, r1 = ranks
    assert r0["steps"] == r1["steps"] == STEPS
    # the host-side collectives (stop signals, non-finite checks, bad images) pair up one to one
    assert r0["host_reduces"] == r1["host_reduces"] and len(r0["host_reduces"]) >= STEPS
    assert ckpt["step"] == STEPS
    # every parameter (student, EMA teacher, online probe) is bit-identical on both processes ...
    assert r0["params"].keys() == r1["params"].keys()
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
        assert torch.equal(r0["params"][name], ckpt["model"][name]), name  # rank 0 wrote last.pt
    # ... while per-process BN statistics are not synchronised: they saw different images
    stats = [n for n in r0["buffers"] if n.endswith("running_mean")]
    assert any(not torch.equal(r0["buffers"][n], r1["buffers"][n]) for n in stats)

    # sharding: each step's global batch is split into disjoint per-process halves ...
    per = GLOBAL_BATCH // WORLD
    for a, b in zip(r0["indices"], r1["indices"]):
        assert len(a) == len(b) == per and not set(a) & set(b)
    # ... and the loader really delivered each process its own shard
    for r in ranks:
        assert torch.equal(r["labels0"], r["expected_labels0"])
        for v, e in zip(r["views0"], r["expected_views0"]):
            assert v.shape == (per, 3, 32, 32) and torch.equal(v, e)
    assert not torch.equal(r0["views0"][0], r1["views0"][0])

    env = json.loads((run_dir / "env.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert env["num_processes"] == WORLD and summary["global_batch"] == GLOBAL_BATCH
    logged = losses(run_dir)
    assert sorted(logged) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in logged.values())


@pytest.mark.slow
def test_mocov2plus_two_processes_share_the_queue(tmp_path, images):
    recipe = write_recipe(tmp_path / "tiny.yaml", images, method={"bn": "shuffle", "queue_size": QUEUE})
    run_dir, (r0, r1), ckpt = _torchrun(tmp_path, recipe)
    _check_lockstep_and_shards(run_dir, (r0, r1), ckpt)

    # the queue advanced by the GLOBAL batch every step: keys of both processes were enqueued
    ptr = STEPS * GLOBAL_BATCH % QUEUE
    assert int(ckpt["model"]["queue_ptr"]) == ptr
    for r in (r0, r1):
        assert torch.equal(r["buffers"]["queue"], ckpt["model"]["queue"])
        assert torch.equal(r["buffers"]["queue_ptr"], ckpt["model"]["queue_ptr"])
    # the last step's keys sit just before the pointer, rank 0's then rank 1's
    assert len(r0["keys"]) == len(r1["keys"]) == STEPS
    k0, k1 = r0["keys"][-1], r1["keys"][-1]  # (global/world)xC each
    assert k0.shape == k1.shape == (GLOBAL_BATCH // WORLD, 32)
    assert not torch.allclose(k0, k1)
    idx = (ptr - GLOBAL_BATCH + torch.arange(GLOBAL_BATCH)) % QUEUE
    assert torch.equal(ckpt["model"]["queue"][idx], torch.cat([k0, k1]))


@pytest.mark.slow
def test_a_timed_checkpoint_at_the_last_step_keeps_the_processes_paired(tmp_path, images):
    """ckpt_every_minutes=0: rank 0 also saves alone after every step, the last (mid-epoch) one
    included. The closing save is still every process's: it was rank 1's alone (rank 0 had just
    saved), so rank 1's collectives in it had no partner."""
    recipe = write_recipe(tmp_path / "tiny.yaml", images)
    dump_dir = tmp_path / "dump"
    dump_dir.mkdir()
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", WORLD,
                REPO / "tests" / "dist_harness.py", dump_dir, TRAIN_PY, recipe, "train.max_steps=2",
                "train.ckpt_every_minutes=0", "train.dist_timeout_minutes=1", "--run-dir", tmp_path / "run"],
               cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(dump_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert r0["host_reduces"] == r1["host_reduces"]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["step"] == 2


@pytest.mark.slow
def test_byol_two_processes_stay_identical(tmp_path, images, digits_root):
    val = small_folder(digits_root / "val", tmp_path / "val", per_class=3)
    recipe = write_recipe(tmp_path / "tiny.yaml", images, base="byol_sgd.yaml", method={"bn": "sync"},
                          data={"val": str(val)}, probe={"knn_every_epochs": 1})
    run_dir, ranks, ckpt = _torchrun(tmp_path, recipe)
    _check_lockstep_and_shards(run_dir, ranks, ckpt)
    assert "queue" not in ckpt["model"] and all(r["keys"] == [] for r in ranks)
    # bn=sync needs CUDA: on CPU the run says so and keeps per-process BN
    assert "SyncBatchNorm needs CUDA" in (run_dir / "log.txt").read_text()

    # the epoch-end kNN monitor: each process encoded half of the bank and of the validation split with
    # rank 0's BN statistics, and searched its half of the bank for every query; that is the kNN of one
    # process encoding everything from last.pt (the epoch ended at the last step). kNN does not see the
    # rows' order (test_features checks gather_strided's), only lost or mislabelled rows
    from fastairl.analysis.checkpoints import load_backbone
    from fastairl.config import load_config
    from fastairl.eval.features import extract, knn_accuracy
    from fastairl.pipelines import build_eval_loader

    (knn,) = json.loads((run_dir / "summary.json").read_text())["knn"]
    cfg = load_config(recipe)
    net = load_backbone(run_dir / "last.pt").net
    (bf, by), (vf, vy) = (extract(net, build_eval_loader(cfg, p), "cpu") for p in (str(images), str(val)))
    assert (len(by), len(vy)) == (50, 30)
    want = knn_accuracy(bf, by, vf, vy, cfg.probe.knn_k, cfg.probe.knn_temperature, 10)
    assert knn["epoch"] == 1 and knn["top1"] == pytest.approx(want, abs=1e-6)
