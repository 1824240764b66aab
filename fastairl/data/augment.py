"""One AugmentSpec drives every loader backend (torch reference, DALI, FFCV, on-device).

Each backend reads the per-view `ViewSpec`; the parameter samplers below are the shared, numpy-only
definition of the distributions (crop box, jitter factors, blur sigma, coin flips), so every backend
can be tested against the same spec.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    crop_size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1
    solarize_p: float = 0.0
    solarize_threshold: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def blur_kernel(self) -> int:
        """Odd kernel side ~ blur_kernel_frac of the crop (23 at 224, as BYOL)."""
        k = int(self.crop_size * self.blur_kernel_frac)
        return max(3, k + 1 - k % 2)


@dataclass(frozen=True)
class AugmentSpec:
    views: tuple[ViewSpec, ...] = field(default_factory=lambda: (ViewSpec(), ViewSpec()))

    @property
    def num_views(self) -> int:
        return len(self.views)


_BYOL_SYM = ViewSpec(solarize_p=0.2)
_MOCOV2 = ViewSpec(crop_scale=(0.2, 1.0), saturation=0.4, solarize_p=0.0)
_CROP_FLIP = ViewSpec(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
PRESETS: dict[str, tuple[ViewSpec, ...]] = {
    "byol_sym": (_BYOL_SYM, _BYOL_SYM),  # PAPER.md Table 5
    "mocov2": (_MOCOV2, _MOCOV2),
    "byol_asym": (replace(_BYOL_SYM, blur_p=1.0, solarize_p=0.0), replace(_BYOL_SYM, blur_p=0.1, solarize_p=0.2)),
    "crop_flip": (_CROP_FLIP, _CROP_FLIP),  # supervised training; also the last ablation level
    "none": (replace(_CROP_FLIP, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0),) * 2,
}
# Fig. 5: remove, cumulatively, solarisation -> blur -> grayscale -> colour jitter.
ABLATION_ORDER = ("-solarize", "-blur", "-gray", "-jitter")
_ABLATE = {"-solarize": dict(solarize_p=0.0), "-blur": dict(blur_p=0.0), "-gray": dict(gray_p=0.0),
           "-jitter": dict(jitter_p=0.0)}


def make_spec(preset: str = "byol_sym", ablation: str = "none", crop_size: int = 224,
              crop_scale: tuple[float, float] | None = None, blur_kernel_frac: float = 0.1,
              num_views: int = 2, flip_p: float | None = None) -> AugmentSpec:
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose from {sorted(PRESETS)}")
    if ablation != "none" and ablation not in ABLATION_ORDER:
        raise ValueError(f"unknown ablation {ablation!r}; choose from none, {', '.join(ABLATION_ORDER)}")
    changes = dict(crop_size=crop_size, blur_kernel_frac=blur_kernel_frac)
    if crop_scale is not None:
        changes["crop_scale"] = tuple(crop_scale)
    if flip_p is not None:
        changes["flip_p"] = float(flip_p)
    if ablation != "none":
        for level in ABLATION_ORDER[: ABLATION_ORDER.index(ablation) + 1]:
            changes.update(_ABLATE[level])
    views = tuple(replace(v, **changes) for v in PRESETS[preset])
    return AugmentSpec(views=views[:num_views])


def spec_from_config(aug_cfg, num_views: int = 2) -> AugmentSpec:
    return make_spec(aug_cfg.preset, aug_cfg.ablation, aug_cfg.crop_size, aug_cfg.crop_scale,
                     aug_cfg.blur_kernel_frac, num_views, aug_cfg.flip_p)


def linear_train_spec(aug_cfg) -> AugmentSpec:
    """The labelled training view of linear evaluation / fine-tuning: random-resized crop and flip
    (aug.flip_p, when set, applies here too) at aug.crop_size."""
    return make_spec("crop_flip", crop_size=aug_cfg.crop_size, num_views=1, flip_p=aug_cfg.flip_p)


# --------------------------------------------------------------- parameter samplers (all backends)
def sample_crop(rng: np.random.Generator, height: int, width: int, scale, ratio) -> tuple[int, int, int, int]:
    """Random-resized-crop box (top, left, h, w): area ~ U(scale)·HW, log-aspect ~ U(log ratio).

    Ten rejection tries, then the central crop clamped to the ratio range (torchvision's rule).
    """
    area = height * width
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass
class ColorParams:
    """The photometric draw for one view of one image (flip is sampled with the crop)."""
    flip: bool
    jitter: bool
    order: tuple[int, int, int, int]  # 0 brightness, 1 contrast, 2 saturation, 3 hue (torchvision)
    brightness: float
    contrast: float
    saturation: float
    hue: float
    gray: bool
    blur: bool
    sigma: float
    solarize: bool


def jitter_ranges(v: ViewSpec) -> tuple[tuple[float, float], ...]:
    """(lo, hi) of the brightness, contrast and saturation factors and of the hue shift, torchvision's
    ColorJitter ranges; every backend draws from these."""
    return ((max(0.0, 1 - v.brightness), 1 + v.brightness), (max(0.0, 1 - v.contrast), 1 + v.contrast),
            (max(0.0, 1 - v.saturation), 1 + v.saturation), (-v.hue, v.hue))


def sample_color(rng: np.random.Generator, v: ViewSpec) -> ColorParams:
    b, c, s, h = jitter_ranges(v)
    return ColorParams(
        flip=bool(rng.random() < v.flip_p),
        jitter=bool(rng.random() < v.jitter_p),
        order=tuple(int(i) for i in rng.permutation(4)),
        brightness=float(rng.uniform(*b)),
        contrast=float(rng.uniform(*c)),
        saturation=float(rng.uniform(*s)),
        hue=float(rng.uniform(*h)),
        gray=bool(rng.random() < v.gray_p),
        blur=bool(rng.random() < v.blur_p),
        sigma=float(rng.uniform(*v.blur_sigma)),
        solarize=bool(rng.random() < v.solarize_p),
    )


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Per-sample generator: the augmentation of sample `index` in `epoch` is a pure function of
    (seed, epoch, index), whatever worker or process loads it — so resume is exact."""
    return np.random.default_rng([seed, epoch, index])
