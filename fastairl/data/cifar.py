"""CIFAR-10 / CIFAR-100 in their python pickle format, and the long-tailed CIFAR-10-LT / CIFAR-100-LT
subsets (numpy only: used by dataset conversion and by evaluation alike, whatever the loader backend).

Layouts read (as downloaded from https://www.cs.toronto.edu/~kriz/cifar.html, or their parent folder):

    cifar-10-batches-py/  data_batch_1 .. data_batch_5, test_batch, batches.meta (label_names)
    cifar-100-python/     train, test, meta (fine_label_names)

Every batch is a pickled dict with `data` (N x 3072 uint8: the 1024 red, then green, then blue values of
a 32x32 image, row-major) and `labels` (CIFAR-10) or `fine_labels` (CIFAR-100).

Long-tailed subsets follow Cao et al. (LDAM-DRW, 2019), the split the paper's CIFAR-LT transfer uses:
class i keeps n_i = floor(n_max * (1/ratio)^(i / (C-1))) training images, n_max = N / C, imbalance
ratio 100 and seed 0 by default. The kept images of each class are the first n_i of a permutation drawn
by `np.random.RandomState(seed)` class after class, exactly as the reference code's `np.random.seed`
+ `np.random.shuffle`, so the subset is image-for-image the one the literature uses. The test set
stays balanced.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fastairl.data.datasets import DataError

SIDE = 32  # CIFAR images are 32x32x3
_LAYOUTS = {  # variant -> (folder name, train batches, test batch, meta file, meta key, label key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", "label_names", "labels"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_label_names", "fine_labels"),
}
Split = Literal["train", "test"]


@dataclass
class CifarSplit:
    """One split in memory: `images` N x 32 x 32 x 3 uint8 (HWC, RGB), `labels` N int64."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    variant: str  # cifar10 | cifar100
    root: str

    def counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(self.classes)).tolist()


def find_cifar(root) -> tuple[str, Path]:
    """(variant, batch folder) for `root` = the batch folder itself or its parent; DataError if neither."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root} does not exist; point it at cifar-10-batches-py or cifar-100-python "
                        f"(the python version from https://www.cs.toronto.edu/~kriz/cifar.html)")
    for variant, (folder, train, test, meta, *_) in _LAYOUTS.items():
        for cand in (root, root / folder):
            if all((cand / f).is_file() for f in (*train, test, meta)):
                return variant, cand
    raise DataError(f"{root} is not a CIFAR python-pickle folder: expected data_batch_1..5, test_batch, "
                    f"batches.meta (CIFAR-10) or train, test, meta (CIFAR-100), in it or in "
                    f"{root}/cifar-10-batches-py or {root}/cifar-100-python")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f, encoding="bytes")  # the official files are python-2 pickles
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: cannot read the CIFAR pickle ({type(e).__name__}: {e}); "
                        f"download it again") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(raw).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path}: a CIFAR batch needs the keys 'data' and '{label_key}', has {sorted(d)}")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * SIDE * SIDE or len(data) != len(labels):
        raise DataError(f"{path}: 'data' must be N x {3 * SIDE * SIDE} with one label per row, got "
                        f"{data.shape} data and {len(labels)} labels")
    images = data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)  # Nx3x32x32 planes -> Nx32x32x3
    return np.ascontiguousarray(images), labels


def load_cifar(root, split: Split = "train") -> CifarSplit:
    """The `split` ("train" or "test") of the CIFAR-10 or CIFAR-100 pickles at `root`."""
    if split not in ("train", "test"):
        raise DataError(f"CIFAR split must be 'train' or 'test', got {split!r}")
    variant, folder = find_cifar(root)
    _, train, test, meta, meta_key, label_key = _LAYOUTS[variant]
    names = _unpickle(folder / meta).get(meta_key)
    if names is None:
        raise DataError(f"{folder / meta}: no '{meta_key}' list of class names")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    parts = [_batch(folder / f, label_key) for f in (train if split == "train" else [test])]
    images = np.concatenate([p[0] for p in parts])  # Nx32x32x3
    labels = np.concatenate([p[1] for p in parts])  # N
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{folder}: labels must be in 0..{len(classes) - 1} ({meta} names "
                        f"{len(classes)} classes), found {labels.min()}..{labels.max()}")
    return CifarSplit(images, labels, classes, variant, str(folder))


def lt_counts(n_max: float, num_classes: int, ratio: float = 100.0) -> list[int]:
    """Images kept per class: floor(n_max * (1/ratio)^(i / (C-1))), i = 0..C-1 (head class first)."""
    if ratio < 1:
        raise DataError(f"imbalance ratio must be >= 1 (n_max / n_min), got {ratio}")
    if num_classes < 2:
        return [int(n_max)] * num_classes
    return [int(n_max * (1.0 / ratio) ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def long_tailed_indices(labels: np.ndarray, num_classes: int, ratio: float = 100.0,
                        seed: int = 0) -> np.ndarray:
    """Indices into `labels` of the long-tailed subset, class 0 first, each class in its permuted order."""
    labels = np.asarray(labels)
    counts = lt_counts(len(labels) / num_classes, num_classes, ratio)
    rs = np.random.RandomState(seed)  # the legacy stream: the same subset as the reference code
    keep = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            raise DataError(f"long-tailed subset: class {c} has {len(idx)} images, needs {n}; the "
                            f"input must be the balanced training set")
        rs.shuffle(idx)
        keep.append(idx[:n])
    return np.concatenate(keep)


def long_tailed(data: CifarSplit, ratio: float = 100.0, seed: int = 0) -> CifarSplit:
    """CIFAR-10-LT / CIFAR-100-LT from the balanced training split."""
    keep = long_tailed_indices(data.labels, len(data.classes), ratio, seed)
    return CifarSplit(data.images[keep], data.labels[keep], data.classes, data.variant, data.root)


def write_cifar(root, variant: str, train: tuple[np.ndarray, np.ndarray],
                test: tuple[np.ndarray, np.ndarray], classes: list[str]) -> Path:
    """Write (images N x 32 x 32 x 3 uint8, labels N) train/test arrays in the official pickle layout
    under `root/<cifar-10-batches-py | cifar-100-python>` (CIFAR-10: the train set split over 5
    batches). For tests and small custom datasets; returns the batch folder."""
    if variant not in _LAYOUTS:
        raise DataError(f"CIFAR variant must be one of {', '.join(_LAYOUTS)}, got {variant!r}")
    folder_name, train_files, test_file, meta, meta_key, label_key = _LAYOUTS[variant]
    folder = Path(root) / folder_name
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
        images = np.asarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (SIDE, SIDE, 3):
            raise DataError(f"write_cifar: images must be N x {SIDE} x {SIDE} x 3, got {images.shape}")
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # Nx32x32x3 -> Nx3072 planes
        batch = {b"data": data, label_key.encode(): [int(x) for x in labels],
                 b"filenames": [f"{name}_{i:05d}.png".encode() for i in range(len(images))]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)

    for name, part in zip(train_files, np.array_split(np.arange(len(train[1])), len(train_files))):
        dump(name, train[0][part], np.asarray(train[1])[part])
    dump(test_file, *test)
    with open(folder / meta, "wb") as f:
        pickle.dump({meta_key.encode(): [c.encode() for c in classes]}, f, protocol=2)
    return folder
