"""Class taxonomies (PAPER.md "Data variations", Table 6): ImageNet's classes merged along the WordNet
is-a tree into fewer super-classes, written as label-map files that `data.label_map` applies.

    fastairl taxonomy --classes data/imagenet/train --is-a wordnet.is_a.txt --words words.txt \\
        --out data/taxonomy                      # bottom_up_{2,10,79,127}.tsv, split_n00021939.tsv

Inputs: the class list (an ImageNet-style folder, whose sub-folders are the wnids and whose images are
counted, or a text file whose first token per line is a wnid, e.g. LOC_synset_mapping.txt); WordNet's
`wordnet.is_a.txt` ("parent child" per line) and optionally `words.txt` ("wnid<TAB>names", for the
report).

The bottom-up rule (after Huh et al. 2016, "What makes ImageNet good for transfer learning?", whose
"down-up" clustering lifts every class at the deepest level of the tree to its parent, level by level):
- A node's parent is the FIRST parent listed for it in is_a.txt (WordNet has a few nodes with two; Huh
  et al. take NLTK's first hypernym, whose order may differ for those). Its depth is the number of such
  steps up to a root.
- Every class starts as its own super-class. While there are more super-classes than the target, the
  super-class node with the greatest depth (ties: the fewest images, or classes when no counts are
  known; then the smaller name) is replaced by its parent; super-classes that meet at the same node
  merge. The count falls by 0 or 1 per step, so every target between the class count and the number of
  roots is hit exactly; the map is taken the first time the count equals the target. Handled level by
  level this is exactly Huh et al.'s down-up rule; "fewest first" only decides targets that fall inside
  a level. Huh et al.'s released 2- and 79-class sets are down-up ones; their 10- and 127-class sets
  came from their top-down ("up-down") rule instead, which `--top-down-steps` also writes (see
  `top_down`): the bottom-up 10 and 127 differ from those (PAPER.md says "bottom-up" for all four).
- The balanced 2-class split: classes that descend from `--split-node` (default n00021939, "artifact,
  artefact") through ANY chain of is-a links, versus all others.

A label-map file has one `class<TAB>superclass` line per class ('#' starts a comment); report.json holds,
per map, the super-classes with their names, class and image counts, and the imbalance ratio
(largest / smallest super-class, in images when counted).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .datasets import IMAGE_EXTENSIONS, DataError, Samples

ARTIFACT = "n00021939"  # "artifact, artefact": the balanced 2-class split of Table 6
DEFAULT_TARGETS = (2, 10, 79, 127)


# ----------------------------------------------------------------------------------- the hierarchy
@dataclass
class Hierarchy:
    parents: dict[str, list[str]]  # child -> its parents, in file order
    names: dict[str, str]  # wnid -> words (may be empty)
    _depth: dict[str, int] = field(default_factory=dict, repr=False)

    def parent(self, node: str) -> Optional[str]:
        """The first-listed parent, or None at a root."""
        ps = self.parents.get(node)
        return ps[0] if ps else None

    def depth(self, node: str) -> int:
        """Steps along first-listed parents up to a root (memoised)."""
        chain = []
        while node not in self._depth and self.parent(node) is not None:
            if node in chain:
                raise DataError(f"is_a.txt has a cycle through {node}: {' -> '.join(chain + [node])}")
            chain.append(node)
            node = self.parent(node)
        d = self._depth.setdefault(node, 0)  # known, or a root
        for n in reversed(chain):
            d += 1
            self._depth[n] = d
        return d

    def ancestors(self, node: str) -> set[str]:
        """Every node above `node` through any parent (not `node` itself)."""
        seen, todo = set(), list(self.parents.get(node, ()))
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(self.parents.get(n, ()))
        return seen

    def name(self, node: str) -> str:
        return self.names.get(node, "")


def read_is_a(path) -> dict[str, list[str]]:
    """`parent child` per line -> child: [parents in file order]."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--is-a: {path} does not exist; give WordNet's wordnet.is_a.txt ('parent child' lines, "
                        f"shipped with ImageNet's devkit / ILSVRC metadata)")
    parents: dict[str, list[str]] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) != 2:
            raise DataError(f"{path}:{lineno}: expected 'parent child', got {line.strip()!r}")
        parent, child = parts
        if parent not in parents.setdefault(child, []):
            parents[child].append(parent)
    if not parents:
        raise DataError(f"--is-a: {path} has no 'parent child' lines")
    return parents


def read_words(path) -> dict[str, str]:
    """`wnid<TAB>names` per line (words.txt); None -> no names."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--words: {path} does not exist; give WordNet's words.txt ('wnid<TAB>names' lines) "
                        f"or leave --words out")
    names = {}
    for line in path.read_text().splitlines():
        wnid, _, words = line.partition("\t")
        if wnid.strip():
            names[wnid.strip()] = words.strip()
    return names


def read_classes(path) -> tuple[list[str], dict[str, int], str]:
    """(classes, count per class, unit): a folder's sub-folders with their image counts, or the first
    token of every line of a text file with count 1 each."""
    path = Path(path)
    if path.is_dir():
        classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise DataError(f"--classes: {path} has no class folders; give an ImageNet-style folder "
                            f"(<wnid>/<image>) or a file with one wnid per line")
        return classes, {c: _count_images(path / c) for c in classes}, "images"
    if not path.is_file():
        raise DataError(f"--classes: {path} does not exist; give an ImageNet-style folder (<wnid>/<image>) "
                        f"or a file with one wnid per line")
    classes = [line.split()[0] for line in path.read_text().splitlines() if line.strip()
               and not line.lstrip().startswith("#")]
    dups = sorted({c for c in classes if classes.count(c) > 1})
    if dups:
        raise DataError(f"--classes: {path} lists {', '.join(dups[:5])} more than once; list every class once")
    if not classes:
        raise DataError(f"--classes: {path} lists no classes")
    return classes, {c: 1 for c in classes}, "classes"


def _count_images(folder: Path) -> int:
    return sum(1 for _, _, files in os.walk(folder, followlinks=True)
               for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))


# ----------------------------------------------------------------------------------------- merging
def bottom_up(h: Hierarchy, classes: list[str], counts: dict[str, int],
              targets: list[int]) -> dict[int, dict[str, str]]:
    """target -> {class: super-class node}, by the module docstring's bottom-up rule."""
    _check_known(h, classes)
    members = {c: [c] for c in classes}  # super-class node -> its classes
    size = dict(counts)  # super-class node -> images (or classes) under it
    wanted = sorted(set(targets), reverse=True)
    roots = {_root(h, c) for c in classes}
    bad = [t for t in wanted if not len(roots) <= t <= len(classes)]
    if bad:
        raise DataError(f"--targets {bad[0]}: reachable super-class counts are {len(roots)}..{len(classes)} "
                        f"({len(classes)} classes, {len(roots)} root(s) in is_a.txt)")
    maps = {}
    while wanted:
        if len(members) == wanted[0]:
            maps[wanted.pop(0)] = {c: node for node, cs in members.items() for c in cs}
            continue
        node = min(members, key=lambda n: (-h.depth(n), size[n], n))  # deepest, smallest, name
        up = h.parent(node)  # not None: more super-classes than roots remain, so one is below a root
        members.setdefault(up, []).extend(members.pop(node))
        size[up] = size.get(up, 0) + size.pop(node)
    return maps


def top_down(h: Hierarchy, classes: list[str], steps: int) -> dict[str, str]:
    """Huh et al.'s other ("up-down") rule, where their 10- and 127-class sets come from: `steps` times,
    every super-class is lifted to its first-listed parent, then replaced by the highest node of its
    first-parent chain that is also a super-class now. The count is whatever the tree gives."""
    _check_known(h, classes)
    mapping = {c: c for c in classes}
    for _ in range(steps):
        mapping = {c: h.parent(s) or s for c, s in mapping.items()}
        present = set(mapping.values())
        mapping = {c: _highest_present(h, s, present) for c, s in mapping.items()}
    return mapping


def _highest_present(h: Hierarchy, node: str, present: set[str]) -> str:
    best = node
    while (node := h.parent(node)) is not None:
        if node in present:
            best = node
    return best


def _root(h: Hierarchy, node: str) -> str:
    h.depth(node)  # raises on a cycle
    while (up := h.parent(node)) is not None:
        node = up
    return node


def _check_known(h: Hierarchy, classes: list[str]) -> None:
    unknown = [c for c in classes if c not in h.parents]
    if unknown:
        raise DataError(f"{len(unknown)} of {len(classes)} classes have no parent in is_a.txt (first: "
                        f"{unknown[0]}); --classes must hold WordNet ids (n01440764, ...) of the --is-a file")


def split_by_node(h: Hierarchy, classes: list[str], node: str) -> dict[str, str]:
    """{class: node} for the classes below `node` through any is-a chain, {class: not_<node>} otherwise."""
    _check_known(h, classes)
    if node not in h.parents and not any(node in ps for ps in h.parents.values()):
        raise DataError(f"--split-node {node} is not in is_a.txt")
    mapping = {c: node if c == node or node in h.ancestors(c) else f"not_{node}" for c in classes}
    sides = set(mapping.values())
    if len(sides) < 2:
        raise DataError(f"--split-node {node}: all {len(classes)} classes fall on one side "
                        f"({sides.pop()}); pick a node some classes descend from")
    return mapping


def describe(mapping: dict[str, str], counts: dict[str, int], unit: str, h: Hierarchy) -> dict:
    """Per super-class: its words, number of classes (and images when `unit` is images); the imbalance
    ratio largest / smallest in `unit`."""
    groups: dict[str, dict] = {}
    for cls in sorted(mapping):
        g = groups.setdefault(mapping[cls], {"name": _super_name(h, mapping[cls]), "classes": 0, "images": 0})
        g["classes"] += 1
        g["images"] += counts[cls]
    if unit == "classes":  # a class list: no image counts
        for g in groups.values():
            del g["images"]
    sizes = [g[unit] for g in groups.values()]
    return {"num_classes": len(groups), "unit": unit, "total": sum(sizes),
            "imbalance_ratio": max(sizes) / max(min(sizes), 1), "superclasses": dict(sorted(groups.items()))}


def _super_name(h: Hierarchy, sup: str) -> str:
    if sup.startswith("not_") and sup not in h.names:  # the rest of a split
        return f"not: {h.name(sup[4:])}"
    return h.name(sup)


# --------------------------------------------------------------------------------- label-map files
def write_label_map(path: Path, mapping: dict[str, str], header: str) -> None:
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"{cls}\t{mapping[cls]}" for cls in sorted(mapping)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def read_label_map(path, key: str = "data.label_map") -> dict[str, str]:
    """`class<TAB>superclass` lines ('#' comments, blank lines skipped) -> {class: superclass}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: label map {path} does not exist; write one with `fastairl taxonomy` "
                        f"('class<TAB>superclass' lines) or unset {key}")
    mapping: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split("\t") if "\t" in text else text.split()
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise DataError(f"{path}:{lineno}: expected 'class<TAB>superclass', got {line.strip()!r}")
        cls, sup = parts[0].strip(), parts[1].strip()
        if mapping.get(cls, sup) != sup:
            raise DataError(f"{path}:{lineno}: class {cls} is mapped twice ({mapping[cls]} and {sup}); "
                            f"map every class once")
        mapping[cls] = sup
    if not mapping:
        raise DataError(f"{key}: label map {path} has no 'class<TAB>superclass' lines")
    return mapping


def label_map_remap(classes: list[str], path, key: str = "data.label_map") -> tuple[list[int], list[str]]:
    """(new label of every old label, the super-classes): the super-classes present among `classes`,
    sorted, so train and val agree whenever their class lists do."""
    mapping = read_label_map(path, key)
    missing = [c for c in classes if c not in mapping]
    if missing:
        raise DataError(f"{key}: {path} has no line for {len(missing)} of the {len(classes)} classes (first: "
                        f"{', '.join(missing[:3])}); add 'class<TAB>superclass' lines for them")
    supers = sorted({mapping[c] for c in classes})
    index = {s: i for i, s in enumerate(supers)}
    return [index[mapping[c]] for c in classes], supers


def apply_label_map(samples: Samples, classes: list[str], path,
                    key: str = "data.label_map") -> tuple[Samples, list[str]]:
    """The samples relabelled to their super-classes (see label_map_remap)."""
    remap, supers = label_map_remap(classes, path, key)
    return [(p, remap[label]) for p, label in samples], supers


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastairl taxonomy", description="Merge classes bottom-up along the "
                                "WordNet is-a tree into super-classes; write data.label_map files + report.json.")
    p.add_argument("--classes", required=True, help="ImageNet-style folder (<wnid>/<image>, images counted) "
                   "or a text file with one wnid per line (first token)")
    p.add_argument("--is-a", required=True, help="wordnet.is_a.txt: 'parent child' per line")
    p.add_argument("--words", default=None, help="words.txt: 'wnid<TAB>names' per line (names in the report)")
    p.add_argument("--targets", default=",".join(map(str, DEFAULT_TARGETS)),
                   help="comma-separated super-class counts (default 2,10,79,127)")
    p.add_argument("--split-node", default=ARTIFACT, help=f"the 2-class split: descendants of this node vs the "
                   f"rest (default {ARTIFACT}, artifact); 'none' skips it")
    p.add_argument("--top-down-steps", default="", help="also Huh et al.'s up-down sets, lifted this many "
                   "steps, comma-separated (e.g. 1,2): top_down_<count>.tsv")
    p.add_argument("--out", required=True, help="output folder: bottom_up_<k>.tsv, split_<node>.tsv, report.json")
    return p


def build(args, argv: list[str]) -> dict:
    targets = _ints(args.targets, "--targets", "2,10,79,127")
    steps = _ints(args.top_down_steps, "--top-down-steps", "1,2")
    h = Hierarchy(read_is_a(args.is_a), read_words(args.words))
    classes, counts, unit = read_classes(args.classes)
    maps = {f"bottom_up_{k}": (m, f"bottom-up merge of {len(classes)} classes into {k} super-classes")
            for k, m in bottom_up(h, classes, counts, targets).items()}
    for k in steps:
        m = top_down(h, classes, k)
        maps[f"top_down_{len(set(m.values()))}"] = (m, f"top-down (Huh et al. up-down): classes lifted {k} step(s)")
    if args.split_node != "none":
        maps[f"split_{args.split_node}"] = (split_by_node(h, classes, args.split_node),
                                            f"descendants of {args.split_node} ({h.name(args.split_node)}) vs the rest")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"tool": "taxonomy", "command": ["fastairl", "taxonomy", *argv],
              "inputs": {k: _file_info(v) for k, v in (("is_a", args.is_a), ("words", args.words)) if v}
              | {"classes": {"path": str(Path(args.classes).resolve()), "count": len(classes), "unit": unit}},
              "rule": "bottom-up: deepest super-class (ties: fewest " + unit + ", then name) replaced by its "
                      "first-listed parent until the target count; split: any is-a chain", "maps": {}}
    for name, (mapping, what) in maps.items():
        write_label_map(out / f"{name}.tsv", mapping, f"fastairl taxonomy: {what}\nclass<TAB>superclass")
        report["maps"][name] = {"file": f"{name}.tsv", "what": what, **describe(mapping, counts, unit, h)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _ints(text: str, flag: str, example: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise DataError(f"{flag} {text!r}: give comma-separated integers, e.g. {example}") from None
    if any(v < 1 for v in values):
        raise DataError(f"{flag} {text!r}: every value must be >= 1")
    return values


def _file_info(path) -> dict:
    path = Path(path)
    return {"path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        report = build(args, argv)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, m in report["maps"].items():
        print(f"{args.out}/{m['file']}: {m['num_classes']} super-classes, imbalance {m['imbalance_ratio']:.1f} "
              f"({m['unit']}: largest / smallest)")
    return 0
