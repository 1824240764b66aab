"""Sample lists for every loader backend: ImageNet-style folders, "path label" file lists, and the
class-fraction subsets of the paper's data-scaling experiments.

A dataset here is just `(samples, classes)`: `samples` is a list of `(path, label)` with labels in
`0..len(classes)-1`, sorted and deterministic, so every process and every backend sees the same indices.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

Samples = list[tuple[str, int]]


class DataError(ValueError):
    """A dataset path or file list is unusable; the message names it and says what to do."""


class ImageReadError(RuntimeError):
    """An image file cannot be decoded: empty, truncated, not an image, unreadable. Loaders raise it
    per file; the torch backend replaces the sample and counts it (data.max_bad_fraction)."""


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_folder(root, key: str = "data.train") -> tuple[Samples, list[str]]:
    """ImageNet-style tree `root/<class>/**/<image>`; classes are the sorted sub-folder names.

    `key` is the config key that named `root`, used in error messages only.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{key}: {root} does not exist; point {key} at an ImageNet-style folder "
                        f"(class/xxx.jpg) or run `fastairl data digits`")
    if not root.is_dir():
        raise DataError(f"{key}: {root} is a file, not a folder; for a 'path label' file list set "
                        f"data.source: filelist")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{key}: {root} has no class folders; expected {root}/<class>/<image>.jpg "
                        f"(or run `fastairl data digits`)")
    samples: Samples = []
    for label, name in enumerate(classes):
        files = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f))
        if not files:
            raise DataError(f"{key}: class folder {root / name} has no images "
                            f"({' '.join(IMAGE_EXTENSIONS)}); add images or remove the folder")
        samples.extend((f, label) for f in files)
    return samples, classes


def read_filelist(path, key: str = "data.train") -> tuple[Samples, list[str]]:
    """Lines `relative/or/absolute/path label` (relative to the list's folder; '#' starts a comment).

    Labels may be any non-negative integers; they are mapped, in sorted order, to 0..k-1 and the class
    names are the original labels as strings (identity when the labels are already 0..k-1).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: {path} does not exist; point {key} at a file list of 'path label' "
                        f"lines, or set data.source: folder for an ImageNet-style folder")
    base = path.parent
    raw: list[tuple[str, int, int]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.rsplit(None, 1)  # the path may contain spaces; the label never does
            try:
                if len(parts) != 2:
                    raise ValueError
                label = int(parts[1])
                if label < 0:
                    raise ValueError
            except ValueError:
                raise DataError(f"{path}:{lineno}: expected 'path label' with a non-negative integer "
                                f"label, got {text!r}") from None
            file = parts[0] if os.path.isabs(parts[0]) else str(base / parts[0])
            raw.append((file, label, lineno))
    if not raw:
        raise DataError(f"{key}: file list {path} has no 'path label' lines")
    missing = [(file, lineno) for file, _, lineno in raw if not os.path.isfile(file)]
    if missing:
        file, lineno = missing[0]
        raise DataError(f"{path}:{lineno}: image {file} does not exist ({len(missing)} of {len(raw)} "
                        f"listed files are missing); fix the list or the paths (relative paths are "
                        f"relative to {base})")
    labels = sorted({label for _, label, _ in raw})
    dense = {label: i for i, label in enumerate(labels)}
    return [(file, dense[label]) for file, label, _ in raw], [str(label) for label in labels]


def select_classes(classes: list[str], fraction: float, seed: int) -> list[int]:
    """Indices of round(fraction * n) >= 1 classes drawn uniformly without replacement, sorted.

    A pure function of (len(classes), fraction, seed): every process and every run picks the same set.
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"data.class_fraction must be in (0, 1], got {fraction}")
    n = len(classes)
    k = max(1, int(round(fraction * n)))
    if k >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False))


def subset(samples: Samples, classes: list[str], keep: list[int]) -> tuple[Samples, list[str]]:
    """Keep the samples of the classes `keep` (indices into `classes`), relabelled to 0..k-1 in the
    order of `keep`."""
    remap = {old: new for new, old in enumerate(keep)}
    kept = [(path, remap[label]) for path, label in samples if label in remap]
    return kept, [classes[i] for i in keep]


def check_same_classes(train_classes: list[str], val_classes: list[str], val_key: str = "data.val") -> None:
    """Labels are the index of a class in each split's own class list: a split that lacks a class, or
    has another, would shift the labels silently. Both splits must list the same classes."""
    if list(train_classes) == list(val_classes):
        return

    def show(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

    in_train, in_val = set(train_classes), set(val_classes)
    only_train = [c for c in train_classes if c not in in_val]
    only_val = [c for c in val_classes if c not in in_train]
    what = ([f"only in data.train: {show(only_train)}"] if only_train else []) + \
           ([f"only in {val_key}: {show(only_val)}"] if only_val else [])
    raise DataError(f"{val_key} has {len(val_classes)} classes and data.train {len(train_classes)}; labels are "
                    f"class indices within each split, so they would not match ("
                    + ("; ".join(what) or "the same names in another order") + f"). Give {val_key} the "
                    f"classes of data.train")


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size} processes")


def eval_indices(n: int, max_samples: Optional[int] = None, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """Which of `n` samples an evaluation loader reads: an evenly spaced subset when `max_samples` < n
    (class-balanced when the samples are sorted by class), then every `world_size`-th one from `rank`
    (strided, so fastairl.eval.features.gather_strided restores the order from the processes' parts)."""
    check_rank(rank, world_size)
    keep = np.arange(n) if max_samples is None or max_samples >= n else (np.arange(max_samples) * n) // max_samples
    return keep[rank::world_size]


def load_samples(data_cfg, path: Optional[str], key: Optional[str] = None) -> tuple[Samples, list[str]]:
    """The (samples, classes) of `path` read as `data_cfg.source` says, restricted to the
    `data_cfg.class_fraction` subset (same classes for train and val when their class lists agree), then
    relabelled to the super-classes of `data_cfg.label_map` when one is set."""
    if key is None:
        is_val = path is not None and path == data_cfg.val and path != data_cfg.train
        key = "data.val" if is_val else "data.train"
    if path is None:
        raise DataError(f"{key} is not set; point it at an ImageNet-style folder (class/xxx.jpg)")
    if data_cfg.source == "folder":
        samples, classes = scan_folder(path, key=key)
    elif data_cfg.source == "filelist":
        samples, classes = read_filelist(path, key=key)
    elif data_cfg.source == "synthetic":
        raise DataError(f"data.source is synthetic: there are no images to read at {path}; set "
                        f"data.source: folder (or filelist) to use {key}")
    else:
        raise DataError(f"data.source must be folder, filelist or synthetic, got {data_cfg.source!r}")
    if data_cfg.class_fraction < 1.0:
        samples, classes = subset(samples, classes,
                                  select_classes(classes, data_cfg.class_fraction, data_cfg.class_seed))
    if data_cfg.label_map:  # merged labels (Table 6): the classes become the super-classes
        from .taxonomy import apply_label_map

        samples, classes = apply_label_map(samples, classes, data_cfg.label_map)
    return samples, classes
