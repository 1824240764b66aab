"""FFCV conversion (`fastairl convert`) and the CIFAR / CIFAR-LT reader, on real images: folders of photos
and digits, damaged files, tiny CIFAR pickles written by hand in the official layout. Every .beton is
read back, either with an independent reader of the file format or with FFCV's own Loader."""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastairl.data import cifar
from fastairl.data.datasets import DataError, scan_folder, select_classes

import fastairl.pipelines.convert as convert_mod
from fastairl.pipelines.convert import ConvertError, ImageOptions, convert, manifest_path
from tiny_runs import deadline

# find_spec, not an import: importing ffcv compiles numba code for seconds; the CIFAR tests need none of it
needs_ffcv = pytest.mark.skipif(importlib.util.find_spec("ffcv") is None,
                                reason="needs the ffcv extra: pip install 'fastairl[ffcv]'")


# ---------------------------------------------------------------------------------------- helpers
def read_beton(path) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(images HxWx3, labels, modes 0=jpg 1=raw) straight from the file's metadata and allocation
    table: a reader independent of FFCV's Loader, so images of varying sizes can be checked too."""
    from ffcv.reader import Reader

    r = Reader(str(path))
    assert r.field_names == ["image", "label"]
    sizes = {int(ptr): int(size) for _, ptr, size in r.alloc_table.tolist()}
    image_meta, labels = r.metadata["f0"], r.metadata["f1"]  # metadata columns are unnamed, in field order
    images = []
    with open(path, "rb") as f:
        for m in image_meta:
            f.seek(int(m["data_ptr"]))
            data = f.read(sizes[int(m["data_ptr"])])
            h, w = int(m["height"]), int(m["width"])
            if m["mode"] == 1:  # raw
                img = np.frombuffer(data, np.uint8).reshape(h, w, 3)
            else:
                import io

                img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            assert img.shape == (h, w, 3)
            images.append(img)
    return images, np.asarray(labels), np.asarray(image_meta["mode"])


def load_with_ffcv(path, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """All images (N x H x W x 3) and labels, in file order, through FFCV's Loader (constant sizes)."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(path), batch_size=batch_size, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
    xs, ys = zip(*[(np.array(x), np.array(y).reshape(-1)) for x, y in loader])
    return np.concatenate(xs), np.concatenate(ys)


def pil_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


def run_convert(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fastairl.pipelines.convert", *map(str, args), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def one_line_error(text: str, *fragments) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    assert "Traceback" not in text
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------ CIFAR-LT profile
def test_lt_profile_matches_the_published_counts_and_a_geometric_sequence():
    # CIFAR-10-LT / CIFAR-100-LT at imbalance 100 as published (Cao et al. 2019): 12,406 and 10,847 images
    assert cifar.lt_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(cifar.lt_counts(5000, 10, 100)) == 12406
    assert sum(cifar.lt_counts(500, 100, 100)) == 10847
    for n_max, classes, ratio in [(5000, 10, 100), (500, 100, 100), (500, 100, 50), (1000, 7, 10), (64, 3, 2)]:
        counts = np.array(cifar.lt_counts(n_max, classes, ratio))
        ref = np.geomspace(n_max, n_max / ratio, classes)  # n_max * q^i with q^(C-1) = 1/ratio
        assert np.all(counts <= ref + 1e-6) and np.all(counts > ref - 1), (counts, ref)
        assert np.all(np.diff(counts) <= 0)
    assert cifar.lt_counts(500, 10, 1) == [500] * 10


def test_lt_subset_is_the_reference_codes_subset():
    """Same indices as LDAM-DRW's IMBALANCECIFAR10 (np.random.seed + np.random.shuffle per class)."""
    labels = np.random.default_rng(3).permutation(np.repeat(np.arange(10), 100))
    state = np.random.get_state()
    try:
        np.random.seed(0)
        ref = []
        for c, n in enumerate(cifar.lt_counts(len(labels) / 10, 10, 100)):
            idx = np.where(labels == c)[0]
            np.random.shuffle(idx)
            ref.append(idx[:n])
        ref = np.concatenate(ref)
    finally:
        np.random.set_state(state)
    ours = cifar.long_tailed_indices(labels, 10, 100, seed=0)
    np.testing.assert_array_equal(ours, ref)
    assert not np.array_equal(cifar.long_tailed_indices(labels, 10, 100, seed=1), ours)
    with pytest.raises(DataError, match="class 0 has 20 images, needs 100"):
        cifar.long_tailed_indices(np.r_[np.zeros(20, int), np.ones(980, int)], 10, 100)


# --------------------------------------------------------------------------- tiny CIFAR pickles
def _digit_images(per_class: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's real handwritten digits as 32x32 RGB (bicubic upscale, one tint per class)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images, labels = [], []
    for c in range(10):
        for i in np.flatnonzero(d.target == c)[offset:offset + per_class]:
            grey = np.round(d.images[i] * 255 / 16).astype(np.uint8)
            img = np.asarray(Image.fromarray(grey).resize((32, 32), Image.BICUBIC).convert("RGB"))
            tint = np.array([1.0, 0.5 + 0.05 * c, 1.0 - 0.08 * c])
            images.append(np.round(img * tint).astype(np.uint8))
            labels.append(c)
    return np.stack(images), np.array(labels)


def _write_cifar10_by_hand(root: Path, train, test, classes) -> Path:
    """The documented layout, written independently of fastairl.data.cifar.write_cifar."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def planar(images):
        return np.stack([np.concatenate([im[..., ch].reshape(-1) for ch in range(3)]) for im in images])

    for k, part in enumerate(np.array_split(np.arange(len(train[1])), 5), 1):
        with open(folder / f"data_batch_{k}", "wb") as f:
            pickle.dump({b"batch_label": b"x", b"labels": train[1][part].tolist(),
                         b"data": planar(train[0][part]), b"filenames": [b"f"] * len(part)}, f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"labels": test[1].tolist(), b"data": planar(test[0])}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in classes], b"num_vis": 3072}, f, protocol=2)
    return folder


@pytest.fixture(scope="module")
def cifar10_root(tmp_path_factory):
    pytest.importorskip("sklearn")
    root = tmp_path_factory.mktemp("cifar")
    train = _digit_images(100)
    test = _digit_images(5, offset=100)
    classes = [f"digit_{c}" for c in range(10)]
    _write_cifar10_by_hand(root, train, test, classes)
    return root, train, test, classes


def test_cifar_reader_decodes_the_official_layout(cifar10_root, tmp_path):
    root, train, test, classes = cifar10_root
    for given in (root, root / "cifar-10-batches-py"):
        data = cifar.load_cifar(given, "train")
        assert data.variant == "cifar10" and data.classes == classes
        np.testing.assert_array_equal(data.images, train[0])
        np.testing.assert_array_equal(data.labels, train[1])
    te = cifar.load_cifar(root, "test")
    np.testing.assert_array_equal(te.images, test[0])
    assert te.counts() == [5] * 10
    # write_cifar writes what the reader (and the hand-written layout) holds, for both variants
    for variant in ("cifar10", "cifar100"):
        folder = cifar.write_cifar(tmp_path / variant, variant, train, test, classes)
        back = cifar.load_cifar(folder, "train")
        assert back.variant == variant and back.classes == classes
        np.testing.assert_array_equal(back.images, train[0])
        np.testing.assert_array_equal(back.labels, train[1])
    with open(tmp_path / "cifar100" / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert raw[b"data"][7, :1024].tolist() == train[0][7][..., 0].reshape(-1).tolist()  # red plane first


def test_cifar_reader_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        cifar.load_cifar(tmp_path / "nope")
    (tmp_path / "data_batch_1").write_bytes(b"junk")
    with pytest.raises(DataError, match="is not a CIFAR python-pickle folder"):
        cifar.load_cifar(tmp_path)
    for f in ["data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch", "batches.meta"]:
        (tmp_path / f).write_bytes(b"junk")
    with pytest.raises(DataError, match=r"batches.meta: cannot read the CIFAR pickle"):
        cifar.load_cifar(tmp_path)


@needs_ffcv
def test_cifar_and_cifar_lt_conversion(cifar10_root, tmp_path):
    root, train, test, classes = cifar10_root
    with deadline(240, "conversion still running"):
        m = convert(root, tmp_path / "c10.beton", workers=2, progress=False)
        mt = convert(root, tmp_path / "c10_test.beton", split="test", workers=1, progress=False)
        ml = convert(root, tmp_path / "c10lt.beton", source="cifar-lt", workers=2, progress=False)
    assert m["source"]["kind"] == "cifar" and m["options"]["write_mode"] == "raw"  # CIFAR default
    assert m["num_images"] == 1000 and m["classes"] == classes
    images, labels = load_with_ffcv(tmp_path / "c10.beton", batch_size=128)
    np.testing.assert_array_equal(images, train[0])  # raw: exact, in file order
    np.testing.assert_array_equal(labels, train[1])
    assert list(mt["counts"].values()) == [5] * 10  # the balanced test set
    # CIFAR-10-LT at the paper's imbalance 100 from 100 images per class, computed by hand:
    # floor(100 * 100^(-i/9)) for i = 0..9
    expected = [100, 59, 35, 21, 12, 7, 4, 2, 1, 1]
    assert list(ml["counts"].values()) == expected and ml["num_images"] == sum(expected)
    assert ml["source"]["imbalance_ratio"] == 100 and ml["source"]["lt_seed"] == 0
    lt_images, lt_labels, modes = read_beton(tmp_path / "c10lt.beton")
    assert np.bincount(lt_labels, minlength=10).tolist() == expected
    keep = cifar.long_tailed_indices(train[1], 10, 100, 0)
    np.testing.assert_array_equal(np.stack(lt_images), train[0][keep])
    assert modes.tolist() == [1] * sum(expected)


# ------------------------------------------------------------------------------ image folders
@pytest.fixture(scope="module")
def square_photos(photo_root, tmp_path_factory):
    """12 real photos as 64x48 JPEGs (one size, so FFCV's SimpleRGBImageDecoder can read them)."""
    root = tmp_path_factory.mktemp("square")
    files = [p for d in sorted((photo_root / "train").iterdir()) for p in sorted(d.iterdir())]
    for i, f in enumerate(files[:12]):
        (root / f"c{i % 3}").mkdir(exist_ok=True)
        with Image.open(f) as im:
            im.convert("RGB").resize((64, 48), Image.BICUBIC).save(root / f"c{i % 3}" / f"{i:02d}.jpg", quality=92)
    return root


@needs_ffcv
def test_folder_read_back_with_ffcv_loader(square_photos, tmp_path):
    samples, classes = scan_folder(square_photos)
    sources = np.stack([pil_rgb(p) for p, _ in samples])
    with deadline(240, "conversion still running"):
        raw = convert(square_photos, tmp_path / "raw.beton", options=ImageOptions(write_mode="raw"),
                      workers=2, progress=False)
        jpg = convert(square_photos, tmp_path / "jpg.beton", options=ImageOptions(jpeg_quality=95),
                      workers=1, progress=False)
        images, labels = load_with_ffcv(tmp_path / "raw.beton")
        jimages, jlabels = load_with_ffcv(tmp_path / "jpg.beton")
    assert raw["classes"] == classes == ["c0", "c1", "c2"] and raw["counts"] == {"c0": 4, "c1": 4, "c2": 4}
    np.testing.assert_array_equal(labels, [label for _, label in samples])
    np.testing.assert_array_equal(images, sources)  # raw: bit-exact
    assert jpg["options"]["write_mode"] == "jpg"
    np.testing.assert_array_equal(jlabels, labels)
    assert min(psnr(a, b) for a, b in zip(jimages, sources)) > 30  # JPEG q95 re-encode


@needs_ffcv
def test_max_resolution_and_write_modes(photo_root, tmp_path):
    train = photo_root / "train"
    samples, classes = scan_folder(train)
    sources = [pil_rgb(p) for p, _ in samples]
    with deadline(240, "conversion still running"):
        for mode in ("raw", "jpg", "smart", "proportion"):
            convert(train, tmp_path / f"{mode}.beton", workers=2, progress=False,
                    options=ImageOptions(max_resolution=96, write_mode=mode, jpeg_quality=90,
                                         smart_threshold=64 * 64 * 3, compress_probability=0.5))
    for mode in ("raw", "jpg", "smart", "proportion"):
        images, labels, modes = read_beton(tmp_path / f"{mode}.beton")
        assert labels.tolist() == [label for _, label in samples]
        for img, src in zip(images, sources):
            h, w = src.shape[:2]
            r = 96 / max(h, w)  # FFCV keeps the aspect and rounds down
            assert img.shape == (int(h * r), int(w * r), 3) and max(img.shape[:2]) <= 96
            small = np.asarray(Image.fromarray(src).resize(img.shape[1::-1], Image.BOX))
            assert psnr(img, small) > 25, mode  # the same photo, area-downsampled
        expected_modes = {"raw": {1}, "jpg": {0}, "smart": {0}}  # every 96-px image exceeds 64x64x3 bytes
        if mode in expected_modes:
            assert set(modes.tolist()) == expected_modes[mode]
        else:
            assert 0 < modes.sum() < len(modes)  # proportion 0.5 of 40: both kinds
    # proportion mode draws from (seed, index): a rerun writes the same choices
    convert(train, tmp_path / "again.beton", workers=1, progress=False,
            options=ImageOptions(max_resolution=96, write_mode="proportion"))
    assert read_beton(tmp_path / "again.beton")[2].tolist() == read_beton(tmp_path / "proportion.beton")[2].tolist()


@needs_ffcv
def test_class_subset_and_file_list(digits_root, photo_root, tmp_path):
    train = digits_root / "train"
    samples, classes = scan_folder(train)
    keep = select_classes(classes, 0.3, 5)
    m = convert(train, tmp_path / "sub.beton", class_fraction=0.3, class_seed=5, workers=2, progress=False)
    assert m["classes"] == [classes[i] for i in keep] and len(keep) == 3
    for old in keep:
        assert m["counts"][classes[old]] == sum(1 for _, label in samples if label == old)
    _, labels, _ = read_beton(tmp_path / "sub.beton")
    assert sorted(set(labels.tolist())) == [0, 1, 2]

    photos = sorted((photo_root / "train").rglob("*.jpg"))[:6]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p} {7 if i % 2 else 3}\n" for i, p in enumerate(photos)))
    m = convert(listing, tmp_path / "list.beton", options=ImageOptions(write_mode="raw"), progress=False)
    assert m["source"]["kind"] == "filelist" and m["classes"] == ["3", "7"]
    images, labels, _ = read_beton(tmp_path / "list.beton")
    assert labels.tolist() == [1 if i % 2 else 0 for i in range(6)]
    for img, p in zip(images, photos):
        np.testing.assert_array_equal(img, pil_rgb(p))


# ---------------------------------------------------------------------------------- bad files
@pytest.fixture()
def damaged_folder(photo_root, tmp_path):
    """Class `a`: 2 good JPEGs, a truncated one, an empty one, a text file named .jpg;
    class `b`: CMYK JPEG, greyscale JPEG, PNG named .jpg, RGBA PNG, 16-bit greyscale PNG."""
    root = tmp_path / "damaged"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    photos = sorted((photo_root / "train").rglob("*.jpg"))
    shutil.copy(photos[0], root / "a" / "good1.jpg")
    shutil.copy(photos[1], root / "a" / "good2.jpg")
    data = photos[2].read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "a" / "notes.jpg").write_text("not an image\n")
    with Image.open(photos[3]) as im:
        im = im.convert("RGB").resize((120, 90))
        im.convert("CMYK").save(root / "b" / "cmyk.jpg", quality=95)
        im.convert("L").save(root / "b" / "grey.jpg", quality=95)
        im.save(root / "b" / "png_named.jpg", format="PNG")
        rgba = im.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(root / "b" / "rgba.png")
        Image.fromarray((np.asarray(im.convert("L"), np.uint16) * 257)).save(root / "b" / "deep.png")
    return root


@needs_ffcv
def test_damaged_files_are_converted_or_skipped_with_reasons(damaged_folder, tmp_path):
    out = tmp_path / "d.beton"
    with deadline(240, "conversion still running"):
        m = convert(damaged_folder, out, options=ImageOptions(write_mode="raw"), workers=2, progress=True)
    skipped = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert set(skipped) == {"truncated.jpg", "empty.jpg", "notes.jpg", "deep.png"}
    assert "truncated" in skipped["truncated.jpg"]
    assert skipped["empty.jpg"] == "empty file (0 bytes)"
    assert "cannot identify image file" in skipped["notes.jpg"]
    assert "pixel mode I;16" in skipped["deep.png"]
    converted = {Path(c["path"]).name: c["note"] for c in m["converted"]}
    assert converted == {"cmyk.jpg": "CMYK -> RGB", "grey.jpg": "L -> RGB",
                         "png_named.jpg": "PNG data in a .jpg file", "rgba.png": "RGBA -> RGB (alpha dropped)"}
    assert m["counts"] == {"a": 2, "b": 4} and m["num_skipped"] == 4
    assert json.loads(manifest_path(out).read_text()) == m
    written = ["a/good1.jpg", "a/good2.jpg", "b/cmyk.jpg", "b/grey.jpg", "b/png_named.jpg", "b/rgba.png"]
    images, labels, _ = read_beton(out)
    assert labels.tolist() == [0, 0, 1, 1, 1, 1]
    for img, rel in zip(images, written):
        np.testing.assert_array_equal(img, pil_rgb(damaged_folder / rel))
    assert files_in(tmp_path) == ["d.beton", "d.beton.json", "damaged"]  # no temporary files left


@needs_ffcv
def test_failed_conversions_leave_the_existing_file_intact(damaged_folder, tmp_path, monkeypatch):
    out = tmp_path / "keep.beton"
    with deadline(240, "conversion still running"):
        good = convert(damaged_folder, out, progress=False)
    before, manifest_before = out.read_bytes(), manifest_path(out).read_text()

    # 1. nothing readable: fails after the check, before writing
    bad = tmp_path / "bad"
    (bad / "x").mkdir(parents=True)
    for name in ("empty.jpg", "notes.jpg"):
        shutil.copy(damaged_folder / "a" / name, bad / "x" / name)
    with pytest.raises(ConvertError, match=r"no readable image in .*bad: all 2 files were skipped"):
        convert(bad, out, progress=False)

    # 2. a file that changes between the check and the write: the writer worker fails mid-file
    victim = damaged_folder / "b" / "grey.jpg"
    real_check = convert_mod._check_all

    def check_then_delete(paths, workers, progress):
        result = real_check(paths, workers, progress)
        victim.unlink()
        return result

    monkeypatch.setattr(convert_mod, "_check_all", check_then_delete)
    with deadline(120, "conversion still running"), pytest.raises(ConvertError, match=r"cannot read .*grey.jpg .*run the conversion again"):
        convert(damaged_folder, out, workers=2, chunk_size=1, progress=False)

    # 3. a worker killed outright (as by the OOM killer): no error message, only its exit code
    monkeypatch.setattr(convert_mod, "_check_all", real_check)
    real_getitem = convert_mod.FileImages.__getitem__

    def die_at_2(self, i):
        if i == 2:
            os._exit(3)
        return real_getitem(self, i)

    monkeypatch.setattr(convert_mod.FileImages, "__getitem__", die_at_2)
    with deadline(120, "conversion still running"), pytest.raises(ConvertError, match=r"writer worker died \(exit code 3"):
        convert(damaged_folder, out, workers=2, chunk_size=1, progress=False)

    assert out.read_bytes() == before and manifest_path(out).read_text() == manifest_before
    assert files_in(tmp_path) == ["bad", "damaged", "keep.beton", "keep.beton.json"]
    assert good["num_images"] == 6


# ------------------------------------------------------------------------------------------ CLI
@needs_ffcv
def test_cli_converts_and_reports(square_photos, tmp_path, capsys):
    from fastairl.cli import main

    out = tmp_path / "sub" / "cli.beton"  # a missing output folder is created
    argv = ["convert", str(square_photos), str(out), "--write-mode", "raw", "--max-resolution", "32",
            "--workers", "2", "--no-progress"]
    with deadline(240, "conversion still running"):
        assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("wrote 12 images of 3 classes to") and "skipped 0" in stdout
    m = json.loads(manifest_path(out).read_text())
    assert m["options"]["max_resolution"] == 32 and m["versions"]["ffcv"] == "1.0.2"
    assert m["seconds"]["total"] > 0 and m["bytes"] == out.stat().st_size
    images, _, _ = read_beton(out)
    assert {img.shape for img in images} == {(24, 32, 3)}


def test_python_m_entry_point(tmp_path):
    proc = run_convert(tmp_path / "missing", tmp_path / "o.beton")
    assert proc.returncode == 2
    one_line_error(proc.stderr, "missing does not exist")


@needs_ffcv
def test_cli_one_line_errors(square_photos, tmp_path, capsys, monkeypatch):
    from fastairl.cli import main

    def error(*argv) -> str:
        try:
            code = main(["convert", *map(str, argv), "--no-progress"])
        except SystemExit as e:  # argparse's own errors exit
            code = e.code
        assert code == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        return captured.err

    out = tmp_path / "o.beton"
    one_line_error(error(tmp_path / "nope", out), "nope does not exist", "ImageNet-style folder")
    (tmp_path / "empty").mkdir()
    one_line_error(error(tmp_path / "empty", out), "empty has no class folders")
    (tmp_path / "afile").write_text("x")
    one_line_error(error(square_photos, tmp_path / "afile" / "o.beton"),
                   "cannot write to the output folder", "afile", "choose a writable folder")
    one_line_error(error(square_photos, out, "--write-mode", "png"),
                   "--write-mode must be one of raw, jpg, proportion, smart, got 'png'")
    one_line_error(error(square_photos, out, "--jpeg-quality", "abc"), "--jpeg-quality", "invalid int")
    one_line_error(error(square_photos, out, "--source", "cifar"), "is not a CIFAR python-pickle folder")
    monkeypatch.setitem(sys.modules, "ffcv", None)  # as if the extra were not installed
    one_line_error(error(square_photos, out), "FFCV is not installed: pip install 'fastairl[ffcv]'")
    assert not out.exists() and files_in(tmp_path) == ["afile", "empty"]


@needs_ffcv
def test_cifar_lt_of_the_test_split_is_refused(cifar10_root, tmp_path):
    with pytest.raises(ConvertError, match="training split only"):
        convert(cifar10_root[0], tmp_path / "x.beton", source="cifar-lt", split="test", progress=False)
    with pytest.raises(ConvertError, match="not CIFAR"):
        convert(cifar10_root[0], tmp_path / "x.beton", class_fraction=0.5, progress=False)


def test_temporary_files_of_killed_conversions_are_removed(tmp_path):
    """A conversion killed outright leaves its `.NAME.tmp-HOST-PID` (as large as the dataset); the next
    conversion to the same file on this host removes those whose process is gone, and no live one's."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    import socket

    out = tmp_path / "train[1].beton"  # glob characters in the name are literal
    host = socket.gethostname()
    stale, live = tmp_path / f".{out.name}.tmp-{host}-{dead}", tmp_path / f".{out.name}.tmp-{host}-{os.getpid()}"
    other_output = tmp_path / f".train1.beton.tmp-{host}-{dead}"
    other_host = tmp_path / f".{out.name}.tmp-elsewhere-{dead}"  # a shared filesystem: not ours to judge
    for f in (stale, live, other_output, other_host):
        f.write_bytes(b"x")
    tmp = convert_mod._prepare_output(out)
    assert not stale.exists() and live.exists() and other_output.exists() and other_host.exists()
    assert tmp == live
