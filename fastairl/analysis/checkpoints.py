"""Backbones from wherever they come: a fastairl checkpoint, a torchvision / timm / MoCo-style state
dict, or random initialisation (the baseline). Every loader returns the backbone of
`fastairl.models.build_backbone` (torchvision ResNet names, `fc` an Identity) and a description of
where it came from, for the tools' summary.json."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .. import checkpoint
from ..checkpoint import CheckpointError
from ..models import FEATURE_DIMS, build_backbone
from . import RANDOM_SEED

# (bottleneck blocks?, blocks per stage) -> arch; the archs build_backbone knows
ARCHS = {(False, (1, 1, 1, 1)): "resnet10", (False, (2, 2, 2, 2)): "resnet18",
         (True, (3, 4, 6, 3)): "resnet50", (True, (3, 4, 23, 3)): "resnet101"}
RANDOM = "random"


@dataclass
class Backbone:
    net: nn.Module
    arch: str
    cifar_stem: bool
    source: dict  # kind (fastairl / state_dict / random), path, branch, step, ...: for summary.json
    config: Optional[dict] = field(default=None)  # the run's resolved config (fastairl checkpoints)


def read(path: Path) -> dict:
    """A verified fastairl checkpoint, or any weights-only torch file (a torchvision / timm state
    dict). A file that claims to be a fastairl checkpoint but does not verify is refused."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a fastairl checkpoint (last.pt), a "
                              f"torchvision/timm state dict, or '{RANDOM}'")
    try:
        return checkpoint.load(path)
    except CheckpointError:
        pass  # not a (sound) fastairl checkpoint: is it a plain state dict?
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated / corrupt / foreign files fail in many ways
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in reason:
            reason = "it holds pickled objects, not only tensors (an old-format checkpoint or a whole model)"
        raise CheckpointError(f"cannot read {path} ({reason}); pass a fastairl checkpoint or a "
                              f"state dict saved with torch.save(model.state_dict(), path)") from None
    if isinstance(obj, dict) and obj.get("format") == checkpoint.FORMAT:
        raise CheckpointError(f"{path} is a damaged fastairl checkpoint (its content does not match its digest); "
                              f"use another checkpoint of the run (last.prev.pt, epoch_XXX.pt)")
    if isinstance(obj, dict) and is_fastairl(obj):
        raise CheckpointError(f"{path} is a fastairl checkpoint of another format ({obj.get('format')!r}, this "
                              f"version reads {checkpoint.FORMAT}); read it with the fastairl that wrote it")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint or state dict; save "
                              f"model.state_dict() instead")
    return obj


def is_fastairl(obj: dict) -> bool:
    return isinstance(obj.get("model"), dict) and isinstance(obj.get("config"), dict)


def _unwrap(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a plain state dict, also when wrapped as {"state_dict": ...} or {"model": ...}."""
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors; expected a state dict of a ResNet")
    return tensors


def strip_to_resnet(state: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """Keep the ResNet trunk under whatever prefix it sits ('', 'module.encoder_q.', 'backbone.',
    ...), with the prefix removed and the classifier (`fc.*`) dropped."""
    stems = [k[:-len("conv1.weight")] for k in state if k.endswith("conv1.weight") and "layer" not in k]
    if not stems:
        raise CheckpointError(f"{path} has no ResNet stem (no '<prefix>conv1.weight' key outside layer1-4); "
                              f"is it a ResNet state dict?")
    prefix = min(stems, key=len)  # the outermost ResNet (a MoCo file also holds encoder_k)
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in out.items() if not k.startswith("fc.")}


def infer_arch(state: dict[str, torch.Tensor], path) -> tuple[str, bool]:
    """(arch, cifar_stem) from torchvision key names: block type, blocks per stage, stem kernel."""
    blocks = [0, 0, 0, 0]
    for k in state:
        m = re.match(r"layer([1-4])\.(\d+)\.", k)
        if m:
            blocks[int(m[1]) - 1] = max(blocks[int(m[1]) - 1], int(m[2]) + 1)
    bottleneck = "layer1.0.conv3.weight" in state
    arch = ARCHS.get((bottleneck, tuple(blocks)))
    if arch is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise CheckpointError(f"{path}: a ResNet with {kind} blocks {blocks} per stage is none of "
                              f"{sorted(FEATURE_DIMS)}; fastairl builds only these")
    return arch, state["conv1.weight"].shape[-1] == 3


def _fill(net: nn.Module, state: dict[str, torch.Tensor], path) -> nn.Module:
    want = net.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
              if k in state and state[k].shape != v.shape]
    if missing or extra or shapes:
        parts = [f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", extra), ("shape", shapes)) if keys]
        raise CheckpointError(f"{path} does not fit the backbone ({'; '.join(parts)})")
    net.load_state_dict(state, strict=True)
    return net


def backbone_state(obj: dict, branch: str, path) -> dict[str, torch.Tensor]:
    """The `<branch>.backbone.*` tensors of a fastairl checkpoint, prefix removed."""
    prefix = f"{branch}.backbone."
    state = {k[len(prefix):]: v for k, v in obj["model"].items() if k.startswith(prefix)}
    if not state:
        branches = sorted({k.split(".")[0] for k in obj["model"] if ".backbone." in k})
        raise CheckpointError(f"{path} has no {prefix}* weights; choose --branch from {branches}")
    return state


def load_backbone(source, *, arch: Optional[str] = None, cifar_stem: Optional[bool] = None,
                  branch: str = "student", seed: int = RANDOM_SEED) -> Backbone:
    """A backbone from a fastairl checkpoint (the `branch` encoder: student or teacher), a
    torchvision/timm-named state dict (arch inferred from its keys), or `random` (needs `arch`)."""
    if str(source) == RANDOM:
        if arch is None:
            raise ValueError(f"'{RANDOM}' needs an architecture: pass --arch (one of {sorted(FEATURE_DIMS)})")
        stem = bool(cifar_stem)
        with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
            torch.manual_seed(seed)
            net = build_backbone(arch, stem)
        return Backbone(net, arch, stem,
                        {"kind": RANDOM, "arch": arch, "cifar_stem": stem, "seed": seed})
    path = Path(source)
    obj = read(path)
    if is_fastairl(obj):
        state, config = backbone_state(obj, branch, path), obj["config"]
        src = {"kind": "fastairl", "path": str(path), "branch": branch, "step": obj.get("step"),
               "epoch": obj.get("epoch"), "name": config.get("name")}
    else:
        state, config = strip_to_resnet(_unwrap(obj, path), path), None
        src = {"kind": "state_dict", "path": str(path)}
    found_arch, found_stem = infer_arch(state, path)
    if (arch or found_arch, found_stem if cifar_stem is None else cifar_stem) != (found_arch, found_stem):
        raise CheckpointError(f"{path} holds a {found_arch}{' with a CIFAR stem' if found_stem else ''}, not the "
                              f"{arch or found_arch} asked for (--arch); drop --arch or fix it")
    net = _fill(build_backbone(found_arch, found_stem), state, path)
    src.update(arch=found_arch, cifar_stem=found_stem)
    return Backbone(net, found_arch, found_stem, src, config)


def load_many(sources: list[str], *, arch: Optional[str] = None, cifar_stem: Optional[bool] = None,
              **kw) -> list[Backbone]:
    """Backbones of several sources where any may be `random`: it then takes the architecture of
    the first loaded checkpoint (or `arch`)."""
    loaded = {s: load_backbone(s, arch=arch, cifar_stem=cifar_stem, **kw) for s in sources if s != RANDOM}
    ref = next(iter(loaded.values()), None)
    if ref is not None:
        arch = arch or ref.arch
        cifar_stem = ref.cifar_stem if cifar_stem is None else cifar_stem
    return [loaded[s] if s != RANDOM else load_backbone(s, arch=arch, cifar_stem=cifar_stem, **kw)
            for s in sources]


def load_student(source) -> tuple[nn.Module, dict]:
    """The whole student of a fastairl checkpoint (backbone + projector + predictor, or the
    supervised fc), as a module, and the source description."""
    from ..config import build_config
    from ..methods import build_method

    path = Path(source)
    obj = read(path)
    if not is_fastairl(obj):
        raise CheckpointError(f"{path} is not a fastairl checkpoint (no 'model' and 'config'); the heads "
                              f"exist only there: use --part backbone for a plain state dict")
    cfg = build_config(obj["config"], origin=f"{path} (config)")
    model = obj["model"]
    head = model.get("probe.weight", model.get("student.fc.weight"))
    net = build_method(cfg, num_classes=head.shape[0] if head is not None else 1).student
    state = {k[len("student."):]: v for k, v in model.items() if k.startswith("student.")}
    src = {"kind": "fastairl", "path": str(path), "branch": "student", "part": "student",
           "step": obj.get("step"), "epoch": obj.get("epoch"), "name": cfg.name, "arch": cfg.model.arch}
    return _fill(net, state, path), src
