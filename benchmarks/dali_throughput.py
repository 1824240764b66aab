"""Dual-view images/s of the DALI pipeline alone (no model), and of the torch reference on the same files.

`dali_images_per_s(paths, spec, batch, threads)` is the function the side-by-side benchmark calls; run
as a script it measures, in rounds on a real-photo JPEG corpus (`make_photo_corpus`, ~500x375, JPEG
quality 75-95): DALI decoding each JPEG once for both views, DALI with ROI decoding (one partial
decode PER VIEW, `decoders.image_slice` of the drawn box), DALI's crops alone and those crops finished
by the on-device module (PATHS), and the torch reference loader with `threads` worker processes. A round measures each path in turn with a fresh loader: `warmup` batches (pipeline build,
prefetch) are not counted, then `steps` batches are timed; the median, min and max over rounds are
reported, with the thread count, the device and the environment. `--paths` picks the paths (a GPU
thread sweep leaves out the torch reference, slow and prefetch-bound there). Nothing here asserts on speed.

    python benchmarks/dali_throughput.py --threads 2 --out bench_out/dali.json
    python benchmarks/dali_throughput.py --quick
    python benchmarks/dali_throughput.py --threads 8 --batch 128 --steps 20 --paths dali_decode_once
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
# what main() can measure, in its order; dali_crops: DALI decodes, crops and flips only (uint8 views, no
# colour, blur or solarise: its gap to dali_decode_once is what the photometric graph costs);
# dali_device_aug: the same crops finished by fastairl.data.device_aug on the same device (the
# trainer's aug.on_device=true)
PATHS = ("dali_decode_once", "dali_roi_decode", "dali_crops", "dali_device_aug", "torch_ref")
_DALI_PATHS = {"dali_decode_once": ("once", "dali"), "dali_roi_decode": ("roi", "dali"),
               "dali_crops": ("once", "crops"), "dali_device_aug": ("once", "device_aug")}  # decode, finish


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "repeats": values}


def _repeat(paths: Sequence[str], batches: int, batch: int) -> list[tuple[str, int]]:
    """(path, 0) samples, the list repeated so that one epoch holds `batches` batches."""
    return [(p, 0) for p in paths] * math.ceil(batches * batch / len(paths))


def _time_batches(loader, warmup: int, steps: int, batch: int, device: Optional[torch.device]) -> float:
    """images/s of `steps` batches after `warmup` batches of a fresh epoch (both views counted once
    per image: a dual-view image is one image)."""
    loader.set_epoch(0)
    it = iter(loader)
    try:
        for _ in range(warmup):
            next(it)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(steps):
            views, _ = next(it)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        return steps * batch / (time.perf_counter() - t)
    finally:
        close = getattr(loader, "close", None)  # DALI's loader: release its pipeline now
        if close is not None:
            close()


def dali_images_per_s(paths: Sequence[str], spec, batch: int, threads: int, *, decode: str = "once",
                      device_id: Optional[int] = None, warmup: int = 2, steps: int = 8,
                      repeats: int = 3, hw_decoder_load: Optional[float] = None, finish: str = "dali") -> dict:
    """Dual-view images/s of the DALI train pipeline on `paths` (JPEGs): median/min/max over
    `repeats` fresh pipelines, each timing `steps` batches after `warmup`. `hw_decoder_load`: the
    `mixed` decoder's share for the hardware JPEG decoder (None: the loader's default). `finish`:
    "dali" (every op in DALI), "crops" (DALI stops at uint8 crops, nothing finishes them) or
    "device_aug" (the on-device module finishes DALI's uint8 crops)."""
    if finish not in ("dali", "crops", "device_aug"):
        raise ValueError(f"finish must be 'dali', 'crops' or 'device_aug', got {finish!r}")
    from fastairl.data.device_aug import DeviceAugLoader
    from fastairl.pipelines.dali import HW_DECODER_LOAD, DaliTrainLoader

    load = HW_DECODER_LOAD if hw_decoder_load is None else hw_decoder_load
    device = torch.device("cuda", device_id) if device_id is not None else torch.device("cpu")
    rates = []
    for _ in range(repeats):
        loader = DaliTrainLoader(_repeat(paths, warmup + steps, batch), ["0"], spec, batch, threads=threads,
                                 device_id=device_id, decode=decode, hw_decoder_load=load, finish=finish == "dali")
        loader.read_sizes()  # the image headers, read once per training run: not the steady state's work
        try:
            timed = DeviceAugLoader(loader, spec, device) if finish == "device_aug" else loader
            rates.append(_time_batches(timed, warmup, steps, batch, device))
        finally:
            loader.close()
    return {"images_per_s": _summary(rates), "threads": threads, "decode": decode, "batch": batch,
            "device": str(device), "views": spec.num_views, "crop": spec.views[0].crop_size,
            "hw_decoder_load": load, "finish": finish}


def torch_images_per_s(paths: Sequence[str], spec, batch: int, workers: int, *, warmup: int = 2, steps: int = 8,
                       repeats: int = 3) -> dict:
    """The same measurement for the torch reference loader with `workers` worker processes."""
    from fastairl.pipelines.torch_ref import TorchTrainLoader

    rates = []
    for _ in range(repeats):
        loader = TorchTrainLoader(_repeat(paths, warmup + steps, batch), ["0"], spec, batch, workers=workers)
        rates.append(_time_batches(loader, warmup, steps, batch, None))
        del loader  # its worker processes end here, before the next path runs
    return {"images_per_s": _summary(rates), "workers": workers, "batch": batch, "device": "cpu",
            "views": spec.num_views, "crop": spec.views[0].crop_size}


def _environment() -> dict:
    import nvidia.dali
    import torchvision

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"python": platform.python_version(), "cpu_model": cpu, "cpu_affinity": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "dali": nvidia.dali.__version__,
            "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def main(argv: Optional[list[str]] = None) -> dict:
    sys.path.insert(0, str(ROOT))
    from fastairl.data.augment import make_spec
    from fastairl.data.bundled import make_photo_corpus

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="DALI threads = torch loader worker processes")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--preset", default="byol_sym")
    p.add_argument("--corpus", default=None, help="corpus folder (default: next to --out)")
    p.add_argument("--out", default="bench_out/dali_throughput.json")
    p.add_argument("--paths", default=",".join(PATHS),
                   help="comma-separated paths to measure (a GPU thread sweep can leave out the CPU reference)")
    p.add_argument("--hw-decoder-load", default="",
                   help="comma-separated shares for the GPU's hardware JPEG decoder, each measured as its own "
                        "DALI path (name@hwX); default: the loader's")
    p.add_argument("--quick", action="store_true", help="120 images, crop 64, batch 8, 2 steps, 2 rounds")
    args = p.parse_args(argv)
    paths_run = args.paths.split(",")
    unknown = sorted(set(paths_run) - set(PATHS))
    if unknown:
        p.error(f"unknown --paths {unknown}; valid: {', '.join(PATHS)}")
    try:
        loads = [float(x) for x in args.hw_decoder_load.split(",")] if args.hw_decoder_load else [None]
    except ValueError:
        p.error(f"--hw-decoder-load takes comma-separated numbers in [0, 1], got {args.hw_decoder_load!r}")
    if any(x is not None and not 0 <= x <= 1 for x in loads):
        p.error(f"--hw-decoder-load takes numbers in [0, 1], got {args.hw_decoder_load!r}")
    if args.quick:
        args.images, args.crop, args.batch, args.steps, args.rounds = 120, 64, 8, 2, 2
    torch.set_num_threads(1)  # the workers / DALI threads do the work; see bench_step.py on oversubscription
    out = Path(args.out)
    corpus = Path(args.corpus) if args.corpus else out.parent / "corpus"
    manifest = make_photo_corpus(corpus / f"photos_{args.images}", n_images=args.images)
    paths = sorted(str(f) for f in (corpus / f"photos_{args.images}" / "train").rglob("*.jpg"))
    spec = make_spec(args.preset, crop_size=args.crop)
    device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
    kw = dict(warmup=args.warmup, steps=args.steps, repeats=1)
    measure = {"torch_ref": lambda: torch_images_per_s(paths, spec, args.batch, args.threads, **kw)}
    for path, (decode, finish) in _DALI_PATHS.items():
        for load in loads:
            measure[path if len(loads) == 1 else f"{path}@hw{load}"] = functools.partial(
                dali_images_per_s, paths, spec, args.batch, args.threads, decode=decode, device_id=device_id,
                hw_decoder_load=load, finish=finish, **kw)
    names = [n for path in PATHS if path in paths_run for n in measure if n.split("@")[0] == path]
    runs = {name: [] for name in names}
    for _ in range(args.rounds):  # each round measures every path once, in turn
        for name in names:
            runs[name].append(measure[name]())
    results = {name: _summary([r["images_per_s"]["median"] for r in rs]) for name, rs in runs.items()}
    ref = results["torch_ref"]["median"] if "torch_ref" in results else None
    from fastairl.pipelines.dali import HW_DECODER_LOAD

    params = {**vars(args), "device": "cuda" if device_id is not None else "cpu",
              "hw_decoder_load": [HW_DECODER_LOAD if x is None else x for x in loads]}
    report = {"environment": _environment(), "params": params,
              "corpus": {k: manifest[k] for k in ("size", "quality", "totals")}, "images_per_s": results,
              "ratio_to_torch_ref": {name: r["median"] / ref for name, r in results.items()} if ref else None}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name:18s} {r['median']:8.1f} img/s  ({r['min']:.1f}-{r['max']:.1f})"
              + (f"  x{r['median'] / ref:.2f} vs torch_ref" if ref else ""))
    return report


if __name__ == "__main__":
    main()
