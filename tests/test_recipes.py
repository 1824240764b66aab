"""Every recipe under recipes/ resolves to the hyper-parameters the paper reports (PAPER.md).

The table below is transcribed from PAPER.md. Runs, subsampling, ablation and variant files are
checked as families built from the table rows. The coverage test fails when a recipe file has no
row and belongs to no family.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional

import pytest
import yaml

from fastairl.config import config_to_dict, load_config
from fastairl.data.augment import spec_from_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
LEAD_OWNED = {"quickstart.yaml", "quickstart_eval.yaml"}  # written and checked elsewhere; loaded here when present


def _rel(p: Path) -> str:
    return p.relative_to(RECIPES).as_posix()


# study files (recipes/studies) are not training recipes; tests/test_study.py loads every recipe they name
ALL_FILES = sorted(_rel(p) for p in RECIPES.rglob("*.yaml")
                   if not p.name.startswith("_") and "studies" not in p.relative_to(RECIPES).parts)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resolved(rel: str) -> dict:
    return _flat(config_to_dict(load_config(RECIPES / rel)))


def diff_keys(a: dict, b: dict) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} - {"name"}


# ------------------------------------------------------------------------------------ the table
class Row(NamedTuple):
    name: str
    loss: str
    symmetric: bool
    predictor: str  # none | student | both
    bn: str
    ema: Optional[tuple]  # (schedule, m0); None: no teacher
    projector: Optional[tuple]  # (hidden, out, BN in hidden layer); None: no projector
    head: Optional[tuple]  # predictor MLP (hidden, out, BN in hidden); None when predictor is none
    optim: tuple  # (name, base_lr, weight_decay, momentum, trust_coef, exclude 1-d params)
    warmup: float
    epochs: int
    arch: str
    aug: str
    batch: int = 1024
    tau: float = 0.2
    queue: int = 65536
    extra: tuple = ()  # further (dotted key, value) pairs


MOCO_PROJ = (2048, 128, False)  # 2048 -> 2048 -> ReLU -> 128
BYOL_PROJ = (4096, 256, True)  # 2048 -> 4096 -> BN -> ReLU -> 256
PRED = (4096, 256, True)  # 256 -> 4096 -> BN -> ReLU -> 256
SGD = ("sgd", 0.03, 1e-4, 0.9, 1e-3, False)  # MoCo v2 / v2+ / BYOL-SGD; wd on every parameter
LARS = ("lars", 0.2, 1.5e-6, 0.9, 1e-3, True)  # BYOL's LARS: biases and BN excluded
SUP_SGD = ("sgd", 0.1, 1e-4, 0.9, 1e-3, False)
CONST = ("constant", 0.999)
COS = ("cosine", 0.99)

# fmt: off
ROWS: dict[str, Row] = {
    #                               name                     loss       sym    pred       bn         ema    projector  head  optim    wu  ep   arch        aug
    "mocov2.yaml":                  Row("mocov2",            "infonce", False, "none",    "shuffle", CONST, MOCO_PROJ, None, SGD,     10, 200, "resnet50", "mocov2"),
    "ladder/1_syncbn_projbn.yaml":  Row("ladder1_syncbn_projbn", "infonce", False, "none", "sync",   CONST, BYOL_PROJ, None, SGD,     10, 200, "resnet50", "mocov2"),
    "ladder/2_predictor.yaml":      Row("ladder2_predictor", "infonce", False, "student", "sync",    CONST, BYOL_PROJ, PRED, SGD,     10, 200, "resnet50", "mocov2"),
    "ladder/3_momentum_cosine.yaml": Row("ladder3_momentum_cosine", "infonce", False, "student", "sync", COS, BYOL_PROJ, PRED, SGD, 10, 200, "resnet50", "mocov2"),
    "ladder/4_symmetric.yaml":      Row("ladder4_symmetric", "infonce", True,  "student", "sync",    COS,   BYOL_PROJ, PRED, SGD,     10, 200, "resnet50", "mocov2"),
    "ladder/5_complex_aug.yaml":    Row("ladder5_complex_aug", "infonce", True, "student", "sync",   COS,   BYOL_PROJ, PRED, SGD,     10, 200, "resnet50", "byol_sym"),
    "mocov2plus.yaml":              Row("mocov2plus",        "infonce", True,  "student", "sync",    COS,   BYOL_PROJ, PRED, SGD,     10, 200, "resnet50", "mocov2"),
    "smocov2plus.yaml":             Row("smocov2plus",       "infonce", True,  "both",    "sync",    COS,   BYOL_PROJ, PRED, SGD,     10, 200, "resnet50", "mocov2"),
    "mocov2plus_lars.yaml":         Row("mocov2plus_lars",   "infonce", True,  "student", "sync",    COS,   BYOL_PROJ, PRED, LARS,    10, 200, "resnet50", "mocov2"),
    "byol_sgd.yaml":                Row("byol_sgd",          "byol",    True,  "student", "sync",    COS,   BYOL_PROJ, PRED, SGD,     10, 200, "resnet50", "byol_sym"),
    "byol_lars.yaml":               Row("byol_lars",         "byol",    True,  "student", "sync",    COS,   BYOL_PROJ, PRED, LARS,    10, 200, "resnet50", "byol_sym"),
    "supervised.yaml":              Row("supervised",        "ce",      False, "none",    "sync",    None,  None,      None, SUP_SGD, 10, 100, "resnet50", "crop_flip",
                                        extra=(("probe.online", False),)),
}
# fmt: on

# Shared setup from base.yaml, checked on every recipe that inherits it.
COMMON = {"data.train": "data/imagenet/train", "data.val": "data/imagenet/val", "data.workers": 8,
          "aug.crop_size": 224, "optim.schedule": "cosine", "optim.nesterov": False}

# Concrete runs: (method recipe, arch, epochs).
RUNS = {
    **{f"runs/{m}_{a}_ep100.yaml": (f"{m}.yaml", arch, 100)
       for m in ("mocov2", "mocov2plus", "byol_sgd") for a, arch in (("r18", "resnet18"), ("r101", "resnet101"))},
    **{f"runs/{m}_ep{e}.yaml": (f"{m}.yaml", "resnet50", e)
       for m in ("mocov2plus", "byol_lars") for e in (100, 300, 500)},
}

# Class subsampling on MoCo v2+: file -> class fraction.
SUBSAMPLE = {f"subsample/frac{p}.yaml": p / 100 for p in (10, 20, 50, 70, 100)}

# Fig. 5 augmentation ablation, complex set first: file -> (method recipe, ablation level).
ABLATION = {f"ablation/{m}_aug{tag}.yaml": (f"{m}.yaml", level)
            for m in ("mocov2plus", "smocov2plus", "byol_sgd")
            for tag, level in (("_full", "none"), ("-solarize", "-solarize"), ("-blur", "-blur"),
                               ("-gray", "-gray"), ("-jitter", "-jitter"))}

# Stackable partials: the only keys each file may set (besides its name).
VARIANTS = {
    "variants/ep100.yaml": {"train.epochs": 100},
    "variants/ep300.yaml": {"train.epochs": 300},
    "variants/ep500.yaml": {"train.epochs": 500},
    "variants/r18.yaml": {"model.arch": "resnet18"},
    "variants/r101.yaml": {"model.arch": "resnet101"},
    "variants/complex_aug.yaml": {"aug.preset": "byol_sym"},
    **{f"variants/abl_{lvl}.yaml": {"aug.ablation": f"-{lvl}"} for lvl in ("solarize", "blur", "gray", "jitter")},
}

BASE_ROW = {"model.arch": "resnet50", "train.epochs": 200, "train.batch_size": 1024, "optim.warmup_epochs": 10,
            "method.temperature": 0.2, "method.queue_size": 65536, "optim.name": "sgd", "optim.base_lr": 0.03,
            "optim.momentum": 0.9, "optim.weight_decay": 1e-4, "optim.exclude_1d": False}


def expected(row: Row) -> dict:
    opt, lr, wd, mom, trust, excl = row.optim
    e = {
        "name": row.name, "method.loss": row.loss, "method.symmetric": row.symmetric,
        "method.predictor": row.predictor, "method.bn": row.bn, "method.temperature": row.tau,
        "method.queue_size": row.queue, "optim.name": opt, "optim.base_lr": lr, "optim.weight_decay": wd,
        "optim.momentum": mom, "optim.trust_coef": trust, "optim.exclude_1d": excl,
        "optim.warmup_epochs": row.warmup, "train.epochs": row.epochs, "model.arch": row.arch,
        "aug.preset": row.aug, "aug.ablation": "none", "train.batch_size": row.batch,
        "data.class_fraction": 1.0, "train.keep_iterations": False,
        "probe.online": row.loss != "ce",
    }
    if row.ema is not None:
        e["method.ema.schedule"], e["method.ema.base"] = row.ema
    for section, dims in (("projector", row.projector), ("predictor", row.head)):
        if dims is not None:
            for key, v in zip(("hidden_dim", "out_dim", "bn_hidden"), dims):
                e[f"model.{section}.{key}"] = v
    e.update(row.extra)
    return e


def mismatches(got: dict, want: dict) -> dict:
    bad = {}
    for k, v in want.items():
        g = got.get(k, "<missing>")
        same = g == pytest.approx(v) if isinstance(v, float) and not isinstance(v, bool) else g == v
        if not same:
            bad[k] = (g, v)
    return bad


def expected_for(rel: str) -> dict:
    """The full expectation for any recipe that has a row or belongs to a checked family."""
    if rel in ROWS:
        return expected(ROWS[rel])
    if rel in RUNS:
        method, arch, epochs = RUNS[rel]
        return expected(ROWS[method]._replace(name=Path(rel).stem, arch=arch, epochs=epochs))
    if rel in SUBSAMPLE:
        row = ROWS["mocov2plus.yaml"]
        f = SUBSAMPLE[rel]  # the epoch intervals scale with the epochs: the full run's cadence in steps
        return {**expected(row._replace(name=f"mocov2plus_{Path(rel).stem}")),
                "data.class_fraction": f, "train.keep_iterations": True,
                "probe.knn_every_epochs": max(1, round(1 / f)), "train.ckpt_every_epochs": round(50 / f)}
    if rel in ABLATION:
        method, level = ABLATION[rel]
        row = ROWS[method]._replace(name=Path(rel).stem, aug="byol_sym")
        return {**expected(row), "aug.ablation": level}
    raise KeyError(rel)


# ---------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("rel", ALL_FILES)
def test_every_recipe_loads(rel):
    cfg = load_config(RECIPES / rel)
    assert cfg.name


def test_every_recipe_is_checked():
    covered = (set(ROWS) | set(RUNS) | set(SUBSAMPLE) | set(ABLATION) | set(VARIANTS) | set(EVAL)
               | {"base.yaml"})
    files = set(ALL_FILES) - LEAD_OWNED
    assert files - covered == set(), "recipe files without a test row or family"
    assert covered - files == set(), "test rows without a recipe file"


def test_run_names_are_distinct():
    names = {}
    for rel in ALL_FILES:
        names.setdefault(load_config(RECIPES / rel).name, []).append(rel)
    assert {n: fs for n, fs in names.items() if len(fs) > 1} == {}


def test_base_holds_the_shared_setup():
    assert mismatches(resolved("base.yaml"), {**BASE_ROW, **COMMON}) == {}


@pytest.mark.parametrize("rel", sorted(set(ROWS) | set(RUNS) | set(SUBSAMPLE) | set(ABLATION)))
def test_recipe_matches_paper(rel):
    got = resolved(rel)
    assert mismatches(got, {**COMMON, **expected_for(rel)}) == {}


def test_sgd_lr_scales_to_the_paper_value():
    for rel in ("mocov2.yaml", "mocov2plus.yaml", "byol_sgd.yaml"):
        cfg = load_config(RECIPES / rel)
        assert cfg.optim.base_lr * cfg.train.batch_size / 256 == pytest.approx(0.12), rel


@pytest.mark.parametrize("rel", sorted(VARIANTS))
def test_variant_sets_only_its_factor(rel):
    raw = yaml.safe_load((RECIPES / rel).read_text())
    raw.pop("name", None)
    assert "base" not in raw, "variants are stacked by list bases; they must not inherit themselves"
    assert _flat(raw) == VARIANTS[rel]


# Fig. 2: each step adds one factor to the previous one.
LADDER = [
    ("mocov2.yaml", None),
    ("ladder/1_syncbn_projbn.yaml", {"method.bn", "model.projector.bn_hidden", "model.projector.hidden_dim",
                                     "model.projector.out_dim"}),
    ("ladder/2_predictor.yaml", {"method.predictor"}),
    ("ladder/3_momentum_cosine.yaml", {"method.ema.schedule", "method.ema.base"}),
    ("ladder/4_symmetric.yaml", {"method.symmetric"}),
    ("ladder/5_complex_aug.yaml", {"aug.preset"}),
]


@pytest.mark.parametrize("i", range(1, len(LADDER)), ids=[s for s, _ in LADDER[1:]])
def test_ladder_step_changes_only_its_factor(i):
    (prev, _), (cur, factor) = LADDER[i - 1], LADDER[i]
    assert diff_keys(resolved(prev), resolved(cur)) == factor


def test_ladder_step4_is_mocov2plus():
    assert diff_keys(resolved("ladder/4_symmetric.yaml"), resolved("mocov2plus.yaml")) == set()


@pytest.mark.parametrize("a, b, factor", [
    # Table 2 crossover: only the optimiser changes.
    ("mocov2plus.yaml", "mocov2plus_lars.yaml", {"optim.name", "optim.base_lr", "optim.weight_decay",
                                                 "optim.exclude_1d"}),
    ("byol_sgd.yaml", "byol_lars.yaml", {"optim.name", "optim.base_lr", "optim.weight_decay", "optim.exclude_1d"}),
    # BYOL-SGD is MoCo v2+ with BYOL's loss and augmentations.
    ("mocov2plus.yaml", "byol_sgd.yaml", {"method.loss", "aug.preset"}),
    ("mocov2plus.yaml", "smocov2plus.yaml", {"method.predictor"}),
    ("ladder/5_complex_aug.yaml", "ablation/mocov2plus_aug_full.yaml", set()),
    ("byol_sgd.yaml", "ablation/byol_sgd_aug_full.yaml", set()),
])
def test_comparisons_are_controlled(a, b, factor):
    assert diff_keys(resolved(a), resolved(b)) == factor


@pytest.mark.parametrize("rel", sorted(RUNS))
def test_run_differs_from_its_method_only_in_size(rel):
    method, arch, epochs = RUNS[rel]
    factor = ({"model.arch"} if arch != "resnet50" else set()) | ({"train.epochs"} if epochs != 200 else set())
    assert diff_keys(resolved(method), resolved(rel)) == factor


@pytest.mark.parametrize("m", ["mocov2plus", "smocov2plus", "byol_sgd"])
def test_last_ablation_level_is_supervised_crop_flip(m):
    # PAPER.md: the last level of Fig. 5 equals supervised training's crop + flip.
    ablated = spec_from_config(load_config(RECIPES / f"ablation/{m}_aug-jitter.yaml").aug)
    supervised = spec_from_config(load_config(RECIPES / "supervised.yaml").aug)
    assert ablated == supervised


# PAPER.md "Evaluation": (protocol, epochs, batch, lr at that batch, nesterov, schedule, milestones, wd)
EVAL = {
    "linear_a.yaml": ("linear", 100, 256, 30.0, False, "step", (60, 80), 0.0),
    "linear_b.yaml": ("linear", 80, 1024, 0.8, True, "cosine", (), 0.0),
    "knn.yaml": ("knn", None, None, None, None, None, None, None),
    # CIFAR-LT transfer (this project's hyper-parameters: the paper gives none)
    "transfer/cifar10lt_linear.yaml": ("linear", 100, 256, 30.0, False, "step", (60, 80), 0.0),
    "transfer/cifar100lt_linear.yaml": ("linear", 100, 256, 30.0, False, "step", (60, 80), 0.0),
    "transfer/cifar10lt_finetune.yaml": ("finetune", 100, 256, 0.05, False, "cosine", (), 5e-4),
    "transfer/cifar100lt_finetune.yaml": ("finetune", 100, 256, 0.05, False, "cosine", (), 5e-4),
}


@pytest.mark.parametrize("rel", [r for r in EVAL if r.startswith("transfer/")])
def test_transfer_recipes_read_their_cifar_lt_split(rel):
    cfg = load_config(RECIPES / rel)
    classes = "100" if "cifar100" in rel else "10"
    assert cfg.data.train == f"data/cifar{classes}_lt/train" and cfg.data.val == f"data/cifar{classes}_lt/val"
    assert cfg.data.eval_resize == cfg.aug.crop_size == 224
    assert cfg.eval.cache_features == ("linear" in rel)


@pytest.mark.parametrize("rel", sorted(EVAL))
def test_eval_recipes_follow_the_paper(rel):
    from fastairl.eval.protocols import peak_lr

    e = load_config(RECIPES / rel).eval
    protocol, epochs, batch, lr, nesterov, schedule, milestones, wd = EVAL[rel]
    assert e.protocol == protocol
    if protocol == "knn":
        assert tuple(e.knn_k) == (20, 200) and e.knn_temperature == 0.07
        return
    assert (e.epochs, e.batch_size, e.nesterov, e.schedule, tuple(e.milestones), e.weight_decay) == \
        (epochs, batch, nesterov, schedule, milestones, wd)
    assert peak_lr(e) == pytest.approx(lr) and e.momentum == 0.9
