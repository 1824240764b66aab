"""Loader throughput, side by side in one process: fully augmented dual-view images/s per path.

Every path is built through the loader seam (`fastairl.pipelines.build_train_loader`) from a config,
exactly as the trainer builds it, on the same real-photo JPEG corpus (`make_photo_corpus`: crops and
rescales of scikit-image / scikit-learn photos to ~500x375, JPEG quality 75-95); FFCV reads the
converted version of the same corpus. Paths:

  torch_pil       the reference: PIL decode + torchvision ops (aug.engine: pil)
  torch_opencv    one DCT-scaled decode for both views + uint8 OpenCV ops (aug.engine: opencv)
  torch_device    PIL decode/crop/flip in the loader, the rest batched per sample on the device
                  (aug.on_device: true; on a CPU-only machine the "device" is the CPU)
  opencv_device   aug.engine: opencv for decode/crop/flip + aug.on_device
  dali            data.pipeline: dali (CPU ops here, GPU ops with CUDA)
  ffcv_opencv     data.pipeline: ffcv, colour ops by the loader's OpenCV stage (the default on a CPU)
  ffcv_device     data.pipeline: ffcv + aug.on_device: the on-device module finishes the uint8 views
                  (the default with CUDA)

Per-core figures: every path runs with ONE loader thread/process doing the work (`data.workers`: 0 for
the torch paths = in the measuring process; 1 thread for DALI and FFCV) and torch pinned to one
intra-op thread, so images/s is images/s per core. A repeat = `--steps` batches after `--warmup`
batches of a fresh epoch, and repeats are interleaved across paths (A B C A B C ...); the report
gives median, min and max over repeats, the ratio of each
path's median to torch_pil's, and the environment. Nothing here asserts on speed.

    python benchmarks/bench_pipeline.py                       # 1,000 images, crop 224, batch 32
    python benchmarks/bench_pipeline.py --quick --paths torch_pil,torch_opencv
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ALL_PATHS = ("torch_pil", "torch_opencv", "torch_device", "opencv_device", "dali", "ffcv_opencv",
             "ffcv_device")
FULL = dict(images=1000, crop=224, batch=32, steps=8, warmup=2, repeats=3)
QUICK = dict(images=120, crop=64, batch=8, steps=2, warmup=1, repeats=2)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "repeats": values}


def _version(module: str):
    try:
        m = importlib.import_module(module)
        return getattr(m, "__version__", "installed")
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def environment() -> dict:
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_model": cpu,
            "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            **{name: _version(mod) for name, mod in (("torchvision", "torchvision"), ("numpy", "numpy"),
                                                     ("pillow", "PIL"), ("opencv", "cv2"),
                                                     ("dali", "nvidia.dali"), ("ffcv", "ffcv"))}}


# ------------------------------------------------------------------------------------- the paths
def path_config(path: str, train: str, args) -> dict:
    """The config (as a raw dict for fastairl.config.build_config) of one benchmark path."""
    one = {"torch": 0, "dali": 1, "ffcv": 1}  # one worker doing the work (0 = in this process)
    pipeline = {"dali": "dali", "ffcv_opencv": "ffcv", "ffcv_device": "ffcv"}.get(path, "torch")
    aug = {"preset": "byol_sym", "crop_size": args.crop,
           "engine": "opencv" if path in ("torch_opencv", "opencv_device") else "pil",
           "on_device": path in ("torch_device", "opencv_device", "ffcv_device")}
    return {"name": f"bench_{path}", "aug": aug,
            "data": {"pipeline": pipeline, "train": train, "workers": one[pipeline]},
            "train": {"batch_size": args.batch, "seed": 0}}


def measure_once(loader, device: torch.device, epoch: int, args) -> float:
    """Dual-view images/s of one repeat: a fresh epoch, timed after `warmup` batches."""
    loader.set_epoch(epoch)
    it = iter(loader)
    for _ in range(args.warmup):
        next(it)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    n = 0
    for _ in range(args.steps):
        views, labels = next(it)
        n += labels.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = n / (time.perf_counter() - t0)
    del it
    return rate


def corpus(args) -> Path:
    from fastairl.data.bundled import make_photo_corpus

    root = Path(args.corpus)
    make_photo_corpus(root, n_images=args.images)  # cached: rebuilt only when the parameters change
    return root / "train"


def beton_for(train: Path, args) -> str:
    """The FFCV file of the same corpus (converted once, then reused)."""
    convert = importlib.import_module("fastairl.pipelines.convert")
    out = Path(args.corpus) / "train.beton"
    if not out.exists():  # JPEG q90 like a typical ImageNet conversion; sizes as the corpus
        convert.convert(train, out, options=convert.ImageOptions(write_mode="jpg", jpeg_quality=90),
                        workers=1, progress=False)
    return str(out)


def build_path(path: str, train: Path, device: torch.device, args):
    """(loader, description) of one path, built through the seam as the trainer builds it."""
    from fastairl.config import build_config
    from fastairl.data.augment import spec_from_config
    from fastairl.data.device_aug import DeviceAugLoader
    from fastairl.pipelines import build_train_loader

    source = beton_for(train, args) if path.startswith("ffcv") else str(train)
    cfg = build_config(path_config(path, source, args))
    t0 = time.perf_counter()
    loader = build_train_loader(cfg, spec_from_config(cfg.aug), rank=0, world_size=1, device=device)
    colour_ops = "on-device module" if isinstance(loader, DeviceAugLoader) else "loader"
    return loader, {"build_s": time.perf_counter() - t0, "workers": cfg.data.workers, "engine": cfg.aug.engine,
                    "on_device": cfg.aug.on_device, "pipeline": cfg.data.pipeline, "colour_ops": colour_ops}


def table(report: dict) -> str:
    lines = ["| path | dual-view img/s per core (median [min-max]) | x torch_pil |", "|---|---|---|"]
    for path, r in report["paths"].items():
        if "skipped" in r:
            lines.append(f"| {path} | skipped: {r['skipped']} | |")
            continue
        s = r["img_per_s"]
        ratio = r.get("ratio_to_torch_pil")
        lines.append(f"| {path} | {s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}] | "
                     f"{'' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small run for tests (< 1 min)")
    p.add_argument("--paths", default=",".join(ALL_PATHS), help=f"comma list from {','.join(ALL_PATHS)}")
    p.add_argument("--out", default="bench_out/pipeline.json")
    p.add_argument("--corpus", default=None, help="corpus cache dir (default: next to --out)")
    for k in FULL:
        p.add_argument(f"--{k}", type=int, default=None)
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.corpus = args.corpus or str(Path(args.out).resolve().parent / "corpus")
    bad = [x for x in args.paths.split(",") if x not in ALL_PATHS]
    if bad:
        p.error(f"unknown path(s) {bad}; choose from {', '.join(ALL_PATHS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)  # per-core figures: one intra-op thread
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train = corpus(args)
    report = {"environment": environment(), "device": str(device),
              "params": {k: getattr(args, k) for k in (*FULL, "quick")}, "paths": {}}
    loaders = {}
    for path in args.paths.split(","):
        print(f"[{path}] building", flush=True)
        if path == "ffcv_opencv" and device.type == "cuda":  # FFCV finishes on the device there
            report["paths"][path] = {"skipped": "on CUDA FFCV's colour ops run in the on-device module: "
                                                "this path would measure ffcv_device again"}
            continue
        try:
            loaders[path], report["paths"][path] = build_path(path, train, device, args)
        except ImportError as e:  # an extra that is not installed: recorded, not fatal
            report["paths"][path] = {"skipped": str(e)}
        except Exception as e:  # noqa: BLE001 - one broken path must not hide the others' numbers
            traceback.print_exc()
            report["paths"][path] = {"skipped": f"failed: {type(e).__name__}: {e}"}
    # repeats interleaved across paths (A B C A B C ...): load from other jobs on a shared machine
    # then drifts over every path alike instead of biasing whichever path ran during a busy spell
    rates: dict = {path: [] for path in loaders}
    for rep in range(args.repeats):
        for path, loader in list(loaders.items()):
            try:
                rates[path].append(measure_once(loader, device, rep, args))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                report["paths"][path] = {"skipped": f"failed: {type(e).__name__}: {e}"}
                del loaders[path]
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{p} {r[-1]:.1f}" for p, r in rates.items() if p in loaders), flush=True)
    for path in loaders:
        report["paths"][path]["img_per_s"] = summary(rates[path])
    base = report["paths"].get("torch_pil", {}).get("img_per_s", {}).get("median")
    for r in report["paths"].values():
        if base and "img_per_s" in r:
            r["ratio_to_torch_pil"] = r["img_per_s"]["median"] / base
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"report: {out}")
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
