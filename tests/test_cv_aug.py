"""The fast CPU view maker (aug.engine: opencv) against the PIL reference, op by op and view by view,
on real photos, with the same parameter draws."""
from __future__ import annotations

import math
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from skimage import data as skdata

pytest.importorskip("cv2")

from fastairl.data import cv_aug  # noqa: E402
from fastairl.data.augment import make_spec, sample_rng  # noqa: E402
from fastairl.pipelines.torch_ref import PILViews, TorchTrainLoader  # noqa: E402

PHOTOS = [skdata.astronaut(), skdata.chelsea(), skdata.coffee()]


def _levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


def _pil(x: np.ndarray) -> Image.Image:
    return Image.fromarray(x)


# Stated tolerances, in grey levels: brightness and contrast equal PIL's (float32 blend, truncated);
# saturation differs by 1 level where OpenCV's grey differs from PIL's (rare pixels), with no bias;
# hue goes through OpenCV's HSV, not PIL's (mean < 1 level, rare pixels a few levels); blur is
# OpenCV's fixed-point Gaussian vs torchvision's float one (<= 1 level).
@pytest.mark.parametrize("name,f", [("brightness", 0.6), ("brightness", 1.4), ("brightness", 0.83),
                                    ("contrast", 0.6), ("contrast", 1.4), ("contrast", 0.83),
                                    ("saturation", 0.0), ("saturation", 1.2), ("saturation", 0.83)])
def test_lut_and_blend_ops_match_pil(name, f):
    ours = getattr(cv_aug, name)
    ref = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation}[name]
    for x in PHOTOS:
        got, want = ours(x, f).astype(np.int16), np.asarray(ref(_pil(x), f)).astype(np.int16)
        if name == "saturation":
            assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.01
            assert abs((got - want).mean()) < 0.02  # truncated like PIL: rounding sat ~0.4 levels above
        else:
            assert np.array_equal(got, want)


@pytest.mark.parametrize("shift", [-0.1, -0.03, 0.05, 0.1])
def test_hue_matches_pil(shift):
    for x in PHOTOS:
        d = _levels(cv_aug.hue(x, shift), np.asarray(TF.adjust_hue(_pil(x), shift)))
        assert d.mean() < 1.0 and np.percentile(d, 99) <= 6, (d.mean(), np.percentile(d, 99))


def test_gray_solarize_blur_match_the_reference():
    for x in PHOTOS:
        assert _levels(cv_aug.grayscale(x), np.asarray(TF.rgb_to_grayscale(_pil(x), 3))).max() <= 1
        assert _levels(cv_aug.solarize(x, 128), np.asarray(TF.solarize(_pil(x), 128))).max() == 0
        for sigma in (0.1, 1.0, 2.0):
            ref = TF.gaussian_blur(torch.from_numpy(x).permute(2, 0, 1), [23, 23], [sigma, sigma])
            assert _levels(cv_aug.blur(x, sigma, 23), ref.permute(1, 2, 0).numpy()).max() <= 1


def test_dct_reduction_keeps_every_crop_at_least_output_size():
    assert [cv_aug.dct_reduction(r) for r in (0.5, 1.0, 1.99, 2.0, 3.9, 4.0, 7.9, 8.0, 50.0)] == [1, 1, 1, 2, 2, 4, 4, 8, 8]


@pytest.mark.parametrize("preset", ["crop_flip", "byol_sym"])
def test_views_match_the_pil_reference_draw_for_draw(photo_root, preset):
    """Same (seed, epoch, index) -> same crop boxes, flips and colour draws; pixels differ only by
    resampling and rounding (median view under 1.5 grey levels, every view under 4)."""
    spec = make_spec(preset, crop_size=64)
    ref, fast = PILViews(spec), cv_aug.OpenCVViews(spec)
    paths = sorted(str(p) for p in (photo_root / "train").rglob("*.jpg"))[:24]
    std = torch.tensor(spec.views[0].std).view(3, 1, 1) * 255
    means = []
    for i, path in enumerate(paths):
        a, b = ref(path, sample_rng(0, 0, i)), fast(path, sample_rng(0, 0, i))
        for x, y in zip(a, b):
            assert x.shape == y.shape == (3, 64, 64) and y.dtype == torch.float32
            means.append(((x - y) * std).abs().mean().item())
    assert np.median(means) < 1.5 and max(means) < 4, (np.median(means), max(means))


def test_flip_is_the_reference_flip():
    """An asymmetric image: both engines flip exactly the same draws."""
    spec = make_spec("crop_flip", crop_size=32)
    spec = replace(spec, views=tuple(replace(v, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)) for v in spec.views))
    ramp = np.tile(np.linspace(0, 255, 96, dtype=np.uint8)[None, :, None], (96, 1, 3))  # dark left, bright right
    path = _write_jpeg(ramp)
    ref, fast = PILViews(spec), cv_aug.OpenCVViews(spec)
    flips = []
    for i in range(200):
        a, b = ref(path, sample_rng(1, 0, i)), fast(path, sample_rng(1, 0, i))
        for x, y in zip(a, b):
            fx, fy = bool(x[0, :, 0].mean() > x[0, :, -1].mean()), bool(y[0, :, 0].mean() > y[0, :, -1].mean())
            assert fx == fy
            flips.append(fy)
    assert abs(np.mean(flips) - 0.5) < 5 * math.sqrt(0.25 / len(flips))


_TMP = []


def _write_jpeg(arr: np.ndarray) -> str:
    import tempfile

    d = tempfile.mkdtemp()
    _TMP.append(d)
    path = f"{d}/img.jpg"
    Image.fromarray(arr).save(path, quality=95)
    return path


def test_uint8_mode_stops_after_flip(photo_root):
    spec = make_spec("byol_sym", crop_size=32)
    path = str(next((photo_root / "train").rglob("*.jpg")))
    u8 = cv_aug.OpenCVViews(spec, finish=False)(path, sample_rng(0, 0, 0))
    assert all(v.dtype == torch.uint8 and v.shape == (3, 32, 32) and v.is_contiguous() for v in u8)


@pytest.mark.parametrize("content", [b"", b"hello, not a jpeg"])
def test_bad_files_fail_with_the_path(tmp_path, content):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(content)
    with pytest.raises(RuntimeError) as e:
        cv_aug.OpenCVViews(make_spec(crop_size=32))(str(bad), sample_rng(0, 0, 0))
    msg = str(e.value)
    assert str(bad) in msg and "remove or replace" in msg and "\n" not in msg


def test_truncated_jpeg_is_an_error_not_grey_pixels(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(PHOTOS[0]).save(good, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="cut.jpg"):
        cv_aug.OpenCVViews(make_spec(crop_size=32))(str(cut), sample_rng(0, 0, 0))


def test_torch_loader_uses_the_engine(photo_root):
    from fastairl.data.datasets import scan_folder

    samples, classes = scan_folder(photo_root / "train")
    loader = TorchTrainLoader(samples, classes, make_spec("byol_sym", crop_size=32), 8, engine="opencv")
    loader.set_epoch(0)
    views, labels = next(iter(loader))
    assert isinstance(loader.dataset.make_views, cv_aug.OpenCVViews)
    assert [v.shape for v in views] == [(8, 3, 32, 32)] * 2 and labels.shape == (8,)


def test_missing_opencv_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    monkeypatch.setattr(cv_aug, "_cv2", None)
    from fastairl.extras import MissingExtra

    with pytest.raises(MissingExtra, match=r"OpenCV is not installed: pip install 'fastairl\[opencv\]'"):
        cv_aug.OpenCVViews(make_spec(crop_size=32))
