"""The loader seam: the trainer asks for a loader here and never imports a backend itself.

Every train loader has `steps_per_epoch`, `num_classes`, `classes`, `set_epoch(epoch, start_step=0)`
(call it before each epoch), `__len__` (steps left in the epoch) and yields
`(views: list of Nx3xHxW float32, labels: N int64)`. Backends with heavy dependencies (DALI, FFCV) are
imported only when asked for.
"""
from __future__ import annotations

from typing import Optional

from fastairl.extras import MissingExtra, require  # noqa: F401  (re-exported: the loader seam's errors)

_BACKENDS = {"dali": ("nvidia.dali", "DALI", 4), "ffcv": ("ffcv", "FFCV", 5)}  # module, name, issue


def _require_backend(pipeline: str) -> None:
    module, name, issue = _BACKENDS[pipeline]
    require(pipeline, module)
    raise NotImplementedError(f"the {name} backend lands with issue #{issue}; use data.pipeline: torch for now")


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
    if cfg.data.pipeline != "torch":
        _require_backend(cfg.data.pipeline)
    from fastairl.data.datasets import load_samples
    from fastairl.pipelines.torch_ref import TorchTrainLoader

    samples, classes = load_samples(cfg.data, cfg.data.train, key="data.train")
    return TorchTrainLoader(samples, classes, spec, cfg.train.batch_size, rank, world_size,
                            cfg.train.seed, cfg.data.workers, pin_memory=device.type == "cuda")


def build_eval_loader(cfg, path: Optional[str], *, max_samples: Optional[int] = None,
                      batch_size: int = 256, pin_memory: bool = False):
    from fastairl.data.datasets import DataError, load_samples

    if cfg.data.source == "synthetic":
        raise DataError("data.source is synthetic: there are no images to evaluate on; set "
                        "probe.knn_every_epochs: 0 and probe.final_eval: false")
    if cfg.data.pipeline != "torch":
        _require_backend(cfg.data.pipeline)
    from fastairl.data.augment import spec_from_config
    from fastairl.pipelines.torch_ref import EvalLoader

    v = spec_from_config(cfg.aug).views[0]
    samples, classes = load_samples(cfg.data, path)
    return EvalLoader(samples, classes, crop_size=cfg.aug.crop_size, resize=eval_resize(cfg),
                      batch_size=batch_size, workers=cfg.data.workers, max_samples=max_samples,
                      mean=v.mean, std=v.std, pin_memory=pin_memory)
