"""The torch reference loader: PIL decode + torchvision functional ops, driven by the shared
AugmentSpec samplers. Slow but obviously correct; the other backends are tested against it.

Determinism: the augmentation of sample `index` in `epoch` depends only on (seed, epoch, index)
(`sample_rng`), and the batch order only on (seed, epoch), so any worker count, any rank layout and a
mid-epoch resume produce the same tensors.
"""
from __future__ import annotations

import functools
import multiprocessing
import signal
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from fastairl.data.augment import (IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, ViewSpec, sample_color,
                                   sample_crop, sample_rng, spec_from_config)
from fastairl.data.datasets import ImageReadError, check_rank, eval_indices

_JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
_IDENTITY = (1.0, 1.0, 1.0, 0.0)


@functools.lru_cache(maxsize=8)
def _scaled_stats(mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(mean, dtype=torch.float32).mul_(255.0).view(3, 1, 1),
            torch.tensor(std, dtype=torch.float32).mul_(255.0).view(3, 1, 1))


def _to_normalised(img: Image.Image, mean, std) -> torch.Tensor:
    """uint8 HxWx3 -> 3xHxW float32 (x/255 - mean) / std, folded into one subtract and one divide."""
    m, s = _scaled_stats(tuple(mean), tuple(std))
    return TF.pil_to_tensor(img).float().sub_(m).div_(s)  # 3xHxW


def augment_view(img: Image.Image, v: ViewSpec, rng: np.random.Generator, finish: bool = True) -> torch.Tensor:
    """One augmented view (3 x crop x crop, float32, normalised) of an RGB PIL image.

    Order (BYOL): random resized crop -> flip -> colour jitter (random op order) -> grayscale ->
    Gaussian blur -> solarise. The crop box is drawn before the photometric parameters.
    `finish=False` stops after the flip and returns uint8 (`aug.on_device`: the rest runs batched on
    the device); the same draws are consumed, so crops and flips do not change.
    """
    top, left, h, w = sample_crop(rng, img.height, img.width, v.crop_scale, v.crop_ratio)
    c = sample_color(rng, v)
    out = TF.resized_crop(img, top, left, h, w, [v.crop_size, v.crop_size],
                          InterpolationMode.BILINEAR, antialias=True)
    if c.flip:
        out = TF.hflip(out)
    if not finish:
        return TF.pil_to_tensor(out)  # 3xHxW uint8
    if c.jitter:
        factors = (c.brightness, c.contrast, c.saturation, c.hue)
        for op in c.order:
            if factors[op] != _IDENTITY[op]:  # a zero-width range (e.g. hue 0) draws the identity: skip it
                out = _JITTER_OPS[op](out, factors[op])
    if c.gray:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    if c.blur:
        out = TF.gaussian_blur(out, [v.blur_kernel, v.blur_kernel], [c.sigma, c.sigma])
    if c.solarize:
        out = TF.solarize(out, v.solarize_threshold)  # PIL uint8: values >= threshold -> 255 - value
    return _to_normalised(out, v.mean, v.std)


def _open_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # forces the full decode, so truncated files fail here
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files; report them all alike
        raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}; remove or replace "
                           f"the file") from None


class PILViews:
    """The reference view maker: full PIL decode, then `augment_view` per view."""

    def __init__(self, spec: AugmentSpec, finish: bool = True):
        self.spec, self.finish = spec, finish

    def __call__(self, path: str, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        img = _open_rgb(path)
        return tuple(augment_view(img, v, rng, self.finish) for v in self.spec.views)


def view_maker(spec: AugmentSpec, engine: str = "pil", finish: bool = True):
    """`aug.engine`: pil (the reference) or opencv (uint8 OpenCV ops, DCT-scaled decode)."""
    if engine == "opencv":
        from fastairl.data.cv_aug import OpenCVViews

        return OpenCVViews(spec, finish)
    return PILViews(spec, finish)


def replacement_candidates(seed: int, epoch: int, index: int, num_samples: int, tries: int) -> list[int]:
    """The samples that may stand in for an unreadable sample `index` (first readable one wins): a pure
    function of (seed, epoch, index), so every worker, backend and resumed run picks the same one."""
    return np.random.default_rng([seed, epoch, index, 1]).integers(num_samples, size=tries).tolist()


class DualViewDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by (epoch, index): decodes once, returns (views, label).

    An unreadable file is replaced by the first readable one of a few other samples drawn as a pure
    function of (seed, epoch, index), so every worker and a resumed run pick the same one; it is
    flagged in `bad` (shared with the worker processes) for the trainer to report. Never zeros."""

    MAX_TRIES = 16  # replacements drawn for one unreadable file

    def __init__(self, samples: Sequence[tuple[str, int]], spec: AugmentSpec, seed: int = 0,
                 finish: bool = True, engine: str = "pil"):
        self.samples = list(samples)
        self.spec = spec
        self.seed = seed
        self.make_views = view_maker(spec, engine, finish)
        self.bad = multiprocessing.RawArray("b", len(self.samples))  # 1: the file is unreadable

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[tuple[torch.Tensor, ...], int]:
        epoch, index = key
        error = None
        for j in self._candidates(epoch, index):
            if self.bad[j] and j != index:  # a known bad replacement would fail the same way
                continue
            path, label = self.samples[j]
            try:
                return self.make_views(path, sample_rng(self.seed, epoch, index)), label
            except ImageReadError as e:
                self.bad[j] = 1
                error = error or e
        raise ImageReadError(f"{error}; none of the {self.MAX_TRIES} samples drawn to replace it is "
                             f"readable either: check the training folder")

    def _candidates(self, epoch: int, index: int) -> Iterator[int]:
        yield index
        yield from replacement_candidates(self.seed, epoch, index, len(self.samples), self.MAX_TRIES)


def check_global_batch(global_batch: int, world_size: int, num_samples: int, source: str) -> None:
    """A global batch splits evenly over the processes, and the samples of `source` fill at least one."""
    if global_batch % world_size:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {world_size} "
                         f"processes; pick a multiple of {world_size}")
    if num_samples < global_batch:
        raise ValueError(f"{source} has {num_samples} samples, fewer than one global batch of "
                         f"train.batch_size={global_batch}; lower train.batch_size")


class EpochBatchSampler:
    """Per-epoch permutation split into global batches (last partial batch dropped); each rank takes
    its contiguous slice of every global batch. Yields lists of (epoch, index)."""

    def __init__(self, num_samples: int, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0):
        check_rank(rank, world_size)
        check_global_batch(global_batch, world_size, num_samples, "the dataset")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_batch = global_batch // world_size
        self.steps_per_epoch = num_samples // global_batch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is outside the epoch's {self.steps_per_epoch} steps")
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def order(self, epoch: int, start_step: int = 0) -> np.ndarray:
        """This rank's sample indices of steps start_step.. of `epoch`, batch after batch: its slice of
        every global batch of the (seed, epoch) permutation. Every backend reads its order from here."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        steps = perm[: self.steps_per_epoch * self.global_batch].reshape(self.steps_per_epoch, self.global_batch)
        return steps[start_step:, self.rank * self.per_batch: (self.rank + 1) * self.per_batch].ravel()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.order(self.epoch, self.start_step).reshape(-1, self.per_batch):
            yield [(self.epoch, int(i)) for i in batch]


def _collate(batch):
    views = [torch.stack([item[0][k] for item in batch]) for k in range(len(batch[0][0]))]  # V x Nx3xHxW
    labels = torch.tensor([item[1] for item in batch], dtype=torch.long)  # N
    return views, labels


class TorchTrainLoader:
    """The loader seam, torch backend: yields (views: list of Nx3xHxW float32, labels: N long) on CPU;
    with `on_device`, uint8 crops (the seam finishes them with fastairl.data.device_aug)."""

    def __init__(self, samples, classes, spec: AugmentSpec, global_batch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, workers: int = 0, pin_memory: bool = False,
                 on_device: bool = False, engine: str = "pil"):
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.spec = spec
        self.uint8_views = on_device
        self.dataset = DualViewDataset(samples, spec, seed, finish=not on_device, engine=engine)
        self.sampler = EpochBatchSampler(len(self.dataset), global_batch, rank, world_size, seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.num_samples = len(self.dataset)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=_collate,
            pin_memory=pin_memory, persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_step)

    def bad_files(self) -> list[str]:
        """Paths of the files found unreadable so far, by any worker (each was replaced)."""
        flags = np.frombuffer(self.dataset.bad, dtype=np.int8)
        return [self.dataset.samples[i][0] for i in np.flatnonzero(flags)]

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        return iter(self.loader)


class _EvalDataset(torch.utils.data.Dataset):
    def __init__(self, samples, crop_size: int, resize: int, mean, std):
        self.samples, self.crop_size, self.resize, self.mean, self.std = samples, crop_size, resize, mean, std

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = TF.resize(_open_rgb(path), self.resize, InterpolationMode.BILINEAR, antialias=True)
        img = TF.center_crop(img, [self.crop_size, self.crop_size])
        return _to_normalised(img, self.mean, self.std), label


def _outlive_stop_signals(worker_id: int) -> None:
    """An evaluation worker ignores the SIGTERM / SIGUSR1 that a scheduler sends to the whole process
    group: the trainer finishes the epoch-end kNN these workers serve, saves, then stops (exit 75).
    The workers still end with their loader, or on their own once the parent process is gone."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


class EvalLoader:
    """Deterministic evaluation: resize the shorter side to `resize`, centre-crop `crop_size`,
    normalise; yields (images Nx3xHxW float32, labels N long) in sample order. `max_samples` keeps an
    evenly spaced subset (class-balanced when the samples are sorted by class); `rank`/`world_size`
    read this process's strided share of it (fastairl.data.datasets.eval_indices)."""

    def __init__(self, samples, classes, *, crop_size: int, resize: int, batch_size: int = 256,
                 workers: int = 0, max_samples: Optional[int] = None, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, pin_memory: bool = False, rank: int = 0, world_size: int = 1):
        samples = list(samples)
        samples = [samples[i] for i in eval_indices(len(samples), max_samples, rank, world_size)]
        self.samples = samples
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.crop_size, self.resize = crop_size, resize
        self.loader = torch.utils.data.DataLoader(
            _EvalDataset(samples, crop_size, resize, mean, std), batch_size=batch_size, shuffle=False,
            num_workers=workers, pin_memory=pin_memory, persistent_workers=False,
            worker_init_fn=_outlive_stop_signals if workers else None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


class SyntheticLoader:
    """`data.source: synthetic`: one pre-generated per-process batch of random normalised views and
    labels, created once on `device` and yielded steps_per_epoch times (the training step without I/O).
    The same tensors are yielded every step: callers must not modify them in place."""

    def __init__(self, spec: AugmentSpec, global_batch: int, rank: int = 0, world_size: int = 1,
                 num_classes: int = 1000, num_samples: int = 1281167, seed: int = 0, device="cpu"):
        check_global_batch(global_batch, world_size, num_samples, "data.synthetic_size")
        self.classes = [str(i) for i in range(num_classes)]
        self.num_classes = num_classes
        self.spec = spec
        self.steps_per_epoch = num_samples // global_batch
        self.start_step = 0
        pb = global_batch // world_size
        g = torch.Generator().manual_seed(seed * 1000003 + rank)  # generated on CPU: same on any device
        self.views = [torch.randn(pb, 3, v.crop_size, v.crop_size, generator=g).to(device)  # Nx3xHxW
                      for v in spec.views]
        self.labels = torch.randint(0, num_classes, (pb,), generator=g).to(device)  # N

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.start_step = start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        for _ in range(len(self)):
            yield self.views, self.labels


# ------------------------------------------------------------------------- the seam's entry points
def train_loader(cfg, spec: AugmentSpec, *, rank: int, world_size: int, device) -> TorchTrainLoader:
    from fastairl.data.datasets import load_samples

    samples, classes = load_samples(cfg.data, cfg.data.train, key="data.train")
    return TorchTrainLoader(samples, classes, spec, cfg.train.batch_size, rank, world_size,
                            cfg.train.seed, cfg.data.workers, pin_memory=torch.device(device).type == "cuda",
                            on_device=cfg.aug.on_device, engine=cfg.aug.engine)


def eval_loader(cfg, path: Optional[str], *, max_samples: Optional[int] = None, batch_size: int = 256,
                pin_memory: bool = False, rank: int = 0, world_size: int = 1) -> EvalLoader:
    from fastairl.data.datasets import load_samples
    from fastairl.pipelines import eval_resize

    v = spec_from_config(cfg.aug).views[0]
    samples, classes = load_samples(cfg.data, path)
    return EvalLoader(samples, classes, crop_size=cfg.aug.crop_size, resize=eval_resize(cfg),
                      batch_size=batch_size, workers=cfg.data.workers, max_samples=max_samples,
                      mean=v.mean, std=v.std, pin_memory=pin_memory, rank=rank, world_size=world_size)
