"""Typed, strict configuration: YAML recipes with `base:` inheritance and `a.b=c` overrides.

Every paper factor is one key here and is consumed in one place. Unknown keys, wrong types and
impossible values raise `ConfigError` naming the key, the file that set it, and the valid choices.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key, its source and the fix."""


# --------------------------------------------------------------------------------------------- schema
@dataclass
class EMAConfig:
    schedule: Literal["constant", "cosine"] = "cosine"
    base: float = 0.99  # m0: constant momentum, or the start of the cosine ramp to 1


@dataclass
class MethodConfig:
    loss: Literal["infonce", "byol", "ce"] = "infonce"  # ce = supervised
    symmetric: bool = True
    predictor: Literal["none", "student", "both"] = "student"
    temperature: float = 0.2
    queue_size: int = 65536
    # Which teacher keys enter the queue under the symmetric loss: the reference code picks one
    # view at random each step; "both" enqueues the keys of both views.
    enqueue: Literal["random_view", "both"] = "random_view"
    bn: Literal["shuffle", "sync", "plain"] = "sync"
    shuffle_bn_groups: int = 2  # one-process emulation of shuffle-BN: sub-batches with own statistics
    ema: EMAConfig = field(default_factory=EMAConfig)


@dataclass
class MLPConfig:
    hidden_dim: int = 4096
    out_dim: int = 256
    bn_hidden: bool = True


@dataclass
class ModelConfig:
    arch: Literal["resnet10", "resnet18", "resnet50", "resnet101"] = "resnet50"
    cifar_stem: bool = False  # 3x3 stride-1 first conv, no max-pool: for 32-px images
    channels_last: bool = True
    compile: bool = False
    projector: MLPConfig = field(default_factory=MLPConfig)
    predictor: MLPConfig = field(default_factory=MLPConfig)  # in/out dim = projector.out_dim


@dataclass
class OptimConfig:
    name: Literal["sgd", "lars"] = "sgd"
    base_lr: float = 0.03  # lr = base_lr * global_batch / 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    # Exclude biases and BN parameters (ndim <= 1) from weight decay (and, for LARS, from the trust
    # ratio). The reference code decays everything under SGD and excludes them under LARS.
    exclude_1d: bool = False
    trust_coef: float = 1e-3  # LARS eta
    warmup_epochs: float = 10.0
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr: float = 0.0


@dataclass
class AugConfig:
    preset: Literal["mocov2", "byol_sym", "byol_asym", "crop_flip", "none"] = "byol_sym"
    # Fig. 5 ablation, cumulative: "-blur" removes solarisation and blur, ... "-jitter" leaves crop+flip.
    ablation: Literal["none", "-solarize", "-blur", "-gray", "-jitter"] = "none"
    crop_size: int = 224
    crop_scale: Optional[tuple[float, float]] = None  # None: the preset's (0.08, 1) or (0.2, 1)
    # None: the preset's 0.5; 0 for data whose mirror image means something else (digits, text)
    flip_p: Optional[float] = None
    blur_kernel_frac: float = 0.1  # kernel side ~ 10 % of the crop (23 px at 224)
    # the loader only decodes, crops and flips (uint8); jitter, grayscale, blur, solarise and
    # normalisation run per sample, batched, on the training device (fastairl/data/device_aug.py).
    # FFCV always does so on CUDA; on a CPU it finishes the views with the OpenCV uint8 ops unless this is set
    on_device: bool = False
    # how loader workers decode and augment on CPU: pil = the torchvision reference; opencv = uint8
    # OpenCV ops after one DCT-scaled decode for both views (fastairl/data/cv_aug.py), several x faster
    engine: Literal["pil", "opencv"] = "pil"


@dataclass
class DataConfig:
    source: Literal["folder", "filelist", "synthetic"] = "folder"
    pipeline: Literal["torch", "dali", "ffcv"] = "torch"
    train: str = "data/imagenet/train"  # folder tree (class/img.jpg) or file list ("path label" lines)
    val: Optional[str] = None  # held-out split for the kNN monitor and final evaluation
    class_fraction: float = 1.0
    class_seed: int = 0
    # 'class<TAB>superclass' lines (`fastairl taxonomy`): train on merged labels (Table 6); applied
    # after class_fraction, by every loader (folders through fastairl.data.datasets.load_samples, FFCV
    # to the .beton's labels)
    label_map: Optional[str] = None
    num_classes: int = 1000  # used by synthetic data only; folders count their classes
    synthetic_size: int = 1281167
    workers: int = 8
    eval_resize: Optional[int] = None  # None: crop_size * 256/224 (256 at 224)
    # unreadable training images are replaced by other samples; more than this fraction stops the run
    max_bad_fraction: float = 0.001


@dataclass
class ProbeConfig:
    online: bool = True  # linear head on detached features, trained alongside (reference code)
    lr: float = 0.1
    knn_every_epochs: int = 1  # 0 disables the epoch-end kNN monitor
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_max_bank: int = 50000
    final_eval: bool = False  # kNN + linear probe of the final encoder and of a random-init one
    final_linear_epochs: int = 100
    # also evaluate both encoders with only this many labels per class (kNN + linear, the semi-supervised
    # protocol), averaged over final_label_draws stratified draws; e.g. (10,). Empty: full labels only
    final_labels_per_class: tuple[int, ...] = ()
    final_label_draws: int = 5


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 1024  # global; per process = batch_size / world_size
    keep_iterations: bool = False  # scale epochs by 1/class_fraction: same iterations as 100 %
    max_steps: int = 0  # >0 stops early (benchmarks, tests); schedules still use the full length
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 0
    log_every: int = 50
    ckpt_every_epochs: int = 50
    ckpt_every_minutes: float = 30.0
    ckpt_every_steps: int = 0  # >0: also save last.pt every N steps
    keep_last_k: int = 0  # keep the newest k epoch_XXX.pt files; 0 keeps them all
    # non-finite loss or gradients: stop (naming the step, last good checkpoint intact) or skip the step
    nan_policy: Literal["stop", "skip"] = "stop"
    dist_timeout_minutes: float = 30.0  # a dead or hung process makes the others fail after this long
    resume: str = "none"  # none | auto | path to a checkpoint
    out_dir: str = "runs"
    run_name: Optional[str] = None  # default: the recipe's name
    tensorboard: bool = False
    progress: bool = True


@dataclass
class EvalConfig:
    """`fastairl eval RECIPE`: a backbone (checkpoint / state dict / random) on data.train -> data.val.
    Linear protocols A and B (PAPER.md "Evaluation") are recipes/linear_a.yaml and linear_b.yaml."""
    protocol: Literal["linear", "knn", "finetune"] = "linear"
    checkpoint: str = "random"  # a fastairl checkpoint, a torchvision/timm state dict, or random
    branch: Literal["student", "teacher"] = "student"  # which encoder of a fastairl checkpoint
    epochs: int = 100
    batch_size: int = 256
    base_lr: float = 30.0  # lr = base_lr * batch_size / 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: Literal["step", "cosine"] = "step"
    milestones: tuple[int, ...] = (60, 80)  # step schedule: lr /= 10 at each of these epochs
    backbone_lr_mult: float = 1.0  # finetune: the backbone's lr = lr * this
    cache_features: bool = False  # linear: extract centre-crop features once, train on them (no aug)
    val_every_epochs: int = 0  # >0: also evaluate on data.val every N epochs
    knn_k: tuple[int, ...] = (20, 200)
    knn_temperature: float = 0.07


@dataclass
class Config:
    name: str = "run"
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    data: DataConfig = field(default_factory=DataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ------------------------------------------------------------------------------------------ loading
def load_config(path: Union[str, Path], overrides: list[str] = ()) -> Config:
    raw, sources = _load_raw(Path(path), chain=())
    for ov in overrides:
        key, value = _parse_override(ov)
        _set_dotted(raw, key, value)
        parts = key.split(".")
        for i in range(1, len(parts) + 1):  # a section the override creates is the override's too
            sources.setdefault(".".join(parts[:i]), f"override '{ov}'")
        sources[key] = f"override '{ov}'"
        if isinstance(value, dict):
            sources.update({f"{key}.{k}": f"override '{ov}'" for k in _dotted_keys(value)})
    return build_config(raw, sources, origin=str(path))


def build_config(raw: dict, sources: Optional[dict] = None, origin: str = "<dict>") -> Config:
    sources = sources or {}
    cfg = _build(Config, raw, prefix="", sources=sources, origin=origin)
    _check_values(cfg, sources, origin)
    return cfg


def config_to_dict(cfg) -> dict:
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return list(v)
        return v

    return conv(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_raw(path: Path, chain: tuple) -> tuple[dict, dict]:
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}" + (f" (base of {chain[-1]})" if chain else ""))
    if path.resolve() in chain:
        raise ConfigError(f"{path}: 'base' chain loops back to itself: {' -> '.join(map(str, chain))}")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"bad YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: 'base' must be a recipe path or a list of them, got {bases!r}")
    merged, sources = {}, {}
    for b in bases:
        braw, bsrc = _load_raw(path.parent / b, chain + (path.resolve(),))
        _deep_merge(merged, braw)
        sources.update(bsrc)
    if "name" not in data:
        data["name"] = path.stem
    _deep_merge(merged, data)
    sources.update({k: str(path) for k in _dotted_keys(data)})
    return merged, sources


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v


def _dotted_keys(d: dict, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        yield key
        if isinstance(v, dict):
            yield from _dotted_keys(v, key + ".")


def _parse_override(ov: str) -> tuple[str, Any]:
    if "=" not in ov:
        raise ConfigError(f"override '{ov}' must look like key.sub=value (e.g. optim.base_lr=0.3)")
    key, text = ov.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{p}' is not a section")
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        _deep_merge(node[parts[-1]], value)  # key={a: 1} changes a, keeps the section's other keys
    else:
        node[parts[-1]] = value


def _where(key: str, sources: dict, origin: str) -> str:
    src = sources.get(key)
    while src is None and "." in key:
        key = key.rsplit(".", 1)[0]
        src = sources.get(key)
    return src or origin


def _build(cls, raw: Any, prefix: str, sources: dict, origin: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{_where(prefix[:-1], sources, origin)}: '{prefix[:-1]}' must be a section "
                          f"with keys {sorted(f.name for f in dataclasses.fields(cls))}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            raise ConfigError(f"{_where(prefix + str(k), sources, origin)}: unknown key '{prefix}{k}'; "
                              f"valid keys{' under ' + repr(prefix[:-1]) if prefix else ''}: "
                              f"{', '.join(sorted(names))}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, raw[name], key + ".", sources, origin)
        else:
            kwargs[name] = _coerce(raw[name], tp, key, sources, origin)
    return cls(**kwargs)


def _coerce(v: Any, tp, key: str, sources: dict, origin: str):
    def fail(expected: str):
        raise ConfigError(f"{_where(key, sources, origin)}: '{key}' must be {expected}, got {v!r}")

    origin_tp = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin_tp is Union:  # Optional[X]
        if v is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(v, inner, key, sources, origin)
    if origin_tp is Literal:
        if v is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            v = "no"
        if v not in args:
            fail("one of " + ", ".join(map(repr, args)))
        return v
    if origin_tp is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
        if not isinstance(v, (list, tuple)):
            fail("a list")
        return tuple(_coerce(x, args[0], key, sources, origin) for x in v)
    if origin_tp is tuple:
        if not isinstance(v, (list, tuple)) or len(v) != len(args):
            fail(f"a list of {len(args)} numbers")
        return tuple(_coerce(x, a, key, sources, origin) for x, a in zip(v, args))
    if tp is bool:
        if not isinstance(v, bool):
            fail("true or false")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            fail("an integer")
        return v
    if tp is float:
        if isinstance(v, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(v)
            except ValueError:
                fail("a number")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            fail("a number")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            fail("a string")
        return v
    raise TypeError(f"unsupported config type {tp} for {key}")


def _check_values(cfg: Config, sources: dict, origin: str) -> None:
    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ConfigError(f"{_where(key, sources, origin)}: '{key}' {what}")

    m, o, t, d, a = cfg.method, cfg.optim, cfg.train, cfg.data, cfg.aug
    need(0.0 < d.class_fraction <= 1.0, "data.class_fraction", "must be in (0, 1]")
    need(t.batch_size > 0, "train.batch_size", "must be positive")
    need(t.epochs > 0, "train.epochs", "must be positive")
    need(t.max_steps >= 0, "train.max_steps", "must be >= 0")
    need(t.log_every > 0, "train.log_every", "must be positive")
    need(m.temperature > 0, "method.temperature", "must be positive")
    need(0.0 <= m.ema.base <= 1.0, "method.ema.base", "must be in [0, 1]")
    keys_per_step = t.batch_size * (2 if m.enqueue == "both" and m.symmetric else 1)
    need(m.loss != "infonce" or m.queue_size >= keys_per_step, "method.queue_size",
         f"must hold the {keys_per_step} keys enqueued per step (the global batch"
         + (", both views)" if keys_per_step > t.batch_size else ")"))
    need(m.shuffle_bn_groups >= 1, "method.shuffle_bn_groups", "must be >= 1")
    for name, mlp in (("projector", cfg.model.projector), ("predictor", cfg.model.predictor)):
        for dim in ("hidden_dim", "out_dim"):
            need(getattr(mlp, dim) > 0, f"model.{name}.{dim}", "must be positive")
    need(o.base_lr > 0, "optim.base_lr", "must be positive")
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(0 <= o.momentum < 1, "optim.momentum", "must be in [0, 1)")
    need(o.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    need(o.min_lr >= 0, "optim.min_lr", "must be >= 0")
    need(o.trust_coef > 0, "optim.trust_coef", "must be positive (LARS eta)")
    need(a.crop_size >= 8, "aug.crop_size", "must be >= 8")
    need(a.crop_scale is None or 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1, "aug.crop_scale",
         "must be (min, max) with 0 < min <= max <= 1")
    need(a.flip_p is None or 0 <= a.flip_p <= 1, "aug.flip_p", "must be a probability in [0, 1]")
    need(d.workers >= 0, "data.workers", "must be >= 0")
    p = cfg.probe
    need(all(n > 0 for n in p.final_labels_per_class), "probe.final_labels_per_class",
         "must be a list of positive integers (labels per class)")
    need(p.final_label_draws > 0, "probe.final_label_draws", "must be positive")
    need(p.knn_every_epochs >= 0, "probe.knn_every_epochs", "must be >= 0 (0: off)")
    need(p.knn_k > 0, "probe.knn_k", "must be positive")
    need(p.knn_temperature > 0, "probe.knn_temperature", "must be positive")
    need(p.knn_max_bank > 0, "probe.knn_max_bank", "must be positive")
    need(p.final_linear_epochs > 0, "probe.final_linear_epochs", "must be positive")
    need(p.lr > 0, "probe.lr", "must be positive")
    e = cfg.eval
    need(e.epochs > 0, "eval.epochs", "must be positive")
    need(e.batch_size > 0, "eval.batch_size", "must be positive")
    need(e.base_lr > 0, "eval.base_lr", "must be positive")
    need(0 <= e.momentum < 1, "eval.momentum", "must be in [0, 1)")
    need(list(e.milestones) == sorted(set(e.milestones)) and all(0 < m < e.epochs for m in e.milestones),
         "eval.milestones", f"must be increasing epochs inside (0, eval.epochs={e.epochs})")
    need(len(e.knn_k) > 0 and all(k > 0 for k in e.knn_k), "eval.knn_k", "must be a list of positive integers")
    need(e.val_every_epochs >= 0, "eval.val_every_epochs", "must be >= 0 (0: only at the end)")
    need(e.knn_temperature > 0, "eval.knn_temperature", "must be positive")
    need(0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction", "must be in [0, 1]")
    need(t.ckpt_every_steps >= 0, "train.ckpt_every_steps", "must be >= 0 (0: off)")
    need(t.ckpt_every_epochs >= 0, "train.ckpt_every_epochs", "must be >= 0 (0: off)")
    need(t.ckpt_every_minutes >= 0, "train.ckpt_every_minutes", "must be >= 0 (0: after every step)")
    need(t.keep_last_k >= 0, "train.keep_last_k", "must be >= 0 (0: keep all)")
    need(t.dist_timeout_minutes > 0, "train.dist_timeout_minutes", "must be positive")
    need(t.resume in ("none", "auto") or Path(t.resume).is_file(), "train.resume",
         "must be none, auto, or the path of an existing checkpoint file")
