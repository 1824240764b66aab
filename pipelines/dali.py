"""The DALI backend (`data.pipeline: dali`): each JPEG decoded once (nvJPEG with `device="mixed"` on a
GPU, libjpeg-turbo on CPU), then one independent augmentation chain per view, all in one DALI graph.

The chains reproduce torchvision's ops on uint8 PIL images (what `torch_ref.augment_view` runs), not
DALI's colour operators, whose formulas differ: `fn.brightness_contrast` pivots contrast around a
fixed value (half the range) where torchvision uses the image's mean grey level, and `fn.hsv` /
`fn.hue` rotate hue in YIQ space where torchvision shifts the H byte of PIL's 8-bit HSV. So:
- brightness, contrast, saturation are PIL's blends, written as arithmetic: base + f·(x - base),
  clipped and truncated to uint8, with base 0, the rounded mean of PIL's "L" image, and each pixel's
  "L" value; hue is PIL's RGB -> HSV -> RGB round trip with torchvision's H += int(f·255) (mod 256).
  All four are bit-exact with torchvision for the same factor (tests/test_dali.py, CPU ops; hue
  checked on all 2^24 colours); the GPU runs the same expressions (the cuda tier compares the two).
- jitter runs the enabled ops in a per-sample random order, one of the n! orders drawn uniformly (as
  torchvision's ColorJitter), also bit-exact for the same order and factors; factors ~ sample_color's
  ranges.
- grayscale is PIL's integer "L" (bit-exact); blur is a separable Gaussian of side `blur_kernel`,
  per-sample sigma ~ U(blur_sigma), mirror-101 borders (torch's "reflect" padding), rounded to uint8
  (within 1 level of torchvision); solarisation maps x >= threshold to 255 - x on uint8 (bit-exact).
- The horizontal flip is applied last, inside `crop_mirror_normalize`: every op after it is pointwise
  or a symmetric kernel with symmetric borders, so this is the same image as flipping after the crop.
- The crop box is sample_crop's rule (torchvision's RandomResizedCrop: area ~ U(scale)·HW, log-aspect
  ~ U(log ratio), 10 tries, then the whole image narrowed to the ratio range, centred), computed in the
  graph from the image's header shape (`crop_window`), box for box the FFCV backend's for the same
  draws; the resize of that box is bilinear with antialiasing (PIL's filter: 0.2 level mean difference
  for the same box).
- JPEG decoding on CPU is libjpeg-turbo, as PIL's (identical pixels); nvJPEG on a GPU differs slightly.
Per-sample probabilities use DALI conditionals (`enable_conditionals=True`): an op only runs on the
samples whose coin came up, and an op whose probability is 0 is not in the graph at all.

Random draws: the graph has no random operator. Every draw of a view (crop tries, flip, jitter coin,
order and factors, grey, blur and its sigma, solarise) is a U[0, 1) number from a counter-based stream
keyed by (seed, epoch, sample index, view) (`draws`; the FFCV backend draws its crops from the same
stream), computed on the host per batch and fed with `fn.external_source`. So a sample's views depend
only on (seed, epoch, index), as with the torch reference: not on the process layout, and a resumed
epoch sees the same views as the uninterrupted one, bit for bit (the torch reference draws from
another stream: same distributions, not the same pixels).

Sample order and sharding: the sample order comes from the host too, fed with the draws: batch j of
a pipeline is the j-th of a stream that starts at some (epoch, step) and runs on through the epochs
after it, each epoch this process's part of the torch reference's order (`EpochBatchSampler`: one
permutation of (seed, epoch), cut into global batches, rank r taking its slice of every batch). Every
rank therefore sees the same number of steps, floor(N / global batch), and the same labels as the
torch backend. Files are read by `fn.io.file.read` from the paths of the stream, so one pipeline
serves epoch after epoch, prefetching across the epoch boundary (it used to be rebuilt every epoch,
about 4 s each on an H200, with `fn.readers.file` reading a new list). It is rebuilt only when the
next batch asked for is not the stream's next (a resume elsewhere, a bad file): `set_epoch(epoch,
start_step)` is an exact seek. The train pipeline uses no DALI reader: `readers.file`'s `random_shuffle`
shuffles within a 1024-sample buffer, which on a class-sorted list gives near-single-class batches.

Unreadable files are replaced as the torch reference replaces them. DALI stops a pipeline at the first
file it cannot read. It names empty or missing files (`File mapping failed: <path>`); for a damaged
image DALI 2.4's decoder error names no file. Then the files of the failing and prefetched batches
that PIL cannot read either (the reference's test) are taken: up to (prefetch + 2) x batch full PIL
decodes on the training thread, once per damaged file. The loader marks the file bad and rebuilds the
pipeline at the failing batch, with every sample of a bad file read from the reference's replacement
(`source`: the first of 16 samples drawn from (seed, epoch, index) whose file is readable; the replaced
sample's draws, the replacement's label). `bad_files()` feeds the trainer's BadDataMonitor, so `data.max_bad_fraction`
applies. Each new bad file costs one pipeline rebuild (about a second on the CPU); a restarted process
meets its bad files again, as the reference does. DALI's image codec also logs `[ERROR]` lines on
stderr for each damaged image it meets (DALI_NVIMGCODEC_LOG_LEVEL does not go below errors).
"""
from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from fastairl.extras import require

require("dali", "nvidia.dali")

from nvidia.dali import fn, pipeline_def, types  # noqa: E402  (after the install check)
from nvidia.dali import math as dmath  # noqa: E402
from nvidia.dali.pipeline import do_not_convert  # noqa: E402
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy  # noqa: E402

from fastairl.data.augment import (IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, ViewSpec,  # noqa: E402
                                   jitter_ranges, linear_train_spec, spec_from_config)
from fastairl.data.datasets import DataError, ImageReadError, eval_indices  # noqa: E402
from fastairl.pipelines.torch_ref import (DualViewDataset, EpochBatchSampler, _open_rgb,  # noqa: E402
                                          replacement_candidates)

# PIL's RGB -> L conversion is (R*19595 + G*38470 + B*7471 + 0x8000) >> 16 (ITU-R 601 luma, rounded).
# With the weights divided by 2^16 every product and partial sum is a multiple of 2^-16 below 256, so
# float32 computes it exactly: floor(w.x + 0.5) is PIL's value for all 2^24 colours.
_L_ROW = [w / 65536 for w in (19595, 38470, 7471)]
_NEXT_MINUS_PREV = [0, 1, -1, -1, 0, 1, 1, -1, 0]  # (g - b, b - r, r - g)
_EARLIER = [0, 0, 0, 1, 0, 0, 1, 1, 0]  # per channel: how many channels come before it
B, C, S, H = range(4)  # the jitter ops, in the order of sample_color's factors
_IDENTITY_SLOT = 3


# ------------------------------------------------------------------- the ops (HxWx3, integer values)
def _grey(x):
    """HxWx3 -> HxWx1 float: PIL's "L" value of every pixel, exactly."""
    return dmath.floor(fn.coord_transform(x, M=_L_ROW, T=[0.5]))


def _blend(base, x, factor):
    """PIL's Image.blend(base, x, factor) on uint8: base + factor·(x - base), clipped, truncated."""
    return dmath.floor(dmath.clamp(base + factor * (x - base), 0.0, 255.0))


def _mean_grey(x):
    """PIL ImageEnhance.Contrast's pivot: the mean "L" value, rounded (a per-sample scalar)."""
    return dmath.floor(fn.reductions.mean(_grey(x)) + 0.5)


def brightness(x, factor):
    """PIL ImageEnhance.Brightness (what torchvision's adjust_brightness runs on a PIL image)."""
    return _blend(0.0, x, factor)


def contrast(x, factor):
    """PIL ImageEnhance.Contrast: blend with the image's mean grey level."""
    return _blend(_mean_grey(x), x, factor)


def saturation(x, factor):
    """PIL ImageEnhance.Color: blend with each pixel's grey level."""
    return _blend(_grey(x), x, factor)


def _trunc(v):
    """Round towards zero (C's float -> int cast)."""
    return dmath.floor(dmath.abs(v)) * ((v > 0) * 1.0 - (v < 0) * 1.0)


def _mod(v, m: float):
    return v - m * dmath.floor(v / m)


def hue(x, shift):
    """torchvision's adjust_hue on a PIL image, bit for bit: RGB -> 8-bit HSV, H += int(shift·255)
    (mod 256), HSV -> RGB.

    The hue byte follows PIL's float steps (float32 rc/gc/bc, the sector sum in double rounded to
    float32, h/6 + 1 mod 1 in double rounded to float32, truncation of h·255): checked against PIL on
    all 2^24 colours. Saturation is floor(255·c / v). The way back is PIL's p/q/t rounding, written as
    one formula for the three channels in integers below 2^24 (exact in float32), also checked on all
    2^24 HSV triples: channel n gets round(v - v·s·w_n / 255^2), w_n = clamp(min(k, 1020 - k), 0, 255),
    k = (255·n + 6·h) mod 1530, n = 5, 3, 1 for r, g, b.
    """
    v = fn.reductions.max(x, axes=2, keep_dims=True)  # HxWx1
    c = v - fn.reductions.min(x, axes=2, keep_dims=True)  # HxWx1, chroma
    is_max = fn.cast(x == v, dtype=types.FLOAT)  # HxWx3
    first = is_max * (fn.coord_transform(is_max, M=_EARLIER) == 0)  # HxWx3 one-hot: r, g, b order
    q = fn.cast((v - x) / (c + (c == 0)), dtype=types.FLOAT64)  # HxWx3: PIL's float32 rc, gc, bc
    rc, gc, bc = q[:, :, 0], q[:, :, 1], q[:, :, 2]  # HxW each
    sector = fn.cast(fn.stack(bc - gc, 2.0 + rc - bc, 4.0 + gc - rc, axis=2), dtype=types.FLOAT)  # HxWx3
    h = fn.cast(fn.reductions.sum(first * sector, axes=2, keep_dims=True), dtype=types.FLOAT64) / 6.0 + 1.0
    h = fn.cast(h - (h >= 1.0), dtype=types.FLOAT)  # HxWx1: fmod(h, 1), stored in a float as PIL does
    h = dmath.floor(fn.cast(h, dtype=types.FLOAT64) * 255.0)  # HxWx1, the hue byte
    s = dmath.floor(255.0 * c / (v + (v == 0)))  # HxWx1, the saturation byte
    h = _mod(h + _trunc(fn.cast(shift, dtype=types.FLOAT64) * 255.0), 256.0)  # torchvision's uint8 wrap
    k = _mod(types.Constant(np.array([5 * 255, 3 * 255, 255], np.float32)) + 6.0 * fn.cast(h, dtype=types.FLOAT),
             1530.0)  # HxWx3
    w = dmath.clamp(dmath.min(k, 1020.0 - k), 0.0, 255.0)
    num = fn.cast(v * 65025.0 - v * s * w, dtype=types.INT32)  # 255^2·output, exact
    return fn.cast((2 * num + 65025) // 130050, dtype=types.FLOAT)  # HxWx3, rounded half up


def _affine_slot(y, kind, factors: dict):
    """Brightness, contrast or saturation (or nothing), chosen per sample by `kind` (B, C, S or
    _IDENTITY_SLOT): the three are blends with base 0, the mean grey, the pixel grey."""
    f = (kind == _IDENTITY_SLOT) * 1.0
    base = 0.0
    for op in (B, C, S):
        if op in factors:
            f = f + (kind == op) * factors[op]
    if C in factors:
        base = base + (kind == C) * _mean_grey(y)
    if S in factors:
        base = base + (kind == S) * _grey(y)
    return _blend(base, y, f)


def jitter_orders(v: ViewSpec) -> list[tuple[int, ...]]:
    """Every order of the enabled jitter ops (an op whose range is the single identity value is left
    out, as torch_ref skips it); the pipeline draws one uniformly per sample."""
    enabled = [op for op, amount in zip((B, C, S, H), (v.brightness, v.contrast, v.saturation, v.hue))
               if amount > 0]
    return list(itertools.permutations(enabled))


def jitter_draws(v: ViewSpec, p):
    """Per-sample factors {op: factor} with sample_color's ranges, and the index of the order, from the
    view's photometric uniforms `p` (one U[0, 1) per slot, see draws())."""
    ranges = dict(zip((B, C, S, H), jitter_ranges(v)))
    orders = jitter_orders(v)
    factors = {op: _between(p[_FACTOR[op]], *ranges[op]) for op in (orders[0] if orders else ())}
    which = fn.cast(dmath.floor(p[_ORDER] * len(orders)), dtype=types.INT32) if len(orders) > 1 else 0
    return factors, which


def _slot_plan(orders: list[tuple[int, ...]]) -> tuple[list[list[int]], list[list[int]]]:
    """Per affine slot, the op it applies under each order (a lookup table over the order index).

    Without hue: slot j applies order[j]. With hue, hue runs once, between len-1 slots before it and
    len-1 slots after it: slot j before applies order[j] if hue comes later, else nothing, and slot j
    after applies order[p+1+j] (p = position of hue) if there is one. One hue op instead of one per
    position keeps the graph small.
    """
    n = len(orders[0])
    if H not in orders[0]:
        return [[o[j] for o in orders] for j in range(n)], []
    before = [[o[j] if j < o.index(H) else _IDENTITY_SLOT for o in orders] for j in range(n - 1)]
    after = [[o[o.index(H) + 1 + j] if o.index(H) + 1 + j < n else _IDENTITY_SLOT for o in orders]
             for j in range(n - 1)]
    return before, after


def jitter(x, v: ViewSpec, factors: dict, which):
    """Colour jitter in the order jitter_orders(v)[which], per sample. uint8 HxWx3 -> uint8 HxWx3."""
    orders = jitter_orders(v)
    if not orders:
        return x
    y = fn.cast(x, dtype=types.FLOAT)
    before, after = _slot_plan(orders)

    def slots(y, table):
        for kinds in table:
            kind = kinds[0] if len(orders) == 1 else fn.lookup_table(
                which, keys=list(range(len(orders))), values=kinds, dtype=types.INT32)
            y = _affine_slot(y, kind, factors)
        return y

    y = slots(y, before)
    if H in factors:
        y = slots(hue(y, factors[H]), after)
    return fn.cast(y, dtype=types.UINT8)


def grayscale(x):
    """PIL convert("L").convert("RGB") on uint8 HxWx3."""
    g = fn.cast(_grey(x), dtype=types.UINT8)  # HxWx1
    return fn.cat(g, g, g, axis=2)


def gaussian_blur(x, v: ViewSpec, sigma):
    """torchvision gaussian_blur: kernel side v.blur_kernel, per-sample sigma, reflect-101 borders."""
    return fn.gaussian_blur(x, window_size=v.blur_kernel, sigma=sigma)


def solarize(x, threshold: int):
    """torchvision/PIL solarize on uint8: x >= threshold -> 255 - x."""
    xi = fn.cast(x, dtype=types.INT32)
    return fn.cast(xi + (xi >= threshold) * (255 - 2 * xi), dtype=types.UINT8)


# ------------------------------------------------------------- the random draws, keyed by the sample
# Every random choice is a function of (seed, epoch, sample index, view), like the reference's
# `sample_rng`: the host draws U[0, 1) numbers from a counter-based stream (splitmix64) and feeds them
# with `fn.external_source`; the graph maps them to boxes, coins and factors. The graph has no random
# op, so a pipeline rebuilt at any step (a resume, a replaced file) gives the same views.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_PHOTO_STREAM = 1 << 16  # the photometric stream of view v is keyed by v + _PHOTO_STREAM, its crop stream by v
_TRIES = 10  # torchvision's RandomResizedCrop tries
CROP_DRAWS = 2 * _TRIES + 4  # try k reads 2k, 2k+1 and, when its box fits, 2k+2 (top), 2k+3 (left), 2k+4 (flip)
_JITTER, _ORDER, _GRAY, _BLUR, _SIGMA, _SOLARIZE = range(6)
_FACTOR = {B: 6, C: 7, S: 8, H: 9}
PHOTO_DRAWS = 10
DRAWS = CROP_DRAWS + PHOTO_DRAWS  # per view: the crop stream's uniforms, then the photometric stream's


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, indices: np.ndarray, stream: int, count: int) -> np.ndarray:
    """N x count U[0, 1) (53 bits) of the stream keyed by (seed, epoch, index, stream): the FFCV
    backend's counter-based stream (`ffcv_loader._key` / `_uniform`), vectorised."""
    with np.errstate(over="ignore"):
        h = _mix(np.full(len(indices), seed, np.uint64) + _GAMMA)
        h = _mix(h ^ (np.uint64(epoch) + _GAMMA))
        h = _mix(h ^ (np.asarray(indices, np.uint64) + _GAMMA))
        h = _mix(h ^ (np.uint64(stream) + _GAMMA))  # N
        steps = _GAMMA * np.arange(1, count + 1, dtype=np.uint64)  # count
        return (_mix(h[:, None] + steps) >> np.uint64(11)) * (1.0 / 2 ** 53)  # N x count


def draws(seed: int, epoch: int, indices: np.ndarray, num_views: int) -> np.ndarray:
    """N x V x DRAWS float64: the uniforms of every view of the samples (crop stream, photometric stream)."""
    return np.stack([np.concatenate([uniforms(seed, epoch, indices, v, CROP_DRAWS),
                                     uniforms(seed, epoch, indices, v + _PHOTO_STREAM, PHOTO_DRAWS)], axis=1)
                     for v in range(num_views)], axis=1)


def _between(u, lo: float, hi: float):
    """U[0, 1) -> U[lo, hi) as float32 (a factor or a sigma)."""
    return fn.cast(lo + (hi - lo) * u, dtype=types.FLOAT)


def crop_window(shape, u, v: ViewSpec):
    """sample_crop's rule (torchvision's RandomResizedCrop) for HxW images (`shape`, per sample) from
    the view's crop uniforms `u` (CROP_DRAWS, consumed as FFCV's draw_crops does): area ~ U(scale)·HW,
    log-aspect ~ U(log ratio), ten tries, else the whole image narrowed to the ratio range, centred.
    -> (roi_start [top, left], roi_end [bottom, right], flip), float32, float32, int32.

    All ten tries are computed at once and the first that fits is picked (float64; the box values are
    integers, exact in float32 for the pick)."""
    hgt, wid = fn.cast(shape[0], dtype=types.FLOAT64), fn.cast(shape[1], dtype=types.FLOAT64)
    (lo, hi), (r_lo, r_hi) = v.crop_scale, v.crop_ratio
    target = hgt * wid * (lo + (hi - lo) * u[0:2 * _TRIES:2])  # 10
    aspect = dmath.exp(math.log(r_lo) + (math.log(r_hi) - math.log(r_lo)) * u[1:2 * _TRIES:2])  # 10
    w = dmath.floor(dmath.sqrt(target * aspect) + 0.5)  # 10
    h = dmath.floor(dmath.sqrt(target / aspect) + 0.5)  # 10
    fits = (w > 0) & (w <= wid) & (h > 0) & (h <= hgt)  # 10 bool
    top = dmath.floor(u[2:2 * _TRIES + 2:2] * (hgt - h + 1))  # 10
    left = dmath.floor(u[3:2 * _TRIES + 3:2] * (wid - w + 1))  # 10
    flip = fn.cast(u[4:2 * _TRIES + 4:2] < v.flip_p, dtype=types.FLOAT64)  # 10
    tries = fn.stack(top, left, h, w, flip, axis=0)  # 5x10
    score = fits * types.Constant(np.arange(_TRIES, 0, -1, dtype=np.int32))  # 10: the first fit scores highest
    best = fn.reductions.max(score)
    first = (score == best) & fits  # 10: one-hot, or all False
    picked = fn.reductions.sum(fn.cast(first * tries, dtype=types.FLOAT), axes=1)  # 5
    # no try fits: the whole image narrowed to the nearest allowed aspect, centred
    narrow, wide = fn.cast(wid < hgt * r_lo, dtype=types.FLOAT64), fn.cast(wid > hgt * r_hi, dtype=types.FLOAT64)
    fb_w = wide * dmath.floor(hgt * r_hi + 0.5) + (1 - wide) * wid
    fb_h = narrow * dmath.floor(wid / r_lo + 0.5) + (1 - narrow) * hgt
    fallback = fn.stack(dmath.floor((hgt - fb_h) / 2), dmath.floor((wid - fb_w) / 2), fb_h, fb_w,
                        fn.cast(u[2 * _TRIES] < v.flip_p, dtype=types.FLOAT64))  # 5
    found = fn.cast(best > 0, dtype=types.FLOAT)
    box = found * picked + (1 - found) * fn.cast(fallback, dtype=types.FLOAT)  # 5: top, left, h, w, flip
    return box[0:2], box[0:2] + box[2:4], fn.cast(box[4], dtype=types.INT32)


def _view(crop, mirror, p, v: ViewSpec, finish: bool = True):
    """One view from its SxSx3 uint8 crop, flip and photometric uniforms `p` -> 3xSxS float32
    normalised (uint8 when not `finish`)."""
    x = crop
    if finish:
        if v.jitter_p > 0:
            if p[_JITTER] < v.jitter_p:
                x = jitter(x, v, *jitter_draws(v, p))
        if v.gray_p > 0:
            if p[_GRAY] < v.gray_p:
                x = grayscale(x)
        if v.blur_p > 0:
            if p[_BLUR] < v.blur_p:
                x = gaussian_blur(x, v, _between(p[_SIGMA], *v.blur_sigma))
        if v.solarize_p > 0:
            if p[_SOLARIZE] < v.solarize_p:
                x = solarize(x, v.solarize_threshold)
    if not finish:
        return fn.crop_mirror_normalize(x, mirror=mirror, dtype=types.UINT8, output_layout="CHW")
    return fn.crop_mirror_normalize(x, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[255 * m for m in v.mean], std=[255 * s for s in v.std])


# pixels as stored, like PIL's Image.open in the torch reference and FFCV: no EXIF rotation (DALI's default)
_AS_STORED = dict(adjust_orientation=False)
# The share of JPEGs `mixed` decoding gives the hardware JPEG decoder (A100, H100; the rest go to nvJPEG's
# CUDA decoder); the CPU decoder ignores it. DALI's default, kept: on H100 machines neither way won
# (benchmarks/results/h100-2026-11-26: 0.9 ahead by 19 % at batch 128 on one machine, behind by 10 % at
# batch 512 on another). `benchmarks/dali_throughput.py --hw-decoder-load` measures it on your GPUs.
HW_DECODER_LOAD = 0.65


def _read(files, labels):
    return fn.readers.file(files=files, labels=labels, random_shuffle=False, pad_last_batch=True, name="reader")


@pipeline_def(enable_conditionals=True)
def train_pipeline(batches, views: tuple[ViewSpec, ...], gpu: bool = False, decode: str = "once",
                   finish: bool = True, hw_decoder_load: float = HW_DECODER_LOAD):
    """Decode once, one augmentation chain per ViewSpec; outputs (view_0, ..., view_k, label).

    `batches(info)` -> the batch of iteration `info.iteration`: (file paths as byte arrays, labels N x 1
    int32, draws N x V x DRAWS uniforms: see draws()); `_Stream` is the loader's.
    decode="roi" instead decodes only each view's crop (`decoders.image_slice`): one partial decode
    PER VIEW. Kept for the benchmark that compares the two (benchmarks/dali_throughput.py).
    """
    paths, label, u = fn.external_source(source=batches, num_outputs=3, batch=True, batch_info=True,
                                         dtype=[types.UINT8, types.INT32, types.FLOAT64], ndim=[1, 1, 2])  # per sample
    jpegs = fn.io.file.read(paths)
    shape = fn.peek_image_shape(jpegs, dtype=types.INT32, **_AS_STORED)  # HxWx3, as the decoder outputs it
    device = "mixed" if gpu else "cpu"
    images = None
    if decode == "once":
        images = fn.decoders.image(jpegs, device=device, output_type=types.RGB, hw_decoder_load=hw_decoder_load,
                                   **_AS_STORED)
    outs = []
    for k, v in enumerate(views):
        start, end, mirror = crop_window(shape, u[k, :CROP_DRAWS], v)
        size = [v.crop_size, v.crop_size]
        if decode == "roi":
            roi = fn.decoders.image_slice(jpegs, start, end - start, device=device, output_type=types.RGB,
                                          axis_names="HW", normalized_anchor=False, normalized_shape=False,
                                          hw_decoder_load=hw_decoder_load, **_AS_STORED)
            crop = fn.resize(roi, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
        else:
            crop = fn.resize(images, size=size, roi_start=start, roi_end=end, interp_type=types.INTERP_LINEAR,
                             antialias=True)  # SxSx3 uint8
        outs.append(_view(crop, mirror, u[k, CROP_DRAWS:], v, finish=finish))
    return (*outs, label)


def _eval_size(shape, resize: int):
    """torchvision's resize(shorter side = resize): (resize, floor(resize·long/short)), per sample."""
    h, w = shape[0], shape[1]
    tall = h > w
    long_ = (resize * dmath.max(h, w)) // dmath.min(h, w)
    return fn.cast(fn.stack(tall * long_ + (1 - tall) * resize, tall * resize + (1 - tall) * long_),
                   dtype=types.FLOAT)  # (out_h, out_w)


def _centre_start(extent, crop: int):
    """torchvision's centre-crop offset int(round((extent - crop) / 2)): Python rounds halves to even."""
    d = extent - crop
    return d // 2 + ((d - (d // 4) * 4) == 3)


@pipeline_def
def eval_pipeline(files: Sequence[str], labels: Sequence[int], crop_size: int, resize: int,
                  mean: Sequence[float], std: Sequence[float], gpu: bool = False):
    """Resize the shorter side to `resize` (bilinear, antialiased) -> centre crop -> normalise."""
    jpegs, label = _read(files, labels)
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                               hw_decoder_load=HW_DECODER_LOAD, **_AS_STORED)
    size = _eval_size(fn.peek_image_shape(jpegs, dtype=types.INT32, **_AS_STORED), resize)
    resized = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
    hw = fn.cast(size, dtype=types.INT32)
    start = fn.stack(_centre_start(hw[0], crop_size), _centre_start(hw[1], crop_size))
    crop = fn.slice(resized, start=start, shape=[crop_size, crop_size], axis_names="HW")  # SxSx3
    return fn.crop_mirror_normalize(crop, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[255 * m for m in mean], std=[255 * s for s in std]), label


# ---------------------------------------------------------------------------------------- loaders
def _device_id(device) -> Optional[int]:
    """The CUDA device index for DALI, or None for a CPU-only pipeline."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


# the decoder's message for a bad image, the reader's for an empty file
_NAMED_FILE = re.compile(r"(?:Failed to decode sample #\d+ : |File mapping failed: )(.+)")


def _named_file(error: Exception) -> Optional[str]:
    named = _NAMED_FILE.search(str(error))
    return named.group(1).strip() if named else None


def _dali_message(error: Exception) -> str:
    """The line of a DALI error that says what went wrong."""
    lines = [ln.strip() for ln in str(error).splitlines()
             if ln.strip() and "pipeline" not in ln and not ln.startswith("C++ context")]
    return lines[-1] if lines else str(error)


def _readable(path: str) -> bool:
    """The reference's test of a file (a full PIL decode)."""
    try:
        _open_rgb(path)
    except ImageReadError:
        return False
    return True


def _unreadable(error: RuntimeError, candidates: Sequence[str]) -> RuntimeError:
    """One line for a DALI failure: the file it names, else the first of `candidates` (the files of
    the failing and prefetched batches) that PIL cannot read either, else DALI's own message."""
    named = _named_file(error)
    if named:
        return ImageReadError(f"cannot read image {named}: DALI cannot decode it; remove or replace the file")
    for path in candidates:
        try:
            _open_rgb(path)
        except ImageReadError as bad:
            return bad
    return RuntimeError(f"DALI pipeline failed: {_dali_message(error)}")


class _PipelineFailed(Exception):
    """DALI failed producing batch `step` of a pass; the pipeline is unusable after that."""

    def __init__(self, step: int, error: RuntimeError):
        super().__init__(str(error))
        self.step, self.error = step, error


def _run(pipe, names: list[str], policy, reader: Optional[str] = "reader") -> Iterator[dict]:
    """Batches (name -> tensor) of `pipe` until its reader's pass ends (the last one partial); with no
    `reader`, the pipeline's input never ends. The pipeline and its threads live as long as this
    generator: closing it releases them."""
    try:
        it = DALIGenericIterator(pipe, names, reader_name=reader, last_batch_policy=policy, auto_reset=False)
    except RuntimeError as e:  # the iterator runs the first batch already
        raise _PipelineFailed(0, e) from None
    for step in itertools.count():
        try:
            batch = next(it)[0]
        except StopIteration:
            return
        except RuntimeError as e:
            raise _PipelineFailed(step, e) from None
        yield batch


def _source(files: Sequence[str], bad: set, seed: int, epoch: int, index: int) -> int:
    """The sample whose file stands for sample `index`: itself, or if its file is bad the reference's
    replacement (DualViewDataset): the first of MAX_TRIES samples drawn from (seed, epoch, index)
    whose file is readable. The views keep `index`'s draws; the label is the replacement's."""
    if files[index] not in bad:
        return index
    tries = DualViewDataset.MAX_TRIES
    for j in replacement_candidates(seed, epoch, index, len(files), tries):
        if files[j] not in bad:
            return j
    raise DataError(f"cannot read image {files[index]}: DALI cannot decode it, nor any of the {tries} "
                    f"samples drawn to replace it: check the training folder")


class _Stream:
    """What a train pipeline reads: batch j is the j-th of this process's batches from (epoch, step)
    on, running on into the following epochs; a pure function of j, since DALI prefetches ahead.
    Holds no reference to the loader, so a loader's pipeline goes when the loader goes."""

    def __init__(self, loader: "DaliTrainLoader", epoch: int, step: int):
        self.files, self.labels, self.bad, self.seed = loader.files, loader.labels, loader._bad, loader.seed
        self.sampler, self.per_batch, self.num_views = loader.sampler, loader.per_batch, loader.spec.num_views
        self.epoch, self.step = epoch, step
        self._orders: dict[int, np.ndarray] = {}

    def position(self, j: int) -> tuple[int, int]:
        """(epoch, step) of batch j."""
        epoch, step = divmod(self.step + j, self.sampler.steps_per_epoch)
        return self.epoch + epoch, step

    def samples(self, j: int) -> tuple[int, np.ndarray, list[int]]:
        """(epoch, sample indices, the samples read for them) of batch j."""
        epoch, step = self.position(j)
        if epoch not in self._orders:  # this epoch's order, and the previous one's while it drains
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = self.sampler.order(epoch)
        mine = self._orders[epoch][step * self.per_batch: (step + 1) * self.per_batch]
        return epoch, mine, [_source(self.files, self.bad, self.seed, epoch, i) for i in mine.tolist()]

    @do_not_convert  # host code: kept out of the conditionals' AutoGraph conversion
    def __call__(self, info):
        epoch, mine, read = self.samples(info.iteration)
        paths = [np.frombuffer(os.fsencode(self.files[r]), dtype=np.uint8) for r in read]
        labels = np.array([[self.labels[r]] for r in read], dtype=np.int32)
        return paths, labels, draws(self.seed, epoch, mine, self.num_views)  # N x V x DRAWS


@dataclass
class _Live:
    """The running pipeline: its stream, its batches, and the index of the next batch to be taken."""
    stream: _Stream
    batches: Iterator[dict]
    next: int = 0


class DaliTrainLoader:
    """The loader seam, DALI backend: yields (views: list of Nx3xHxW float32, labels: N long), on the
    GPU when `device_id` is set, else on CPU.

    The DALI iterator is not passed through `accelerator.prepare`: accelerate only shards torch
    DataLoaders; this loader reads only its process's slice of every global batch. One pipeline serves
    the epochs one after another (`close()` releases it); `builds` counts the pipelines built.
    """

    def __init__(self, samples, classes, spec: AugmentSpec, global_batch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, threads: int = 1, device_id: Optional[int] = None,
                 decode: str = "once", finish: bool = True, prefetch: int = 2,
                 hw_decoder_load: float = HW_DECODER_LOAD):
        if decode not in ("once", "roi"):
            raise ValueError(f"decode must be 'once' or 'roi', got {decode!r}")
        self.files = [path for path, _ in samples]
        self.labels = [label for _, label in samples]
        self.num_samples = len(self.files)
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.spec = spec
        self.sampler = EpochBatchSampler(len(self.files), global_batch, rank, world_size, seed)  # the checks
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_batch = global_batch // world_size
        self.threads, self.device_id, self.decode, self.prefetch = max(1, threads), device_id, decode, prefetch
        self.hw_decoder_load = hw_decoder_load
        self.uint8_views = not finish  # the seam then finishes the views on the device (aug.on_device)
        self._bad: set[str] = set()  # files DALI could not read: their samples are replaced
        self._names = [f"view{k}" for k in range(spec.num_views)]
        self._live: Optional[_Live] = None
        self.builds = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return len(self.sampler)

    def bad_files(self) -> list[str]:
        """The files found unreadable so far (each replaced); the trainer's BadDataMonitor reads them."""
        return sorted(self._bad)

    def source(self, epoch: int, index: int) -> int:
        """The sample read for sample `index` of `epoch` (`_source`)."""
        return _source(self.files, self._bad, self.seed, epoch, index)

    def close(self) -> None:
        """Release the pipeline and its threads (the next iteration builds a new one)."""
        if self._live is not None:
            self._live.batches.close()
            self._live = None

    def _start(self, epoch: int, step: int) -> None:
        self.close()
        stream = _Stream(self, epoch, step)
        pipe = train_pipeline(batches=stream, views=self.spec.views, gpu=self.device_id is not None,
                              decode=self.decode, finish=not self.uint8_views, hw_decoder_load=self.hw_decoder_load,
                              batch_size=self.per_batch,
                              num_threads=self.threads, device_id=self.device_id, seed=self.seed,
                              prefetch_queue_depth=self.prefetch)
        self._live = _Live(stream, _run(pipe, self._names + ["label"], LastBatchPolicy.DROP, reader=None))
        self.builds += 1

    def _find_bad(self, failed: _PipelineFailed, batches: list[list[str]], where: str) -> None:
        """Add the file(s) behind a DALI failure to the bad set: the one DALI names, else those of the
        failing batch, or failing that of the batches prefetched after it, that PIL cannot read either
        (a full decode each: the failing batch is searched first); none new: raise."""
        named = _named_file(failed.error)
        found = [named] if named and named not in self._bad else []
        for batch in [] if named else batches:
            found = [p for p in dict.fromkeys(batch) if p not in self._bad and not _readable(p)]
            if found:
                break
        if not found:
            raise RuntimeError(f"DALI pipeline failed at {where}: {_dali_message(failed.error)}")
        self._bad.update(found)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        s = self.sampler
        step = s.start_step
        while step < self.steps_per_epoch:
            live = self._live
            if live is None or live.stream.position(live.next) != (s.epoch, step):
                self._start(s.epoch, step)  # first use, a seek, or after a bad file
                live = self._live
            try:
                batch = next(live.batches)
            except _PipelineFailed as failed:  # the pipeline is dead: find the file, restart at this batch
                self._live = None
                candidates = [[self.files[r] for r in live.stream.samples(live.next + k)[2]]
                              for k in range(self.prefetch + 2)]
                self._find_bad(failed, candidates, f"epoch {s.epoch} step {step}")
                continue
            except BaseException:  # anything else (a DataError from the stream, Ctrl-C): no half-dead pipeline
                self.close()
                raise
            live.next += 1
            step += 1
            yield [batch[n] for n in self._names], batch["label"].view(-1).long()  # V x Nx3xSxS, N


class DaliEvalLoader:
    """Deterministic evaluation through DALI: shorter side -> `resize`, centre crop `crop_size`,
    normalise; yields (images Nx3xHxW float32, labels N long) in sample order, the last batch partial.
    `max_samples` and `rank`/`world_size` select the samples as the torch EvalLoader does."""

    def __init__(self, samples, classes, *, crop_size: int, resize: int, batch_size: int = 256,
                 threads: int = 1, max_samples: Optional[int] = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 device_id: Optional[int] = None, rank: int = 0, world_size: int = 1):
        samples = list(samples)
        samples = [samples[i] for i in eval_indices(len(samples), max_samples, rank, world_size)]
        self.files = [path for path, _ in samples]
        self.labels = [label for _, label in samples]
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.crop_size, self.resize, self.batch_size = crop_size, resize, max(1, min(batch_size, len(samples)))
        self.mean, self.std = tuple(mean), tuple(std)
        self.threads, self.device_id = max(1, threads), device_id

    def __len__(self) -> int:
        return math.ceil(len(self.files) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.files:  # a process's share of fewer samples than processes
            return
        pipe = eval_pipeline(files=self.files, labels=self.labels, crop_size=self.crop_size, resize=self.resize,
                             mean=self.mean, std=self.std, gpu=self.device_id is not None,
                             batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id, seed=0)
        bs = self.batch_size

        try:
            for batch in _run(pipe, ["images", "label"], LastBatchPolicy.PARTIAL):
                yield batch["images"], batch["label"].view(-1).long()  # Nx3xSxS, N
        except _PipelineFailed as failed:  # the failing batch and the ones prefetched after it
            raise _unreadable(failed.error, self.files[failed.step * bs: (failed.step + 3) * bs]) from None


# ------------------------------------------------------------------------- the seam's entry points
def train_loader(cfg, spec: AugmentSpec, *, rank: int, world_size: int, device) -> DaliTrainLoader:
    from fastairl.data.datasets import load_samples

    samples, classes = load_samples(cfg.data, cfg.data.train, key="data.train")
    return DaliTrainLoader(samples, classes, spec, cfg.train.batch_size, rank, world_size, cfg.train.seed,
                           threads=cfg.data.workers, device_id=_device_id(device), finish=not cfg.aug.on_device)


def linear_train_loader(cfg, path: str, *, rank: int = 0, world_size: int = 1, device="cpu",
                        batch_size: Optional[int] = None) -> DaliTrainLoader:
    """Linear-evaluation training data: one view, random-resized crop + flip (the crop_flip preset at
    aug.crop_size), labels for the classifier."""
    from fastairl.data.datasets import load_samples

    samples, classes = load_samples(cfg.data, path)
    spec = linear_train_spec(cfg.aug)
    return DaliTrainLoader(samples, classes, spec, batch_size or cfg.train.batch_size, rank, world_size,
                           cfg.train.seed, threads=cfg.data.workers, device_id=_device_id(device))


def eval_loader(cfg, path: Optional[str], *, max_samples: Optional[int] = None, batch_size: int = 256,
                pin_memory: bool = False, rank: int = 0, world_size: int = 1) -> DaliEvalLoader:
    """`pin_memory` is unused: on a GPU the batches are decoded and produced on the current device."""
    from fastairl.data.datasets import load_samples
    from fastairl.pipelines import eval_resize

    v = spec_from_config(cfg.aug).views[0]
    samples, classes = load_samples(cfg.data, path)
    device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
    return DaliEvalLoader(samples, classes, crop_size=cfg.aug.crop_size, resize=eval_resize(cfg),
                          batch_size=batch_size, threads=cfg.data.workers, max_samples=max_samples,
                          mean=v.mean, std=v.std, device_id=device_id, rank=rank, world_size=world_size)
