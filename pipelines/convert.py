"""Convert a dataset once into an FFCV `.beton` file, for `data.pipeline: ffcv`.

    fastairl convert /data/imagenet/train /data/ffcv/train.beton --max-resolution 512 --write-mode jpg
    fastairl convert /data/imagenet/train train10.beton --class-fraction 0.1 --class-seed 0
    fastairl convert /data/cifar-10-batches-py cifar10lt.beton --source cifar-lt --imbalance-ratio 100
    python -m fastairl.pipelines.convert INPUT OUT.beton ...            (same options; -h lists them)

Inputs (`--source`, default auto): an ImageNet-style folder `class/**/image` and a "path label" file
list (both read by `fastairl.data.datasets`, so `--class-fraction/--class-seed` pick the same classes
as `data.class_fraction/class_seed`), CIFAR-10/100 python pickles (`--split train|test`) and
CIFAR-10/100-LT (`fastairl.data.cifar`: exponential profile, ratio 100, seed 0; train split only).

Field layout of the .beton, in this order (what `pipelines/ffcv_loader.py` reads):

    image  RGBImageField  H x W x 3 uint8 RGB. Images whose longer side exceeds `max_resolution` are
                          shrunk to it (aspect kept, OpenCV INTER_AREA, FFCV's own resizer); stored as
                          raw pixels or re-encoded JPEG (`jpeg_quality`) per `write_mode`: raw | jpg |
                          proportion (JPEG with probability `compress_probability`, drawn per sample
                          from (seed, index), so a rerun writes the same file) | smart (JPEG when the
                          raw pixels exceed `smart_threshold` bytes, raw otherwise).
    label  IntField       class index 0..C-1 into the manifest's `classes`.

Sample i of the file is sample i of the source order: folders sorted by class then path, file lists
in line order, CIFAR in file order (CIFAR-LT class by class). EXIF orientation is not applied, as in
the torch reference loader; every pixel mode PIL can turn into RGB is converted (CMYK, grey, palette,
alpha dropped).

Robustness: every image file is fully decoded up front (in `workers` processes); empty, truncated,
corrupt and non-image files are skipped and listed with the reason, and PNG-named-.jpg, CMYK or grey
files are converted and listed as such. Only images that decoded are handed to FFCV's writer; a worker
that still fails stops the conversion with its error (FFCV alone would wait forever). The file is
written under a temporary name in the output folder and renamed over OUT only when complete, so an
existing OUT survives any failure. Next to it, `OUT.json` (`manifest_path`) records the source,
options, classes, counts per class, skipped / converted files, timings and versions.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import json
import math
import multiprocessing
import os
import platform
import socket
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from fastairl.data.datasets import DataError, Samples

WRITE_MODES = ("raw", "jpg", "proportion", "smart")
SOURCES = ("auto", "folder", "filelist", "cifar", "cifar-lt")
DEFAULT_SMART_THRESHOLD = 256 * 256 * 3  # smart mode: raw pixels beyond a 256x256 image go to JPEG
MIN_PAGE = 8 << 20  # FFCV's default page size; pages grow to fit the largest image
MAX_PAGE = 1 << 32
# Pixel modes PIL converts to 8-bit RGB without losing meaning; the rest (I;16, I, F, LAB, HSV) are skipped.
RGB_CONVERTIBLE = ("RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "La", "P", "PA", "1", "CMYK", "YCbCr")
JPEG_SUFFIXES = (".jpg", ".jpeg")


class ConvertError(ValueError):
    """The conversion cannot run or failed; the message names the path or option and the fix."""


@dataclass
class ImageOptions:
    """The `image` field's options (FFCV's RGBImageField)."""

    max_resolution: Optional[int] = None  # longest side; None keeps the source size
    jpeg_quality: int = 90
    write_mode: Optional[str] = None  # None: raw for CIFAR, jpg otherwise
    compress_probability: float = 0.5  # proportion mode only
    smart_threshold: Optional[int] = None  # smart mode only; None: DEFAULT_SMART_THRESHOLD bytes

    def check(self) -> None:
        if self.write_mode is not None and self.write_mode not in WRITE_MODES:
            raise ConvertError(f"--write-mode must be one of {', '.join(WRITE_MODES)}, got {self.write_mode!r}")
        if self.max_resolution is not None and self.max_resolution < 1:
            raise ConvertError(f"--max-resolution must be a positive number of pixels, got {self.max_resolution}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConvertError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise ConvertError(f"--compress-probability must be in [0, 1], got {self.compress_probability}")
        if self.smart_threshold is not None and self.smart_threshold < 0:
            raise ConvertError(f"--smart-threshold must be >= 0 bytes, got {self.smart_threshold}")

    def resolved(self, is_cifar: bool) -> "ImageOptions":
        mode = self.write_mode or ("raw" if is_cifar else "jpg")
        threshold = (self.smart_threshold if self.smart_threshold is not None else DEFAULT_SMART_THRESHOLD)
        return ImageOptions(self.max_resolution, self.jpeg_quality, mode, self.compress_probability,
                            threshold if mode == "smart" else None)


def manifest_path(out) -> Path:
    """The manifest written next to `out`: `<out>.json` (train.beton -> train.beton.json)."""
    out = Path(out)
    return out.with_name(out.name + ".json")


# ------------------------------------------------------------------------------ checking image files
def check_image(path: str) -> tuple[Optional[str], Optional[str], int, int]:
    """(skip reason or None, conversion note or None, width, height) after a full decode of `path`."""
    from PIL import Image, ImageFile

    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)", None, 0, 0
        truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not decode half grey
        try:
            with Image.open(path) as im:
                im.load()
                fmt, mode, (w, h) = im.format, im.mode, im.size
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files; each one is a skip
        return f"unreadable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", None, 0, 0
    if mode not in RGB_CONVERTIBLE:
        return f"pixel mode {mode} is not 8-bit colour; convert it to 8-bit RGB first", None, w, h
    notes = []
    if path.lower().endswith(JPEG_SUFFIXES) and fmt != "JPEG":
        notes.append(f"{fmt} data in a {Path(path).suffix} file")
    if mode != "RGB":
        notes.append(f"{mode} -> RGB" + (" (alpha dropped)" if "A" in mode or "a" in mode else ""))
    return None, "; ".join(notes) or None, w, h


def _check_all(paths: list[str], workers: int, progress: bool) -> list[tuple]:
    from tqdm import tqdm

    bar = dict(total=len(paths), desc="check", unit="img", disable=not progress)
    if workers <= 1:
        return [check_image(p) for p in tqdm(paths, **bar)]
    with multiprocessing.Pool(workers) as pool:
        chunk = max(1, min(64, len(paths) // (8 * workers)))
        return list(tqdm(pool.imap(check_image, paths, chunksize=chunk), **bar))


# ------------------------------------------------------------------------- datasets for the writer
def _open_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))  # HxWx3 uint8


class FileImages:
    """(image HxWx3 uint8, label) of checked image files; reseeds numpy per sample so FFCV's
    proportion mode draws the same JPEG/raw choice for sample i on every run and worker."""

    def __init__(self, samples: Samples, seed: int = 0):
        self.samples, self.seed = samples, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        np.random.seed([self.seed, i])
        path, label = self.samples[i]
        try:
            return _open_rgb(path), label
        except Exception as e:  # noqa: BLE001
            raise ConvertError(f"cannot read {path} ({type(e).__name__}: {e}); it changed after it was "
                               f"checked - run the conversion again") from None


class ArrayImages:
    """(image HxWx3 uint8, label) of in-memory arrays (CIFAR)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int = 0):
        self.images, self.labels, self.seed = images, labels, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        np.random.seed([self.seed, i])
        return self.images[i], int(self.labels[i])


class _Reporting:
    """Forwards to a dataset; a failure is put on `errors` at once, before the worker unwinds."""

    def __init__(self, dataset, errors):
        self.dataset, self.errors = dataset, errors

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.dataset[i]
        except BaseException as e:
            self.errors.put(str(e) if isinstance(e, ConvertError) else f"sample {i}: {type(e).__name__}: {e}")
            raise


def _writer_worker(errors, job, *args) -> None:
    try:
        job(*args)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which stops the conversion
        errors.put(f"{type(e).__name__}: {e}")
        raise SystemExit(1) from None


# ------------------------------------------------------------------------------------------ writing
def _page_size(sizes: Sequence[tuple[int, int]], options: ImageOptions) -> int:
    """FFCV page size (a power of two) that holds the largest stored image: raw pixels, or twice that
    for JPEG (a high-quality JPEG of a noisy image can exceed its raw size)."""
    largest = 0
    for w, h in sizes:
        r = options.max_resolution
        if r is not None and max(w, h) > r:
            w, h = int(w * r / max(w, h)), int(h * r / max(w, h))  # FFCV's resizer rounds down
        largest = max(largest, w * h * 3)
    need = largest * (1 if options.write_mode == "raw" else 2) + (1 << 16)
    page = max(MIN_PAGE, 1 << math.ceil(math.log2(need)))
    if page >= MAX_PAGE:
        raise ConvertError(f"an image of {largest // 3} pixels does not fit an FFCV page; set "
                           f"--max-resolution (e.g. 1024)")
    return page


def _raise_worker_failure(errors, procs) -> None:
    """Raise the first error a writer worker reported, or the exit code of one that died silently."""
    import queue

    try:
        raise ConvertError(errors.get_nowait())
    except queue.Empty:
        pass
    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
    if dead:
        raise ConvertError(f"an FFCV writer worker died (exit code {dead[0]}; -9 usually means out of "
                           f"memory: use fewer --workers)")


def _ffcv_writer(tmp: Path, options: ImageOptions, sizes, workers: int):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    image = RGBImageField(write_mode=options.write_mode, max_resolution=options.max_resolution,
                          smart_threshold=options.smart_threshold, jpeg_quality=options.jpeg_quality,
                          compress_probability=options.compress_probability)
    return DatasetWriter(str(tmp), {"image": image, "label": IntField()},
                         page_size=_page_size(sizes, options), num_workers=workers)


def _wait_for_workers(procs, done, n: int, allocations, errors, progress: bool) -> list:
    """Follow the workers' progress until all `n` samples are written; their allocation tables."""
    import queue

    from tqdm import tqdm

    with tqdm(total=n, desc="write", unit="img", disable=not progress) as bar:
        written = 0
        while written < n:
            _raise_worker_failure(errors, procs)
            now = done.value
            if now < n and all(p.exitcode == 0 for p in procs):  # exited: the counter is final now
                now = done.value  # (read again: the last worker may have counted just before exiting)
                if now < n:
                    raise ConvertError(f"the FFCV writer workers exited after {now} of {n} images")
            bar.update(now - written)
            written = now
            time.sleep(0.05)
    tables: list = []
    while len(tables) < len(procs):  # each worker sends its table once its last page is flushed
        alive = any(p.is_alive() for p in procs)
        try:
            tables.append(allocations.get(timeout=0.1 if alive else 10))
        except queue.Empty:
            _raise_worker_failure(errors, procs)
            if not alive:
                raise ConvertError("the FFCV writer workers exited without their allocation tables")
    return [a for table in tables for a in table]


def _write(tmp: Path, dataset, options: ImageOptions, sizes, workers: int, chunk_size: int,
           progress: bool) -> None:
    """FFCV's `DatasetWriter.from_indexed_dataset` (ffcv 1.0.2 `_write_common`: same workers, same
    file), except that a failing worker stops the conversion with its error instead of leaving the
    parent polling a counter that never completes."""
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.utils import chunks
    from ffcv.writer import worker_job_indexed_dataset

    writer = _ffcv_writer(tmp, options, sizes, workers)
    n = len(dataset)
    writer.num_samples = n
    writer.prepare()  # header + field descriptors; creates the shared metadata block
    work, allocations, errors = (multiprocessing.Queue() for _ in range(3))
    for chunk in chunks(list(enumerate(range(n))), chunk_size):  # (destination, source) index pairs
        work.put(chunk)
    for _ in range(workers):
        work.put(None)
    done = multiprocessing.Value(ctypes.c_uint64, 0)
    allocator = MemoryAllocator(str(tmp), writer.data_region_start, writer.page_size)
    args = (errors, worker_job_indexed_dataset, work, writer.metadata_sm, writer.metadata_type,
            writer.fields, allocator, done, allocations, _Reporting(dataset, errors))
    procs = [multiprocessing.Process(target=_writer_worker, args=args, daemon=True) for _ in range(workers)]
    try:
        for p in procs:
            p.start()
        table = _wait_for_workers(procs, done, n, allocations, errors, progress)
        for p in procs:
            p.join()
        writer.finalize(table)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            if p.pid is not None:
                p.join()
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()


# ------------------------------------------------------------------------------------------ sources
@dataclass
class Source:
    kind: str  # folder | filelist | cifar | cifar-lt
    path: str
    classes: list[str]
    labels: list[int]  # of the samples that are written
    dataset: object  # FileImages | ArrayImages
    sizes: list[tuple[int, int]]
    skipped: list[dict]
    converted: list[dict]
    details: dict  # what selected the samples (class subset, split, LT ratio / seed)


def _detect(path: Path, kind: str) -> str:
    if not path.exists():
        raise ConvertError(f"{path} does not exist; give an ImageNet-style folder (class/xxx.jpg), a "
                           f"'path label' file list or a CIFAR python-pickle folder")
    if kind != "auto":
        return kind
    if path.is_file():
        return "filelist"
    from fastairl.data.cifar import find_cifar

    try:
        find_cifar(path)
        return "cifar"
    except DataError:
        return "folder"


def _image_source(kind: str, path: Path, class_fraction: float, class_seed: int, workers: int,
                  progress: bool, seed: int) -> Source:
    from fastairl.config import DataConfig
    from fastairl.data.datasets import load_samples

    cfg = DataConfig(source=kind, train=str(path), class_fraction=class_fraction, class_seed=class_seed)
    samples, classes = load_samples(cfg, str(path), key="convert input")
    checks = _check_all([p for p, _ in samples], workers, progress)
    good: Samples = []
    sizes, skipped, converted = [], [], []
    for (p, label), (reason, note, w, h) in zip(samples, checks):
        if reason is not None:
            skipped.append({"path": p, "label": label, "class": classes[label], "reason": reason})
            continue
        good.append((p, label))
        sizes.append((w, h))
        if note is not None:
            converted.append(dict(path=p, note=note))
    if not good:
        first = skipped[0]
        raise ConvertError(f"no readable image in {path}: all {len(samples)} files were skipped (first: "
                           f"{first['path']}: {first['reason']})")
    details = dict(class_fraction=class_fraction, class_seed=class_seed, files_found=len(samples))
    return Source(kind, str(path), classes, [label for _, label in good], FileImages(good, seed), sizes,
                  skipped, converted, details)


def _cifar_source(kind: str, path: Path, split: str, ratio: float, lt_seed: int, seed: int) -> Source:
    from fastairl.data.cifar import SIDE, load_cifar, long_tailed, lt_counts

    if kind == "cifar-lt" and split != "train":
        raise ConvertError("--source cifar-lt applies to the training split only: the CIFAR-LT test set "
                           "is the balanced CIFAR test set (--source cifar --split test)")
    data = load_cifar(path, split)
    details = dict(variant=data.variant, split=split, root=data.root, balanced_counts=data.counts())
    if kind == "cifar-lt":
        details.update(imbalance_ratio=ratio, lt_seed=lt_seed,
                       profile=lt_counts(len(data.labels) / len(data.classes), len(data.classes), ratio))
        data = long_tailed(data, ratio, lt_seed)
    return Source(kind, str(path), data.classes, data.labels.tolist(),
                  ArrayImages(data.images, data.labels, seed), [(SIDE, SIDE)], [], [], details)


# ------------------------------------------------------------------------------------ the conversion
def _tmp_name(out: Path, pid: int) -> Path:
    return out.parent / f".{out.name}.tmp-{socket.gethostname()}-{pid}"


def _remove_stale_tmp(out: Path) -> None:
    """Delete the temporary files of earlier conversions to `out` on this host that were killed (their
    process is gone): each can be as large as the dataset. Live conversions' files, and other hosts'
    (a shared filesystem), are left alone; a file that cannot be deleted is left too."""
    prefix = _tmp_name(out, 0).name[:-1]  # .NAME.tmp-HOST-
    for old in out.parent.glob(glob.escape(prefix) + "*"):
        pid = old.name[len(prefix):]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: does the process exist?
            continue
        except ProcessLookupError:
            pass
        except PermissionError:  # it exists, owned by another user
            continue
        with contextlib.suppress(OSError):
            old.unlink()


def _prepare_output(out: Path) -> Path:
    """Create the output folder if needed and claim a temporary file in it (the writability check)."""
    if out.is_dir():
        raise ConvertError(f"output {out} is a folder; give a file name such as {out / 'train.beton'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(out)
        tmp = _tmp_name(out, os.getpid())
        tmp.open("wb").close()
    except OSError as e:
        raise ConvertError(f"cannot write to the output folder {out.parent} ({type(e).__name__}: "
                           f"{e.strerror or e}); choose a writable folder") from None
    return tmp


def _manifest(src: Source, out: Path, options: ImageOptions, workers: int, seed: int,
              seconds: dict) -> dict:
    counts = np.bincount(np.asarray(src.labels, dtype=np.int64), minlength=len(src.classes)).tolist()
    n = len(src.labels)
    return dict(
        format="ffcv", file=out.name, bytes=out.stat().st_size,
        fields=dict(image="RGBImageField (HxWx3 uint8 RGB)", label="IntField (index into classes)"),
        source=dict(kind=src.kind, path=src.path, **src.details),
        options=dict(asdict(options), workers=workers, seed=seed),
        num_images=n, num_classes=len(src.classes), classes=src.classes,
        counts=dict(zip(src.classes, counts)),
        num_skipped=len(src.skipped), skipped=src.skipped, converted=src.converted,
        seconds=seconds, images_per_second=round(n / max(seconds["total"], 1e-9), 1),
        versions=dict(ffcv=metadata.version("ffcv"), numpy=np.__version__,
                      python=platform.python_version()),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def convert(input_path, out, *, source: str = "auto", split: str = "train", class_fraction: float = 1.0,
            class_seed: int = 0, imbalance_ratio: float = 100.0, lt_seed: int = 0,
            options: Optional[ImageOptions] = None, workers: int = 1, chunk_size: int = 100,
            seed: int = 0, progress: bool = True) -> dict:
    """Convert `input_path` into the FFCV file `out` (+ its manifest); returns the manifest."""
    from fastairl.extras import require

    options = options or ImageOptions()
    options.check()
    if source not in SOURCES:
        raise ConvertError(f"--source must be one of {', '.join(SOURCES)}, got {source!r}")
    if workers < 1 or chunk_size < 1:
        raise ConvertError(f"--workers and --chunk-size must be >= 1, got {workers} and {chunk_size}")
    input_path, out = Path(input_path).absolute(), Path(out).absolute()
    kind = _detect(input_path, source)
    if kind in ("cifar", "cifar-lt") and class_fraction < 1.0:
        raise ConvertError("--class-fraction selects classes of folder and file-list inputs, not CIFAR")
    require("ffcv", "ffcv")
    tmp = _prepare_output(out)
    meta_tmp = tmp.with_name(tmp.name + ".json")
    t0 = time.perf_counter()
    try:
        if kind in ("cifar", "cifar-lt"):
            src = _cifar_source(kind, input_path, split, imbalance_ratio, lt_seed, seed)
        else:
            src = _image_source(kind, input_path, class_fraction, class_seed, workers, progress, seed)
        t1 = time.perf_counter()
        options = options.resolved(kind in ("cifar", "cifar-lt"))
        chunk = max(1, min(chunk_size, math.ceil(len(src.labels) / (4 * workers))))
        _write(tmp, src.dataset, options, src.sizes, workers, chunk, progress)
        t2 = time.perf_counter()
        seconds = dict(check=round(t1 - t0, 3), write=round(t2 - t1, 3), total=round(t2 - t0, 3))
        manifest = _manifest(src, tmp, options, workers, seed, seconds)
        manifest["file"] = out.name
        meta = manifest_path(out)
        meta_tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, out)  # the .beton first: a manifest never describes a file that is not there
        os.replace(meta_tmp, meta)
    finally:
        tmp.unlink(missing_ok=True)
        meta_tmp.unlink(missing_ok=True)
    return manifest


# ---------------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, like every other fastairl error
        self.exit(2, f"error: {message} ({self.prog} -h for help)\n")


def _parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Convert a dataset into an FFCV .beton file (+ OUT.json manifest).")
    p.add_argument("input", help="ImageNet-style folder, 'path label' file list, or CIFAR pickle folder")
    p.add_argument("out", help="output .beton file (replaced atomically when the conversion succeeds)")
    p.add_argument("--source", default="auto", help=f"{' | '.join(SOURCES)} (default: auto)")
    p.add_argument("--split", default="train", help="CIFAR: train | test")
    p.add_argument("--class-fraction", type=float, default=1.0, help="keep this fraction of the classes")
    p.add_argument("--class-seed", type=int, default=0, help="seed of the class subset")
    p.add_argument("--imbalance-ratio", type=float, default=100.0, help="CIFAR-LT: n_max / n_min")
    p.add_argument("--lt-seed", type=int, default=0, help="CIFAR-LT: seed of the per-class subsets")
    p.add_argument("--max-resolution", type=int, default=None, help="longest side in pixels (default: keep)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--write-mode", default=None, help="raw | jpg | proportion | smart (default: raw for "
                                                      "CIFAR, jpg otherwise)")
    p.add_argument("--compress-probability", type=float, default=0.5, help="proportion mode: P(JPEG)")
    p.add_argument("--smart-threshold", type=int, default=None,
                   help=f"smart mode: JPEG above this many raw bytes (default {DEFAULT_SMART_THRESHOLD})")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--chunk-size", type=int, default=100, help="samples per writer work item")
    p.add_argument("--seed", type=int, default=0, help="proportion mode: seed of the JPEG/raw draws")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[list[str]] = None, prog: str = "python -m fastairl.pipelines.convert") -> int:
    args = _parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    options = ImageOptions(args.max_resolution, args.jpeg_quality, args.write_mode,
                           args.compress_probability, args.smart_threshold)
    try:
        m = convert(args.input, args.out, source=args.source, split=args.split,
                    class_fraction=args.class_fraction, class_seed=args.class_seed,
                    imbalance_ratio=args.imbalance_ratio, lt_seed=args.lt_seed, options=options,
                    workers=args.workers, chunk_size=args.chunk_size, seed=args.seed,
                    progress=not args.no_progress)
    except (ConvertError, DataError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m['num_images']} images of {m['num_classes']} classes to {args.out} "
          f"({m['bytes'] / 2**20:.1f} MiB, {m['seconds']['total']:.1f} s, {m['images_per_second']:.0f} img/s);"
          f" skipped {m['num_skipped']}, converted {len(m['converted'])}: see {manifest_path(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
