"""The loader seam: the trainer asks for a loader here and never imports a backend itself.

Every backend is a module `fastairl.pipelines.<name>` with two functions:

    train_loader(cfg, spec, *, rank, world_size, device) -> train loader
    eval_loader(cfg, path, *, max_samples, batch_size, pin_memory, rank, world_size) -> eval loader

A train loader has `steps_per_epoch`, `num_classes`, `classes`, `set_epoch(epoch, start_step=0)` (call
it before each epoch), `__len__` (steps left in the epoch) and yields
`(views: list of Nx3xHxW float32, labels: N int64)`. A backend that only decodes, crops and flips sets
`uint8_views = True` and yields uint8 views instead; the seam then wraps it in
`fastairl.data.device_aug.DeviceAugLoader`, which runs the rest of the AugmentSpec (jitter, grayscale,
blur, solarise, normalise) per sample on the training device. An eval loader yields
`(images: Nx3xHxW float32, labels: N int64)` in sample order; with `world_size` > 1 it reads only the
process's strided share (`fastairl.data.datasets.eval_indices`).

Backends with heavy dependencies (DALI, FFCV) are imported only when asked for, behind
`fastairl.extras.require`, so a missing extra is one clear error.
"""
from __future__ import annotations

import importlib
from typing import Optional

from fastairl.extras import MissingExtra, require

__all__ = ["BACKENDS", "MissingExtra", "backend", "build_eval_loader", "build_train_loader", "eval_resize"]

# pipeline name -> (backend module, the extra's import name or None)
BACKENDS = {
    "torch": ("fastairl.pipelines.torch_ref", None),
    "dali": ("fastairl.pipelines.dali", "nvidia.dali"),
    "ffcv": ("fastairl.pipelines.ffcv_loader", "ffcv"),
}


def backend(pipeline: str):
    """The backend module for `data.pipeline` (imports its extra first: MissingExtra if absent)."""
    module, extra = BACKENDS[pipeline]
    if extra is not None:
        require(pipeline, extra)
    return importlib.import_module(module)


def eval_resize(cfg) -> int:
    """The shorter side before the centre crop: data.eval_resize, or crop * 256/224 (256 at 224)."""
    if cfg.data.eval_resize is not None:
        return cfg.data.eval_resize
    return int(round(cfg.aug.crop_size * 256 / 224))


def build_train_loader(cfg, spec, *, rank: int, world_size: int, device):
    import torch

    device = torch.device(device)
    if cfg.data.source == "synthetic":
        from fastairl.pipelines.torch_ref import SyntheticLoader

        return SyntheticLoader(spec, cfg.train.batch_size, rank, world_size, cfg.data.num_classes,
                               cfg.data.synthetic_size, cfg.train.seed, device)
    loader = backend(cfg.data.pipeline).train_loader(cfg, spec, rank=rank, world_size=world_size,
                                                      device=device)
    if getattr(loader, "uint8_views", False):
        from fastairl.data.device_aug import DeviceAugLoader

        loader = DeviceAugLoader(loader, spec, device, seed=cfg.train.seed, rank=rank)
    return loader


def build_eval_loader(cfg, path: Optional[str], *, max_samples: Optional[int] = None,
                      batch_size: int = 256, pin_memory: bool = False, rank: int = 0, world_size: int = 1):
    from fastairl.data.datasets import DataError

    if cfg.data.source == "synthetic":
        raise DataError("data.source is synthetic: there are no images to evaluate on; set "
                        "probe.knn_every_epochs: 0 and probe.final_eval: false")
    return backend(cfg.data.pipeline).eval_loader(cfg, path, max_samples=max_samples, batch_size=batch_size,
                                                  pin_memory=pin_memory, rank=rank, world_size=world_size)
