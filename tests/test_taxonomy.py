"""WordNet taxonomies (Table 6): the bottom-up merge and the artifact split on a small hand-made
hierarchy, the label-map files, and data.label_map applied by load_samples on real images."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from fastairl.config import DataConfig
from fastairl.data.datasets import DataError, load_samples
from fastairl.data.taxonomy import (ARTIFACT, Hierarchy, bottom_up, describe, label_map_remap, main,
                                    read_is_a, read_label_map, split_by_node, top_down)

# entity ─┬─ abstraction ── a1
#         └─ physical ─┬─ n00021939 (artifact) ─┬─ device ─┬─ c_phone
#                      │                        │          ├─ c_radio
#                      │                        │          └─ c_toydog (second parent)
#                      │                        └─ c_cup
#                      └─ organism ─┬─ dog (itself a class) ─┬─ c_terrier, c_poodle
#                                   │                        └─ c_toydog (first parent)
#                                   └─ c_cat
IS_A = """entity abstraction
entity physical
abstraction a1
physical n00021939
physical organism
n00021939 device
n00021939 c_cup
device c_phone
device c_radio
organism dog
organism c_cat
dog c_terrier
dog c_poodle
dog c_toydog
device c_toydog
"""
WORDS = "n00021939\tartifact, artefact\ndog\tdog, domestic dog\nphysical\tphysical entity\n"
IMAGES = {"a1": 5, "c_cup": 10, "c_cat": 10, "c_phone": 3, "c_radio": 4, "c_terrier": 6, "c_poodle": 7,
          "c_toydog": 2, "dog": 8}
CLASSES = sorted(IMAGES)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "is_a.txt").write_text(IS_A)
    (tmp_path / "words.txt").write_text(WORDS)
    (tmp_path / "classes.txt").write_text("".join(f"{c} some words\n" for c in CLASSES))
    return tmp_path


def hierarchy(files) -> Hierarchy:
    return Hierarchy(read_is_a(files / "is_a.txt"), {})


def groups(mapping: dict) -> set[frozenset]:
    by = {}
    for cls, sup in mapping.items():
        by.setdefault(sup, set()).add(cls)
    return {frozenset(g) for g in by.values()}


def test_bottom_up_properties_every_target(files):
    maps = bottom_up(hierarchy(files), CLASSES, IMAGES, list(range(1, len(CLASSES) + 1)))
    assert sorted(maps) == list(range(1, 10))
    for k, m in maps.items():
        assert sorted(m) == CLASSES  # every class mapped exactly once
        assert len(set(m.values())) == k  # the target count is reached exactly
        d = describe(m, IMAGES, "images", hierarchy(files))
        assert d["total"] == sum(IMAGES.values()) == 55  # counts add up
        assert sum(g["classes"] for g in d["superclasses"].values()) == len(CLASSES)
    for k in range(1, 9):  # bottom-up: every coarser map only merges groups of the finer one
        finer, coarser = groups(maps[k + 1]), groups(maps[k])
        assert all(any(f <= c for c in coarser) for f in finer)
    assert maps[9] == {c: c for c in CLASSES}


def test_bottom_up_hand_computed(files):
    """Deepest first (depth 4: the leaves under device and dog), the fewest images first among
    equals, each replaced by its FIRST-listed parent (c_toydog -> dog, not device)."""
    maps = bottom_up(hierarchy(files), CLASSES, IMAGES, [8, 7, 5, 4, 2])
    assert maps[8] == {**{c: c for c in CLASSES}, "c_toydog": "dog"}  # 2 images: the smallest goes first
    assert maps[7]["c_phone"] == maps[7]["c_radio"] == "device"
    assert groups(maps[5]) == {frozenset({"a1"}), frozenset({"c_cup"}), frozenset({"c_cat"}),
                               frozenset({"c_phone", "c_radio"}),
                               frozenset({"dog", "c_toydog", "c_terrier", "c_poodle"})}
    # depth 3: device (7 images) first, then c_cat before c_cup (10 each: by name), then c_cup
    assert maps[4] == {"a1": "a1", "c_phone": ARTIFACT, "c_radio": ARTIFACT, "c_cup": ARTIFACT,
                       "c_cat": "organism", "dog": "dog", "c_toydog": "dog", "c_terrier": "dog",
                       "c_poodle": "dog"}
    assert maps[2] == {c: "abstraction" if c == "a1" else "physical" for c in CLASSES}
    d = describe(maps[2], IMAGES, "images", Hierarchy(read_is_a(files / "is_a.txt"), {"physical": "phys"}))
    assert d["superclasses"]["physical"] == {"name": "phys", "classes": 8, "images": 50}
    assert d["imbalance_ratio"] == 10.0  # 50 / 5


def test_artifact_split_follows_any_parent(files):
    m = split_by_node(hierarchy(files), CLASSES, ARTIFACT)
    artifact = {c for c, s in m.items() if s == ARTIFACT}
    assert artifact == {"c_phone", "c_radio", "c_cup", "c_toydog"}  # c_toydog through its second parent
    assert {s for c, s in m.items() if c not in artifact} == {f"not_{ARTIFACT}"}
    with pytest.raises(DataError, match="all 9 classes fall on one side"):
        split_by_node(hierarchy(files), CLASSES, "entity")
    with pytest.raises(DataError, match="--split-node n999 is not in is_a.txt"):
        split_by_node(hierarchy(files), CLASSES, "n999")


def test_top_down_lifts_then_collapses_to_the_highest_present_node(files):
    h = hierarchy(files)
    one = top_down(h, CLASSES, 1)  # device -> n00021939 and dog -> organism: their ancestors are present too
    assert one == {"a1": "abstraction", "c_cup": ARTIFACT, "c_phone": ARTIFACT, "c_radio": ARTIFACT,
                   "c_cat": "organism", "dog": "organism", "c_toydog": "organism", "c_terrier": "organism",
                   "c_poodle": "organism"}
    assert set(top_down(h, CLASSES, 2).values()) == {"entity"}  # physical lies below entity


def test_hierarchy_errors(files):
    h = hierarchy(files)
    with pytest.raises(DataError, match=r"1 of 10 classes have no parent in is_a.txt \(first: n123\)"):
        bottom_up(h, CLASSES + ["n123"], {**IMAGES, "n123": 1}, [2])
    with pytest.raises(DataError, match="reachable super-class counts are 1..9"):
        bottom_up(h, CLASSES, IMAGES, [10])
    loop = Hierarchy({"a": ["b"], "b": ["a"]}, {})
    with pytest.raises(DataError, match="cycle"):
        loop.depth("a")
    (files / "bad.txt").write_text("entity\n")
    with pytest.raises(DataError, match=r"bad.txt:1: expected 'parent child'"):
        read_is_a(files / "bad.txt")


def test_cli_writes_label_maps_and_report(files, capsys):
    out = files / "tax"
    assert main(["--classes", str(files / "classes.txt"), "--is-a", str(files / "is_a.txt"), "--words",
                 str(files / "words.txt"), "--targets", "2,4", "--top-down-steps", "1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["maps"]) == ["bottom_up_2", "bottom_up_4", f"split_{ARTIFACT}", "top_down_3"]
    for name, m in report["maps"].items():
        mapping = read_label_map(out / m["file"])
        assert sorted(mapping) == CLASSES and len(set(mapping.values())) == m["num_classes"]
        assert m["unit"] == "classes" and m["total"] == 9  # a class list: counts are classes
    split = report["maps"][f"split_{ARTIFACT}"]
    assert split["superclasses"][ARTIFACT] == {"name": "artifact, artefact", "classes": 4}
    assert split["superclasses"][f"not_{ARTIFACT}"]["name"] == "not: artifact, artefact"
    assert split["imbalance_ratio"] == 5 / 4
    assert "bottom_up_4.tsv: 4 super-classes" in capsys.readouterr().out


def test_cli_counts_images_of_a_folder(files):
    root = files / "train"
    for c, n in IMAGES.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            (root / c / f"{i}.JPEG").write_bytes(b"")
    assert main(["--classes", str(root), "--is-a", str(files / "is_a.txt"), "--targets", "2",
                 "--out", str(files / "tax")]) == 0
    m = json.loads((files / "tax" / "report.json").read_text())["maps"]["bottom_up_2"]
    assert m["unit"] == "images" and m["superclasses"]["abstraction"]["images"] == 5
    assert m["imbalance_ratio"] == 10.0


@pytest.mark.parametrize("bad, fragment", [
    (["--is-a", "missing.txt"], "--is-a: missing.txt does not exist"),
    (["--classes", "nope"], "--classes: nope does not exist"),
    (["--targets", "2,x"], "--targets '2,x': give comma-separated integers"),
])
def test_cli_one_line_errors(files, capsys, monkeypatch, bad, fragment):
    monkeypatch.chdir(files)
    args = {"--classes": "classes.txt", "--is-a": "is_a.txt", "--targets": "2", "--out": "tax"}
    args.update(dict(zip(bad[::2], bad[1::2])))
    assert main([x for kv in args.items() for x in kv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err


def test_label_map_on_real_images(digits_root, tmp_path):
    """10 digits -> 2 super-classes on the bundled digits: labels and classes change, counts add up,
    train and val agree."""
    lm = tmp_path / "parity.tsv"
    lm.write_text("# parity\n" + "".join(f"{d}\t{'even' if d % 2 == 0 else 'odd'}\n" for d in range(10)))
    plain = DataConfig(train=str(digits_root / "train"), val=str(digits_root / "val"))
    mapped = DataConfig(train=plain.train, val=plain.val, label_map=str(lm))
    for split in (plain.train, plain.val):
        before, classes = load_samples(plain, split)
        after, supers = load_samples(mapped, split)
        assert classes == [str(d) for d in range(10)] and supers == ["even", "odd"]
        assert [p for p, _ in after] == [p for p, _ in before]  # same images, same order
        assert all(s == int(classes[c]) % 2 for (_, c), (_, s) in zip(before, after))
        n_before, n_after = Counter(c for _, c in before), Counter(s for _, s in after)
        assert n_after[0] == sum(n_before[d] for d in (0, 2, 4, 6, 8)) and sum(n_after.values()) == len(before)
    frac = DataConfig(train=plain.train, label_map=str(lm), class_fraction=0.3, class_seed=1)
    kept = load_samples(DataConfig(train=plain.train, class_fraction=0.3, class_seed=1), plain.train)[1]
    assert load_samples(frac, plain.train)[1] == sorted({"even" if int(c) % 2 == 0 else "odd" for c in kept})


def test_label_map_errors(digits_root, tmp_path):
    train = str(digits_root / "train")
    with pytest.raises(DataError, match=r"data.label_map: label map .*none.tsv does not exist; write one with "
                                        r"`fastairl taxonomy`"):
        load_samples(DataConfig(train=train, label_map=str(tmp_path / "none.tsv")), train)
    part = tmp_path / "part.tsv"
    part.write_text("".join(f"{d}\tlow\n" for d in range(5)))
    with pytest.raises(DataError, match=r"has no line for 5 of the 10 classes \(first: 5, 6, 7\)"):
        load_samples(DataConfig(train=train, label_map=str(part)), train)
    twice = tmp_path / "twice.tsv"
    twice.write_text("0\ta\n0\tb\n")
    with pytest.raises(DataError, match=r"twice.tsv:2: class 0 is mapped twice \(a and b\)"):
        label_map_remap(["0"], twice)
