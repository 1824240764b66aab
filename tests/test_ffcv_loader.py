"""The FFCV backend (`data.pipeline: ffcv`) against the AugmentSpec and the torch reference, on real photos.

Test files are written with FFCV's DatasetWriter in the converter's layout (fields `image`, `label`, the
class names in `<file>.json`). `raw` files hold exactly the pixels PIL decodes from the source JPEGs,
so views and eval images can be compared with the torch reference to within one uint8 level (the
resampler is PIL's bilinear in float32 instead of PIL's 22-bit fixed point); `jpg` files are
re-encoded at quality 90 and decoded by FFCV's libjpeg-turbo call, which adds a few levels.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

pytest.importorskip("ffcv")

from fastairl.config import Config  # noqa: E402
from fastairl.data.augment import AugmentSpec, ViewSpec, make_spec, sample_color, sample_crop  # noqa: E402
from fastairl.data.cv_aug import finish_view  # noqa: E402
from fastairl.data.device_aug import DeviceAugLoader  # noqa: E402
from fastairl.data.datasets import DataError, load_samples, scan_folder  # noqa: E402
from fastairl.pipelines import build_eval_loader, build_train_loader  # noqa: E402
from fastairl.pipelines import ffcv_loader as F  # noqa: E402
from fastairl.pipelines.convert import manifest_path  # noqa: E402
from fastairl.pipelines.torch_ref import EpochBatchSampler, EvalLoader  # noqa: E402
from tiny_runs import deadline, losses, one_line_error, run, small_folder, train_cmd, write_recipe  # noqa: E402

S = 32  # small crops keep the tests fast; the boxes (>= 8 % of ~500x375) are still shrunk 4-15x
GLOBAL_BATCH = 12  # 40 photos -> 3 steps, 4 samples dropped
SPEC = make_spec("byol_sym", crop_size=S)


# ------------------------------------------------------------------------------------- helpers
def write_beton(samples, classes, out: Path, mode: str) -> Path:
    """The converter's layout, written directly: `image` RGBImageField, `label` IntField, manifest."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Photos:
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            return np.asarray(_rgb(samples[i][0])), samples[i][1]

    DatasetWriter(str(out), {"image": RGBImageField(write_mode=mode, jpeg_quality=90),
                             "label": IntField()}, num_workers=1).from_indexed_dataset(Photos())
    manifest_path(out).write_text(json.dumps({"classes": classes}))
    return out


def _rgb(path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def _reference_view(img: Image.Image, p: np.ndarray) -> torch.Tensor:
    """The torch reference's crop + flip for the box and flip in p (one row of draw_crops)."""
    out = TF.resized_crop(img, int(p[F.TOP]), int(p[F.LEFT]), int(p[F.HEIGHT]), int(p[F.WIDTH]), [S, S],
                          InterpolationMode.BILINEAR, antialias=True)
    return TF.pil_to_tensor(TF.hflip(out) if p[F.FLIP] else out)  # 3xSxS uint8


def _epoch(loader) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    return [(views, labels) for views, labels in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(va, vb))
        for (va, la), (vb, lb) in zip(a, b))


def _cfg(train, **data) -> Config:
    cfg = Config()
    cfg.aug.crop_size = S
    cfg.train.batch_size = GLOBAL_BATCH
    cfg.data.pipeline, cfg.data.train, cfg.data.workers = "ffcv", str(train), 1
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def photos(photo_root):
    return scan_folder(photo_root / "train")


@pytest.fixture(scope="module")
def raw_beton(photos, tmp_path_factory):
    samples, classes = photos
    return write_beton(samples, classes, tmp_path_factory.mktemp("ffcv") / "photos_raw.beton", "raw")


@pytest.fixture(scope="module")
def jpg_beton(photos, tmp_path_factory):
    samples, classes = photos
    return write_beton(samples, classes, tmp_path_factory.mktemp("ffcv") / "photos_jpg.beton", "jpg")


@pytest.fixture(scope="module")
def loader(raw_beton):
    """One process, seed 3: shared by the order, resume and reproducibility tests (set_epoch first)."""
    return F.FFCVTrainLoader(F.BetonFile(raw_beton, "data.train"), SPEC, GLOBAL_BATCH, seed=3, workers=2)


@pytest.fixture(scope="module")
def finishing(raw_beton):
    """The same loader with the CPU colour stage (FinishViews), 2 threads: fully augmented views."""
    return F.FFCVTrainLoader(F.BetonFile(raw_beton, "data.train"), SPEC, GLOBAL_BATCH, seed=3, workers=2,
                             finish=True)


def _binomial_ok(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


# ------------------------------------------------------------------------- the numba pieces alone
def test_resampler_matches_torchvision_resized_crop(photos):
    """Random boxes from 3 px to the whole image (up- and down-scaling), flipped or not, and a resize
    window (the eval path): within one uint8 level of PIL via torchvision."""
    rng = np.random.default_rng(0)
    for path, _ in photos[0][:6]:
        img = _rgb(path)
        a = np.asarray(img)
        h_img, w_img = a.shape[:2]
        rows = []
        for _ in range(8):
            h, w = int(rng.integers(3, h_img + 1)), int(rng.integers(3, w_img + 1))
            top, left = int(rng.integers(0, h_img - h + 1)), int(rng.integers(0, w_img - w + 1))
            rows.append([top, left, h, w, S, S, 0, 0, int(rng.integers(0, 2))])
        params = np.array(rows, np.int64)[:, None]  # 8 x 1 x 9
        images = np.repeat(a.reshape(1, -1), len(rows), axis=0)
        out = np.zeros((1, len(rows), 3, S, S), np.uint8)
        F.resample_batch(images, np.full(len(rows), h_img), np.full(len(rows), w_img), params, out)
        for k, p in enumerate(params[:, 0]):
            diff = (torch.from_numpy(out[0, k]).int() - _reference_view(img, p).int()).abs()
            assert diff.max() <= 1, (p, diff.max())


def test_crop_distribution_matches_sample_crop():
    """draw_crops (counter-based) against the torch reference's sampler: area fraction, log aspect
    and position by two-sample KS tests, and the central-crop fallback rate on an extreme shape."""
    from scipy.stats import ks_2samp

    v = SPEC.views[0]
    n = 3000
    for h, w in ((375, 500), (500, 333), (24, 400)):
        ours = F.draw_crops(0, 0, np.arange(n, dtype=np.uint64), np.full(n, h), np.full(n, w), SPEC.views, S)[:, 0]
        rng = np.random.default_rng(1)
        ref = np.array([sample_crop(rng, h, w, v.crop_scale, v.crop_ratio) for _ in range(n)])
        stats = lambda b: (b[:, 2] * b[:, 3] / (h * w), np.log(b[:, 3] / b[:, 2]),  # noqa: E731
                           (b[:, 0] + b[:, 2] / 2) / h, (b[:, 1] + b[:, 3] / 2) / w)
        for name, x, y in zip(("area", "log aspect", "centre y", "centre x"), stats(ours[:, :4]), stats(ref)):
            assert ks_2samp(x, y, method="asymp").pvalue > 1e-3, (h, w, name)
        assert (ours[:, F.HEIGHT] <= h).all() and (ours[:, F.WIDTH] <= w).all() and (ours[:, :4] >= 0).all()
        assert (ours[:, F.TOP] + ours[:, F.HEIGHT] <= h).all()
        assert (ours[:, F.LEFT] + ours[:, F.WIDTH] <= w).all()
        fallback = lambda b: np.mean(b[:, 2] * b[:, 3] == min(h, w / v.crop_ratio[1]) * w)  # noqa: E731
        if (h, w) == (24, 400):  # too wide for the ratio range: most draws fail ten times
            assert abs(fallback(ours[:, :4]) - fallback(ref)) < 0.05


def test_flip_rate_and_draws_are_keyed_by_seed_epoch_index():
    views = (SPEC.views[0], replace(SPEC.views[0], flip_p=0.2))
    idx = np.arange(4000, dtype=np.uint64)
    p = F.draw_crops(5, 2, idx, np.full(4000, 375), np.full(4000, 500), views, S)
    for v, rate in ((0, 0.5), (1, 0.2)):
        assert abs(p[:, v, F.FLIP].mean() - rate) < 4 * math.sqrt(rate * (1 - rate) / 4000)
    assert not np.array_equal(p[:, 0, :4], p[:, 1, :4])  # the views draw independently
    again = F.draw_crops(5, 2, idx[::-1].copy(), np.full(4000, 375), np.full(4000, 500), views, S)
    assert np.array_equal(again[::-1], p)  # a function of the index, not of the batch position
    for other in ((6, 2), (5, 3)):
        q = F.draw_crops(*other, idx, np.full(4000, 375), np.full(4000, 500), views, S)
        assert (q[:, 0, :4] != p[:, 0, :4]).any(axis=1).mean() > 0.99


def test_color_draws_follow_sample_color():
    """draw_colors (counter-based) against the torch reference's sampler: coin rates, the factor
    and sigma distributions (KS), every jitter order equally likely; keyed by (seed, epoch, index)."""
    from scipy.stats import ks_2samp

    n = 20000
    for v in (SPEC.views[0], make_spec("mocov2").views[0]):
        d = F.draw_colors(0, 0, np.arange(n, dtype=np.uint64), F.color_ranges(AugmentSpec(views=(v,))))[:, 0]
        rng = np.random.default_rng(1)
        ref = [sample_color(rng, v) for _ in range(n)]
        for col, name in ((F.BRIGHTNESS, "brightness"), (F.CONTRAST, "contrast"), (F.SATURATION, "saturation"),
                          (F.HUE, "hue"), (F.SIGMA, "sigma")):
            assert ks_2samp(d[:, col], [getattr(c, name) for c in ref], method="asymp").pvalue > 1e-3, name
        for col, rate in ((F.JITTER, v.jitter_p), (F.GRAY, v.gray_p), (F.BLUR, v.blur_p), (F.SOLARIZE, v.solarize_p)):
            assert _binomial_ok(int(d[:, col].sum()), n, rate), (col, d[:, col].mean(), rate)
        orders = {tuple(o) for o in d[:, F.ORDER: F.ORDER + 4].astype(int)}
        assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and len(orders) == 24
        counts = np.unique(d[:, F.ORDER: F.ORDER + 4], axis=0, return_counts=True)[1]
        assert _binomial_ok(int(counts.min()), n, 1 / 24) and _binomial_ok(int(counts.max()), n, 1 / 24)
    idx = np.arange(4000, dtype=np.uint64)
    ranges = F.color_ranges(SPEC)
    d = F.draw_colors(5, 2, idx, ranges)
    assert np.array_equal(F.draw_colors(5, 2, idx[::-1].copy(), ranges)[::-1], d)  # a function of the index
    assert not np.array_equal(d[:, 0], d[:, 1])  # the views draw independently
    factors = slice(F.BRIGHTNESS, F.HUE + 1)
    for other in ((6, 2), (5, 3)):
        assert (F.draw_colors(*other, idx, ranges)[:, :, factors] != d[:, :, factors]).all()
    crops = F.draw_crops(5, 2, idx, np.full(4000, 375), np.full(4000, 500), SPEC.views, S)
    both = crops[:, 0, F.FLIP] + 2 * d[:, 0, F.GRAY]  # the colour stream is not the crop stream
    assert _binomial_ok(int((both == 3).sum()), 4000, SPEC.views[0].flip_p * SPEC.views[0].gray_p)


@pytest.mark.parametrize("what", ["gray", "solarize", "jitter"])
def test_color_stage_rates_measured_from_pixels(photos, what):
    """The CPU colour stage alone (FFCV's FinishViews) on 1,200 real-photo crops, one op with its
    probability: whether it fired is read from the output pixels."""
    ps = {"gray": 0.2, "solarize": 0.2, "jitter": 0.8}
    v = ViewSpec(crop_size=16, flip_p=0, jitter_p=0, gray_p=0, blur_p=0, solarize_p=0)
    v = replace(v, **{f"{what}_p": ps[what]})
    rng = np.random.default_rng(0)
    images = [np.asarray(_rgb(path)) for path, _ in photos[0]]
    crops = []
    while len(crops) < 1200:
        a = images[len(crops) % len(images)]
        y, x = int(rng.integers(0, a.shape[0] - 16)), int(rng.integers(0, a.shape[1] - 16))
        c = a[y: y + 16, x: x + 16]
        if (c.max() >= 128 or what != "solarize") and not (c[..., 0] == c[..., 1]).all():
            crops.append(c)  # solarising a crop with no pixel >= 128 would change nothing
    views = np.stack(crops)[None].copy()  # 1 x N x 16 x 16 x 3 uint8
    stage = F.FinishViews(AugmentSpec(views=(v,)), seed=7, workers=2)
    out = stage.generate_code()(views.copy(), None, np.arange(len(crops), dtype=np.uint64))[0]  # Nx3x16x16
    mean, std = np.array(v.mean)[:, None, None] * 255, np.array(v.std)[:, None, None] * 255
    plain = ((views[0].transpose(0, 3, 1, 2) - mean) / std).astype(np.float32)
    if what == "gray":
        fired = (np.abs(out * std + mean - (out * std + mean)[:, :1]).max(axis=(1, 2, 3)) < 1e-3)
    else:
        fired = np.abs(out - plain).max(axis=(1, 2, 3)) > 1e-4
    assert _binomial_ok(int(fired.sum()), len(crops), ps[what]), (what, int(fired.sum()), len(crops) * ps[what])


# ------------------------------------------------------------------------------- the train loader
def test_views_are_torchvision_crops_of_one_image_in_the_torch_order(loader, photos):
    """Every view is the torch reference's crop+flip of its own sample (same order as
    EpochBatchSampler), both views cut from the same decode, with different boxes."""
    samples, classes = photos
    assert loader.uint8_views and loader.classes == classes and loader.num_classes == 10
    assert loader.steps_per_epoch == len(samples) // GLOBAL_BATCH == len(loader) == 3
    loader.set_epoch(1)
    batches = _epoch(loader)
    sampler = EpochBatchSampler(len(samples), GLOBAL_BATCH, seed=3)
    sampler.set_epoch(1)
    assert len(batches) == 3
    for (views, labels), keys in zip(batches, sampler):
        index = np.array([i for _, i in keys], np.uint64)
        assert len(views) == 2 and labels.dtype == torch.int64
        assert labels.tolist() == [samples[i][1] for i in index]
        heights = np.array([_rgb(samples[i][0]).height for i in index])
        widths = np.array([_rgb(samples[i][0]).width for i in index])
        params = F.draw_crops(3, 1, index, heights, widths, SPEC.views, S)
        for k, x in enumerate(views):
            assert x.shape == (GLOBAL_BATCH, 3, S, S) and x.dtype == torch.uint8 and x.is_contiguous()
            for j, i in enumerate(index):
                ref = _reference_view(_rgb(samples[i][0]), params[j, k])
                assert (x[j].int() - ref.int()).abs().max() <= 1
        assert (params[:, 0, :4] != params[:, 1, :4]).any(axis=1).all()
        assert not torch.equal(views[0], views[1])


def test_color_stage_is_finish_view_of_each_crop(loader, finishing, photos):
    """The finishing loader's views are, sample by sample and bit for bit, cv_aug.finish_view (the
    OpenCV engine's colour ops) of the uint8 loader's crops with that sample's draw_colors, then the
    OpenCV engine's normalisation lookup."""
    samples, _ = photos
    assert finishing.uint8_views is False and loader.uint8_views is True
    loader.set_epoch(1)
    finishing.set_epoch(1)
    sampler = EpochBatchSampler(len(samples), GLOBAL_BATCH, seed=3)
    sampler.set_epoch(1)
    tables = F.normalize_tables(SPEC)
    fired = np.zeros(4)
    for (crops, labels), (views, flabels), keys in zip(loader, finishing, sampler):
        assert torch.equal(labels, flabels)
        index = np.array([i for _, i in keys], np.uint64)
        draws = F.draw_colors(3, 1, index, F.color_ranges(SPEC))
        fired += draws[:, :, [F.JITTER, F.GRAY, F.BLUR, F.SOLARIZE]].sum(axis=(0, 1))
        for k, (x, v) in enumerate(zip(views, SPEC.views)):
            assert x.shape == (GLOBAL_BATCH, 3, S, S) and x.dtype == torch.float32 and x.is_contiguous()
            for j in range(GLOBAL_BATCH):
                hwc = np.ascontiguousarray(crops[k][j].permute(1, 2, 0).numpy())
                y = finish_view(hwc, F.color_params(draws[j, k]), v)
                want = np.stack([tables[k, c][y[..., c]] for c in range(3)])  # 3xSxS
                assert np.array_equal(x[j].numpy(), want), (k, j, draws[j, k])
    assert (fired > 0).all()  # every op ran on some sample


def test_jpg_file_decodes_close_to_pil(jpg_beton, photos):
    """A JPEG-mode file (re-encoded at q90, decoded by FFCV's libjpeg-turbo): a few levels from the
    reference on average, the same images."""
    samples, _ = photos
    ffcv = F.FFCVTrainLoader(F.BetonFile(jpg_beton, "data.train"), SPEC, GLOBAL_BATCH, seed=3, workers=1)
    views, labels = next(iter(ffcv))
    index = np.array([i for _, i in next(iter(EpochBatchSampler(len(samples), GLOBAL_BATCH, seed=3)))],
                     np.uint64)
    sizes = [_rgb(samples[i][0]).size for i in index]
    params = F.draw_crops(3, 0, index, np.array([h for _, h in sizes]), np.array([w for w, _ in sizes]),
                          SPEC.views, S)
    ref = torch.stack([_reference_view(_rgb(samples[i][0]), params[j, 0]) for j, i in enumerate(index)])
    diff = (views[0].float() - ref.float()).abs()
    assert diff.mean() < 2.0 and diff.amax(dim=(1, 2, 3)).max() < 40, (diff.mean(), diff.max())


def test_two_ranks_split_every_global_batch(loader, raw_beton):
    """Rank r yields the r-th half of every single-process batch, bit for bit: disjoint samples,
    equal step counts, the same crops whatever the process layout."""
    loader.set_epoch(2)
    whole = _epoch(loader)
    data = F.BetonFile(raw_beton, "data.train")
    halves = []
    for rank in (0, 1):
        part = F.FFCVTrainLoader(data, SPEC, GLOBAL_BATCH, rank=rank, world_size=2, seed=3, workers=1)
        part.set_epoch(2)
        halves.append(_epoch(part))
        assert part.steps_per_epoch == loader.steps_per_epoch == len(halves[-1])
    h = GLOBAL_BATCH // 2
    for s, (views, labels) in enumerate(whole):
        for rank, part in enumerate(halves):
            pv, pl = part[s]
            assert torch.equal(pl, labels[rank * h: (rank + 1) * h])
            assert all(torch.equal(a, b[rank * h: (rank + 1) * h]) for a, b in zip(pv, views))


def test_same_seed_reproduces_and_resume_continues_mid_epoch(loader, raw_beton):
    loader.set_epoch(4)
    first = _epoch(loader)
    loader.set_epoch(4)
    assert _same(_epoch(loader), first)
    loader.set_epoch(4, start_step=2)
    assert len(loader) == 1
    assert _same(_epoch(loader), first[2:])
    loader.set_epoch(5)
    other_epoch = _epoch(loader)
    assert not torch.equal(other_epoch[0][0][0], first[0][0][0])
    fresh = F.FFCVTrainLoader(F.BetonFile(raw_beton, "data.train"), SPEC, GLOBAL_BATCH, seed=3, workers=1)
    fresh.set_epoch(4, start_step=1)
    assert _same(_epoch(fresh), first[1:])  # a new process resumes exactly
    with pytest.raises(ValueError, match="outside the epoch"):
        loader.set_epoch(0, start_step=4)


def test_color_stage_resumes_mid_epoch_and_ignores_threads_and_ranks(finishing, raw_beton):
    """Finished views are a function of (seed, epoch, index): a resumed epoch, a fresh process with
    another thread count and rank 1 of 2 all reproduce the uninterrupted single-process batches."""
    finishing.set_epoch(4)
    first = _epoch(finishing)
    finishing.set_epoch(4, start_step=1)
    assert _same(_epoch(finishing), first[1:])
    data = F.BetonFile(raw_beton, "data.train")
    fresh = F.FFCVTrainLoader(data, SPEC, GLOBAL_BATCH, seed=3, workers=1, finish=True)
    fresh.set_epoch(4, start_step=2)
    assert _same(_epoch(fresh), first[2:])
    half = F.FFCVTrainLoader(data, SPEC, GLOBAL_BATCH, rank=1, world_size=2, seed=3, workers=1, finish=True)
    half.set_epoch(4)
    h = GLOBAL_BATCH // 2
    assert _same(_epoch(half), [([v[h:] for v in views], y[h:]) for views, y in first])
    finishing.set_epoch(5)
    assert not torch.equal(_epoch(finishing)[0][0][0], first[0][0][0])


def test_an_error_in_the_loader_thread_reaches_the_consumer(loader, monkeypatch):
    def broken(*_):
        raise ValueError("boom")

    monkeypatch.setattr(F, "draw_crops", broken)
    loader.set_epoch(0)
    with deadline(120, "no batch"), pytest.raises(RuntimeError, match="FFCV loader of .* failed: ValueError: boom"):
        _epoch(loader)


def test_abandoned_epoch_does_not_leak_into_the_next(loader):
    loader.set_epoch(6)
    whole = _epoch(loader)
    loader.set_epoch(6)
    next(iter(loader))  # the consumer walks away after one batch
    loader.set_epoch(6)
    assert _same(_epoch(loader), whole)


# ------------------------------------------------------------------------------- the eval loader
def test_eval_matches_torch_reference(raw_beton, jpg_beton, photo_root, photos):
    """Centre crop after resizing the shorter side: within one uint8 level of torch_ref.EvalLoader on
    the raw file (x 1/(255·std) after normalising), a few levels on the JPEG file; same order."""
    cfg = _cfg(raw_beton, val=str(raw_beton), eval_resize=37)
    ffcv = build_eval_loader(cfg, cfg.data.val, max_samples=25, batch_size=8)
    samples, classes = photos
    ref = EvalLoader(samples, classes, crop_size=S, resize=37, batch_size=8, max_samples=25)
    assert ffcv.classes == classes and len(ffcv) == len(ref) == 4
    got, want = list(ffcv), list(ref)
    std = torch.tensor(SPEC.views[0].std).view(1, 3, 1, 1) * 255
    for (x, y), (rx, ry) in zip(got, want):
        assert x.dtype == torch.float32 and x.shape == rx.shape and torch.equal(y, ry)
        assert ((x - rx) * std).abs().max() <= 1.0 + 1e-3
    jpg = F.FFCVEvalLoader(F.BetonFile(jpg_beton, "data.val"), crop_size=S, resize=37, batch_size=40)
    (x, _), = list(jpg)
    (rx, _), = list(EvalLoader(samples, classes, crop_size=S, resize=37, batch_size=40))
    assert ((x - rx) * std).abs().mean() < 2.0


def test_class_fraction_picks_the_torch_backends_classes(raw_beton, photo_root):
    cfg = _cfg(raw_beton, class_fraction=0.5, class_seed=1)
    want_samples, want_classes = load_samples(cfg.data, str(photo_root / "train"))
    ours = F.eval_loader(cfg, str(raw_beton), batch_size=100)
    assert ours.classes == want_classes and len(ours.indices) == len(want_samples)
    (_, labels), = list(ours)
    assert labels.tolist() == [label for _, label in want_samples]


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_label_map_merges_labels_like_the_torch_reference(raw_beton, photo_root, tmp_path, fraction):
    """data.label_map (after data.class_fraction): the train and eval loaders yield the super-class
    labels and names that the torch reference yields on the folder of the same photos, batch for batch."""
    _, classes = scan_folder(photo_root / "train")
    groups = {"space": ("astronaut", "rocket", "hubble"), "micro": ("immunohistochemistry", "retina")}
    sup = {c: next((g for g, names in groups.items() if c.split("_", 1)[1].startswith(names)), "scene")
           for c in classes}
    lm = tmp_path / "supers.tsv"
    lm.write_text("# photo classes -> 3 super-classes\n" + "".join(f"{c}\t{s}\n" for c, s in sup.items()))
    spec = make_spec("crop_flip", crop_size=S)
    data = dict(label_map=str(lm), class_fraction=fraction, class_seed=1)
    ffcv_cfg = _cfg(raw_beton, val=str(raw_beton), **data)
    torch_cfg = _cfg(photo_root / "train", val=str(photo_root / "train"), **data)
    torch_cfg.data.pipeline, torch_cfg.data.workers = "torch", 0
    want_classes = sorted({sup[c] for c in load_samples(replace(torch_cfg.data, label_map=None),
                                                         torch_cfg.data.train)[1]})
    loaders = [build_train_loader(c, spec, rank=0, world_size=1, device="cpu") for c in (ffcv_cfg, torch_cfg)]
    for loader in loaders:
        assert loader.classes == want_classes and loader.num_classes == len(want_classes)
        loader.set_epoch(1)
    ffcv_labels, torch_labels = ([y.tolist() for _, y in loader] for loader in loaders)
    assert ffcv_labels == torch_labels and len(ffcv_labels) == loaders[1].steps_per_epoch > 0
    assert len({y for batch in ffcv_labels for y in batch}) > 1  # merged, not collapsed to one class
    evals = [build_eval_loader(c, c.data.val, batch_size=7) for c in (ffcv_cfg, torch_cfg)]
    assert evals[0].classes == evals[1].classes == want_classes
    assert [y.tolist() for _, y in evals[0]] == [y.tolist() for _, y in evals[1]]


def test_label_map_without_every_class_says_what_to_add(raw_beton, tmp_path):
    part = tmp_path / "part.tsv"
    part.write_text("000_astronaut\tspace\n")
    with pytest.raises(DataError, match=r"^data.label_map: .*part.tsv has no line for 9 of the 10 classes"):
        F.train_loader(_cfg(raw_beton, label_map=str(part)), SPEC, rank=0, world_size=1, device="cpu")


def test_class_names_fall_back_to_numbers_without_a_manifest(raw_beton, tmp_path):
    bare = tmp_path / "bare.beton"
    bare.symlink_to(raw_beton)
    assert F.BetonFile(bare, "data.train").classes == [str(i) for i in range(10)]


# ------------------------------------------------------------------------------ the seam and errors
def test_seam_finishes_on_the_cpu_and_leaves_cuda_to_the_device_module(raw_beton):
    """On a CPU device the loader's OpenCV stage finishes the views (measured faster there); with
    aug.on_device or on a CUDA device the seam wraps the uint8 views in the on-device module."""
    cfg = _cfg(raw_beton)
    assert F.finishes_on_cpu(cfg, "cpu") and not F.finishes_on_cpu(cfg, torch.device("cuda", 0))
    plain = build_train_loader(cfg, SPEC, rank=0, world_size=1, device="cpu")
    cfg.aug.on_device = True
    assert not F.finishes_on_cpu(cfg, "cpu")
    wrapped = build_train_loader(cfg, SPEC, rank=0, world_size=1, device="cpu")
    assert isinstance(plain, F.FFCVTrainLoader) and plain.finish is not None and not plain.uint8_views
    assert isinstance(wrapped, DeviceAugLoader) and isinstance(wrapped.loader, F.FFCVTrainLoader)
    assert wrapped.loader.uint8_views and wrapped.loader.finish is None
    for loader in (plain, wrapped):
        assert loader.steps_per_epoch == 3
        loader.set_epoch(0)
        views, labels = next(iter(loader))
        assert [tuple(v.shape) for v in views] == [(GLOBAL_BATCH, 3, S, S)] * 2
        assert all(v.dtype == torch.float32 for v in views) and labels.shape == (GLOBAL_BATCH,)


def test_both_colour_paths_agree_without_colour_ops(raw_beton):
    """crop_flip (no colour op): the CPU stage and the on-device module see the same crops and
    normalise them alike (same layout, channel order and statistics), up to float rounding."""
    spec = make_spec("crop_flip", crop_size=S)
    cfg = _cfg(raw_beton)
    cfg.aug.preset = "crop_flip"
    cpu = build_train_loader(cfg, spec, rank=0, world_size=1, device="cpu")
    cfg.aug.on_device = True
    dev = build_train_loader(cfg, spec, rank=0, world_size=1, device="cpu")
    for loader in (cpu, dev):
        loader.set_epoch(2)
    for (a, ya), (b, yb) in zip(cpu, dev):
        assert torch.equal(ya, yb)
        assert all((x - y).abs().max() < 1e-5 for x, y in zip(a, b))


def test_bad_paths_say_to_convert(tmp_path, photo_root, raw_beton):
    garbage = tmp_path / "garbage.beton"
    garbage.write_bytes(b"\x00\x01" * 10)
    cases = {tmp_path / "missing.beton": "does not exist", photo_root / "train": "is not a .beton file",
             garbage: "is not a readable FFCV file"}
    for path, what in cases.items():
        with pytest.raises(DataError) as e:
            build_train_loader(_cfg(path), SPEC, rank=0, world_size=1, device="cpu")
        msg = str(e.value)
        assert "\n" not in msg and what in msg and str(path) in msg and "fastairl convert" in msg
        assert msg.startswith("data.train: ")
    with pytest.raises(DataError, match="data.val: .*does not exist"):
        build_eval_loader(_cfg(raw_beton, val=str(tmp_path / "v.beton")), str(tmp_path / "v.beton"))


def test_wrong_fields_and_sizes_are_rejected(tmp_path, photos):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    samples, _ = photos

    class Two:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return np.asarray(_rgb(samples[i][0])), samples[i][1]

    other = tmp_path / "other.beton"
    fields = {"img": RGBImageField(), "y": IntField()}
    DatasetWriter(str(other), fields, num_workers=1).from_indexed_dataset(Two())
    with pytest.raises(DataError, match="has fields .*'img'.*not image .* fastairl convert"):
        F.BetonFile(other, "data.train")
    with pytest.raises(ValueError, match="one crop size for all views"):
        F.CropFlipViews(AugmentSpec(views=(SPEC.views[0], replace(SPEC.views[0], crop_size=48))), 0)
    with pytest.raises(ValueError, match="data.eval_resize=20 is smaller than aug.crop_size=32"):
        F.CentreCrop(S, 20)


# ----------------------------------------------------------------------------- the trainer, end to end
@pytest.mark.slow
def test_trainer_runs_on_a_converted_file_through_the_cli(photo_root, tmp_path):
    """`fastairl convert` a small photo folder, then train two epochs with data.pipeline=ffcv and the
    kNN monitor reading the same file through the FFCV eval loader."""
    folder = small_folder(photo_root / "train", tmp_path / "train", per_class=2)
    beton = tmp_path / "train.beton"
    conv = run(["fastairl", "convert", folder, beton, "--workers", "1"], cwd=tmp_path)
    assert conv.returncode == 0, conv.stderr[-2000:]
    recipe = write_recipe(tmp_path / "r.yaml", beton, data={"pipeline": "ffcv", "val": str(beton)},
                          train={"batch_size": 8, "epochs": 2}, probe={"knn_every_epochs": 2, "knn_k": 3})
    proc = run(train_cmd(recipe, f"train.out_dir={tmp_path / 'runs'}"), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    assert sorted(losses(run_dir)) == [1, 2, 3, 4] and all(map(math.isfinite, losses(run_dir).values()))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("knn_top1" in r for r in rows)
    bad = run(train_cmd(recipe, f"train.out_dir={tmp_path / 'runs2'}", f"data.train={folder}"), cwd=tmp_path)
    one_line_error(bad, "data.train", "is not a .beton file", "fastairl convert")
