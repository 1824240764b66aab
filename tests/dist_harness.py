"""Test harness: run the launch script under torchrun and dump what each process saw.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_harness.py DUMP_DIR \
        fastairl/train.py RECIPE [key=value ...]

It observes the real training loop without changing it: thin wrappers around the loader seam,
`fastairl.trainer.train_step`, `Siamese._enqueue` and `HostComm.reduce` record each process's model,
its first batch, the keys it enqueued and the host-side collectives it made (they must pair up). When the launch script returns, process r writes DUMP_DIR/rank{r}.pt and the
harness exits with the script's exit code.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import torch

import fastairl.pipelines
import fastairl.trainer
from fastairl.methods import Siamese
from fastairl.pipelines.torch_ref import _collate

seen: dict = {"keys": [], "steps": 0, "host_reduces": []}

_build_train_loader = fastairl.pipelines.build_train_loader
_train_step = fastairl.trainer.train_step
_enqueue = Siamese._enqueue
_reduce = fastairl.trainer.HostComm.reduce


def build_train_loader(*args, **kwargs):
    seen["loader"] = _build_train_loader(*args, **kwargs)
    return seen["loader"]


def train_step(model, unwrapped, optimizer, probe_opt, accelerator, views, labels, step, *args, **kwargs):
    seen["model"] = unwrapped
    if "views0" not in seen:
        seen["views0"] = [v.clone() for v in views]  # V x Nx3xHxW: this process's first batch
        seen["labels0"] = labels.clone()
    seen["steps"] += 1
    return _train_step(model, unwrapped, optimizer, probe_opt, accelerator, views, labels, step, *args, **kwargs)


def enqueue(self, keys):
    seen["keys"].append(keys.detach().clone())  # NxC: this process's keys, before the all-gather
    _enqueue(self, keys)


def reduce(self, values, op):
    seen["host_reduces"].append((op, len(values)))  # every process must make the same sequence
    return _reduce(self, values, op)


def dump(path: Path) -> None:
    model, loader = seen["model"], seen["loader"]
    sampler = loader.sampler
    sampler.set_epoch(0)
    batches = list(iter(sampler))  # this process's (epoch, index) lists, one per step of epoch 0
    expected_views, expected_labels = _collate([loader.dataset[k] for k in batches[0]])
    torch.save({
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "steps": seen["steps"], "keys": seen["keys"], "host_reduces": seen["host_reduces"], "indices": [[i for _, i in b] for b in batches],
        "views0": seen["views0"], "labels0": seen["labels0"],
        "expected_views0": expected_views, "expected_labels0": expected_labels,
    }, path)


def main() -> int:
    dump_dir, script, *args = sys.argv[1:]
    fastairl.pipelines.build_train_loader = build_train_loader
    fastairl.trainer.train_step = train_step
    Siamese._enqueue = enqueue
    fastairl.trainer.HostComm.reduce = reduce
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code or 0
    if code == 0:
        dump(Path(dump_dir) / f"rank{int(os.environ.get('RANK', 0))}.pt")
    return code


if __name__ == "__main__":
    sys.exit(main())
