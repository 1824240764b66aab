"""Analysis and export tools that read checkpoints (PAPER.md "Analyses", "Transfer").

One module per tool, each with a `main(argv)` behind a `fastairl` subcommand:

    fastairl norms        weight norms per layer (conv / BN weight / BN bias), table + log-scale plot
    fastairl cka          linear CKA per layer between two models on the same images, + plot
    fastairl normrescale  w* = ||w_S|| w_L / ||w_L||, anchored on an SGD model or a constant factor
    fastairl export       backbone -> torchvision / timm state dict, detectron2 .pkl (MoCo convention)

Every tool writes a self-describing output directory (`summary.json`: the tool, its inputs with
their checksums, the parameters and what was computed) and stops with one `error:` line when an
input is missing or unreadable. This module holds what the tools share.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable

# the errors a user can fix; everything else is a bug and keeps its traceback
USER_ERRORS = (ValueError, ImportError, FileNotFoundError)
# 'random' backbones: not the runs' own init seed (train.seed 0 would give the very same weights)
RANDOM_SEED = 12345


def file_info(path) -> dict:
    """Absolute path, size and SHA-256 of an input file: which checkpoint, exactly."""
    path = Path(path).resolve()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def check_out_dir(out, overwrite: bool) -> Path:
    """Refuse, before any work, an output directory that already holds results (unless `overwrite`)."""
    out = Path(out)
    if (out / "summary.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds results (summary.json); choose another --out or pass --overwrite")
    return out


def prepare_out_dir(out, overwrite: bool) -> Path:
    """Create the output directory once the inputs have loaded (a failed run leaves nothing behind)."""
    out = check_out_dir(out, overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create output dir {out} ({e.strerror}); choose another --out") from None
    return out


def write_summary(out: Path, tool: str, argv: list[str], **sections) -> dict:
    """summary.json: tool, command line, versions, time, then the tool's own sections."""
    import torch

    summary = {"tool": tool, "command": ["fastairl", tool, *argv], "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "versions": {"python": sys.version.split()[0], "torch": torch.__version__}, **sections}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def figure(**kw):
    """A matplotlib Figure without pyplot: no global backend state, nothing opens a window."""
    from ..extras import require

    return require("plot", "matplotlib.figure").Figure(**kw)


def try_plot(draw: Callable[..., None], path: Path, *args) -> bool | str:
    """Draw a plot, or say why not: a missing matplotlib must not throw away a computed result."""
    from ..extras import MissingExtra

    try:
        draw(path, *args)
    except MissingExtra as e:
        print(f"warning: no plot ({e})", file=sys.stderr)
        return f"skipped: {e}"
    return True


def run_tool(fn: Callable[[], None], out, overwrite: bool) -> int:
    """Run a tool's body; a user error becomes one `error:` line and exit status 2."""
    try:
        check_out_dir(out, overwrite)
        fn()
    except (*USER_ERRORS, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
