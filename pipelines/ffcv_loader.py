"""FFCV backend (`data.pipeline: ffcv`): train and eval loaders over a `.beton` written by
`fastairl convert` (fields `image`: RGBImageField, `label`: IntField; classes in `<file>.json`).

Train: every image is decoded ONCE and all V views are cut from that decode. FFCV's own
`RandomResizedCropRGBImageDecoder` decodes per pipeline, so two views from it cost two JPEG decodes.
Here the pipeline is

    image: DecodeOnce (numba, in FFCV's jitted stage) -> CropFlipViews (per batch: draw the crop boxes
           and flips, then one parallel numba kernel resamples every view) [-> FinishViews]
    label: IntDecoder -> ToTensor

The crop boxes follow `fastairl.data.augment.sample_crop`'s rule (torchvision's RandomResizedCrop):
`draw_crops` maps the uniforms of a counter-based stream keyed by (seed, epoch, index, view) with
`fastairl.data.draws.crop_boxes`, vectorised over the batch, as the DALI backend does (same boxes). A
pure function of those keys, so resume is exact and the process layout does not matter. It is a
different stream from the torch reference's numpy Generators (same distribution, tested; not the
same boxes): a Generator per image cost ~0.15-0.3 ms in FFCV's single Python stage, a serial
bottleneck next to ~1.5 ms of decode spread over the decode threads. The resampler is PIL's BILINEAR
filter (triangle, widened when shrinking: torchvision's `antialias=True`), crop-then-resize like
`TF.resized_crop`, within one uint8 level of it.

The rest of the AugmentSpec (jitter, grayscale, blur, solarise, normalise) runs where it is fastest
(`finishes_on_cpu`): with a CUDA device the loader yields uint8 views (`uint8_views = True`) and the
seam wraps it in `fastairl.data.device_aug.DeviceAugLoader` on the GPU; on a CPU device FinishViews
applies the OpenCV engine's uint8 ops (`cv_aug.finish_view`) per sample in the loader's thread, with
draws (`draw_colors`) from sample_color's distributions keyed by (seed, epoch, index, view) like the
crops. On the CPU the on-device module is ~10x slower per view than these ops; `aug.on_device: true`
still selects it.

Order: the torch reference's (`torch_ref.EpochBatchSampler`): a permutation seeded by (seed, epoch),
cut into global batches of `train.batch_size`, the last partial one dropped, each rank taking its
slice of every global batch: floor(N / global batch) steps on every rank, disjoint ranks. FFCV's own
`distributed=True` order (a padded DistributedSampler) would give ceil(N / world) // batch steps,
which differs between layouts, so the order is a custom `TraversalOrder`. A mid-epoch resume
(`set_epoch(epoch, start_step)`) starts the order at `start_step`: the same batches, crops and flips as
the uninterrupted epoch.
"""
from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from queue import Empty, Full
from typing import Iterator, Optional, Sequence

import numba
import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import ctypes_imdecode, ctypes_memcopy
from ffcv.loader import Loader, OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.reader import Reader
from ffcv.transforms import ToTensor
from ffcv.traversal_order.base import TraversalOrder

from fastairl.data.augment import (IMAGENET_MEAN, IMAGENET_STD, AugmentSpec, ColorParams, ViewSpec,
                                   jitter_ranges, spec_from_config)
from fastairl.data.cv_aug import cv2, finish_view, normalize_lut
from fastairl.data.datasets import DataError, eval_indices, select_classes
from fastairl.data.draws import CROP_DRAWS, crop_boxes, uniforms
from fastairl.data.taxonomy import label_map_remap
from fastairl.pipelines.convert import manifest_path
from fastairl.pipelines.torch_ref import EpochBatchSampler

# Per view and sample: the source box, the size of the whole resized image, and the output window
# inside it (RRC: the window is the whole output; eval: the centre crop of the resized image).
TOP, LEFT, HEIGHT, WIDTH, OUT_H, OUT_W, WIN_Y, WIN_X, FLIP = range(9)


# ------------------------------------------------------------------------------ numba resampling
@numba.njit(cache=True, nogil=True)
def _taps(in_size, out_size, win_start, win_count, flip):
    """PIL's BILINEAR coefficients for output pixels win_start.. of resizing in_size -> out_size.

    Triangle filter, widened by the scale when shrinking (antialiasing), taps clipped to the input
    (PIL's precompute_coeffs). Returns (first tap, tap count, weights) per output pixel of the window,
    mirrored when `flip`.
    """
    scale = in_size / out_size
    fscale = max(scale, 1.0)
    support = fscale  # the triangle's support is 1, widened by the scale
    ksize = int(math.ceil(support)) * 2 + 1
    first = np.zeros(win_count, np.int32)
    count = np.zeros(win_count, np.int32)
    weights = np.zeros((win_count, ksize), np.float32)
    for j in range(win_count):
        row = win_count - 1 - j if flip else j
        center = (win_start + j + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        n = min(int(center + support + 0.5), in_size) - lo
        total = 0.0
        for t in range(n):
            w = max(1.0 - abs((t + lo - center + 0.5) / fscale), 0.0)
            weights[row, t] = w
            total += w
        if total > 0.0:
            for t in range(n):
                weights[row, t] /= total
        first[row], count[row] = lo, n
    return first, count, weights


@numba.njit(cache=True, nogil=True, fastmath=True)
def _resample(img, p, out):
    """out (3 x h x w uint8) <- the window of img[box] (H x W x 3 uint8) resized by p's sizes.

    Vertical pass first (over whole contiguous rows, so it vectorises), float32 in between, rounded
    once at the end. fastmath (reassociated sums) is ~1.3x faster here; the taps are exact.
    """
    oh, ow = out.shape[1], out.shape[2]
    top, left, bw = p[TOP], p[LEFT], p[WIDTH]
    ys, ny, wy = _taps(p[HEIGHT], p[OUT_H], p[WIN_Y], oh, False)
    xs, nx, wx = _taps(bw, p[OUT_W], p[WIN_X], ow, p[FLIP] != 0)
    rows = np.zeros((oh, bw * 3), np.float32)  # the window's rows, full box width
    for i in range(oh):
        acc = rows[i]
        for t in range(ny[i]):
            w = wy[i, t]
            src = img[top + ys[i] + t, left: left + bw].ravel()  # bw*3, contiguous
            for q in range(bw * 3):
                acc[q] += w * src[q]
    for i in range(oh):
        acc = rows[i]
        for j in range(ow):
            r = g = b = 0.0
            for t in range(nx[j]):
                w = wx[j, t]
                q = (xs[j] + t) * 3
                r += w * acc[q]
                g += w * acc[q + 1]
                b += w * acc[q + 2]
            out[0, i, j] = min(max(math.floor(r + 0.5), 0.0), 255.0)
            out[1, i, j] = min(max(math.floor(g + 0.5), 0.0), 255.0)
            out[2, i, j] = min(max(math.floor(b + 0.5), 0.0), 255.0)


@numba.njit(parallel=True, cache=True, nogil=True)
def resample_batch(images, heights, widths, params, out):
    """out[v, i] (3 x S x S) <- view v of decoded image i; images: N x (>= H*W*3) uint8 rows,
    params: N x V x 9 int64 (the columns TOP..FLIP), out: V x N x 3 x S x S uint8."""
    for i in numba.prange(images.shape[0]):
        h, w = heights[i], widths[i]
        img = images[i, : h * w * 3].reshape((h, w, 3))
        for v in range(params.shape[1]):
            _resample(img, params[i, v], out[v, i])


# ------------------------------------------------------------------------------------ the draws
# View v's crop box and flip come from the stream keyed by (seed, epoch, index, v), its colour draws
# from the one keyed by (seed, epoch, index, COLOR_STREAM + v): fastairl.data.draws' counter-based
# streams, the DALI backend's too, so the two backends cut the same boxes. A sample's draws are a pure
# function of those keys, whichever thread, worker or rank makes them, so resume is exact. They are
# drawn for the whole batch at once, vectorised, in the per-batch Python stage.
JITTER, ORDER, BRIGHTNESS, CONTRAST, SATURATION, HUE, GRAY, BLUR, SIGMA, SOLARIZE = 0, 1, 5, 6, 7, 8, 9, 10, 11, 12
COLOR_STREAM = 1 << 32
COLOR_DRAWS = 12  # the jitter coin, 3 for the order, 4 factors, grey, blur, sigma, solarise


def _shuffles() -> np.ndarray:
    """4 x 3 x 2 x 4: the order of the four jitter ops after Fisher-Yates' swaps (3 <-> j3, 2 <-> j2,
    1 <-> j1) from 0, 1, 2, 3: every order equally likely when j_k ~ U{0..k}."""
    out = np.zeros((4, 3, 2, 4), np.int64)
    for j3, j2, j1 in np.ndindex(4, 3, 2):
        order = [0, 1, 2, 3]
        for k, j in ((3, j3), (2, j2), (1, j1)):
            order[k], order[j] = order[j], order[k]
        out[j3, j2, j1] = order
    return out


_SHUFFLES = _shuffles()


def draw_crops(seed, epoch, indices, heights, widths, views: Sequence[ViewSpec], size: int) -> np.ndarray:
    """N x V x 9 resample parameters: view v of sample indices[i] gets sample_crop's box and a flip
    (`draws.crop_boxes`) from its own stream, resized to size x size."""
    params = np.zeros((len(indices), len(views), 9), np.int64)
    for k, v in enumerate(views):
        params[:, k, [TOP, LEFT, HEIGHT, WIDTH, FLIP]] = crop_boxes(
            heights, widths, uniforms(seed, epoch, indices, k, CROP_DRAWS), v)
    params[:, :, OUT_H] = params[:, :, OUT_W] = size
    return params


def draw_colors(seed, epoch, indices, ranges: np.ndarray) -> np.ndarray:
    """N x V x 13 float64 colour draws (the columns JITTER..SOLARIZE; ORDER holds a permutation of
    0..3 in 4 columns) with sample_color's distributions; ranges[v] = jitter_p, brightness lo, hi,
    contrast lo, hi, saturation lo, hi, hue lo, hi, gray_p, blur_p, sigma lo, hi, solarize_p."""
    out = np.zeros((len(indices), len(ranges), 13), np.float64)
    for v, r in enumerate(ranges):
        u = uniforms(seed, epoch, indices, COLOR_STREAM + v, COLOR_DRAWS)  # N x 12, read in that order
        d = out[:, v]  # N x 13
        d[:, JITTER] = u[:, 0] < r[0]
        j = (u[:, 1:4] * [4, 3, 2]).astype(np.int64)  # N x 3: Fisher-Yates' j3, j2, j1
        d[:, ORDER: ORDER + 4] = _SHUFFLES[j[:, 0], j[:, 1], j[:, 2]]
        for k in range(4):  # brightness, contrast, saturation factors, hue shift
            d[:, BRIGHTNESS + k] = r[1 + 2 * k] + (r[2 + 2 * k] - r[1 + 2 * k]) * u[:, 4 + k]
        d[:, GRAY] = u[:, 8] < r[9]
        d[:, BLUR] = u[:, 9] < r[10]
        d[:, SIGMA] = r[11] + (r[12] - r[11]) * u[:, 10]
        d[:, SOLARIZE] = u[:, 11] < r[13]
    return out


def color_ranges(spec: AugmentSpec) -> np.ndarray:
    """V x 14 float64: the parameter ranges of draw_colors, as sample_color reads them from each view."""
    return np.array([[v.jitter_p, *(x for r in jitter_ranges(v) for x in r), v.gray_p, v.blur_p, *v.blur_sigma,
                      v.solarize_p] for v in spec.views], np.float64)


def color_params(d: np.ndarray) -> ColorParams:
    """One row of draw_colors as the ColorParams that cv_aug.finish_view reads (flip: done by the crop)."""
    d = d.tolist()
    return ColorParams(flip=False, jitter=bool(d[JITTER]), order=tuple(int(k) for k in d[ORDER: ORDER + 4]),
                       brightness=d[BRIGHTNESS], contrast=d[CONTRAST], saturation=d[SATURATION],
                       hue=d[HUE], gray=bool(d[GRAY]), blur=bool(d[BLUR]), sigma=d[SIGMA],
                       solarize=bool(d[SOLARIZE]))


@numba.njit(parallel=True, cache=True, nogil=True)
def normalize_batch(views, tables, out):
    """out[v, i, c] (S x S float32) <- tables[v, c][views[v, i, :, :, c]]: uint8 V x N x S x S x 3 in,
    V x N x 3 x S x S out; tables hold (x - mean) / std per view and channel (cv_aug's lookup)."""
    for i in numba.prange(views.shape[1]):
        for v in range(views.shape[0]):
            for y in range(views.shape[2]):
                for x in range(views.shape[3]):
                    for c in range(3):
                        out[v, i, c, y, x] = tables[v, c, views[v, i, y, x, c]]


def normalize_tables(spec: AugmentSpec) -> np.ndarray:
    """V x 3 x 256 float32: each view's normalisation table (cv_aug.normalize_lut, the OpenCV engine's)."""
    return np.stack([normalize_lut(v).T for v in spec.views])


# ---------------------------------------------------------------------------- FFCV operations
class DecodeOnce(SimpleRGBImageDecoder):
    """Decoder for RGBImageField: each image decoded (or copied, raw mode) whole, once, into a
    per-sample buffer of the dataset's largest H*W*3; the crops are cut from it by the next stage.
    (A subclass of the field's default decoder, which is how FFCV recognises a decoder.)"""

    def declare_state_and_memory(self, previous_state: State):
        pixels = self.metadata["height"].astype(np.int64) * self.metadata["width"].astype(np.int64)
        shape = (int(pixels.max()) * 3,)
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("u1")),
                AllocationQuery(shape, np.dtype("u1")))

    def generate_code(self):
        mem_read = self.memory_read
        # libffcv's C functions called directly: FFCV's Python wrappers get a fresh numba dispatcher
        # each time code is generated, and numba 0.68 then fails on their literal-typed overloads
        # (KeyError while compiling, or "Exception ignored" from the dropped dispatchers' finalisers).
        decode_c, copy_c = ctypes_imdecode, ctypes_memcopy
        loop = Compiler.get_iterator()
        jpg = IMAGE_MODES["jpg"]

        def decode(batch_indices, destination, metadata, storage_state):
            for i in loop(len(batch_indices)):
                field = metadata[batch_indices[i]]
                data = mem_read(field["data_ptr"], storage_state)
                h, w = field["height"], field["width"]
                dst = destination[i]
                if field["mode"] == jpg:  # whole image: crop = full size, scale 1/1, no crop, no flip
                    decode_c(data.ctypes.data, data.size, h, w, dst.ctypes.data,
                             h, w, 0, 0, 1, 1, False, False)
                else:
                    copy_c(data.ctypes.data, dst.ctypes.data, data.size)
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class _ResampleStage(Operation):
    """Python stage after DecodeOnce: builds the per-sample parameters of the batch (`params`), then
    runs `resample_batch` (parallel, GIL released) into a fresh V x N x 3 x S x S array (V x N x S x S
    x 3 with `channels_last`, the layout OpenCV works on), so a yielded batch is never overwritten by a
    later one."""

    def __init__(self, num_views: int, size: int, channels_last: bool = False):
        super().__init__()
        self.num_views, self.size, self.channels_last = num_views, size, channels_last

    def params(self, indices: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def declare_state_and_memory(self, previous_state: State):
        s = self.size
        shape = (self.num_views, s, s, 3) if self.channels_last else (self.num_views, 3, s, s)
        return replace(previous_state, jit_mode=False, shape=shape, dtype=np.dtype("u1")), None

    def generate_code(self):
        def resample(images, _unused, indices):
            heights = self.metadata["height"][indices].astype(np.int64)
            widths = self.metadata["width"][indices].astype(np.int64)
            params = self.params(indices, heights, widths)  # N x V x 9
            s = self.size
            if self.channels_last:  # the kernel writes channel planes: hand it the transposed view
                out = np.empty((self.num_views, len(indices), s, s, 3), np.uint8)
                resample_batch(images, heights, widths, params, out.transpose(0, 1, 4, 2, 3))
            else:
                out = np.empty((self.num_views, len(indices), 3, s, s), np.uint8)
                resample_batch(images, heights, widths, params, out)
            return out

        resample.with_indices = True
        return resample


class CropFlipViews(_ResampleStage):
    """The random resized crop and flip of every view (`draw_crops`, keyed by seed, epoch, index,
    view). `epoch` is read when a batch is made: set it before the epoch's iterator starts."""

    def __init__(self, spec: AugmentSpec, seed: int, channels_last: bool = False):
        sizes = {v.crop_size for v in spec.views}
        if len(sizes) != 1:
            raise ValueError(f"the FFCV loader needs one crop size for all views, got {sorted(sizes)}")
        super().__init__(spec.num_views, sizes.pop(), channels_last)
        self.views = spec.views
        self.seed, self.epoch = seed % 2**64, 0

    def params(self, indices, heights, widths) -> np.ndarray:
        return draw_crops(self.seed, self.epoch, indices, heights, widths, self.views, self.size)


class CentreCrop(_ResampleStage):
    """Evaluation: shorter side resized to `resize` (torchvision's size rule), centre `size` crop."""

    def __init__(self, size: int, resize: int):
        if resize < size:
            raise ValueError(f"data.eval_resize={resize} is smaller than aug.crop_size={size}; set "
                             f"data.eval_resize >= {size} (or leave it unset)")
        super().__init__(1, size)
        self.resize = resize

    def params(self, indices, heights, widths) -> np.ndarray:
        r, s = self.resize, self.size
        short, long_ = np.minimum(heights, widths), np.maximum(heights, widths)
        new_long = (r * long_ / short).astype(np.int64)  # int(), as torchvision
        out_h = np.where(heights <= widths, r, new_long)
        out_w = np.where(heights <= widths, new_long, r)
        p = np.zeros((len(indices), 1, 9), np.int64)
        p[:, 0, HEIGHT], p[:, 0, WIDTH] = heights, widths
        p[:, 0, OUT_H], p[:, 0, OUT_W] = out_h, out_w
        p[:, 0, WIN_Y] = np.round((out_h - s) / 2.0)  # TF.center_crop: int(round((h - s) / 2))
        p[:, 0, WIN_X] = np.round((out_w - s) / 2.0)
        return p


class FinishViews(Operation):
    """The rest of the AugmentSpec on the CPU, in the loader's thread: V x N x S x S x 3 uint8 crops
    (CropFlipViews with channels_last) -> V x N x 3 x S x S float32, jittered, grey, blurred, solarised
    (cv_aug.finish_view: uint8 OpenCV ops and lookup tables, as `aug.engine: opencv`) and normalised.

    The draws (`draw_colors`) are keyed by (seed, epoch, index, view) like the crops; `epoch` is read
    when a batch is made. OpenCV releases the GIL, so `workers` threads split the batch's samples.
    FFCV's numba stages cannot call OpenCV, hence a Python stage: it runs in FFCV's epoch thread,
    `batches_ahead` of the consumer, not in the training loop."""

    def __init__(self, spec: AugmentSpec, seed: int, workers: int = 1):
        super().__init__()
        self.spec, self.seed, self.epoch = spec, seed % 2**64, 0
        self.size = spec.views[0].crop_size
        self.ranges, self.tables = color_ranges(spec), normalize_tables(spec)
        self.workers = max(1, workers)
        self._pool: Optional[ThreadPoolExecutor] = None
        cv2()  # fail now with the install line, not inside the epoch thread

    def declare_state_and_memory(self, previous_state: State):
        shape = (self.spec.num_views, 3, self.size, self.size)
        return replace(previous_state, jit_mode=False, shape=shape, dtype=np.dtype("f4")), None

    def finish(self, views: np.ndarray, draws: np.ndarray, samples: range) -> None:
        """views[v, i] <- finish_view of it with draws[i, v], in place, for the samples i given."""
        for i in samples:
            for v, view in enumerate(self.spec.views):
                x = views[v, i]
                y = finish_view(x, color_params(draws[i, v]), view)
                if y is not x:
                    x[...] = y

    def generate_code(self):
        def finish(views, _unused, indices):  # views: V x N x S x S x 3 uint8, this batch's own array
            draws = draw_colors(self.seed, self.epoch, indices, self.ranges)  # N x V x 13
            n = len(indices)
            if self.workers == 1 or n < 2:
                self.finish(views, draws, range(n))
            else:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="ffcv-finish")
                chunks = np.array_split(np.arange(n), min(self.workers, n))
                list(self._pool.map(lambda c: self.finish(views, draws, range(c[0], c[-1] + 1)), chunks))
            out = np.empty((views.shape[0], n, 3, self.size, self.size), np.float32)
            normalize_batch(views, self.tables, out)
            return out

        finish.with_indices = True
        return finish


class EpochOrder(TraversalOrder):
    """The torch reference's order (EpochBatchSampler), vectorised: this rank's sample positions of
    the epoch's global batches from `start_step` on, mapped through the loader's `indices`.

    FFCV instantiates a custom order by calling it with the loader; calling returns this object."""

    def __init__(self, batches: EpochBatchSampler):
        self.batches = batches  # not `sampler`: TraversalOrder.__init__ sets that to None

    def __call__(self, loader: Loader) -> "EpochOrder":
        super().__init__(loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.indices[self.batches.order(epoch, self.batches.start_step)].astype(np.uint64)


class _EpochThread(EpochIterator):
    """FFCV's epoch thread, except that an exception in it (a bug, an unreadable sample) reaches the
    consumer; FFCV's own thread dies with it and leaves the consumer waiting for a batch forever."""

    error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            super().run()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
            self.error = e
            while not self.terminate_event.is_set():
                try:
                    self.output_queue.put(None, timeout=0.5)
                    return
                except Full:
                    pass

    def stop(self) -> None:
        """End the epoch now. FFCV's close() alone can leave the thread blocked for ever on a full
        queue (its end-of-epoch put has no timeout), so drain the queue until it exits."""
        self.close()
        while self.is_alive():
            try:
                while True:
                    self.output_queue.get_nowait()
            except Empty:
                pass
            self.join(timeout=0.05)

    def __next__(self):
        try:
            return super().__next__()
        except StopIteration:
            if self.error is not None:
                raise RuntimeError(f"the FFCV loader of {self.loader.fname} failed: "
                                   f"{type(self.error).__name__}: {self.error}") from self.error
            raise


class _Loader(Loader):
    """FFCV's Loader with `_EpochThread` (its __iter__, otherwise unchanged)."""

    def __iter__(self) -> _EpochThread:
        Compiler.set_num_threads(self.num_workers)
        order = self.next_traversal_order()[: len(self) * self.batch_size]
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        return _EpochThread(self, order)

# ----------------------------------------------------------------------------------- the file
@contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """FFCV sets torch's intra-op thread count to its worker count; keep the trainer's setting."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _threads(workers: int) -> int:
    """numba threads for `data.workers` (0 still means one: FFCV always decodes in its own thread)."""
    return max(1, min(workers, numba.config.NUMBA_NUM_THREADS))


class BetonFile:
    """A checked `.beton`: its Reader, labels, class names (manifest, else 0..C-1) and the sample
    indices kept by `data.class_fraction` with their labels remapped to 0..k-1, then to the
    super-classes of `data.label_map` when one is given (as `load_samples` does for folders)."""

    def __init__(self, path, key: str, class_fraction: float = 1.0, class_seed: int = 0,
                 label_map: Optional[str] = None):
        self.path = Path(path)
        fix = f"convert the dataset first: fastairl convert <images> {self.path}"
        if not self.path.exists():
            raise DataError(f"{key}: {self.path} does not exist; data.pipeline=ffcv reads a .beton file, "
                            f"{fix}")
        if not self.path.is_file() or self.path.suffix != ".beton":
            raise DataError(f"{key}: {self.path} is not a .beton file; data.pipeline=ffcv reads FFCV files, "
                            f"{fix}")
        try:
            self.reader = Reader(str(self.path))
        except Exception as e:  # noqa: BLE001 - numpy/FFCV raise many types for a damaged header
            raise DataError(f"{key}: {self.path} is not a readable FFCV file ({type(e).__name__}: {e}); "
                            f"{fix}") from None
        fields = {n: type(h) for n, h in self.reader.handlers.items()}
        if fields.get("image") is not RGBImageField or fields.get("label") is not IntField:
            raise DataError(f"{key}: {self.path} has fields {sorted(fields)}, not image (RGBImageField) "
                            f"and label (IntField); {fix}")
        labels = self.reader.metadata[f"f{self.reader.field_names.index('label')}"].astype(np.int64)
        classes = self._class_names(labels, key)
        keep = select_classes(classes, class_fraction, class_seed)
        kept = [classes[i] for i in keep]
        new_labels = list(range(len(keep)))
        if label_map:  # merged labels (Table 6), applied after class_fraction like load_samples
            new_labels, kept = label_map_remap(kept, label_map)
        remap = np.full(len(classes), -1, np.int64)
        remap[keep] = new_labels
        self.indices = np.flatnonzero(remap[labels] >= 0).astype(np.uint64)  # sample ids kept, in order
        self.label_map = torch.from_numpy(remap)  # file label -> training label (-1: not kept)
        self.classes = kept

    def _class_names(self, labels: np.ndarray, key: str) -> list[str]:
        meta = manifest_path(self.path)
        if labels.min(initial=0) < 0:
            raise DataError(f"{key}: {self.path} has negative labels; convert the dataset again")
        num = int(labels.max()) + 1 if len(labels) else 0
        if not meta.is_file():
            return [str(i) for i in range(num)]
        try:
            classes = [str(c) for c in json.loads(meta.read_text())["classes"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{key}: manifest {meta} is unreadable ({type(e).__name__}: {e}); "
                            f"convert the dataset again or delete the manifest") from None
        if len(classes) < num:
            raise DataError(f"{key}: {self.path} has labels up to {num - 1} but its manifest {meta} "
                            f"lists {len(classes)} classes; convert the dataset again")
        return classes


def _labels(batch: torch.Tensor, label_map: torch.Tensor) -> torch.Tensor:
    return label_map[batch.view(-1)]  # N int64, a fresh tensor (FFCV reuses its label buffer)


class FFCVTrainLoader:
    """The seam's train loader over a .beton: yields (views: list of V N x 3 x S x S, labels: N int64)
    on the CPU. With `finish` the views are fully augmented float32 (FinishViews, OpenCV on the CPU);
    without, uint8 crops and `uint8_views = True` (the seam adds the rest of the AugmentSpec on the
    training device).

    Resume is exact mid-epoch: `set_epoch(epoch, start_step)` starts this epoch's order (and the crop
    and colour draws, a function of (seed, epoch, index)) at batch `start_step`, nothing is decoded for
    the skipped batches. `workers` threads decode, crop and finish; `batches_ahead` batches are prepared
    ahead (each slot holds its batch's decoded images, N x largest H*W*3 bytes)."""

    def __init__(self, data: BetonFile, spec: AugmentSpec, global_batch: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, workers: int = 1, batches_ahead: int = 2,
                 finish: bool = False):
        self.data, self.spec = data, spec
        self.classes = data.classes
        self.num_classes = len(self.classes)
        self.batches = EpochBatchSampler(len(data.indices), global_batch, rank, world_size, seed)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.uint8_views = not finish
        self.crop = CropFlipViews(spec, seed, channels_last=finish)
        self.finish = FinishViews(spec, seed, _threads(workers)) if finish else None
        image = [DecodeOnce(), self.crop] + ([self.finish] if finish else [])
        self._running = None  # the FFCV epoch iterator in flight
        with _torch_threads_kept():
            self.loader = _Loader(
                str(data.path), batch_size=self.batches.per_batch, num_workers=_threads(workers),
                order=EpochOrder(self.batches), distributed=world_size > 1, seed=seed,
                indices=data.indices, drop_last=True, batches_ahead=batches_ahead,
                pipelines={"image": image, "label": [IntDecoder(), ToTensor()]})

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.batches.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        self._stop()
        self.crop.epoch = self.loader.next_epoch = self.batches.epoch
        if self.finish is not None:
            self.finish.epoch = self.batches.epoch
        with _torch_threads_kept():
            self._running = iter(self.loader)
        try:
            for views, labels in self._running:  # views: V x N x 3 x S x S, uint8 or finished float32
                yield list(torch.from_numpy(views).unbind(0)), _labels(labels, self.data.label_map)
        finally:  # also when the consumer drops the epoch half way
            self._stop()

    def _stop(self) -> None:
        """End the epoch's thread, so an unfinished one neither races the next for the decoder nor
        lingers, blocked, holding its batch buffers."""
        if self._running is not None:
            self._running.stop()
            self._running = None


class FFCVEvalLoader:
    """Deterministic evaluation over a .beton: shorter side resized to `resize`, centre `crop_size`
    crop, normalised; yields (images N x 3 x S x S float32, labels N int64) in sample order.
    `max_samples` and `rank`/`world_size` select the samples as the torch EvalLoader does."""

    def __init__(self, data: BetonFile, *, crop_size: int, resize: int, batch_size: int = 256,
                 workers: int = 1, max_samples: Optional[int] = None, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, rank: int = 0, world_size: int = 1):
        indices = data.indices[eval_indices(len(data.indices), max_samples, rank, world_size)]
        self.data, self.indices = data, indices
        self.classes = data.classes
        self.num_classes = len(self.classes)
        self.mean = torch.tensor(mean, dtype=torch.float32).mul(255.0).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).mul(255.0).view(1, 3, 1, 1)
        self.batch_size, self.loader = batch_size, None
        if len(indices):  # a process's share of fewer samples than processes may be empty
            with _torch_threads_kept():
                self.loader = _Loader(
                    str(data.path), batch_size=batch_size, num_workers=_threads(workers),
                    order=OrderOption.SEQUENTIAL, indices=indices, drop_last=False, batches_ahead=2,
                    pipelines={"image": [DecodeOnce(), CentreCrop(crop_size, resize)],
                               "label": [IntDecoder(), ToTensor()]})

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        if self.loader is None:
            return
        with _torch_threads_kept():
            batches = iter(self.loader)
        try:
            for images, labels in batches:  # images: 1 x N x 3 x S x S uint8
                x = torch.from_numpy(images[0]).float().sub_(self.mean).div_(self.std)  # Nx3xSxS
                yield x, _labels(labels, self.data.label_map)
        finally:
            batches.stop()


# ------------------------------------------------------------------------- the seam's entry points
def finishes_on_cpu(cfg, device) -> bool:
    """Where the colour ops run: on a CUDA device the on-device module (the seam wraps the uint8
    views); on a CPU the loader's OpenCV stage (FinishViews), measured ~10x faster there than the
    on-device module run on the CPU, unless `aug.on_device: true` asks for the module."""
    return torch.device(device).type == "cpu" and not cfg.aug.on_device


def train_loader(cfg, spec: AugmentSpec, *, rank: int, world_size: int, device) -> FFCVTrainLoader:
    data = BetonFile(cfg.data.train, "data.train", cfg.data.class_fraction, cfg.data.class_seed,
                     cfg.data.label_map)
    return FFCVTrainLoader(data, spec, cfg.train.batch_size, rank, world_size, cfg.train.seed,
                           cfg.data.workers, finish=finishes_on_cpu(cfg, device))


def eval_loader(cfg, path: Optional[str], *, max_samples: Optional[int] = None, batch_size: int = 256,
                pin_memory: bool = False, rank: int = 0, world_size: int = 1) -> FFCVEvalLoader:
    """The seam's eval loader; `pin_memory` is not used: every batch is a fresh CPU tensor."""
    from fastairl.pipelines import eval_resize

    key = "data.val" if path is not None and path == cfg.data.val and path != cfg.data.train else "data.train"
    if path is None:
        raise DataError(f"{key} is not set; point it at a .beton file written by fastairl convert")
    v = spec_from_config(cfg.aug).views[0]
    data = BetonFile(path, key, cfg.data.class_fraction, cfg.data.class_seed, cfg.data.label_map)
    return FFCVEvalLoader(data, crop_size=cfg.aug.crop_size, resize=eval_resize(cfg),
                          batch_size=batch_size, workers=cfg.data.workers, max_samples=max_samples,
                          mean=v.mean, std=v.std, rank=rank, world_size=world_size)
