"""Export a backbone for transfer: torchvision / timm state dicts and a detectron2 `.pkl`.

* torchvision: `conv1 ... layer4` names, no `fc`; loads with strict=True into
  `torchvision.models.resnetXX()` once its fc is removed (`model.fc = nn.Identity()`), or with
  `strict=False` (fc missing) as it is, and into `deeplabv3_resnetXX().backbone`.
* timm: timm's ResNets use the same names (checked here and in the tests): loads with strict=True
  into `timm.create_model("resnetXX", num_classes=0)`.
* detectron2: the MoCo `detection/convert-pretrain-to-detectron2.py` convention: `stem.conv1`,
  `res2..res5`, `bnK -> convK.norm`, `downsample.0/1 -> shortcut(.norm)`, numpy arrays under `model`,
  `matching_heuristics: True`. detectron2 must then read RGB input normalised with ImageNet
  mean/std and put the stride in the 3x3 conv (torchvision's ResNet): the `detectron2` entry of
  summary.json lists those config keys.

    fastairl export runs/mocov2plus/last.pt --out exported/mocov2plus
"""
from __future__ import annotations

import argparse
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from . import file_info, prepare_out_dir, run_tool, write_summary

FORMATS = ("torchvision", "timm", "detectron2")
TORCHVISION_ARCHS = ("resnet18", "resnet50", "resnet101")  # resnet10 is fastairl's own test trunk
DEPTH = {"resnet18": 18, "resnet50": 50, "resnet101": 101}

# torchvision name -> detectron2 name, applied in order (MoCo's convert-pretrain-to-detectron2 rules)
_D2_RULES = [
    (re.compile(r"^conv1\."), "stem.conv1."),
    (re.compile(r"^bn1\."), "stem.conv1.norm."),
    (re.compile(r"^layer([1-4])\."), lambda m: f"res{int(m[1]) + 1}."),
    (re.compile(r"\.bn([1-3])\."), r".conv\1.norm."),
    (re.compile(r"\.downsample\.0\."), ".shortcut."),
    (re.compile(r"\.downsample\.1\."), ".shortcut.norm."),
]


def torchvision_state(net: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """The backbone's state dict (weights and BN buffers) as contiguous CPU tensors, no fc."""
    return OrderedDict((k, v.detach().cpu().contiguous().clone()) for k, v in net.state_dict().items()
                       if not k.startswith("fc."))


def detectron2_name(key: str) -> str:
    for pattern, repl in _D2_RULES:
        key = pattern.sub(repl, key)
    return key


def detectron2_model(state: dict[str, torch.Tensor]) -> dict:
    """The pickled object detectron2's checkpointer reads: numpy arrays, matched by name heuristics."""
    return {"model": {detectron2_name(k): v.numpy() for k, v in state.items()},
            "__author__": "fastairl", "matching_heuristics": True}


def detectron2_config(arch: str) -> dict:
    """The detectron2 keys an exported torchvision-style backbone needs (as MoCo's *_moco.yaml)."""
    cfg = {"MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53], "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
           "INPUT.FORMAT": "RGB", "MODEL.RESNETS.STRIDE_IN_1X1": False, "MODEL.RESNETS.DEPTH": DEPTH[arch]}
    if arch == "resnet18":
        cfg["MODEL.RESNETS.RES2_OUT_CHANNELS"] = 64  # BasicBlock trunks: detectron2 needs it set
    return cfg


def verify_torchvision(state: dict, arch: str) -> str:
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    net.fc = nn.Identity()
    net.load_state_dict(state, strict=True)
    return f"torchvision.models.{arch}() with fc = Identity: strict load ok"


def verify_timm(state: dict, arch: str) -> str:
    try:
        import timm
    except ImportError:
        return "not verified: timm is not installed"
    timm.create_model(arch, pretrained=False, num_classes=0).load_state_dict(state, strict=True)
    return f"timm.create_model('{arch}', num_classes=0): strict load ok (timm {timm.__version__})"


def check_exportable(arch: str, cifar_stem: bool, source: str) -> None:
    if cifar_stem:
        raise ValueError(f"{source} has a CIFAR stem (3x3 conv1, no max-pool); torchvision, timm and detectron2 "
                         f"ResNets have a 7x7 stem, so nothing could load it: use the fastairl checkpoint itself")
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(f"{source} is a {arch}, which torchvision, timm and detectron2 do not build; export "
                         f"{', '.join(TORCHVISION_ARCHS)} backbones")


def export(net: nn.Module, arch: str, out: Path, formats) -> dict:
    """Write each format to `out`; returns {format: {file, check}}."""
    state = torchvision_state(net)
    done = {}
    if "torchvision" in formats:
        torch.save(state, out / f"{arch}_torchvision.pth")
        done["torchvision"] = {"file": f"{arch}_torchvision.pth", "check": verify_torchvision(state, arch)}
    if "timm" in formats:
        torch.save(state, out / f"{arch}_timm.pth")
        done["timm"] = {"file": f"{arch}_timm.pth", "check": verify_timm(state, arch)}
    if "detectron2" in formats:
        with open(out / f"{arch}_detectron2.pkl", "wb") as f:
            pickle.dump(detectron2_model(state), f)
        done["detectron2"] = {"file": f"{arch}_detectron2.pkl", "config": detectron2_config(arch),
                              "check": "key names by the MoCo convert-pretrain-to-detectron2 rules"}
    return done


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastairl export", description="Export a backbone as a torchvision / timm "
                                "state dict and a detectron2 .pkl (MoCo convention).")
    p.add_argument("checkpoint", help="fastairl checkpoint (or a torchvision/timm state dict to convert)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--to", default=",".join(FORMATS), help=f"comma-separated formats (default {','.join(FORMATS)})")
    p.add_argument("--branch", choices=["student", "teacher"], default="student")
    p.add_argument("--overwrite", action="store_true")
    return p


def compute(args, argv: list[str]) -> dict:
    from .checkpoints import load_backbone

    formats = [f for f in args.to.split(",") if f]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"--to {args.to!r}: choose from {', '.join(FORMATS)}")
    bb = load_backbone(args.checkpoint, branch=args.branch)
    check_exportable(bb.arch, bb.cifar_stem, args.checkpoint)
    out = prepare_out_dir(args.out, args.overwrite)
    done = export(bb.net, bb.arch, out, formats)
    for fmt, entry in done.items():
        print(f"{fmt}: {out / entry['file']}  ({entry['check']})")
    return write_summary(out, "export", argv, inputs={**bb.source, "file": file_info(args.checkpoint)},
                         arch=bb.arch, exports=done, outputs=[e["file"] for e in done.values()])


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return run_tool(lambda: compute(args, argv), args.out, args.overwrite)
