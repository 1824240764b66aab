"""Small REAL-image datasets built from images that scikit-learn / scikit-image ship, so the
quickstart, the tests and the benchmarks run without downloading ImageNet.

Both builders write an ImageNet-style tree `root/train/<class>/*.jpg` (digits also `root/val/...`) and
`root/manifest.json`. They are idempotent (same parameters in the manifest: nothing to do) and build in
a temporary sibling folder that is renamed into place, so a half-written dataset never has a manifest.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from fastairl.data.datasets import DataError
from fastairl.extras import require

MANIFEST = "manifest.json"


def _build_atomically(root, params: dict, build: Callable[[Path], dict]) -> dict:
    """Run `build(tmp)` in a temporary sibling of `root`, write the manifest last, rename into place."""
    root = Path(root)
    params = json.loads(json.dumps(params))  # tuples -> lists, as they read back from the manifest
    manifest_path = root / MANIFEST
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and old.get("params") == params:
            return old
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} exists and is not a fastairl dataset (no {MANIFEST}); choose a new or "
                        f"empty folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        info = build(tmp)
        info["params"] = params
        (tmp / MANIFEST).write_text(json.dumps(info, indent=2) + "\n")
        if root.exists():
            trash = root.parent / f".{root.name}.old-{os.getpid()}"
            os.rename(root, trash)
            os.rename(tmp, root)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return json.loads(manifest_path.read_text())


# ------------------------------------------------------------------------------------------- digits
def make_digits(root, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict:
    """sklearn's 1797 handwritten 8x8 digits (10 classes) as size x size RGB JPEGs (bicubic, q95),
    split per class (stratified) into train / val with `seed`. Returns the manifest."""
    if size < 8:
        raise DataError(f"digits size must be >= 8 (the source images are 8x8), got {size}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"digits val_fraction must be in [0, 1), got {val_fraction}")
    datasets = require("data", "sklearn.datasets")
    from PIL import Image

    params = dict(size=size, val_fraction=val_fraction, seed=seed)

    def build(tmp: Path) -> dict:
        digits = datasets.load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # Nx8x8
        targets = digits.target.astype(int)
        classes = [str(c) for c in sorted(set(targets.tolist()))]
        rng = np.random.default_rng(seed)
        is_val = np.zeros(len(targets), dtype=bool)
        for c in sorted(set(targets.tolist())):
            idx = rng.permutation(np.flatnonzero(targets == c))
            is_val[idx[: int(round(val_fraction * len(idx)))]] = True
        splits = ["train", "val"] if val_fraction > 0 else ["train"]
        counts = {s: {c: 0 for c in classes} for s in splits}
        for s in splits:
            for c in classes:
                (tmp / s / c).mkdir(parents=True)
        for i, (img, c) in enumerate(zip(images, targets)):
            split = "val" if is_val[i] else "train"
            pil = Image.fromarray(img).convert("RGB").resize((size, size), Image.BICUBIC)
            pil.save(tmp / split / str(c) / f"{i:04d}.jpg", quality=95)
            counts[split][str(c)] += 1
        return dict(name="digits", source="sklearn.datasets.load_digits", size=size, quality=95,
                    classes=classes, counts=counts,
                    totals={s: sum(counts[s].values()) for s in splits}, skipped=[])

    return _build_atomically(root, params, build)


# ------------------------------------------------------------------------------------- photo corpus
def _photo_sources() -> tuple[list[tuple[str, np.ndarray]], list[dict]]:
    """(name, HxWx3 uint8) of every real photo available offline, colour photos first; and the ones
    skipped with the reason (some skimage images need the optional `pooch` download)."""
    skd = require("data", "skimage.data")
    skds = require("data", "sklearn.datasets")
    loaders = [
        ("astronaut", skd.astronaut), ("chelsea", skd.chelsea), ("coffee", skd.coffee),
        ("rocket", skd.rocket), ("hubble_deep_field", skd.hubble_deep_field),
        ("immunohistochemistry", skd.immunohistochemistry),
        ("motorcycle", lambda: skd.stereo_motorcycle()[0]), ("retina", skd.retina),
        ("china", lambda: skds.load_sample_image("china.jpg")),
        ("flower", lambda: skds.load_sample_image("flower.jpg")),
        # greyscale photos, as RGB: used when more classes are asked for than there are colour photos
        ("camera", skd.camera), ("brick", skd.brick), ("grass", skd.grass), ("gravel", skd.gravel),
        ("moon", skd.moon), ("coins", skd.coins), ("clock", skd.clock), ("cell", skd.cell),
    ]
    found, skipped = [], []
    for name, load in loaders:
        try:
            arr = np.asarray(load())
        except Exception as e:  # noqa: BLE001 - any failure just means this photo is not available
            skipped.append(dict(source=name, reason=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            continue
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            skipped.append(dict(source=name, reason=f"not an 8-bit RGB/grey photo: {arr.dtype} {arr.shape}"))
            continue
        found.append((name, np.ascontiguousarray(arr)))
    return found, skipped


# Variants that turn one photo into several distinguishable classes when more classes than photos
# are asked for: 4 rotations x 6 channel orders (the first 4: the rotations in the photo's own colours).
_VARIANTS = [(rot, perm) for perm in itertools.permutations(range(3)) for rot in range(4)]


def _photo_classes(sources: list[tuple[str, np.ndarray]]) -> list[tuple[int, int]]:
    """(source index, variant index) of every distinct class, variant by variant: a grey photo's
    channel orders are the same image, so it gives its 4 rotations only."""
    grey = [bool((arr == arr[..., :1]).all()) for _, arr in sources]
    return [(k, v) for v, (_, perm) in enumerate(_VARIANTS) for k in range(len(sources))
            if not (grey[k] and perm != (0, 1, 2))]


def make_photo_corpus(root, n_images: int = 1000, classes: int = 10, seed: int = 0,
                      min_side: int = 375, max_side: int = 500) -> dict:
    """An ImageNet-like JPEG corpus from real photos: `root/train/<class>/*.jpg`.

    Class k is source photo k (then rotated / channel-permuted copies when `classes` exceeds the number
    of photos). Image i belongs to class i % classes and is a random crop (35-100 % of the largest box
    of its aspect) rescaled so the long side is `max_side` and the short side is `min_side` half the
    time, else U[min_side, max_side] (landscape 3 times out of 4), flipped with p 0.5, saved at JPEG
    quality U{75..95}. Returns the manifest.
    """
    if not 0 < min_side <= max_side:
        raise DataError(f"photo corpus needs 0 < min_side <= max_side, got {min_side}, {max_side}")
    if classes < 1 or n_images < classes:
        raise DataError(f"photo corpus needs n_images >= classes >= 1 (every class folder gets an "
                        f"image), got n_images={n_images}, classes={classes}")
    from PIL import Image

    # layout 2: grey photos give their rotations only; a cached corpus of the earlier layout is rebuilt
    # (beyond 4 variants per photo it had duplicate classes)
    params = dict(n_images=n_images, classes=classes, seed=seed, min_side=min_side, max_side=max_side,
                  layout=2)

    def build(tmp: Path) -> dict:
        sources, skipped = _photo_sources()
        distinct = _photo_classes(sources)
        if classes > len(distinct):
            raise DataError(f"photo corpus: at most {len(distinct)} distinct classes from the "
                            f"{len(sources)} available photos, asked for {classes}")
        class_imgs, names = [], []
        for k, (src, v) in enumerate(distinct[:classes]):
            name, arr = sources[src]
            rot, perm = _VARIANTS[v]
            class_imgs.append(Image.fromarray(np.ascontiguousarray(np.rot90(arr, rot)[..., list(perm)])))
            names.append(f"{k:03d}_{name}" + (f"_v{v}" if v else ""))
        for n in names:
            (tmp / "train" / n).mkdir(parents=True)
        counts = {n: 0 for n in names}
        sizes, qualities = [], []
        for i in range(n_images):
            k = i % classes
            src = class_imgs[k]
            rng = np.random.default_rng([seed, i])
            # long / short: ImageNet's most common 4:3 (500x375) half the time, else anything up to it
            aspect = max_side / min_side if rng.random() < 0.5 else rng.uniform(1.0, max_side / min_side)
            long_, short = max_side, int(round(max_side / aspect))
            w, h = (short, long_) if rng.random() < 0.25 else (long_, short)
            sw, sh = src.size
            cw, ch = (sh * w / h, sh) if sw / sh > w / h else (sw, sw * h / w)
            s = np.sqrt(rng.uniform(0.35, 1.0))
            cw, ch = cw * s, ch * s
            left, top = rng.uniform(0, sw - cw), rng.uniform(0, sh - ch)
            img = src.resize((w, h), Image.BICUBIC, box=(left, top, left + cw, top + ch))
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            quality = int(rng.integers(75, 96))
            img.save(tmp / "train" / names[k] / f"{i:05d}.jpg", quality=quality)
            counts[names[k]] += 1
            sizes.append((w, h))
            qualities.append(quality)
        ws, hs = zip(*sizes)
        return dict(name="photo_corpus", source="skimage.data + sklearn.datasets.load_sample_image",
                    photos=[n for n, _ in sources], classes=names, counts={"train": counts},
                    totals={"train": n_images},
                    size=dict(mean_width=float(np.mean(ws)), mean_height=float(np.mean(hs)),
                              min_side=min(min(ws), min(hs)), max_side=max(max(ws), max(hs))),
                    quality=dict(min=min(qualities), max=max(qualities)), skipped=skipped)

    return _build_atomically(root, params, build)


# -------------------------------------------------------------------------------------------- CIFAR
def make_cifar_folder(src, root, lt_ratio: float | None = None, seed: int = 0) -> dict:
    """CIFAR-10/100 (python pickles under `src`) as lossless PNG folder trees `root/train/<class>/`
    and `root/val/<class>/` (the official test set, balanced), so every loader backend and
    `fastairl convert` read it like ImageNet. `lt_ratio` (e.g. 100) keeps the long-tailed training
    subset of fastairl.data.cifar (exponential profile, `seed`). Returns the manifest."""
    from PIL import Image

    from fastairl.data import cifar

    params = dict(src=str(Path(src).resolve()), lt_ratio=lt_ratio, seed=seed)

    def build(tmp: Path) -> dict:
        train, test = cifar.load_cifar(src, "train"), cifar.load_cifar(src, "test")
        if lt_ratio is not None:
            train = cifar.long_tailed(train, ratio=lt_ratio, seed=seed)
        # folder names keep CIFAR's label order (sorted folders = label index): 00_airplane, ...
        names = [f"{i:0{len(str(len(train.classes) - 1))}d}_{c}" for i, c in enumerate(train.classes)]
        counts = {}
        for split, data in (("train", train), ("val", test)):
            counts[split] = {c: 0 for c in names}
            for c in names:
                (tmp / split / c).mkdir(parents=True)
            for i, (img, y) in enumerate(zip(data.images, data.labels)):
                c = names[int(y)]
                Image.fromarray(img).save(tmp / split / c / f"{i:05d}.png")
                counts[split][c] += 1
        name = train.variant + ("-LT" if lt_ratio is not None else "")
        return dict(name=name, source=str(Path(src).resolve()), format="png", classes=names,
                    lt_ratio=lt_ratio, seed=seed, counts=counts,
                    totals={s: sum(v.values()) for s, v in counts.items()}, skipped=[])

    return _build_atomically(root, params, build)
