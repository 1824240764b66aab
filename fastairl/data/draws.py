"""The counter-based random stream and the crop rule that the DALI and FFCV backends share (numpy only).

A view's random choices are a function of (seed, epoch, sample index, stream) alone: `uniforms` hashes
those into a splitmix64 state and steps it, so the draws do not depend on the batch, the worker, the
thread or the rank, and a resume at any step sees the same views. Both backends draw a whole batch at
once (vectorised over the samples) in their per-batch Python stage and map the uniforms with
`crop_boxes` (sample_crop's rule: torchvision's RandomResizedCrop); each then draws its photometric
choices from streams of its own layout.
"""
from __future__ import annotations

import math

import numpy as np

from fastairl.data.augment import ViewSpec

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment (the golden ratio in 64 bits)
TRIES = 10  # torchvision's RandomResizedCrop tries
CROP_DRAWS = 2 * TRIES + 4  # try k reads 2k, 2k+1 and, when its box fits, 2k+2 (top), 2k+3 (left), 2k+4 (flip)
TOP, LEFT, HEIGHT, WIDTH, FLIP = range(5)  # the columns of crop_boxes


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, epoch: int, indices, stream: int, count: int) -> np.ndarray:
    """N x count U[0, 1) (53 bits each) of the streams keyed by (seed, epoch, indices[i], stream)."""
    with np.errstate(over="ignore"):
        h = _mix(np.full(len(indices), seed % 2**64, np.uint64) + _GAMMA)
        h = _mix(h ^ (np.uint64(epoch) + _GAMMA))
        h = _mix(h ^ (np.asarray(indices).astype(np.uint64) + _GAMMA))
        h = _mix(h ^ (np.uint64(stream) + _GAMMA))  # N: the stream's state
        steps = _GAMMA * np.arange(1, count + 1, dtype=np.uint64)  # count
        return (_mix(h[:, None] + steps) >> np.uint64(11)) * (1.0 / 2 ** 53)  # N x count


def _exp(x: np.ndarray) -> np.ndarray:
    """math.exp element by element (the C library's exp, as the reference uses; numpy's vectorised
    exp may differ in the last bit, which can move a rounded box side)."""
    return np.fromiter(map(math.exp, x.ravel().tolist()), np.float64, x.size).reshape(x.shape)


def crop_boxes(heights, widths, u: np.ndarray, v: ViewSpec) -> np.ndarray:
    """sample_crop's rule (torchvision's RandomResizedCrop) for images of `heights` x `widths` from the
    view's crop uniforms `u` (N x CROP_DRAWS, read as the rule reads them one by one): area ~
    U(scale)·HW, log-aspect ~ U(log ratio), ten tries, else the whole image narrowed to the ratio
    range, centred; then the flip. -> N x 5 int64 (TOP, LEFT, HEIGHT, WIDTH, FLIP).

    Try by try over the samples still without a box (most have one after the first try)."""
    hgt, wid = np.asarray(heights, np.float64), np.asarray(widths, np.float64)  # N
    (lo, hi), (r_lo, r_hi) = v.crop_scale, v.crop_ratio
    log_lo, log_hi = math.log(r_lo), math.log(r_hi)
    box = np.empty((len(u), 5), np.float64)
    left = np.arange(len(u))  # the samples no try has fitted yet
    for k in range(TRIES):
        h_, w_, uk = hgt[left], wid[left], u[left, 2 * k: 2 * k + 5]  # uk: this try's uniforms
        target = h_ * w_ * (lo + (hi - lo) * uk[:, 0])
        aspect = _exp(log_lo + (log_hi - log_lo) * uk[:, 1])
        w = np.rint(np.sqrt(target * aspect))  # Python's round(): halves to even
        h = np.rint(np.sqrt(target / aspect))
        fits = (w > 0) & (w <= w_) & (h > 0) & (h <= h_)
        box[left[fits]] = np.stack([np.floor(uk[:, 2] * (h_ - h + 1)), np.floor(uk[:, 3] * (w_ - w + 1)),
                                    h, w, uk[:, 4] < v.flip_p], axis=1)[fits]
        left = left[~fits]
        if not len(left):
            break
    # no try fits: the whole image narrowed to the nearest allowed aspect, centred
    h_, w_ = hgt[left], wid[left]
    w = np.where(w_ > h_ * r_hi, np.rint(h_ * r_hi), w_)
    h = np.where(w_ < h_ * r_lo, np.rint(w_ / r_lo), h_)
    box[left] = np.stack([np.floor((h_ - h) / 2), np.floor((w_ - w) / 2), h, w, u[left, 2 * TRIES] < v.flip_p], axis=1)
    return box.astype(np.int64)
