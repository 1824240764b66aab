"""The torch reference loader against the AugmentSpec, on real images."""
from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from fastairl.config import Config
from fastairl.data.augment import (IMAGENET_MEAN, IMAGENET_STD, ABLATION_ORDER, ViewSpec, make_spec,
                                   sample_crop, sample_rng)
from fastairl.data.datasets import scan_folder
from fastairl.pipelines import MissingExtra, build_eval_loader, build_train_loader, eval_resize
from tiny_runs import one_torch_thread
from fastairl.pipelines.torch_ref import (DualViewDataset, EpochBatchSampler, EvalLoader, SyntheticLoader,
                                          TorchTrainLoader, augment_view)

S = 32  # small crops keep the statistics tests fast
ONLY_CROP = ViewSpec(crop_size=S, flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def _uint8(x: torch.Tensor, v: ViewSpec = ONLY_CROP) -> torch.Tensor:
    """Undo the normalisation: 3xHxW float -> the uint8 pixel values (exact, the ops are on uint8)."""
    m = torch.tensor(v.mean).view(3, 1, 1) * 255
    s = torch.tensor(v.std).view(3, 1, 1) * 255
    return (x * s + m).round().clamp(0, 255).to(torch.uint8)


def _rgb(path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


_one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


@pytest.fixture(scope="module")
def photo(photo_root):
    """A real colour photo (the astronaut class), ~500x375."""
    path = sorted((photo_root / "train" / "000_astronaut").glob("*.jpg"))[0]
    return _rgb(path)


@pytest.fixture(scope="module")
def photo_samples(photo_root):
    return scan_folder(photo_root / "train")


# ------------------------------------------------------------------------------------------ presets
def test_byol_sym_matches_table5():
    spec = make_spec("byol_sym")
    assert spec.num_views == 2 and spec.views[0] == spec.views[1]
    v = spec.views[0]
    assert (v.crop_size, v.crop_scale) == (224, (0.08, 1.0))
    assert v.crop_ratio == pytest.approx((3 / 4, 4 / 3))
    assert (v.flip_p, v.jitter_p, v.gray_p, v.blur_p, v.solarize_p) == (0.5, 0.8, 0.2, 0.5, 0.2)
    assert (v.brightness, v.contrast, v.saturation, v.hue) == (0.4, 0.4, 0.2, 0.1)
    assert (v.blur_sigma, v.blur_kernel, v.solarize_threshold) == ((0.1, 2.0), 23, 128)
    assert (v.mean, v.std) == (IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.parametrize("preset", ["byol_sym", "mocov2", "byol_asym"])
def test_ablation_levels_are_cumulative(preset):
    fields = {"-solarize": "solarize_p", "-blur": "blur_p", "-gray": "gray_p", "-jitter": "jitter_p"}
    full = make_spec(preset).views
    for i, level in enumerate(ABLATION_ORDER):
        views = make_spec(preset, ablation=level).views
        removed = {fields[lv] for lv in ABLATION_ORDER[: i + 1]}
        for v, f in zip(views, full):
            for name in fields.values():
                assert getattr(v, name) == (0.0 if name in removed else getattr(f, name)), (level, name)
            assert (v.crop_scale, v.flip_p) == (f.crop_scale, f.flip_p)
    last = make_spec(preset, ablation="-jitter").views[0]
    crop_flip = make_spec("crop_flip").views[0]
    assert [getattr(last, f) for f in fields.values()] == [getattr(crop_flip, f) for f in fields.values()]


def test_flip_p_overrides_the_preset_for_pretraining_and_linear_evaluation():
    """aug.flip_p (digits, text: a mirror image is another symbol) reaches every view's ViewSpec, which
    all backends read, and the linear-evaluation view; nothing else changes."""
    from fastairl.config import ConfigError, load_config
    from fastairl.data.augment import linear_train_spec, spec_from_config

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "byol_lars.yaml"
    cfg = load_config(recipe, ["aug.flip_p=0", "aug.crop_size=32"])
    for got, preset in ((spec_from_config(cfg.aug), "byol_sym"), (linear_train_spec(cfg.aug), "crop_flip")):
        for v, ref in zip(got.views, make_spec(preset, crop_size=32).views):
            assert v == replace(ref, flip_p=0.0)
    assert spec_from_config(load_config(recipe).aug).views[0].flip_p == 0.5
    with pytest.raises(ConfigError, match="aug.flip_p.*in \\[0, 1\\]"):
        load_config(recipe, ["aug.flip_p=1.5"])


# ------------------------------------------------------------------------------------- augment_view
def test_augment_view_shape_and_determinism(photo):
    v = make_spec("byol_sym", crop_size=48).views[0]
    a = augment_view(photo, v, np.random.default_rng(3))
    assert a.shape == (3, 48, 48) and a.dtype == torch.float32
    assert torch.equal(a, augment_view(photo, v, np.random.default_rng(3)))
    assert not torch.equal(a, augment_view(photo, v, np.random.default_rng(4)))
    assert -3 < a.mean() < 3 and a.std() > 0.05  # normalised, not raw [0, 255]


def _only(**kw) -> ViewSpec:
    return replace(ONLY_CROP, crop_scale=(0.5, 1.0), **kw)


def test_solarisation_rate_and_pixels(photo):
    n, p = 300, 0.2
    on, off = _only(solarize_p=p), _only(solarize_p=0.0)
    hits = 0
    for i in range(n):
        ref = _uint8(augment_view(photo, off, np.random.default_rng([7, i])))
        out = _uint8(augment_view(photo, on, np.random.default_rng([7, i])))
        solarised = torch.where(ref >= 128, 255 - ref, ref)
        assert (ref >= 128).any()
        assert torch.equal(out, ref) or torch.equal(out, solarised), i
        hits += torch.equal(out, solarised)
    assert abs(hits / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_grayscale_rate(photo):
    n, p = 300, 0.2
    gray = 0
    for i in range(n):
        u = _uint8(augment_view(photo, _only(gray_p=p), np.random.default_rng([8, i])))
        gray += bool((u[0] == u[1]).all() and (u[1] == u[2]).all())
    assert abs(gray / n - p) < 4 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("field", ["jitter_p", "blur_p"])
def test_jitter_and_blur_rates(photo, field):
    # Against the same draw with the op off: a jittered or blurred crop of a photo never equals it.
    n, p = 200, {"jitter_p": 0.8, "blur_p": 0.5}[field]
    v = replace(_only(**{field: p}), crop_size=48)  # blur kernel 3 at 32 px is too weak to see
    changed = 0
    for i in range(n):
        ref = augment_view(photo, replace(v, **{field: 0.0}), np.random.default_rng([11, i]))
        changed += not torch.equal(augment_view(photo, v, np.random.default_rng([11, i])), ref)
    assert abs(changed / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_flip_rate_on_asymmetric_image(photo):
    w, h = photo.size
    v = replace(ONLY_CROP, crop_scale=(1.0, 1.0), crop_ratio=(w / h, w / h), flip_p=0.5)  # full image
    ref = _uint8(augment_view(photo, replace(v, flip_p=0.0), np.random.default_rng(0)))
    mirror = ref.flip(-1)
    assert (ref.float() - mirror.float()).abs().mean() > 5  # the photo is not left-right symmetric
    n, flips = 300, 0
    for i in range(n):
        u = _uint8(augment_view(photo, v, np.random.default_rng([9, i])))
        assert torch.equal(u, ref) or torch.equal(u, mirror)
        flips += torch.equal(u, mirror)
    assert abs(flips / n - 0.5) < 4 * math.sqrt(0.25 / n)


def test_crop_area_follows_the_spec():
    # A coordinate image (R = x, G = y) lets the crop box be read back from the output pixels.
    x = np.arange(256)
    coord = np.stack([np.broadcast_to(x[None, :], (256, 256)), np.broadcast_to(x[:, None], (256, 256)),
                      np.zeros((256, 256), int)], -1).astype(np.uint8)
    img = Image.fromarray(coord)
    v = ONLY_CROP  # scale (0.08, 1), ratio (3/4, 4/3)
    est, err = [], []
    for i in range(300):
        u = _uint8(augment_view(img, v, np.random.default_rng([10, i]))).float()
        w_est = (u[0].max() - u[0].min()).item() / (1 - 1 / S)  # the resize maps pixel centres
        h_est = (u[1].max() - u[1].min()).item() / (1 - 1 / S)
        _, _, h, w = sample_crop(np.random.default_rng([10, i]), 256, 256, v.crop_scale, v.crop_ratio)
        est.append(w_est * h_est / 256 ** 2)
        err.append(est[-1] - w * h / 256 ** 2)
    assert np.abs(err).max() < 0.03  # every output shows the sampled box
    rng = np.random.default_rng(123)
    boxes = [sample_crop(rng, 256, 256, v.crop_scale, v.crop_ratio) for _ in range(20000)]
    expected = np.mean([b[2] * b[3] for b in boxes]) / 256 ** 2
    assert abs(np.mean(est) - expected) < 0.035
    assert min(est) > 0.08 - 0.03 and max(est) > 0.9


# ------------------------------------------------------------------------------------------ dataset
def test_dual_views_differ_and_follow_num_views(photo_samples):
    samples, _ = photo_samples
    spec = make_spec("byol_sym", crop_size=S)
    views, label = DualViewDataset(samples, spec, seed=0)[(0, 5)]
    assert len(views) == 2 and label == samples[5][1]
    assert views[0].shape == views[1].shape == (3, S, S) and not torch.equal(views[0], views[1])
    again, _ = DualViewDataset(samples, spec, seed=0)[(0, 5)]
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    other_epoch, _ = DualViewDataset(samples, spec, seed=0)[(1, 5)]
    assert not torch.equal(views[0], other_epoch[0])
    one, _ = DualViewDataset(samples, make_spec("byol_sym", crop_size=S, num_views=1), seed=0)[(0, 5)]
    assert len(one) == 1 and torch.equal(one[0], views[0])


def test_corrupt_jpeg_names_the_path(tmp_path, photo_samples):
    good = photo_samples[0][0][0]
    bad = tmp_path / "truncated.jpg"
    data = Path(good).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    ds = DualViewDataset([(str(bad), 0), (str(junk), 0)], make_spec(crop_size=S))
    for i, path in enumerate([bad, junk]):
        with pytest.raises(RuntimeError, match=rf"^cannot read image {path}: ") as e:
            ds[(0, i)]
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ sampler
def test_sampler_ranks_are_disjoint_and_in_step():
    n, gb, ws, seed = 103, 12, 3, 4
    perm = np.random.default_rng([seed, 2]).permutation(n)
    per_rank = []
    for rank in range(ws):
        s = EpochBatchSampler(n, gb, rank, ws, seed)
        s.set_epoch(2)
        batches = list(s)
        assert s.steps_per_epoch == len(s) == len(batches) == n // gb
        assert all(len(b) == gb // ws and all(e == 2 for e, _ in b) for b in batches)
        per_rank.append([i for b in batches for _, i in b])
    flat = [i for r in per_rank for i in r]
    assert len(flat) == len(set(flat)) == (n // gb) * gb
    assert sorted(flat) == sorted(perm[: (n // gb) * gb].tolist())
    # step s of the run is global batch s of the permutation, split across ranks in rank order
    step3 = [i for rank in range(ws) for i in per_rank[rank][3 * 4: 4 * 4]]
    assert step3 == perm[36:48].tolist()


def test_sampler_epochs_differ_and_resume():
    s = EpochBatchSampler(50, 10, seed=1)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    assert list(s) != [[(1, i) for _, i in b] for b in e0]
    s.set_epoch(0, start_step=3)
    assert len(s) == 2 and list(s) == e0[3:]


def test_sampler_errors():
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by the 3 processes"):
        EpochBatchSampler(100, 10, 0, 3)
    with pytest.raises(ValueError, match="has 7 samples, fewer than one global batch of train.batch_size=8"):
        EpochBatchSampler(7, 8)
    # synthetic data: the same two rules, naming the key that sets its size
    spec = make_spec(crop_size=S)
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by the 4 processes"):
        SyntheticLoader(spec, 10, 0, 4, num_samples=100)
    with pytest.raises(ValueError, match="data.synthetic_size has 7 samples, fewer than one global batch"):
        SyntheticLoader(spec, 8, num_samples=7)


# ------------------------------------------------------------------------------------------- loader
def _epoch(loader, epoch, start_step=0):
    loader.set_epoch(epoch, start_step)
    return [(views, labels) for views, labels in loader]


def _same(a, b) -> bool:
    """Two lists of (views, labels) batches hold identical tensors."""
    return len(a) == len(b) and all(torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(va, vb))
                                    for (va, la), (vb, lb) in zip(a, b))


def test_train_loader_shapes_and_resume_is_exact(photo_samples):
    samples, classes = photo_samples
    spec = make_spec("byol_sym", crop_size=S)
    loader = TorchTrainLoader(samples, classes, spec, global_batch=8, seed=3, workers=0)
    assert (loader.steps_per_epoch, loader.num_classes, loader.classes) == (5, 10, classes)
    full = _epoch(loader, 1)
    views, labels = full[0]
    assert len(views) == 2 and all(v.shape == (8, 3, S, S) and v.dtype == torch.float32 for v in views)
    assert labels.dtype == torch.long and labels.shape == (8,)
    assert not torch.equal(views[0], views[1])
    loader.set_epoch(1, start_step=2)
    assert len(loader) == 3
    tail = [(v, lb) for v, lb in loader]
    assert _same(tail, full[2:])
    assert not _same(_epoch(loader, 2)[2:], full[2:])


def test_workers_and_ranks_give_the_same_tensors(photo_samples):
    samples, classes = photo_samples
    spec = make_spec("byol_sym", crop_size=S)
    ref = TorchTrainLoader(samples, classes, spec, global_batch=8, seed=0, workers=0)
    par = TorchTrainLoader(samples, classes, spec, global_batch=8, seed=0, workers=2)  # persistent
    for epoch in (0, 1):
        assert _same(_epoch(par, epoch), _epoch(ref, epoch))
    halves = [TorchTrainLoader(samples, classes, spec, global_batch=8, rank=r, world_size=2, seed=0)
              for r in range(2)]
    whole = _epoch(ref, 0)
    for step, ((v0, l0), (v1, l1)) in enumerate(zip(_epoch(halves[0], 0), _epoch(halves[1], 0))):
        assert torch.equal(torch.cat([l0, l1]), whole[step][1])
        assert all(torch.equal(torch.cat([a, b]), c) for a, b, c in zip(v0, v1, whole[step][0]))


def test_synthetic_loader():
    spec = make_spec("byol_sym", crop_size=S)
    loader = SyntheticLoader(spec, global_batch=8, rank=1, world_size=2, num_classes=10, num_samples=100)
    assert (loader.steps_per_epoch, len(loader), loader.num_classes) == (12, 12, 10)
    batches = list(loader)
    assert len(batches) == 12
    views, labels = batches[0]
    assert len(views) == 2 and all(v.shape == (4, 3, S, S) and v.dtype == torch.float32 for v in views)
    assert labels.shape == (4,) and labels.dtype == torch.long and 0 <= labels.min() and labels.max() < 10
    assert not torch.equal(views[0], views[1]) and abs(views[0].std().item() - 1) < 0.1
    loader.set_epoch(3, start_step=10)
    assert len(loader) == 2 and len(list(loader)) == 2


# ---------------------------------------------------------------------------------------- eval + seam
def _cfg(**data) -> Config:
    cfg = Config()
    cfg.aug.crop_size = S
    cfg.train.batch_size = 8
    cfg.data.workers = 0
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_eval_loader_is_deterministic_and_ordered(digits_root):
    cfg = _cfg(val=str(digits_root / "val"))
    assert eval_resize(cfg) == 37 and eval_resize(Config()) == 256
    loader = build_eval_loader(cfg, cfg.data.val, batch_size=64)
    assert isinstance(loader, EvalLoader) and loader.resize == 37 and loader.num_classes == 10
    first = [(x, y) for x, y in loader]
    assert first[0][0].shape == (64, 3, S, S) and first[0][0].dtype == torch.float32
    labels = torch.cat([y for _, y in first])
    assert labels.tolist() == [label for _, label in scan_folder(digits_root / "val")[0]]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, loader))
    sub = build_eval_loader(cfg, cfg.data.val, max_samples=50, batch_size=64)
    (x, y), = list(sub)
    assert x.shape[0] == 50 and set(y.tolist()) == set(range(10))  # evenly spaced: every class
    # centre crop of the shorter-side resize, exactly
    path, _ = scan_folder(digits_root / "val")[0][0]
    img = TF.center_crop(TF.resize(_rgb(path), 37, antialias=True), [S, S])
    assert torch.equal(_uint8(first[0][0][0]), TF.pil_to_tensor(img))


def test_seam_builds_torch_and_synthetic(photo_root):
    cfg = _cfg(train=str(photo_root / "train"))
    spec = make_spec("byol_sym", crop_size=S)
    loader = build_train_loader(cfg, spec, rank=0, world_size=1, device="cpu")
    assert isinstance(loader, TorchTrainLoader) and loader.steps_per_epoch == 5
    cfg = _cfg(source="synthetic", num_classes=7, synthetic_size=80)
    loader = build_train_loader(cfg, spec, rank=0, world_size=2, device=torch.device("cpu"))
    assert isinstance(loader, SyntheticLoader) and loader.steps_per_epoch == 10
    assert loader.views[0].shape == (4, 3, S, S) and loader.num_classes == 7


@pytest.mark.parametrize("pipeline,name", [("dali", "DALI"), ("ffcv", "FFCV")])
def test_missing_extra_says_how_to_install(photo_root, monkeypatch, pipeline, name):
    # installed or not, the extra is made unimportable here: None in sys.modules stops an import
    monkeypatch.setitem(sys.modules, {"dali": "nvidia.dali", "ffcv": "ffcv"}[pipeline], None)
    cfg = _cfg(train=str(photo_root / "train"), pipeline=pipeline)
    with pytest.raises(MissingExtra) as e:
        build_train_loader(cfg, make_spec(crop_size=S), rank=0, world_size=1, device="cpu")
    assert str(e.value) == f"{name} is not installed: pip install 'fastairl[{pipeline}]'"
    assert isinstance(e.value, ImportError)


def test_importing_the_seam_stays_light():
    code = ("import sys, fastairl.pipelines; bad = [m for m in ('sklearn', 'skimage', 'ffcv', 'nvidia.dali') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sample_rng_is_the_only_randomness(photo_samples):
    # the dataset ignores global RNG state: the same (seed, epoch, index) gives the same views
    samples, _ = photo_samples
    ds = DualViewDataset(samples, make_spec(crop_size=S), seed=11)
    np.random.seed(0), torch.manual_seed(0)
    a, _ = ds[(2, 3)]
    np.random.seed(1), torch.manual_seed(1)
    b, _ = ds[(2, 3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    img = _rgb(samples[3][0])
    rng = sample_rng(11, 2, 3)
    assert torch.equal(a[0], augment_view(img, make_spec(crop_size=S).views[0], rng))
