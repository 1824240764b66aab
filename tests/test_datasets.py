"""Sample lists (folders, file lists, class subsets) and the bundled real-image corpora."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastairl.config import DataConfig
from fastairl.data.datasets import (DataError, load_samples, read_filelist, scan_folder, select_classes,
                                    subset)


# ------------------------------------------------------------------------------------------ bundled
def test_digits_layout_split_and_manifest(digits_root):
    m = json.loads((digits_root / "manifest.json").read_text())
    assert m["source"] == "sklearn.datasets.load_digits" and m["size"] == 32
    assert m["totals"]["train"] + m["totals"]["val"] == 1797
    for c in map(str, range(10)):
        n_train = len(list((digits_root / "train" / c).glob("*.jpg")))
        n_val = len(list((digits_root / "val" / c).glob("*.jpg")))
        assert (n_train, n_val) == (m["counts"]["train"][c], m["counts"]["val"][c])
        assert abs(n_val / (n_train + n_val) - 0.2) < 0.01  # stratified: 20 % of every class
    with Image.open(next((digits_root / "val" / "3").glob("*.jpg"))) as img:
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (32, 32)
        a = np.asarray(img).astype(int)
    assert a.max() - a.min() > 100  # a real digit, not a blank image


def test_digits_idempotent_and_rebuilds_on_new_params(tmp_path):
    from fastairl.data.bundled import make_digits

    root = tmp_path / "d"
    make_digits(root, size=8, val_fraction=0.5)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    marker = root / "train" / "0" / "marker.txt"
    marker.write_text("still here")
    make_digits(root, size=8, val_fraction=0.5)  # same parameters: nothing to do
    assert (root / "manifest.json").stat().st_mtime_ns == stamp and marker.exists()
    m = make_digits(root, size=12, val_fraction=0.5)
    assert m["size"] == 12 and not marker.exists()
    with Image.open(next((root / "train" / "0").glob("*.jpg"))) as img:
        assert img.size == (12, 12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp folders left behind


def test_half_written_dataset_leaves_nothing(tmp_path, monkeypatch):
    from fastairl.data.bundled import make_digits

    calls = {"n": 0}
    real_save = Image.Image.save

    def failing_save(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 100:
            raise OSError("disk full")
        return real_save(self, *a, **k)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        make_digits(tmp_path / "d", size=8)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    from fastairl.data.bundled import make_digits

    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match="not a fastairl dataset"):
        make_digits(tmp_path, size=8)
    assert (tmp_path / "mine.txt").exists()


def test_photo_corpus(photo_root):
    m = json.loads((photo_root / "manifest.json").read_text())
    samples, classes = scan_folder(photo_root / "train")
    assert len(samples) == 40 and len(classes) == 10 and classes == m["classes"]
    assert sorted(np.bincount([label for _, label in samples])) == [4] * 10
    sizes, qualities = set(), set()
    for path, _ in samples[::4]:
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB"
            assert max(img.size) == 500 and 375 <= min(img.size) <= 500
            sizes.add(img.size)
            qualities.add(int(np.asarray(img.quantization[0]).mean()))  # luma table tracks the quality
    assert len(sizes) > 3 and len(qualities) > 3  # random shapes and JPEG qualities
    assert 75 <= m["quality"]["min"] <= m["quality"]["max"] <= 95
    # class = source photo: images of one class share content far more than images of two classes
    def small(p):
        with Image.open(p) as img:
            return np.asarray(img.convert("RGB").resize((16, 16)), dtype=float).mean((0, 1))
    by_class = {}
    for p, label in samples:
        by_class.setdefault(label, []).append(small(p))
    means = np.array([np.mean(v, 0) for v in by_class.values()])
    assert np.ptp(means, axis=0).max() > 40  # the classes look different from each other


def test_photo_corpus_is_deterministic(photo_root, tmp_path):
    from fastairl.data.bundled import make_photo_corpus

    make_photo_corpus(tmp_path / "p", n_images=12, classes=3, seed=0)
    again = sorted((tmp_path / "p" / "train").rglob("*.jpg"))
    assert len(again) == 12
    first = {p.relative_to(tmp_path / "p"): p.read_bytes() for p in again}
    shutil.rmtree(tmp_path / "p")
    make_photo_corpus(tmp_path / "p", n_images=12, classes=3, seed=0)
    assert {p.relative_to(tmp_path / "p"): p.read_bytes()
            for p in sorted((tmp_path / "p" / "train").rglob("*.jpg"))} == first


# ------------------------------------------------------------------------------------------- folders
def _tree(root: Path, layout: dict[str, list[str]], src: str) -> None:
    for cls, files in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for f in files:
            (root / cls / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / cls / f)


def test_scan_folder_sorted_and_filters(tmp_path, digits_root):
    src = str(next((digits_root / "train" / "1").glob("*.jpg")))
    _tree(tmp_path, {"b": ["2.JPEG", "1.png", "notes.txt", ".hidden.jpg"], "a": ["z.Jpg", "sub/y.webp"],
                     ".cache": ["x.jpg"]}, src)
    samples, classes = scan_folder(tmp_path)
    assert classes == ["a", "b"]
    rel = [(os.path.relpath(p, tmp_path), label) for p, label in samples]
    assert rel == [("a/z.Jpg", 0), ("a/sub/y.webp", 0), ("b/1.png", 1), ("b/2.JPEG", 1)]
    assert scan_folder(tmp_path) == (samples, classes)


def test_scan_digits(digits_root):
    samples, classes = scan_folder(digits_root / "train")
    assert classes == [str(i) for i in range(10)]
    assert len(samples) == json.loads((digits_root / "manifest.json").read_text())["totals"]["train"]
    assert all(Path(p).parent.name == classes[label] for p, label in samples)
    assert [label for _, label in samples] == sorted(label for _, label in samples)


def test_missing_dir_error(tmp_path):
    with pytest.raises(DataError) as e:
        scan_folder(tmp_path / "nope")
    msg = str(e.value)
    assert msg == (f"data.train: {tmp_path / 'nope'} does not exist; point data.train at an ImageNet-style "
                   f"folder (class/xxx.jpg) or run `fastairl data digits`")
    with pytest.raises(DataError, match=r"^data\.val: .* does not exist"):
        load_samples(DataConfig(train="x", val=str(tmp_path / "nope")), str(tmp_path / "nope"))


def test_empty_class_folder_is_named(tmp_path, digits_root):
    src = str(next((digits_root / "train" / "1").glob("*.jpg")))
    _tree(tmp_path, {"cat": ["1.jpg"], "dog": ["readme.txt"]}, src)
    with pytest.raises(DataError, match=r"class folder .*dog has no images"):
        scan_folder(tmp_path)


def test_no_classes(tmp_path):
    (tmp_path / "loose.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="has no class folders"):
        scan_folder(tmp_path)


# ---------------------------------------------------------------------------------------- file lists
def test_filelist_relative_absolute_and_sparse_labels(tmp_path, digits_root):
    a = next((digits_root / "train" / "4").glob("*.jpg"))
    (tmp_path / "imgs").mkdir()
    shutil.copy(a, tmp_path / "imgs" / "with space.jpg")
    lst = tmp_path / "train.txt"
    lst.write_text(f"# comment\nimgs/with space.jpg 7\n\n{a} 3\n")
    samples, classes = read_filelist(lst)
    assert classes == ["3", "7"]
    assert samples == [(str(tmp_path / "imgs" / "with space.jpg"), 1), (str(a), 0)]
    cfg = DataConfig(source="filelist", train=str(lst))
    assert load_samples(cfg, cfg.train) == (samples, classes)


def test_filelist_bad_line_names_file_and_line(tmp_path, digits_root):
    a = next((digits_root / "train" / "4").glob("*.jpg"))
    lst = tmp_path / "l.txt"
    lst.write_text(f"{a} 0\n{a} four\n")
    with pytest.raises(DataError, match=rf"^{lst}:2: expected 'path label'"):
        read_filelist(lst)
    lst.write_text(f"{a}\n")
    with pytest.raises(DataError, match=rf"^{lst}:1:"):
        read_filelist(lst)


def test_filelist_missing_file(tmp_path, digits_root):
    a = next((digits_root / "train" / "4").glob("*.jpg"))
    lst = tmp_path / "l.txt"
    lst.write_text(f"{a} 0\ngone.jpg 1\n")
    with pytest.raises(DataError, match=rf"^{lst}:2: image {tmp_path / 'gone.jpg'} does not exist"):
        read_filelist(lst)


# ----------------------------------------------------------------------------------- class fraction
@pytest.mark.parametrize("n,fraction,k", [(1000, 0.1, 100), (1000, 0.25, 250), (10, 0.3, 3), (10, 0.01, 1),
                                          (10, 1.0, 10)])
def test_select_classes_count_and_determinism(n, fraction, k):
    classes = [f"c{i}" for i in range(n)]
    keep = select_classes(classes, fraction, seed=0)
    assert len(keep) == k == len(set(keep)) and keep == sorted(keep) and 0 <= keep[0] and keep[-1] < n
    assert select_classes(classes, fraction, seed=0) == keep
    if 1 < k < n:
        assert select_classes(classes, fraction, seed=1) != keep


def test_select_classes_rejects_bad_fraction():
    with pytest.raises(DataError, match="class_fraction"):
        select_classes(["a"], 0.0, 0)


def test_subset_remaps_labels():
    samples = [("a0", 0), ("b0", 1), ("c0", 2), ("b1", 1), ("d0", 3)]
    kept, names = subset(samples, ["a", "b", "c", "d"], [1, 3])
    assert kept == [("b0", 0), ("b1", 0), ("d0", 1)] and names == ["b", "d"]


def test_load_samples_class_fraction_same_classes_for_train_and_val(digits_root):
    cfg = DataConfig(train=str(digits_root / "train"), val=str(digits_root / "val"),
                     class_fraction=0.3, class_seed=5)
    train, train_classes = load_samples(cfg, cfg.train)
    val, val_classes = load_samples(cfg, cfg.val)
    expected = [str(i) for i in select_classes([str(i) for i in range(10)], 0.3, 5)]
    assert train_classes == val_classes == expected
    assert {label for _, label in train} == {0, 1, 2}
    assert all(Path(p).parent.name == train_classes[label] for p, label in train + val)
    assert load_samples(cfg, cfg.train) == (train, train_classes)


def test_missing_data_extra_says_how_to_install(tmp_path, monkeypatch):
    from fastairl.data.bundled import make_digits

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'fastairl\[data\]'"):
        make_digits(tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_check_same_classes_names_the_difference():
    from fastairl.data.datasets import DataError, check_same_classes

    check_same_classes(["a", "b"], ["a", "b"])
    with pytest.raises(DataError, match=r"only in data.train: b; only in data.val: z"):
        check_same_classes(["a", "b", "c"], ["a", "c", "z"])
    with pytest.raises(DataError, match=r"\(\+2 more\)"):
        check_same_classes([str(i) for i in range(10)], ["0", "1", "2"])
    with pytest.raises(DataError, match="another order"):  # file lists and label maps keep their own order
        check_same_classes(["a", "b"], ["b", "a"])


def test_photo_corpus_classes_are_distinct_images():
    """More classes than photos: rotations and channel orders of each photo, except that a grey photo's
    channel orders are the same image (they made duplicate classes from the 83rd class on)."""
    import numpy as np

    from fastairl.data.bundled import _VARIANTS, _photo_classes, _photo_sources

    sources, _ = _photo_sources()
    classes = _photo_classes(sources)
    seen = set()
    for k, v in classes:
        rot, perm = _VARIANTS[v]
        seen.add(np.ascontiguousarray(np.rot90(sources[k][1], rot)[..., list(perm)]).tobytes())
    assert len(seen) == len(classes) > 24 * len(sources) // 2  # every class its own image
    assert classes[:len(sources)] == [(k, 0) for k in range(len(sources))]  # each photo first, as it is
