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
  ~ U(log ratio), 10 tries, then the whole image narrowed to the ratio range, centred), computed on
  the host (`crop_boxes`) from the image's size as stored, read once from its header (`image_size`),
  box for box the FFCV backend's for the same draws; the resize of that box is bilinear with
  antialiasing (PIL's filter: 0.2 level mean difference for the same box).
- JPEG decoding on CPU is libjpeg-turbo, as PIL's (identical pixels); nvJPEG on a GPU differs slightly.
Per-sample probabilities use DALI conditionals (`enable_conditionals=True`): an op only runs on the
samples whose coin came up, and an op whose probability is 0 is not in the graph at all.

Random draws: the graph has no random operator and no per-sample arithmetic of its own. Every draw of
a view (crop tries, flip, jitter coin, order and factors, grey, blur and its sigma, solarise) is a
U[0, 1) number from a counter-based stream keyed by (seed, epoch, sample index, view) (`draws`; the
FFCV backend draws its crops from the same stream); the host turns them, per batch, into what the
graph reads (`view_plan`: boxes, flips, coins, the jitter slots' factors, the hue byte, sigma) and
feeds those with `fn.external_source`. (In the graph they were some 450 scalar operators: 45 ms of
CPU per batch of 128 on a 2-core VM, file reads included, against 12 ms now; README.) So a sample's
views depend only on (seed, epoch, index), as with the torch reference: not on the process layout,
and a resumed epoch sees the same views as the uninterrupted one, bit for bit (the torch reference
draws from another stream: same distributions, not the same pixels).

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

Unreadable files are replaced as the torch reference replaces them. A file whose header no reader can
read (missing, empty, not an image) is found when the host reads the sizes for its batch and is
replaced there, before DALI sees it. Otherwise DALI stops a pipeline at the first file it cannot read.
It names empty or missing files (`File mapping failed: <path>`); for a damaged image DALI 2.4's
decoder error names no file. Then the files of the failing and prefetched batches
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
from fastairl.data.draws import CROP_DRAWS, FLIP, HEIGHT, LEFT, TOP, WIDTH, crop_boxes, uniforms  # noqa: E402
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
def _grey(x, channels: int = 1):
    """HxWx3 -> HxWx`channels` float: PIL's "L" value of every pixel, exactly, in each channel."""
    return dmath.floor(fn.coord_transform(x, M=_L_ROW * channels, T=[0.5] * channels))


def _blend(base, x, factor):
    """PIL's Image.blend(base, x, factor) on uint8: base + factor·(x - base), clipped, truncated."""
    return dmath.floor(dmath.clamp(base + factor * (x - base), 0.0, 255.0))


def _mean_grey(grey):
    """PIL ImageEnhance.Contrast's pivot from the "L" image `grey`: its mean, rounded (per sample)."""
    return dmath.floor(fn.reductions.mean(grey) + 0.5)


def brightness(x, factor):
    """PIL ImageEnhance.Brightness (what torchvision's adjust_brightness runs on a PIL image)."""
    return _blend(0.0, x, factor)


def contrast(x, factor):
    """PIL ImageEnhance.Contrast: blend with the image's mean grey level."""
    return _blend(_mean_grey(_grey(x)), x, factor)


def saturation(x, factor):
    """PIL ImageEnhance.Color: blend with each pixel's grey level."""
    return _blend(_grey(x), x, factor)


def _hue_weights() -> list[float]:
    """w_n(h) = clamp(min(k, 1020 - k), 0, 255), k = (255·n + 6·h) mod 1530 (n = 5, 3, 1 for r, g, b),
    at key 512·channel + j for the hue byte h = j mod 256, j in [0, 512): a shifted byte before its wrap."""
    h = np.arange(512) % 256
    k = (255 * np.array([5, 3, 1])[:, None] + 6 * h[None, :]) % 1530  # 3 x 512
    return np.clip(np.minimum(k, 1020 - k), 0, 255).astype(float).ravel().tolist()


_HUE_WEIGHTS = _hue_weights()


def hue_byte(shift) -> np.ndarray:
    """torchvision's hue step for factors `shift` (float32): int(shift·255) (towards zero) as the
    uint8 it adds to PIL's hue byte, mod 256; float64, for hue()."""
    return np.mod(np.trunc(np.asarray(shift, np.float32).astype(np.float64) * 255.0), 256.0)


def hue(x, byte):
    """torchvision's adjust_hue on a PIL image, bit for bit: RGB -> 8-bit HSV, H += byte (mod 256,
    byte = hue_byte(factor), per sample), HSV -> RGB.

    The hue byte follows PIL's float steps (float32 rc/gc/bc, the sector sum in double rounded to
    float32, h/6 + 1 mod 1 in double rounded to float32, truncation of h·255): checked against PIL on
    all 2^24 colours. Saturation is floor(255·c / v). The way back is PIL's p/q/t rounding, written as
    one formula for the three channels in integers below 2^24 (exact in float32), also checked on all
    2^24 HSV triples: channel n gets round(v - v·s·w_n / 255^2), w_n = clamp(min(k, 1020 - k), 0, 255),
    k = (255·n + 6·h) mod 1530, n = 5, 3, 1 for r, g, b; w_n of the shifted byte is one table lookup
    (_HUE_WEIGHTS), and the rounding is integer arithmetic. (tests/test_dali.py checks the whole op
    against torchvision on all 2^24 colours.)
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
    s = fn.cast(dmath.floor(255.0 * c / (v + (v == 0))), dtype=types.INT32)  # HxWx1, the saturation byte
    shifted = fn.cast(h + byte, dtype=types.INT32)  # HxWx1 in [0, 510]: the table does the uint8 wrap
    w = fn.lookup_table(shifted + types.Constant(np.array([0, 512, 1024], np.int32)), keys=list(range(1536)),
                        values=_HUE_WEIGHTS, dtype=types.INT32)  # HxWx3: w_n
    v = fn.cast(v, dtype=types.INT32)
    num = (v * 130050 + 65025) - (2 * v * s) * w  # HxWx3: 2·255^2·(v - v·s·w_n / 255^2) + 255^2, > 0
    return fn.cast(num // 130050, dtype=types.FLOAT)  # HxWx3, rounded half up


def _affine_slot(y, slot, ops):
    """Brightness, contrast or saturation, or nothing, per sample: a blend base + f·(y - base) with
    base = wc·(mean grey) + ws·(pixel grey), `slot` = (f, wc, ws) per-sample scalars (jitter_slots:
    brightness f, 0, 0; contrast f, 1, 0; saturation f, 0, 1; nothing 1, 0, 0). Adding the zero terms
    and multiplying by 0 or 1 is exact, so each kind is its op's value bit for bit. `ops`: the view's
    enabled jitter ops (no grey is computed when neither contrast nor saturation can run)."""
    f, wc, ws = slot
    terms = []
    if C in ops or S in ops:
        g = _grey(y)  # HxWx1
        if C in ops:
            terms.append(wc * _mean_grey(g))  # per sample
        if S in ops:
            terms.append(ws * g)  # HxWx1
    return _blend(sum(terms[1:], terms[0]) if terms else 0.0, y, f)


def jitter_ops(v: ViewSpec) -> tuple[int, ...]:
    """The enabled jitter ops, in B, C, S, H order (an op whose range is the single identity value is
    left out, as torch_ref skips it)."""
    return tuple(op for op, amount in zip((B, C, S, H), (v.brightness, v.contrast, v.saturation, v.hue))
                 if amount > 0)


def jitter_orders(v: ViewSpec) -> list[tuple[int, ...]]:
    """Every order of the enabled jitter ops; the pipeline draws one uniformly per sample."""
    return list(itertools.permutations(jitter_ops(v)))


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


def jitter(x, v: ViewSpec, before, byte=None, after=()):
    """Colour jitter, per sample in the order its slots spell (jitter_slots): the affine slots
    `before` (each (f, wc, ws, on)), hue by the hue byte `byte` when the view has hue, the slots
    `after`. uint8 HxWx3 -> uint8 HxWx3."""
    ops = set(jitter_ops(v))
    if not ops:
        return x
    y = fn.cast(x, dtype=types.FLOAT)
    for slot in before:
        y = _slot(y, slot, ops)
    if H in ops:
        y = hue(y, byte)
        for slot in after:
            y = _slot(y, slot, ops)
    return fn.cast(y, dtype=types.UINT8)


def _slot(y, slot, ops):
    """An affine slot, run only on the samples for which it does something when it has an `on` coin
    (the slots around hue: half of them are nothing for any one sample)."""
    *coefficients, on = slot
    if on is None:
        return _affine_slot(y, coefficients, ops)
    if on:
        y = _affine_slot(y, coefficients, ops)
    return y


def grayscale(x):
    """PIL convert("L").convert("RGB") on uint8 HxWx3: the "L" value of _grey in all three channels."""
    return fn.cast(_grey(x, channels=3), dtype=types.UINT8)


def gaussian_blur(x, v: ViewSpec, sigma):
    """torchvision gaussian_blur: kernel side v.blur_kernel, per-sample sigma, reflect-101 borders."""
    return fn.gaussian_blur(x, window_size=v.blur_kernel, sigma=sigma)


def solarize(x, threshold: int):
    """torchvision/PIL solarize on uint8: x >= threshold -> 255 - x (one table lookup)."""
    table = [float(255 - k if k >= threshold else k) for k in range(256)]
    return fn.lookup_table(x, keys=list(range(256)), values=table, dtype=types.UINT8)


# ------------------------------------------------------------- the random draws, keyed by the sample
# Every random choice is a function of (seed, epoch, sample index, view), like the reference's
# `sample_rng`: the host draws U[0, 1) numbers from a counter-based stream (splitmix64), maps them to
# boxes, coins and factors (`view_plan`) and feeds those with `fn.external_source`. The graph has no
# random op, so a pipeline rebuilt at any step (a resume, a replaced file) gives the same views.
_PHOTO_STREAM = 1 << 16  # the photometric stream of view v is keyed by v + _PHOTO_STREAM, its crop stream by v
_JITTER, _ORDER, _GRAY, _BLUR, _SIGMA, _SOLARIZE = range(6)
_FACTOR = {B: 6, C: 7, S: 8, H: 9}
PHOTO_DRAWS = 10
DRAWS = CROP_DRAWS + PHOTO_DRAWS  # per view: the crop stream's uniforms, then the photometric stream's


def draws(seed: int, epoch: int, indices: np.ndarray, num_views: int) -> np.ndarray:
    """N x V x DRAWS float64: the uniforms of every view of the samples (crop stream, photometric stream)."""
    return np.stack([np.concatenate([uniforms(seed, epoch, indices, v, CROP_DRAWS),
                                     uniforms(seed, epoch, indices, v + _PHOTO_STREAM, PHOTO_DRAWS)], axis=1)
                     for v in range(num_views)], axis=1)


def _between(u, lo: float, hi: float) -> np.ndarray:
    """U[0, 1) -> U[lo, hi) as float32 (a factor or a sigma)."""
    return (lo + (hi - lo) * u).astype(np.float32)


def jitter_factors(v: ViewSpec, p: np.ndarray) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Per-sample factors {op: N float32} with sample_color's ranges and the index of each sample's
    order in jitter_orders(v) (N int), from the view's photometric uniforms `p` (N x PHOTO_DRAWS)."""
    ranges = dict(zip((B, C, S, H), jitter_ranges(v)))
    factors = {op: _between(p[:, _FACTOR[op]], *ranges[op]) for op in jitter_ops(v)}
    return factors, np.floor(p[:, _ORDER] * max(1, len(jitter_orders(v)))).astype(np.int64)


def _named_slots(before: list, after: list) -> list[tuple[str, list]]:
    """(before0, before[0]), ..., (after0, after[0]), ...: the slots' field prefixes with their tables."""
    return [(f"before{j}", t) for j, t in enumerate(before)] + [(f"after{j}", t) for j, t in enumerate(after)]


def jitter_slots(v: ViewSpec, factors: dict[int, np.ndarray], which: np.ndarray) -> dict[str, np.ndarray]:
    """What jitter() reads for the orders `which` and `factors`: per affine slot (_slot_plan),
    `{slot}_f` (the factor, 1 for nothing), `{slot}_wc` (1 for contrast) and `{slot}_ws` (1 for
    saturation), float32, the weights only when the op is enabled; with hue, `{slot}_on` (bool: the
    slot does something) and `hue`, the hue byte."""
    ops = set(jitter_ops(v))
    before, after = _slot_plan(jitter_orders(v))
    out = {}
    for name, kinds in _named_slots(before, after):
        kind = np.asarray(kinds)[which]  # N: the op this slot applies to each sample
        f = np.ones(len(which), np.float32)
        for op in ops - {H}:
            f = np.where(kind == op, factors[op], f)
        out[f"{name}_f"] = f.astype(np.float32)
        for op, key in ((C, "wc"), (S, "ws")):
            if op in ops:
                out[f"{name}_{key}"] = (kind == op).astype(np.float32)
        if H in ops:  # around hue a slot is nothing for some samples: they skip it
            out[f"{name}_on"] = kind != _IDENTITY_SLOT
    if H in ops:
        out["hue"] = hue_byte(factors[H])
    return out


def view_plan(u: np.ndarray, heights, widths, v: ViewSpec, finish: bool = True) -> dict[str, np.ndarray]:
    """Everything view `v` does to each sample, from its uniforms `u` (N x DRAWS, see draws()) and the
    image sizes: the crop box and flip, and when the view is finished in DALI the coins of the ops
    (bool), the jitter slots and hue byte (jitter_slots) and the blur sigma. A field is present only
    when its op can run: an op of probability 0 is not in the graph. The pipeline reads the fields
    by name (`_view`); computing them here rather than in the graph keeps some 450 small operators
    per batch out of the graph. The arithmetic is float64 throughout, as FFCV's draw_crops and the
    reference's; the graph rounded its range constants to float32, so a factor (rarely a box) can
    differ in its last bit from the values of that older graph, and a run resumed across that change
    does not see its earlier views bit for bit."""
    box = crop_boxes(heights, widths, u[:, :CROP_DRAWS], v)  # N x 5 int64
    # N x 2, C-contiguous as external_source needs (a column pick can come back Fortran-ordered)
    start, size = (np.ascontiguousarray(box[:, cols], np.float32) for cols in ([TOP, LEFT], [HEIGHT, WIDTH]))
    plan = {"start": start, "end": start + size, "mirror": box[:, FLIP].astype(np.int32)}
    if not finish:
        return plan
    p = u[:, CROP_DRAWS:]
    if v.jitter_p > 0 and jitter_ops(v):
        plan["jitter"] = p[:, _JITTER] < v.jitter_p
        plan.update(jitter_slots(v, *jitter_factors(v, p)))
    if v.gray_p > 0:
        plan["gray"] = p[:, _GRAY] < v.gray_p
    if v.blur_p > 0:
        plan["blur"] = p[:, _BLUR] < v.blur_p
        plan["sigma"] = _between(p[:, _SIGMA], *v.blur_sigma)
    if v.solarize_p > 0:
        plan["solarize"] = p[:, _SOLARIZE] < v.solarize_p
    return plan


_DALI_TYPE = {np.dtype(np.float32): types.FLOAT, np.dtype(np.float64): types.FLOAT64,
              np.dtype(np.int32): types.INT32, np.dtype(np.bool_): types.BOOL}


def plan_layout(views: Sequence[ViewSpec], finish: bool) -> list[list[tuple[str, np.dtype, int]]]:
    """Per view, the (name, dtype, ndim) of its view_plan fields, in the order the stream feeds them."""
    one = np.zeros((1, DRAWS))
    return [[(k, a.dtype, a.ndim - 1) for k, a in view_plan(one, [1], [1], v, finish).items()] for v in views]


def _slots(plan: dict, prefix: str) -> list[tuple]:
    """The (f, wc, ws, on) nodes of the slots `prefix`0, 1, ... (None for a field the view leaves out)."""
    return [tuple(plan.get(f"{prefix}{j}_{key}") for key in ("f", "wc", "ws", "on"))
            for j in itertools.takewhile(lambda j: f"{prefix}{j}_f" in plan, itertools.count())]


def _view(crop, plan: dict, v: ViewSpec, finish: bool = True):
    """One view from its SxSx3 uint8 crop and its view_plan fields (nodes, by name) -> 3xSxS float32
    normalised (uint8 when not `finish`)."""
    x = crop
    if finish:
        if "jitter" in plan:
            if plan["jitter"]:
                x = jitter(x, v, _slots(plan, "before"), plan.get("hue"), _slots(plan, "after"))
        if "gray" in plan:
            if plan["gray"]:
                x = grayscale(x)
        if "blur" in plan:
            if plan["blur"]:
                x = gaussian_blur(x, v, plan["sigma"])
        if "solarize" in plan:
            if plan["solarize"]:
                x = solarize(x, v.solarize_threshold)
    if not finish:
        return fn.crop_mirror_normalize(x, mirror=plan["mirror"], dtype=types.UINT8, output_layout="CHW")
    return fn.crop_mirror_normalize(x, mirror=plan["mirror"], dtype=types.FLOAT, output_layout="CHW",
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

    `batches(info)` -> the batch of iteration `info.iteration`: file paths as byte arrays, labels N x 1
    int32, then each view's view_plan fields in plan_layout's order; `_Stream` is the loader's.
    decode="roi" instead decodes only each view's crop (`decoders.image_slice`): one partial decode
    PER VIEW. Kept for the benchmark that compares the two (benchmarks/dali_throughput.py).
    """
    layout = plan_layout(views, finish)
    fields = [f for view in layout for f in view]
    paths, label, *nodes = fn.external_source(
        source=batches, num_outputs=2 + len(fields), batch=True, batch_info=True,
        dtype=[types.UINT8, types.INT32] + [_DALI_TYPE[d] for _, d, _ in fields],
        ndim=[1, 1] + [n for _, _, n in fields])  # per sample
    jpegs = fn.io.file.read(paths)
    device = "mixed" if gpu else "cpu"
    images = None
    if decode == "once":
        images = fn.decoders.image(jpegs, device=device, output_type=types.RGB, hw_decoder_load=hw_decoder_load,
                                   **_AS_STORED)
    outs = []
    for v, view in zip(views, layout):
        plan = {name: nodes.pop(0) for name, _, _ in view}
        size = [v.crop_size, v.crop_size]
        if decode == "roi":
            roi = fn.decoders.image_slice(jpegs, plan["start"], plan["end"] - plan["start"], device=device,
                                          output_type=types.RGB, axis_names="HW", normalized_anchor=False,
                                          normalized_shape=False, hw_decoder_load=hw_decoder_load, **_AS_STORED)
            crop = fn.resize(roi, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
        else:
            crop = fn.resize(images, size=size, roi_start=plan["start"], roi_end=plan["end"],
                             interp_type=types.INTERP_LINEAR, antialias=True)  # SxSx3 uint8
        outs.append(_view(crop, plan, v, finish=finish))
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


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # frame headers


def _jpeg_size(fh) -> Optional[tuple[int, int]]:
    """(height, width) from a JPEG's frame header, skipping the segments before it; None if the file
    is not a JPEG or the header is not where it should be."""
    if fh.read(2) != b"\xff\xd8":
        return None
    while True:
        head = fh.read(2)
        if len(head) < 2 or head[0] != 0xFF:
            return None
        marker = head[1]
        while marker == 0xFF:  # fill bytes
            nxt = fh.read(1)
            if not nxt:
                return None
            marker = nxt[0]
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
            continue
        if marker in (0xD9, 0xDA):  # end of image, or the scan, before any frame header
            return None
        size = fh.read(2)
        length = int.from_bytes(size, "big")
        if len(size) < 2 or length < 2:  # cut off, or a length that would not move on
            return None
        if marker in _SOF:
            frame = fh.read(5)  # precision, height, width
            return (int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big")) if len(frame) == 5 else None
        fh.seek(length - 2, os.SEEK_CUR)


def image_size(path: str) -> Optional[tuple[int, int]]:
    """(height, width) of an image as stored (no EXIF rotation, as the decoder is told), read from its
    header: a JPEG's frame header, else PIL's; None when neither can read it (the torch reference,
    which opens every image with PIL, would find the file unreadable too)."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            hw = _jpeg_size(fh)
        if hw is None or 0 in hw:
            with Image.open(path) as img:
                hw = (img.height, img.width)
        return hw if min(hw) > 0 else None
    except Exception:  # noqa: BLE001  (any failure: PIL raises many kinds, DecompressionBombError among them)
        return None


class _Sizes:
    """(height, width) of each file, read from its header the first time a batch holds it, then kept
    for the loader's life: only the first epoch pays (image_size: ~20 us a file from the page cache on
    one core here). The headers of a batch are read by `threads` threads, so that a network file
    system's latency per open is paid in parallel. A header that cannot be read gives (-1, -1) and is
    not kept (the stream then treats the file as unreadable)."""

    def __init__(self, files: Sequence[str], threads: int = 8):
        self.files, self.threads = files, threads
        self.hw = np.full((len(files), 2), -1, np.int64)
        self._pool = None

    def __call__(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        idx = np.asarray(indices, np.int64)
        missing = np.unique(idx[self.hw[idx, 0] < 0]).tolist()
        if len(missing) > 1 and self.threads > 1:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fastairl-sizes")
            found = list(self._pool.map(image_size, [self.files[i] for i in missing]))
        else:
            found = [image_size(self.files[i]) for i in missing]
        for i, hw in zip(missing, found):
            if hw is not None:
                self.hw[i] = hw
        hw = self.hw[idx]
        return hw[:, 0], hw[:, 1]

    def read_all(self) -> None:
        """Read every size now (a benchmark that must not time the first epoch's header reads)."""
        self(range(len(self.files)))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


class _Stream:
    """What a train pipeline reads: batch j is the j-th of this process's batches from (epoch, step)
    on, running on into the following epochs; a pure function of j, since DALI prefetches ahead.
    Holds no reference to the loader, so a loader's pipeline goes when the loader goes."""

    def __init__(self, loader: "DaliTrainLoader", epoch: int, step: int):
        self.files, self.labels, self.bad, self.seed = loader.files, loader.labels, loader._bad, loader.seed
        self.sampler, self.per_batch, self.views = loader.sampler, loader.per_batch, loader.spec.views
        self.sizes, self.finish = loader._sizes, not loader.uint8_views
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
        heights, widths = self.sizes(read)  # the file read's (a replacement's, for a bad file)
        while (heights < 0).any():  # a header no reader can read: a bad file, replaced here and now
            self.bad.update(self.files[r] for r, h in zip(read, heights.tolist()) if h < 0)
            epoch, mine, read = self.samples(info.iteration)
            heights, widths = self.sizes(read)
        paths = [np.frombuffer(os.fsencode(self.files[r]), dtype=np.uint8) for r in read]
        labels = np.array([[self.labels[r]] for r in read], dtype=np.int32)
        u = draws(self.seed, epoch, mine, len(self.views))  # N x V x DRAWS: the drawn sample's
        plans = [view_plan(u[:, k], heights, widths, v, self.finish) for k, v in enumerate(self.views)]
        return [paths, labels] + [a for plan in plans for a in plan.values()]


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
        self._sizes = _Sizes(self.files)  # image sizes, from the headers: the crop boxes are drawn on the host
        self._names = [f"view{k}" for k in range(spec.num_views)]
        self._live: Optional[_Live] = None
        self.builds = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return len(self.sampler)

    def read_sizes(self) -> None:
        """Read every image's size from its header now rather than as the first epoch meets it (a
        benchmark of the steady state)."""
        self._sizes.read_all()

    def bad_files(self) -> list[str]:
        """The files found unreadable so far (each replaced); the trainer's BadDataMonitor reads them."""
        return sorted(self._bad)

    def source(self, epoch: int, index: int) -> int:
        """The sample read for sample `index` of `epoch` (`_source`)."""
        return _source(self.files, self._bad, self.seed, epoch, index)

    def close(self) -> None:
        """Release the pipeline and its threads (the next iteration builds a new one); the image sizes
        read so far are kept."""
        self._sizes.close()
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
