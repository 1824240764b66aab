"""The fast CPU view maker (`aug.engine: opencv`): one DCT-scaled JPEG decode for both views, then
uint8 OpenCV ops, driven by the same draws as the PIL reference (`sample_crop`, `sample_color`).

Why it is faster than the reference: (1) both crop boxes are drawn from the JPEG header's size
before decoding, so the decoder can scale by 1/2, 1/4 or 1/8 in the DCT whenever every crop stays at
least `crop_size` on its shorter side (that decode is ~2x cheaper and the resize smaller); the crop
box is mapped to sub-pixel coordinates of the smaller image and resized with the reference's filter
(PIL antialiased bilinear), so the views stay within ~1 grey level of the reference's; (2) the
photometric ops are 256-entry lookup tables, `addWeighted`, one HSV round trip and a separable
Gaussian, all on uint8 in C (OpenCV). Tests bound the per-pixel difference on real photos.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from fastairl.extras import require

from .augment import AugmentSpec, ColorParams, ViewSpec, sample_color, sample_crop
from .datasets import ImageReadError

_cv2 = None


def cv2():
    """OpenCV, imported once, single-threaded: loader workers are the parallelism."""
    global _cv2
    if _cv2 is None:
        _cv2 = require("opencv", "cv2")
        _cv2.setNumThreads(1)
    return _cv2


_RAMP = np.arange(256, dtype=np.float32)


def _lut(table: np.ndarray) -> np.ndarray:
    """A float32 table of blended levels, truncated as PIL's Image.blend does (rounding would sit
    ~0.4 levels brighter on average)."""
    return np.clip(np.floor(table), 0, 255).astype(np.uint8)


def _gray(x: np.ndarray) -> np.ndarray:
    return cv2().cvtColor(x, cv2().COLOR_RGB2GRAY)  # HxW, 0.299 R + 0.587 G + 0.114 B


def brightness(x: np.ndarray, f: float) -> np.ndarray:
    return cv2().LUT(x, _lut(_RAMP * f))


def contrast(x: np.ndarray, f: float) -> np.ndarray:
    mean = float(int(_gray(x).mean() + 0.5))  # PIL's ImageEnhance.Contrast: the rounded grey mean
    return cv2().LUT(x, _lut(mean + f * (_RAMP - mean)))


def saturation(x: np.ndarray, f: float) -> np.ndarray:
    g = cv2().cvtColor(_gray(x), cv2().COLOR_GRAY2RGB)  # HxWx3
    # addWeighted rounds to nearest, PIL's blend truncates: an offset of just under half a level turns
    # the one into the other (exactly, unless a blend lands within 1e-4 below the next level)
    return cv2().addWeighted(x, f, g, 1.0 - f, -0.5 + 1e-4)


def hue(x: np.ndarray, shift: float) -> np.ndarray:
    """Hue rotation by `shift` turns on a 0-255 hue circle, wrapping like torchvision's PIL path."""
    c = cv2()
    hsv = c.cvtColor(x, c.COLOR_RGB2HSV_FULL)  # HxWx3, H in 0..255
    hsv[..., 0] += np.uint8(int(shift * 255) % 256)  # uint8 wrap-around = rotation
    return c.cvtColor(hsv, c.COLOR_HSV2RGB_FULL)


def grayscale(x: np.ndarray) -> np.ndarray:
    return cv2().cvtColor(_gray(x), cv2().COLOR_GRAY2RGB)


def blur(x: np.ndarray, sigma: float, kernel: int) -> np.ndarray:
    """torchvision's Gaussian blur of side `kernel`, with the taps beyond 4 sigma dropped (their weight
    is < 1e-4 of the centre's: no pixel changes by a grey level, and the blur is up to 2x cheaper).
    BORDER_REFLECT_101 is torchvision's "reflect" padding."""
    k = min(kernel, 2 * math.ceil(4 * sigma) + 1)
    return cv2().GaussianBlur(x, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2().BORDER_REFLECT_101)


def solarize(x: np.ndarray, threshold: int) -> np.ndarray:
    return cv2().LUT(x, np.where(_RAMP >= threshold, 255 - _RAMP, _RAMP).astype(np.uint8))


_JITTER = (brightness, contrast, saturation, hue)
_IDENTITY = (1.0, 1.0, 1.0, 0.0)


def finish_view(x: np.ndarray, c: ColorParams, v: ViewSpec) -> np.ndarray:
    """The photometric part of the AugmentSpec on a uint8 HxWx3 crop (already flipped)."""
    if c.jitter:
        factors = (c.brightness, c.contrast, c.saturation, c.hue)
        for op in c.order:
            if factors[op] != _IDENTITY[op]:
                x = _JITTER[op](x, factors[op])
    if c.gray:
        x = grayscale(x)
    if c.blur:
        x = blur(x, c.sigma, v.blur_kernel)
    if c.solarize:
        x = solarize(x, v.solarize_threshold)
    return x


def _bad(path: str, e: Exception) -> ImageReadError:
    return ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}; remove or replace the file")


def decode_for_crops(path: str, plan) -> tuple[Image.Image, int, object]:
    """Open `path` once: read its size from the header, call `plan(width, height)` -> (reduce, draws),
    then decode to RGB shrunk by `reduce` (1, 2, 4 or 8) in the JPEG DCT where the format allows.
    Returns (image, the reduction applied, draws): decoded pixel x covers original [x·r, (x+1)·r)."""
    try:
        with Image.open(path) as im:
            w0 = im.width
            reduce, draws = plan(im.width, im.height)
            if reduce > 1 and im.format == "JPEG":
                im.draft("RGB", (-(-im.width // reduce), -(-im.height // reduce)))
            img = im.convert("RGB")  # forces the full decode: truncated files fail here
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files; report them all alike
        raise _bad(path, e) from None
    return img, max(1, round(w0 / img.width)), draws


def dct_reduction(min_ratio: float) -> int:
    """The largest JPEG scale-down (1, 2, 4, 8) that keeps every crop at >= its output size:
    min_ratio = min over views of (crop box's shorter side / crop_size)."""
    factor = 1
    while factor < 8 and min_ratio >= factor * 2:
        factor *= 2
    return factor


def crop_resize(img: Image.Image, box: tuple[int, int, int, int], r: int, size: int) -> np.ndarray:
    """The reference's crop + antialiased bilinear resize, on an image decoded at 1/r: the box is
    mapped to sub-pixel coordinates, so no rounding moves the crop. -> uint8 size x size x 3."""
    top, left, h, w = box
    out = img.resize((size, size), Image.BILINEAR, box=(left / r, top / r, (left + w) / r, (top + h) / r))
    return np.array(out)  # a writable copy (np.asarray of a PIL image is read-only)


def normalize_lut(v: ViewSpec) -> np.ndarray:
    """256 x 3 float32: (level - 255·mean) / (255·std) per channel, the view's normalisation of a uint8 level."""
    return ((np.arange(256)[:, None] - np.array(v.mean) * 255) / (np.array(v.std) * 255)).astype(np.float32)


class OpenCVViews:
    """View maker with the PIL reference's interface: (path, rng) -> tuple of views. Draws crops and
    colours in the reference's order (crop, colour per view), so the two engines see the same
    parameters for the same (seed, epoch, index)."""

    def __init__(self, spec: AugmentSpec, finish: bool = True):
        self.spec, self.finish = spec, finish
        cv2()  # fail early with the install line, not inside a worker
        # normalisation as a per-channel uint8 -> float32 lookup table: one pass instead of three
        self._luts = [normalize_lut(v).reshape(256, 1, 3) for v in spec.views]

    def __call__(self, path: str, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        def plan(w0: int, h0: int):
            draws = [(sample_crop(rng, h0, w0, v.crop_scale, v.crop_ratio), sample_color(rng, v)) for v in self.spec.views]
            return dct_reduction(min(min(b[2], b[3]) / v.crop_size for (b, _), v in zip(draws, self.spec.views))), draws

        img, r, draws = decode_for_crops(path, plan)
        out = []
        for (box, c), v, lut in zip(draws, self.spec.views, self._luts):
            x = crop_resize(img, box, r, v.crop_size)  # HxWx3 uint8
            if c.flip:
                x = cv2().flip(x, 1)
            if self.finish:
                x = cv2().LUT(finish_view(x, c, v), lut)  # HxWx3 float32, normalised
            out.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))  # 3xHxW
        return tuple(out)
