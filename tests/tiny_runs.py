"""Tiny real training runs for the CPU tier: recipes written as diffs of the repository's recipes, a
small ImageFolder cut from the bundled digits, and the launch script run as a subprocess."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from fastairl.config import _deep_merge  # the recipes' own merge rule

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "fastairl" / "train.py"

# Small enough for 2 CPU cores: a one-block-per-stage ResNet, 64/32-wide heads, 32-px crops, batch 16.
TINY = {
    "model": {"arch": "resnet10", "projector": {"hidden_dim": 64, "out_dim": 32},
              "predictor": {"hidden_dim": 64, "out_dim": 32}},
    "method": {"queue_size": 32, "bn": "shuffle"},
    "optim": {"warmup_epochs": 1},
    "aug": {"preset": "byol_sym", "crop_size": 32},
    "data": {"val": None, "workers": 0},
    "train": {"epochs": 2, "batch_size": 16, "log_every": 1, "progress": False, "ckpt_every_epochs": 0},
    "probe": {"knn_every_epochs": 0, "final_eval": False},
}


def write_recipe(path: Path, train_dir, base: str = "mocov2plus.yaml", **sections) -> Path:
    """A recipe at `path` that says `base: <repo>/recipes/<base>` and changes only the TINY keys,
    `data.train` and `sections` (e.g. train={"epochs": 3})."""
    raw = json.loads(json.dumps(TINY))
    _deep_merge(raw, {"data": {"train": str(train_dir)}})
    _deep_merge(raw, sections)
    raw = {"base": str(REPO / "recipes" / base), "name": "tiny", **raw}
    path = Path(path)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def small_folder(src, dst, per_class: int) -> Path:
    """Copy the first `per_class` images of every class of the ImageFolder `src` to `dst`."""
    src, dst = Path(src), Path(dst)
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:per_class]:
            shutil.copy(f, dst / cls.name / f.name)
    return dst


def run(cmd: list, cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def train_cmd(*args) -> list:
    """`python fastairl/train.py ARGS`: the launch script as a user runs it."""
    return [sys.executable, str(TRAIN_PY), *args]


def losses(run_dir) -> dict[int, float]:
    """step -> loss_ssl of every training row of metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss_ssl"] for r in rows if "loss_ssl" in r}


def one_line_error(proc, *fragments) -> str:
    """The CLI failed with exit 2 and one `error: ...` line holding every fragment, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def one_intra_op_thread():
    """Generator for a module-scoped autouse fixture: OMP_NUM_THREADS=1 (the trainer then keeps it, and
    subprocesses inherit it) and one torch thread here. Bit-exact comparisons need a fixed thread count.

        fixed_threads = pytest.fixture(scope="module", autouse=True)(one_intra_op_thread)
    """
    import pytest
    import torch

    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    mp.undo()


@contextlib.contextmanager
def deadline(seconds: int, what: str):
    """Raise TimeoutError("<what> after <seconds> s") when the block outlives `seconds` (SIGALRM): a
    stuck writer or loader thread must be a test failure, not a hung CI."""
    def fail(*_):
        raise TimeoutError(f"{what} after {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def one_torch_thread():
    """Generator for a module-scoped autouse fixture: one torch intra-op thread in this process only
    (subprocesses keep theirs). Tiny tensors gain nothing from more threads on a busy CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
