"""fastairl.data.draws: the counter-based stream and the crop rule that the DALI and FFCV backends share."""
from __future__ import annotations

import math

import numpy as np

from fastairl.data.augment import ViewSpec
from fastairl.data.draws import CROP_DRAWS, crop_boxes, uniforms

M64 = 2 ** 64


def _splitmix_mix(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % M64
    return x ^ (x >> 31)


def _scalar_uniforms(seed: int, epoch: int, index: int, stream: int, count: int) -> list[float]:
    """splitmix64 in Python integers: the key hashed from (seed, epoch, index, stream), then the
    state stepped by the golden-ratio increment, each output's top 53 bits over 2^53."""
    gamma = 0x9E3779B97F4A7C15
    h = _splitmix_mix((seed + gamma) % M64)
    for part in (epoch, index, stream):
        h = _splitmix_mix(h ^ ((part + gamma) % M64))
    out = []
    for _ in range(count):
        h = (h + gamma) % M64
        out.append((_splitmix_mix(h) >> 11) / 2 ** 53)
    return out


def test_uniforms_are_splitmix64_keyed_by_seed_epoch_index_stream():
    idx = np.array([0, 1, 7, 2 ** 40 + 3])
    for seed, epoch, stream in ((0, 0, 0), (123456789, 7, 1 << 32), (2 ** 63 + 5, 99, 3)):
        got = uniforms(seed, epoch, idx, stream, 30)
        want = [_scalar_uniforms(seed, epoch, int(i), stream, 30) for i in idx]
        assert got.dtype == np.float64 and np.array_equal(got, np.array(want))


def _crop_rule(u, height: int, width: int, v: ViewSpec) -> tuple[tuple[int, int, int, int, bool], bool]:
    """fastairl.data.augment.sample_crop's rule, line by line, reading its uniforms in order from `u`
    (then the flip): what crop_boxes must compute. -> ((top, left, h, w, flip), whether no try fit)"""
    u = iter(u)
    area = height * width
    log_r = (math.log(v.crop_ratio[0]), math.log(v.crop_ratio[1]))
    for _ in range(10):
        target = area * (v.crop_scale[0] + (v.crop_scale[1] - v.crop_scale[0]) * next(u))
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * next(u))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(next(u) * (height - h + 1)), int(next(u) * (width - w + 1))
            return (top, left, h, w, next(u) < v.flip_p), False
    in_ratio = width / height
    if in_ratio < v.crop_ratio[0]:
        w, h = width, int(round(width / v.crop_ratio[0]))
    elif in_ratio > v.crop_ratio[1]:
        h, w = height, int(round(height * v.crop_ratio[1]))
    else:
        w, h = width, height
    return ((height - h) // 2, (width - w) // 2, h, w, next(u) < v.flip_p), True


def test_crop_boxes_are_sample_crops_rule():
    """Box for box on 3,000 image sizes from 1 to 2,000 px, a fifth of them so elongated that no try
    fits (the fallback), for the default view, a narrow one with a flip rate of 0.3, and a fixed
    ratio of 2.5 whose fallback sides often end in exactly .5 (Python rounds those to even)."""
    rng = np.random.default_rng(1)
    n = 3000
    h, w = rng.integers(1, 600, n), rng.integers(1, 600, n)
    h[: n // 5], w[: n // 5] = rng.integers(1, 30, n // 5), rng.integers(300, 2000, n // 5)
    fallbacks = flips = 0
    views = (ViewSpec(), ViewSpec(crop_scale=(0.9, 1.0), crop_ratio=(0.5, 0.6), flip_p=0.3),
             ViewSpec(crop_scale=(0.99, 1.0), crop_ratio=(2.5, 2.5)))
    ties = 0
    for k, v in enumerate(views):
        u = uniforms(5, 3, np.arange(n), k, CROP_DRAWS)
        got = crop_boxes(h, w, u, v)
        assert got.shape == (n, 5) and got.dtype == np.int64
        for i in range(n):
            want, fell_back = _crop_rule(u[i], int(h[i]), int(w[i]), v)
            assert tuple(got[i]) == want, (i, k, int(h[i]), int(w[i]))
            fallbacks += fell_back
            ties += fell_back and (h[i] * v.crop_ratio[1]) % 1 == 0.5
        flips += got[:, 4].sum()
    # the fallback branch, rounding ties and both flip outcomes exercised
    assert fallbacks > 500 and ties > 0 and 0 < flips < len(views) * n
