"""The DALI backend against torchvision and the torch reference pipeline, on real photos (CPU pipelines,
`device_id=None`; the GPU path in the `cuda` tier).

Three levels: every op on fixed inputs is compared with torchvision pixel for pixel; the whole
pipeline is run many times with one op switched on at a time (probabilities 0/1 in the ViewSpec) and
the rate at which it fires and the strength it applies, read back from the output pixels, are compared
with the spec and with `torch_ref.augment_view` on the same images; and the loader's sharding, order,
resume, evaluation and seam behaviour are compared with the torch backend's.
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

pytest.importorskip("nvidia.dali")
stats = pytest.importorskip("scipy.stats")
from nvidia.dali import fn, pipeline_def, types  # noqa: E402

import fastairl.pipelines.dali as D  # noqa: E402
from fastairl.config import Config  # noqa: E402
from fastairl.data.augment import AugmentSpec, ViewSpec, make_spec, sample_crop  # noqa: E402
from fastairl.data.datasets import DataError, scan_folder  # noqa: E402
from fastairl.data.draws import CROP_DRAWS, crop_boxes, uniforms  # noqa: E402
from fastairl.pipelines import build_eval_loader, build_train_loader  # noqa: E402
from fastairl.pipelines.torch_ref import EvalLoader, TorchTrainLoader, augment_view  # noqa: E402
from tiny_runs import losses, one_torch_thread, run, small_folder, train_cmd, write_recipe  # noqa: E402

S = 32  # output side: small crops keep the statistics fast
TILE = 40  # the photo tiles are TILE x TILE, resized to S by the deterministic full-image "crop"
N = 320  # samples per statistical test
# the full image, no photometric op: the reference every single-op run is compared with
ONLY = ViewSpec(crop_size=S, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                gray_p=0.0, blur_p=0.0, solarize_p=0.0)
NO_JITTER = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
# crop, flip, grayscale, solarise, two views: a small graph (quick to build) for the loader mechanics
LIGHT = AugmentSpec(tuple(replace(v, gray_p=0.3, solarize_p=0.3) for v in make_spec("crop_flip", crop_size=S).views))


_one_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


# ------------------------------------------------------------------------------------------ images
def _rgb(path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


@pytest.fixture(scope="module")
def tiles(photo_root) -> list[np.ndarray]:
    """16 colourful TILE x TILE uint8 crops of the real photos (HxWx3)."""
    out = []
    for path, _ in scan_folder(photo_root / "train")[0]:
        img = _rgb(path)
        tile = np.array(TF.resized_crop(img, img.height // 4, img.width // 4, img.height // 2, img.height // 2,
                                        [TILE, TILE], antialias=True))
        t = tile.astype(int)
        if np.abs(t[..., 0] - t[..., 1]).mean() + np.abs(t[..., 1] - t[..., 2]).mean() > 6:  # colour: grey/hue show
            out.append(tile)
    assert len(out) >= 16, f"only {len(out)} colour tiles in the photo corpus"
    return out[:16]


@pytest.fixture(scope="module")
def tile_samples(tiles, tmp_path_factory) -> list[tuple[str, int]]:
    """The tiles as lossless PNG files (decoded identically by DALI and PIL), tile k labelled k."""
    root = tmp_path_factory.mktemp("tiles")
    samples = []
    for k, tile in enumerate(tiles):
        path = root / f"{k:02d}.png"
        Image.fromarray(tile).save(path)
        samples.append((str(path), k))
    return samples


def _uint8(x: torch.Tensor, v: ViewSpec) -> np.ndarray:
    """Undo the normalisation: ...x3xHxW float -> the uint8 pixels (exact, the ops are on uint8)."""
    m = torch.tensor(v.mean).view(3, 1, 1) * 255
    s = torch.tensor(v.std).view(3, 1, 1) * 255
    return (x * s + m).round().clamp(0, 255).to(torch.uint8).numpy()


def _dali_views(samples, v: ViewSpec, n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels n, uint8 views nx3xSxS) of one epoch over `samples` repeated to n, one view per sample."""
    reps = math.ceil(n / len(samples))
    loader = D.DaliTrainLoader(samples * reps, [str(i) for i in range(len(samples))], AugmentSpec((v,)),
                               global_batch=len(samples), seed=seed)
    loader.set_epoch(0)
    labels, views = zip(*[(lb.numpy(), _uint8(vs[0], v)) for vs, lb in loader])
    return np.concatenate(labels)[:n], np.concatenate(views)[:n]


def _torch_views(tiles, v: ViewSpec, n: int = N) -> tuple[np.ndarray, np.ndarray]:
    """The same from the reference `augment_view`, sample i being tile i % len(tiles)."""
    imgs = [Image.fromarray(t) for t in tiles]
    labels = np.arange(n) % len(tiles)
    views = np.stack([_uint8(augment_view(imgs[k], v, np.random.default_rng([5, i])), v) for i, k in enumerate(labels)])
    return labels, views


@pytest.fixture(scope="module")
def refs(tiles, tile_samples) -> dict[str, np.ndarray]:
    """Per tile, the output with every op off (3xSxS uint8), from each backend."""
    labels, views = _dali_views(tile_samples, ONLY, n=len(tiles))
    dali = np.empty_like(views)
    dali[labels] = views
    return {"dali": dali, "torch": _torch_views(tiles, ONLY, n=len(tiles))[1]}


def _pil_grey(x: np.ndarray) -> np.ndarray:
    """PIL's "L" of ...x3xHxW uint8 -> ...xHxW int."""
    x = x.astype(np.int64)
    return (x[..., 0, :, :] * 19595 + x[..., 1, :, :] * 38470 + x[..., 2, :, :] * 7471 + 32768) >> 16


# ------------------------------------------------------------------------- ops against torchvision
def _const(value):
    return lambda: value  # DALI calls a callable source with no argument only when it takes none


def _dali_apply(op, images: list[np.ndarray], *per_sample, gpu: bool = False) -> list[np.ndarray]:
    """op(x, *args) in a DALI pipeline over HxWx3 uint8 `images` with per-sample scalar args."""
    @pipeline_def(batch_size=len(images), num_threads=1, device_id=0 if gpu else None, seed=0, enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=_const(images), layout="HWC", batch=True, device="gpu" if gpu else "cpu")
        return op(x, *[fn.external_source(source=_const(list(a)), batch=True) for a in per_sample])

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.array(t) for t in (out.as_cpu() if gpu else out)]


def _float_op(op):
    """A jitter op on float input, cast back to uint8, as the pipeline chains it."""
    return lambda x, f: fn.cast(op(fn.cast(x, dtype=types.FLOAT), f), dtype=types.UINT8)


TV_OPS = {D.B: TF.adjust_brightness, D.C: TF.adjust_contrast, D.S: TF.adjust_saturation, D.H: TF.adjust_hue}
DALI_OPS = {D.B: D.brightness, D.C: D.contrast, D.S: D.saturation, D.H: D.hue}


def _host_arg(op, factors: np.ndarray) -> np.ndarray:
    """What DALI_OPS[op] takes for these factors: hue takes the hue byte, computed on the host."""
    return D.hue_byte(factors) if op == D.H else factors


@pytest.mark.parametrize("op,lo,hi", [(D.B, 0.0, 2.0), (D.C, 0.0, 2.0), (D.S, 0.0, 2.5), (D.H, -0.5, 0.5)],
                         ids=["brightness", "contrast", "saturation", "hue"])
def test_jitter_ops_are_bit_exact_with_torchvision(tiles, op, lo, hi):
    # the range ends and random factors inside, wider than any preset's
    identity = 0.0 if op == D.H else 1.0
    inside = np.random.default_rng(op).uniform(lo, hi, len(tiles) - 3)
    f = np.concatenate([[lo, hi, identity], inside]).astype(np.float32)
    out = _dali_apply(_float_op(DALI_OPS[op]), tiles, _host_arg(op, f))
    for tile, factor, o in zip(tiles, f, out):
        assert np.array_equal(o, np.array(TV_OPS[op](Image.fromarray(tile), float(factor)))), (op, factor)


def test_hue_is_bit_exact_with_torchvision_on_every_colour():
    # all 2^24 RGB colours (four 2048 x 2048 images), two shifts of opposite sign: PIL's float steps on
    # the way to HSV, the uint8 wrap of the shifted byte (a table) and the integer way back
    c = np.arange(1 << 24, dtype=np.uint32)
    every = np.stack([c >> 16, (c >> 8) & 255, c & 255], axis=-1).astype(np.uint8).reshape(4, 2048, 2048, 3)
    for f in np.array([0.2345, -0.3987], np.float32):
        out = _dali_apply(_float_op(D.hue), list(every), D.hue_byte(np.full(4, f)))
        for img, o in zip(every, out):
            differ = (o != np.array(TF.adjust_hue(Image.fromarray(img), float(f)))).any(axis=-1)
            assert not differ.any(), (f, img[differ][:5])


def test_jitter_random_order_is_bit_exact_with_torchvision(tiles):
    v = ViewSpec()  # all four ops enabled: 24 orders
    orders = D.jitter_orders(v)
    assert len(orders) == 24 and len(set(orders)) == 24
    rng = np.random.default_rng(0)
    images = [tiles[i % len(tiles)] for i in range(24)]
    factors = {D.B: rng.uniform(0.6, 1.4, 24), D.C: rng.uniform(0.6, 1.4, 24), D.S: rng.uniform(0.8, 1.2, 24),
               D.H: rng.uniform(-0.1, 0.1, 24)}
    f32 = [factors[op].astype(np.float32) for op in (D.B, D.C, D.S, D.H)]
    plan = D.jitter_slots(v, dict(zip((D.B, D.C, D.S, D.H), f32)), np.arange(24))
    slots = [f"{s}{j}" for s in ("before", "after") for j in range(3)]
    assert set(plan) == {"hue"} | {f"{slot}_{k}" for slot in slots for k in ("f", "wc", "ws", "on")}

    def graph(x, *nodes):
        p = dict(zip(plan, nodes))
        return D.jitter(x, v, D._slots(p, "before"), p["hue"], D._slots(p, "after"))

    out = _dali_apply(graph, images, *plan.values())
    for i, (img, o) in enumerate(zip(images, out)):  # sample i uses order i
        ref = Image.fromarray(img)
        for op in orders[i]:
            ref = TV_OPS[op](ref, float(f32[op][i]))
        assert np.array_equal(o, np.array(ref)), orders[i]
    # a disabled op (range 0) is left out of the orders, as the reference skips identity draws
    assert D.jitter_orders(replace(v, hue=0.0)) == list(itertools.permutations((D.B, D.C, D.S)))


def test_grayscale_solarize_blur_match_torchvision(tiles):
    grey = _dali_apply(lambda x, f: D.grayscale(x), tiles, np.zeros(len(tiles), np.float32))
    sol = _dali_apply(lambda x, f: D.solarize(x, 100), tiles, np.zeros(len(tiles), np.float32))
    v = ViewSpec(crop_size=TILE)  # kernel 5 at 40 px
    sigma = np.random.default_rng(3).uniform(0.1, 2.0, len(tiles)).astype(np.float32)
    blur = _dali_apply(lambda x, s: D.gaussian_blur(x, v, s), tiles, sigma)
    diffs = []
    for tile, g, so, b, s in zip(tiles, grey, sol, blur, sigma):
        img = Image.fromarray(tile)
        assert np.array_equal(g, np.array(TF.rgb_to_grayscale(img, num_output_channels=3)))
        assert np.array_equal(so, np.array(TF.solarize(img, 100)))  # x >= 100 -> 255 - x
        ref = np.array(TF.gaussian_blur(img, [v.blur_kernel] * 2, [float(s)] * 2))
        diffs.append(np.abs(b.astype(int) - ref))
    diffs = np.stack(diffs)
    assert diffs.max() <= 1 and (diffs == 0).mean() > 0.99  # float rounding of the same kernel


def test_jitter_factors_follow_sample_color():
    v = ViewSpec(brightness=0.4, contrast=0.3, saturation=0.9, hue=0.1)  # saturation range is clipped at 0
    orders = D.jitter_orders(v)
    u = D.draws(0, 0, np.arange(4000), 1)[:, 0, D.CROP_DRAWS:]  # 4000 x PHOTO_DRAWS
    factors, which = D.jitter_factors(v, u)
    for op, lo, hi in ((D.B, 0.6, 1.4), (D.C, 0.7, 1.3), (D.S, 0.1, 1.9), (D.H, -0.1, 0.1)):
        x = factors[op]
        assert x.dtype == np.float32 and lo <= x.min() and x.max() <= hi
        assert stats.kstest(x, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    counts = np.bincount(which, minlength=len(orders))
    assert len(counts) == 24 and stats.chisquare(counts).pvalue > 1e-3
    # a slot applies its order's op with that op's factor, or nothing (factor 1, no weights)
    plan = D.jitter_slots(v, factors, which)
    before, after = D._slot_plan(orders)
    for name, table in D._named_slots(before, after):
        kind = np.asarray(table)[which]
        want = np.select([kind == D.B, kind == D.C, kind == D.S], [factors[D.B], factors[D.C], factors[D.S]], 1.0)
        assert np.array_equal(plan[f"{name}_f"], want.astype(np.float32))
        assert np.array_equal(plan[f"{name}_wc"], kind == D.C) and np.array_equal(plan[f"{name}_ws"], kind == D.S)
        assert np.array_equal(plan[f"{name}_on"], kind != D._IDENTITY_SLOT)
    active = sum(plan[f"{name}_on"].astype(int) for name, _ in D._named_slots(before, after))
    assert active.tolist() == [3] * len(which)  # with all four ops, three slots act on each sample
    assert np.array_equal(plan["hue"], np.mod(np.trunc(factors[D.H].astype(np.float64) * 255), 256))
    # an op switched off is no field: no slot weight is fed for it, and no hue byte
    only_b = D.jitter_slots(replace(v, contrast=0.0, saturation=0.0, hue=0.0), {D.B: factors[D.B]}, which * 0)
    assert set(only_b) == {"before0_f"}


def test_draws_are_uniform_and_keyed_by_seed_epoch_sample_and_view():
    u = D.draws(3, 1, np.arange(500), 2)  # 500 x 2 x DRAWS
    assert u.shape == (500, 2, D.DRAWS) and u.dtype == np.float64 and 0 <= u.min() and u.max() < 1
    assert stats.kstest(u.reshape(-1), stats.uniform().cdf).pvalue > 1e-3
    assert np.array_equal(D.draws(3, 1, np.arange(100, 500), 2), u[100:])  # a sample's draws: its own
    for other in (D.draws(4, 1, np.arange(500), 2), D.draws(3, 2, np.arange(500), 2), u[:, ::-1]):
        assert abs(np.corrcoef(u.reshape(-1), other.reshape(-1))[0, 1]) < 0.02  # seed, epoch, view


def test_crop_windows_are_crop_boxes_of_the_crop_stream_as_in_ffcv():
    """view_plan's start / end / mirror are draws.crop_boxes of each view's crop stream: the boxes and
    flips of the FFCV backend's draw_crops for the same (seed, epoch, index, view)."""
    rng = np.random.default_rng(1)
    h, w = rng.integers(1, 600, 2000), rng.integers(1, 600, 2000)
    h[:400] = rng.integers(1, 30, 400)  # so elongated that no try fits: the fallback
    views = (ViewSpec(), ViewSpec(crop_scale=(0.9, 1.0), crop_ratio=(0.5, 0.6), flip_p=0.3))
    idx = np.arange(len(h)) + 7
    u = D.draws(5, 3, idx, len(views))
    got = []
    for k, v in enumerate(views):
        plan = D.view_plan(u[:, k], h, w, v, finish=False)
        assert plan["start"].dtype == plan["end"].dtype == np.float32 and plan["mirror"].dtype == np.int32
        assert all(a.flags.c_contiguous for a in plan.values())  # external_source takes no strides
        got.append(np.concatenate([plan["start"], plan["end"] - plan["start"], plan["mirror"][:, None]], axis=1))
    got = np.stack(got, axis=1).astype(np.int64)  # N x V x (top, left, h, w, flip)
    for k, v in enumerate(views):
        assert np.array_equal(got[:, k], crop_boxes(h, w, uniforms(5, 3, idx, k, CROP_DRAWS), v))
    if importlib.util.find_spec("ffcv") is not None:
        from fastairl.pipelines import ffcv_loader as F

        want = F.draw_crops(5, 3, idx, h, w, views, S)[..., [F.TOP, F.LEFT, F.HEIGHT, F.WIDTH, F.FLIP]]
        assert np.array_equal(got, want)


def test_image_size_reads_the_stored_size_from_the_header(photo_root, tmp_path):
    # the crop boxes are drawn on the host from these sizes: they must be the decoder's
    for path, _ in scan_folder(photo_root / "train")[0][:12]:
        with open(path, "rb") as fh:
            fast = D._jpeg_size(fh)  # the JPEG frame header, not PIL
        assert fast == D.image_size(path) == _rgb(path).size[::-1]
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation "rotate 90": the decoder keeps the stored pixels, so must the size
    img.save(tmp_path / "exif.jpg", exif=exif.tobytes())
    img.save(tmp_path / "progressive.jpg", progressive=True)
    img.save(tmp_path / "lossless.png")
    (tmp_path / "noise.jpg").write_bytes(b"\xff\xd8" + bytes(range(256)) * 4)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0")  # cut off after a marker: no endless loop
    (tmp_path / "fill.jpg").write_bytes(b"\xff\xd8\xff\xff\xe1")
    (tmp_path / "zero.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x00" + b"\x00" * 64)  # a length of 0
    for name, want in (("exif.jpg", (30, 50)), ("progressive.jpg", (30, 50)), ("lossless.png", (30, 50)),
                       ("noise.jpg", None), ("empty.jpg", None), ("missing.jpg", None), ("cut.jpg", None),
                       ("fill.jpg", None), ("zero.jpg", None)):
        assert D.image_size(str(tmp_path / name)) == want, name
    names = ["exif.jpg", "lossless.png", "noise.jpg", "progressive.jpg"]
    for threads in (1, 4):
        sizes = D._Sizes([str(tmp_path / n) for n in names], threads=threads)
        assert [h.tolist() for h in sizes([1, 0, 1, 2])] == [[30, 30, 30, -1], [50, 50, 50, -1]]  # -1: unreadable
        assert [h.tolist() for h in sizes([3])] == [[30], [50]]
        sizes.close()
    (tmp_path / "exif.jpg").unlink()  # read once, then kept
    assert [h.tolist() for h in sizes([0, 3])] == [[30, 30], [50, 50]]


# ------------------------------------------------------------------- the pipeline, one op at a time
def test_decode_and_crop_match_the_reference(photo_root, refs):
    # every op off: DALI and torch differ only by the resampling rounding (PNG decoding is exact)
    assert np.abs(refs["dali"].astype(int) - refs["torch"]).mean() < 0.3
    # real JPEGs, full image, ImageNet-like size: libjpeg-turbo in both, then the same resize
    samples = scan_folder(photo_root / "train")[0][:8]
    for path, _ in samples:
        img = _rgb(path)
        v = replace(ONLY, crop_ratio=(img.width / img.height,) * 2)
        (_, dali), = [_dali_views([(path, 0)], v, n=1)]
        ref = _uint8(augment_view(img, v, np.random.default_rng(0)), v)
        assert np.abs(dali[0].astype(int) - ref).mean() < 0.5, path


def _solarized(ref):
    return np.where(ref >= 128, 255 - ref, ref)


def _fired(field: str, out: np.ndarray, ref: np.ndarray) -> bool:
    """Whether the op of `field` changed `out` (3xSxS) from `ref`, checking that the output is exactly
    `ref` or exactly the op's result where the op is an exact function of the image."""
    if field == "solarize_p":
        assert np.array_equal(out, ref) or np.array_equal(out, _solarized(ref))
        return np.array_equal(out, _solarized(ref))
    if field == "gray_p":
        grey = np.broadcast_to(_pil_grey(ref), out.shape)
        assert np.array_equal(out, ref) or np.array_equal(out, grey)
        return np.array_equal(out, grey)
    if field == "flip_p":
        assert np.array_equal(out, ref) or np.array_equal(out, ref[..., ::-1])
        return np.array_equal(out, ref[..., ::-1])
    return not np.array_equal(out, ref)  # jitter, blur: any change


@pytest.mark.parametrize("field,p,extra", [
    ("solarize_p", 0.3, {}), ("gray_p", 0.3, {}), ("flip_p", 0.5, {}), ("jitter_p", 0.5, {}),
    ("blur_p", 0.5, {"blur_sigma": (1.0, 2.0)}),  # sigma >= 1: every blur is visible at kernel 3
])
def test_each_op_fires_at_its_probability(tiles, tile_samples, refs, field, p, extra):
    v = replace(ONLY, **{field: p}, **extra)
    for name, (labels, views) in (("dali", _dali_views(tile_samples, v)), ("torch", _torch_views(tiles, v))):
        ref = refs[name]
        if field == "solarize_p":
            assert all((r >= 128).any() for r in ref)
        if field == "flip_p":
            assert all(np.abs(r.astype(int) - r[..., ::-1]).mean() > 5 for r in ref)  # not mirror-symmetric
        rate = np.mean([_fired(field, out, ref[k]) for k, out in zip(labels, views)])
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / N), (name, rate)


# ---- strengths: each factor read back from (ref, out), for both backends
def _brightness_of(ref, out) -> float:
    r, o = ref.astype(float), out.astype(float)
    keep = (r >= 20) & (r <= 170)  # never clipped at 1.4x
    return (o[keep].sum() + 0.5 * keep.sum()) / r[keep].sum()  # + 0.5: the truncation


def _slope(base, ref, out, limit) -> float:
    """Least-squares f of out + 0.5 = base + f·(ref - base) over the pixels that cannot clip."""
    d = ref.astype(float) - base
    keep = (np.abs(d) >= 1) & (np.abs(d) <= limit)
    return float(((out.astype(float) + 0.5 - base)[keep] * d[keep]).sum() / (d[keep] ** 2).sum())


def _contrast_of(ref, out) -> float:
    m = math.floor(_pil_grey(ref).mean() + 0.5)
    return _slope(m, ref, out, min(m, 255 - m) / 1.45)


def _saturation_of(ref, out) -> float:
    g = np.broadcast_to(_pil_grey(ref), ref.shape)
    return _slope(g, ref, out, np.minimum(g, 255 - g) / 1.25)


def _hue_of(ref, out) -> float:
    """The median shift of PIL's 8-bit hue over well-saturated pixels, in turns."""
    h0, s0, v0 = np.array(Image.fromarray(ref.transpose(1, 2, 0)).convert("HSV")).transpose(2, 0, 1).astype(int)
    h1 = np.array(Image.fromarray(out.transpose(1, 2, 0)).convert("HSV"))[..., 0].astype(int)
    keep = (s0 >= 80) & (v0 >= 60)
    return float(np.median((h1 - h0 + 128)[keep] % 256 - 128) / 255)


SIGMAS = np.arange(0.4, 2.1, 0.04)


def _blur_estimator(tiles_ref: np.ndarray, kernel: int):
    """sigma of the best-fitting torchvision blur of the tile (grid search over SIGMAS)."""
    table = np.stack([[TF.gaussian_blur(torch.from_numpy(r), [kernel] * 2, [float(s)] * 2).numpy() for s in SIGMAS]
                      for r in tiles_ref]).astype(int)  # tiles x sigmas x 3xSxS

    def sigma_of(k: int, out) -> float:
        return float(SIGMAS[np.abs(table[k] - out).mean(axis=(1, 2, 3)).argmin()])
    return sigma_of


STRENGTHS = {  # op: (ViewSpec changes, range of the factor, estimator tolerance)
    "brightness": (dict(jitter_p=1.0, **{**NO_JITTER, "brightness": 0.4}), (0.6, 1.4), 0.02),
    "contrast": (dict(jitter_p=1.0, **{**NO_JITTER, "contrast": 0.4}), (0.6, 1.4), 0.03),
    "saturation": (dict(jitter_p=1.0, **{**NO_JITTER, "saturation": 0.2}), (0.8, 1.2), 0.03),
    "hue": (dict(jitter_p=1.0, **{**NO_JITTER, "hue": 0.1}), (-0.1, 0.1), 0.01),
    "blur": (dict(blur_p=1.0, blur_sigma=(0.5, 2.0), blur_kernel_frac=0.3), (0.5, 2.0), 0.05),  # kernel 9
}


@pytest.mark.parametrize("op", list(STRENGTHS))
def test_strengths_follow_the_spec_like_the_reference(tiles, tile_samples, refs, op):
    changes, (lo, hi), tol = STRENGTHS[op]
    v = replace(ONLY, **changes)
    estimates = {}
    for name, (labels, views) in (("dali", _dali_views(tile_samples, v)), ("torch", _torch_views(tiles, v))):
        ref = refs[name]
        if op == "blur":
            sigma_of = _blur_estimator(ref, v.blur_kernel)
            est = [sigma_of(k, out) for k, out in zip(labels, views)]
        else:
            of = {"brightness": _brightness_of, "contrast": _contrast_of, "saturation": _saturation_of,
                  "hue": _hue_of}[op]
            est = [of(ref[k], out) for k, out in zip(labels, views)]
        est = np.array(est)
        assert lo - tol <= est.min() and est.max() <= hi + tol, (name, est.min(), est.max())
        assert stats.kstest(est, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3, name
        estimates[name] = est
    assert stats.ks_2samp(estimates["dali"], estimates["torch"]).pvalue > 1e-3


def test_crop_area_and_aspect_match_the_reference(tmp_path):
    # a coordinate image (R = x, G = y) lets the crop box be read back from the output pixels
    h, w = 192, 256
    coord = np.zeros((h, w, 3), np.uint8)
    coord[..., 0], coord[..., 1] = np.arange(w)[None, :], np.arange(h)[:, None]
    path = tmp_path / "coord.png"
    Image.fromarray(coord).save(path)
    v = replace(ONLY, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3))

    def boxes(views):  # area fraction and log aspect of each output's box
        span = (views[:, :2].max(axis=(2, 3)) - views[:, :2].min(axis=(2, 3))) / (1 - 1 / S)  # n x (w, h)
        return span[:, 0] * span[:, 1] / (w * h), np.log(span[:, 0] / span[:, 1])

    dali = boxes(_dali_views([(str(path), 0)], v)[1].astype(float))
    torch_ = boxes(_torch_views([coord], v)[1].astype(float))
    rng = np.random.default_rng(0)
    exact = [sample_crop(rng, h, w, v.crop_scale, v.crop_ratio) for _ in range(20000)]
    exact = (np.array([b[2] * b[3] for b in exact]) / (w * h), np.log([b[3] / b[2] for b in exact]))
    for i, lo, hi in ((0, 0.08, 1.0), (1, math.log(3 / 4), math.log(4 / 3))):
        for est in (dali[i], torch_[i]):
            assert lo - 0.05 < est.min() and est.max() < hi + 0.05
            assert stats.ks_2samp(est, exact[i]).pvalue > 1e-3
        assert stats.ks_2samp(dali[i], torch_[i]).pvalue > 1e-3


# ------------------------------------------------------------------------------------------- loader
def _indexed(tile_samples, n: int) -> list[tuple[str, int]]:
    """n samples over the tile files, sample i labelled i (so labels identify samples)."""
    return [(tile_samples[i % len(tile_samples)][0], i) for i in range(n)]


def _epoch(loader, epoch: int, start_step: int = 0):
    loader.set_epoch(epoch, start_step)
    return [(views, labels) for views, labels in loader]


def test_views_shapes_dtypes_and_normalisation(photo_root):
    samples, classes = scan_folder(photo_root / "train")
    loader = D.DaliTrainLoader(samples, classes, make_spec("byol_sym", crop_size=S), global_batch=8, seed=0)
    assert (loader.steps_per_epoch, len(loader), loader.num_classes, loader.classes) == (5, 5, 10, classes)
    assert not loader.uint8_views
    batches = _epoch(loader, 0)
    assert len(batches) == 5
    views, labels = batches[0]
    assert len(views) == 2 and all(x.shape == (8, 3, S, S) and x.dtype == torch.float32 for x in views)
    assert labels.shape == (8,) and labels.dtype == torch.int64
    assert not torch.equal(views[0], views[1])  # two independent chains
    allv = torch.cat([x for vs, _ in batches for x in vs])
    assert -1.0 < allv.mean() < 1.0 and 0.6 < allv.std() < 1.6  # normalised, not [0, 255] or [0, 1]
    one = D.DaliTrainLoader(samples, classes, make_spec("byol_sym", crop_size=S, num_views=1), global_batch=8)
    assert len(_epoch(one, 0)[0][0]) == 1


def test_sharding_matches_the_torch_backend(tile_samples):
    samples = _indexed(tile_samples, 26)  # 26 samples, global batch 8: 3 steps, 2 samples dropped
    seen = []
    for rank in range(2):
        dali = D.DaliTrainLoader(samples, ["x"], AugmentSpec((ONLY,)), 8, rank=rank, world_size=2, seed=4)
        ref = TorchTrainLoader(samples, ["x"], AugmentSpec((ONLY,)), 8, rank=rank, world_size=2, seed=4)
        assert dali.steps_per_epoch == len(dali) == 3
        for epoch in (0, 1):
            got = [lb.tolist() for _, lb in _epoch(dali, epoch)]
            assert got == [lb.tolist() for _, lb in _epoch(ref, epoch)]  # same batches, same order
            assert all(len(b) == 4 for b in got)
            if epoch == 0:
                seen.append([i for b in got for i in b])
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0] + seen[1])) == 24


def test_resume_seeks_exactly_and_runs_are_reproducible(tile_samples):
    samples = _indexed(tile_samples, 40)
    loader = D.DaliTrainLoader(samples, ["x"], LIGHT, 8, seed=3)
    full = _epoch(loader, 1)
    again = _epoch(D.DaliTrainLoader(samples, ["x"], LIGHT, 8, seed=3), 1)
    assert all(torch.equal(a, b) for (va, _), (vb, _) in zip(full, again) for a, b in zip(va, vb))
    tail = _epoch(loader, 1, start_step=2)
    assert len(tail) == 3 and [lb.tolist() for _, lb in tail] == [lb.tolist() for _, lb in full[2:]]
    assert [lb.tolist() for _, lb in _epoch(loader, 2)] != [lb.tolist() for _, lb in full]
    other = _epoch(D.DaliTrainLoader(samples, ["x"], LIGHT, 8, seed=4), 1)
    assert not torch.equal(other[0][0][0], full[0][0][0])
    loader.set_epoch(1, start_step=2)  # a consumer that stops early: the next pass seeks back
    it = iter(loader)
    next(it)
    it.close()
    assert [lb.tolist() for _, lb in loader] == [lb.tolist() for _, lb in full[2:]]


def test_one_pipeline_serves_consecutive_epochs(tile_samples):
    # epochs read on from the prefetching pipeline are those of a fresh loader, bit for bit; only a
    # jump (a seek, a resume elsewhere) builds a new pipeline
    samples, spec = _indexed(tile_samples, 40), make_spec("byol_sym", crop_size=S)
    loader = D.DaliTrainLoader(samples, ["x"], spec, 8, seed=2)
    streamed = [_epoch(loader, e) for e in range(3)]
    assert loader.builds == 1
    for e in (1, 2):
        assert _same(streamed[e], _epoch(D.DaliTrainLoader(samples, ["x"], spec, 8, seed=2), e))
    assert _same(_epoch(loader, 1, start_step=3), streamed[1][3:]) and loader.builds == 2
    assert _same(_epoch(loader, 2), streamed[2]) and loader.builds == 2  # 1 then 2: read on
    loader.close()
    assert _same(_epoch(loader, 0), streamed[0]) and loader.builds == 3


def _same(a, b) -> bool:
    """Two lists of batches hold the same views and labels, bit for bit."""
    return len(a) == len(b) and all(torch.equal(x, y) for (va, la), (vb, lb) in zip(a, b)
                                    for x, y in zip([*va, la], [*vb, lb]))


def test_mid_epoch_resume_is_bit_identical(tile_samples):
    # every op of byol_sym on: crops, flips, jitter factors and order, grey, blur sigma, solarise
    samples, spec = _indexed(tile_samples, 40), make_spec("byol_sym", crop_size=S)
    full = _epoch(D.DaliTrainLoader(samples, ["x"], spec, 8, seed=3), 1)  # 5 steps, uninterrupted
    for k in (1, 3):  # stop before step k; a new loader, as after a process restart
        assert _same(_epoch(D.DaliTrainLoader(samples, ["x"], spec, 8, seed=3), 1, start_step=k), full[k:])
    uint8 = dict(finish=False)  # aug.on_device: DALI's crops and flips
    full = _epoch(D.DaliTrainLoader(samples, ["x"], spec, 8, seed=3, **uint8), 1)
    assert _same(_epoch(D.DaliTrainLoader(samples, ["x"], spec, 8, seed=3, **uint8), 1, start_step=2), full[2:])


def test_views_depend_only_on_the_sample(tile_samples):
    # as the reference's: one process or two, sample i of epoch e gets the same views
    samples, spec = _indexed(tile_samples, 24), make_spec("byol_sym", crop_size=S)
    one = {}
    for views, labels in _epoch(D.DaliTrainLoader(samples, ["x"], spec, 8, seed=1), 2):
        one.update({int(i): [x[n] for x in views] for n, i in enumerate(labels)})
    for rank in range(2):
        for views, labels in _epoch(D.DaliTrainLoader(samples, ["x"], spec, 8, rank=rank, world_size=2, seed=1), 2):
            for n, i in enumerate(labels.tolist()):
                assert all(torch.equal(x[n], y) for x, y in zip(views, one[i]))


def test_roi_decoding_variant_runs(photo_root):
    samples, classes = scan_folder(photo_root / "train")
    loader = D.DaliTrainLoader(samples, classes, LIGHT, 16, decode="roi")
    views, labels = _epoch(loader, 0)[0]
    assert len(views) == 2 and views[0].shape == (16, 3, S, S) and not torch.equal(views[0], views[1])
    with pytest.raises(ValueError, match="decode must be 'once' or 'roi'"):
        D.DaliTrainLoader(samples, classes, make_spec(crop_size=S), 16, decode="twice")


# ------------------------------------------------------------------------------------ bad files
BAD = {"truncated.jpg": lambda real: real[: len(real) // 3], "empty.jpg": lambda real: b"",
       "notes.jpg": lambda real: b"not an image at all\n"}


def _bad_files(folder, real_jpeg) -> list[str]:
    """A truncated JPEG, a zero-byte one and a text file named .jpg in `folder`."""
    real = open(real_jpeg, "rb").read()
    for name, damage in BAD.items():
        (folder / name).write_bytes(damage(real))
    return [str(folder / name) for name in BAD]


@pytest.fixture(scope="module")
def bad_photos(photo_root, tmp_path_factory):
    """(samples, classes, bad paths): 37 real photos and the 3 bad files, spread over the list."""
    samples, classes = scan_folder(photo_root / "train")
    bad = _bad_files(tmp_path_factory.mktemp("bad_photos"), samples[0][0])
    listed = samples[:12] + [(bad[0], 1)] + samples[12:24] + [(bad[1], 2)] + samples[24:37] + [(bad[2], 3)]
    return listed, classes, bad


def test_unreadable_files_are_replaced_like_the_reference(bad_photos):
    samples, classes, bad = bad_photos
    spec = make_spec("byol_sym", crop_size=S)
    loader = D.DaliTrainLoader(samples, classes, spec, 8, seed=2)
    ref = TorchTrainLoader(samples, classes, spec, 8, seed=2)
    runs = [_epoch(loader, epoch) for epoch in (0, 1)]
    assert all(len(r) == 5 for r in runs)
    for epoch, got in enumerate(runs):  # the reference's replacements: the same labels in the same slots
        assert [lb.tolist() for _, lb in got] == [lb.tolist() for _, lb in _epoch(ref, epoch)]
    assert loader.bad_files() == sorted(bad) == sorted(ref.bad_files())
    # the empty and the text file were replaced when their headers were read: only the truncated JPEG
    # (a readable header) stopped a pipeline, which was rebuilt once
    assert loader.builds == 2
    # the same views whether the loader meets the bad files mid-pass (a new process) or knows them
    assert _same(_epoch(D.DaliTrainLoader(samples, classes, spec, 8, seed=2), 1, start_step=1), runs[1][1:])
    assert _same(_epoch(loader, 1, start_step=1), runs[1][1:])
    # a replaced sample is another real image of the list, with the replaced sample's draws (not zeros)
    assert all(loader.source(0, i) != i for i, (p, _) in enumerate(samples) if p in bad)
    swapped = [samples[loader.source(0, i)] for i in range(len(samples))]
    assert _same(_epoch(D.DaliTrainLoader(swapped, classes, spec, 8, seed=2), 0), runs[0])


def test_no_readable_replacement_is_one_line(tmp_path, photo_root):
    samples, classes = scan_folder(photo_root / "train")
    junk = []
    for k in range(8):
        junk.append(tmp_path / f"junk{k}.jpg")
        junk[-1].write_bytes(b"")
    loader = D.DaliTrainLoader([(str(p), 0) for p in junk], classes, AugmentSpec((ONLY,)), 8)
    with pytest.raises(DataError, match=r"^cannot read image .*junk\d.jpg: DALI cannot decode it, nor any of the 16 "
                                        r"samples drawn to replace it: check the training folder$") as e:
        _epoch(loader, 0)
    assert "\n" not in str(e.value) and loader._live is None  # no half-dead pipeline is kept
    with pytest.raises(DataError, match=r"nor any of the 16"):  # asked again: the same error
        _epoch(loader, 0)


def test_eval_loader_names_an_unreadable_file_in_one_line(tmp_path, photo_root):
    samples, classes = scan_folder(photo_root / "train")
    for path in _bad_files(tmp_path, samples[0][0]):
        listed = samples[1:12] + [(path, 0)] + samples[12:20]
        loader = D.DaliEvalLoader(listed, classes, crop_size=S, resize=37, batch_size=8)
        with pytest.raises(RuntimeError, match=rf"^cannot read image {path}: .*; remove or replace the file$") as e:
            list(loader)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------- eval + seam + CLI
def _cfg(**data) -> Config:
    cfg = Config()
    cfg.aug.crop_size = S
    cfg.train.batch_size = 8
    cfg.data.workers = 1
    cfg.data.pipeline = "dali"
    for k, value in data.items():
        setattr(cfg.data, k, value)
    return cfg


@pytest.mark.parametrize("split", ["digits", "photos"])
def test_eval_loader_matches_the_torch_eval_loader(digits_root, photo_root, split):
    root = digits_root / "val" if split == "digits" else photo_root / "train"  # 32x32 / ~500x375 JPEGs
    cfg = _cfg(val=str(root))
    loader = build_eval_loader(cfg, str(root), batch_size=64)
    assert isinstance(loader, D.DaliEvalLoader) and loader.resize == 37
    samples, classes = scan_folder(root)
    ref = EvalLoader(samples, classes, crop_size=S, resize=37, batch_size=64)
    got, want = list(loader), list(ref)
    assert len(got) == len(loader) == len(want) == math.ceil(len(samples) / 64)
    x, y = torch.cat([b[0] for b in got]), torch.cat([b[1] for b in got])
    assert x.shape == (len(samples), 3, S, S) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y, torch.cat([b[1] for b in want]))  # sample order
    v = ViewSpec()
    diff = np.abs(_uint8(x, v).astype(int) - _uint8(torch.cat([b[0] for b in want]), v))
    assert diff.mean() < 0.5  # same resize (torchvision's output size), same centre crop offsets
    sub = build_eval_loader(cfg, str(root), max_samples=10, batch_size=64)
    (xs, ys), = list(sub)
    assert xs.shape[0] == 10 and ys.tolist() == [samples[i][1] for i in (np.arange(10) * len(samples)) // 10]


def test_exif_orientation_is_ignored_like_the_reference(tmp_path, photo_root):
    """Camera JPEGs carry an EXIF rotation tag; PIL's Image.open (the reference, FFCV) keeps the stored
    pixels, and so must DALI (its decoder would rotate them by default)."""
    from PIL import Image

    samples, classes = scan_folder(photo_root / "train")
    tagged = []
    for k, (path, label) in enumerate(samples[:6]):
        exif = Image.Exif()
        exif[0x0112] = 6 if k % 2 else 8  # "rotate 90 CW / CCW to display"
        out = tmp_path / f"exif{k}.jpg"
        Image.open(path).save(out, quality=90, exif=exif)
        tagged.append((str(out), label))
    got = torch.cat([b[0] for b in D.DaliEvalLoader(tagged, classes, crop_size=S, resize=37, batch_size=8)])
    want = torch.cat([b[0] for b in EvalLoader(tagged, classes, crop_size=S, resize=37, batch_size=8)])
    v = ViewSpec()
    assert np.abs(_uint8(got, v).astype(int) - _uint8(want, v)).mean() < 0.5
    loader = D.DaliTrainLoader(tagged, classes, AugmentSpec((ONLY,)), 6)
    loader.set_epoch(0)
    views, _ = next(iter(loader))
    assert views[0].shape == (6, 3, S, S)  # crop boxes drawn on the stored (unrotated) shape


def test_seam_builds_dali_loaders(photo_root):
    cfg = _cfg(train=str(photo_root / "train"))
    spec = make_spec("byol_sym", crop_size=S)
    loader = build_train_loader(cfg, spec, rank=0, world_size=1, device="cpu")
    assert isinstance(loader, D.DaliTrainLoader) and loader.device_id is None and loader.steps_per_epoch == 5
    cfg.aug.on_device = True  # DALI decodes, crops and flips; the device finishes the views
    from fastairl.data.device_aug import DeviceAugLoader

    wrapped = build_train_loader(cfg, spec, rank=0, world_size=1, device="cpu")
    assert isinstance(wrapped, DeviceAugLoader) and wrapped.loader.uint8_views
    wrapped.set_epoch(0)
    raw = next(iter(wrapped.loader))[0]
    assert raw[0].dtype == torch.uint8 and raw[0].shape == (8, 3, S, S)
    views, labels = next(iter(wrapped))
    assert views[0].dtype == torch.float32 and views[0].shape == (8, 3, S, S) and labels.shape == (8,)


def test_linear_eval_train_loader_is_crop_and_flip(digits_root):
    cfg = _cfg(train=str(digits_root / "train"))
    loader = D.linear_train_loader(cfg, str(digits_root / "train"), batch_size=32)
    v = loader.spec.views[0]
    assert loader.spec.num_views == 1 and (v.jitter_p, v.gray_p, v.blur_p, v.solarize_p) == (0, 0, 0, 0)
    assert (v.flip_p, v.crop_scale, v.crop_size) == (0.5, (0.08, 1.0), S)
    loader.set_epoch(0)
    views, labels = next(iter(loader))
    assert len(views) == 1 and views[0].shape == (32, 3, S, S) and labels.max() < 10


def test_trainer_runs_with_dali_through_the_cli(digits_root, tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", digits_root / "train", data={"pipeline": "dali", "workers": 1},
                          train={"max_steps": 3})
    proc = run(train_cmd(recipe, "--run-dir", tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss = losses(tmp_path / "run")
    assert sorted(loss) == [1, 2, 3] and all(math.isfinite(x) for x in loss.values())


def test_trainer_resume_mid_epoch_is_exact_with_dali(digits_root, tmp_path, monkeypatch):
    from fastairl import checkpoint
    from fastairl.config import load_config
    from fastairl.trainer import train

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same intra-op threads in every leg: bit-exact steps
    train_dir = small_folder(digits_root / "train", tmp_path / "train", per_class=4)  # 2 steps of 16 per epoch
    recipe = write_recipe(tmp_path / "tiny.yaml", train_dir, data={"pipeline": "dali", "workers": 1})
    train(load_config(recipe, []), tmp_path / "full")  # 4 steps
    train(load_config(recipe, ["train.max_steps=3"]), tmp_path / "cut")  # stops inside epoch 1
    train(load_config(recipe, ["train.resume=auto"]), tmp_path / "cut")
    assert losses(tmp_path / "cut") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 4
    ref, got = checkpoint.load(tmp_path / "full" / "last.pt"), checkpoint.load(tmp_path / "cut" / "last.pt")
    assert got["step"] == ref["step"] == 4
    assert all(torch.equal(ref["model"][k], got["model"][k]) for k in ref["model"])


@pytest.fixture(scope="module")
def bad_digits(digits_root, tmp_path_factory):
    """16 files, one global batch of the tiny recipe: 13 real digits and the 3 bad files."""
    root = small_folder(digits_root / "train", tmp_path_factory.mktemp("bad_digits") / "train", per_class=1)
    for f in sorted((digits_root / "train" / "1").iterdir())[1:4]:
        shutil.copy(f, root / "1" / f.name)
    return root, _bad_files(root / "0", next((root / "1").iterdir()))


def test_trainer_replaces_bad_images_and_stops_past_max_bad_fraction(bad_digits, tmp_path):
    root, bad = bad_digits
    recipe = write_recipe(tmp_path / "tiny.yaml", root, data={"pipeline": "dali", "workers": 1})  # 2 steps
    proc = run(train_cmd(recipe, "--run-dir", tmp_path / "ok", "data.max_bad_fraction=0.25"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "ok" / "log.txt").read_text()
    assert all(log.count(f"warning: unreadable image {p} in data.train: replaced by another sample") == 1 for p in bad)
    assert sorted(losses(tmp_path / "ok")) == [1, 2]

    proc = run(train_cmd(recipe, "--run-dir", tmp_path / "stop", "data.max_bad_fraction=0.1"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # besides the log of DALI's image codec ("[ERROR] [jpeg_parser] Invalid marker" and the like, in
    # colour, per damaged JPEG it meets): one line
    lines = [ln for ln in proc.stderr.strip().splitlines() if not re.match(r"(\x1b\[[0-9;]*m)?\[ERROR\]", ln)]
    assert len(lines) == 1 and lines[0].startswith("error: 3 of the 16 images in data.train are unreadable, more "
                                                   "than data.max_bad_fraction=0.1: "), proc.stderr
    assert all(p in lines[0] for p in bad)


# ------------------------------------------------------------------------------------------ GPU tier
@pytest.mark.cuda
def test_gpu_ops_match_the_cpu_ops(tiles):
    # the same expressions on the GPU; the compiler may fuse a·b + c (one rounding instead of two),
    # which can move a truncation by one level on rare pixels
    for op, f in ((D.B, 1.3), (D.C, 0.7), (D.S, 1.2), (D.H, 0.08)):
        factors = np.full(len(tiles), f, np.float32)
        cpu = np.stack(_dali_apply(_float_op(DALI_OPS[op]), tiles, _host_arg(op, factors))).astype(int)
        gpu = np.stack(_dali_apply(_float_op(DALI_OPS[op]), tiles, _host_arg(op, factors), gpu=True))
        assert np.abs(cpu - gpu).max() <= 1 and (cpu == gpu).mean() > 0.999, op
    sigma = np.full(len(tiles), 1.5, np.float32)
    v = ViewSpec(crop_size=TILE)
    for cpu, gpu in zip(_dali_apply(lambda x, s: D.gaussian_blur(x, v, s), tiles, sigma),
                        _dali_apply(lambda x, s: D.gaussian_blur(x, v, s), tiles, sigma, gpu=True)):
        assert np.abs(cpu.astype(int) - gpu).max() <= 1
    # grey and solarise are exact integer work (a table; products and sums below 2^24): equal
    for op in (lambda x, f: D.grayscale(x), lambda x, f: D.solarize(x, 100)):
        cpu, gpu = _dali_apply(op, tiles, sigma), _dali_apply(op, tiles, sigma, gpu=True)
        assert all(np.array_equal(c, g) for c, g in zip(cpu, gpu))
    # the whole jitter with per-sample orders (the slot conditionals around hue on GPU data): each
    # arithmetic operator is its own kernel, so only coord_transform's sums could round differently
    v = ViewSpec()
    rng = np.random.default_rng(1)
    factors = {op: rng.uniform(lo, hi, len(tiles)).astype(np.float32)
               for op, lo, hi in ((D.B, 0.6, 1.4), (D.C, 0.6, 1.4), (D.S, 0.8, 1.2), (D.H, -0.1, 0.1))}
    plan = D.jitter_slots(v, factors, np.arange(len(tiles)) % 24)

    def graph(x, *nodes):
        p = dict(zip(plan, nodes))
        return D.jitter(x, v, D._slots(p, "before"), p["hue"], D._slots(p, "after"))

    cpu = np.stack(_dali_apply(graph, tiles, *plan.values())).astype(int)
    gpu = np.stack(_dali_apply(graph, tiles, *plan.values(), gpu=True))
    # a pixel moved by one level before hue can move further through it, so the bound is on how many
    # pixels differ, not by how much
    assert (cpu == gpu).mean() > 0.99 and np.abs(cpu - gpu).mean() < 0.05


@pytest.mark.cuda
def test_gpu_loader_decodes_with_nvjpeg_and_yields_cuda_tensors(photo_root):
    samples, classes = scan_folder(photo_root / "train")
    spec = make_spec("byol_sym", crop_size=S)
    loader = D.DaliTrainLoader(samples, classes, spec, 8, seed=0, device_id=torch.cuda.current_device())
    batches = _epoch(loader, 0)
    assert len(batches) == 5
    views, labels = batches[0]
    assert all(x.is_cuda and x.shape == (8, 3, S, S) and x.dtype == torch.float32 for x in views)
    cpu = _epoch(D.DaliTrainLoader(samples, classes, spec, 8, seed=0), 0)
    assert [lb.tolist() for _, lb in batches] == [lb.tolist() for _, lb in cpu]  # same order on both devices
    # full image, no op: nvJPEG + GPU resize against libjpeg-turbo + PIL
    path, _ = samples[0]
    img = _rgb(path)
    v = replace(ONLY, crop_ratio=(img.width / img.height,) * 2)
    gpu = D.DaliTrainLoader([(path, 0)], ["0"], AugmentSpec((v,)), 1, device_id=torch.cuda.current_device())
    (out,), _ = _epoch(gpu, 0)[0]
    ref = _uint8(augment_view(img, v, np.random.default_rng(0)), v)
    assert np.abs(_uint8(out.cpu(), v)[0].astype(int) - ref).mean() < 1.5
    ev = build_eval_loader(_cfg(val=str(photo_root / "train")), str(photo_root / "train"), batch_size=16)
    x, _ = next(iter(ev))
    assert x.is_cuda and x.shape == (16, 3, S, S)
