"""NormRescale (PAPER.md "Analyses", Table 8): w* = ||w_S|| * w_L / ||w_L|| for every weight of a
LARS-trained backbone, w_S the matching weight of an SGD-trained anchor (default), or w* = c * w_L
with a constant factor c (0.1 in the paper). Then fine-tune as usual.

Which tensors: every learnable tensor of the backbone (conv weights, BN weights and BN biases; the
fc of a classifier is not part of a backbone). The paper rescales "each weight", and its explanation
of the ~10x norm gap is that LARS does not decay BN parameters, so leaving BN out would leave the
gap where it comes from; `--kinds conv` restricts it to conv weights. Each tensor is rescaled as a
whole (one norm per tensor). BN running statistics are buffers, not weights: they are left as they
are, and fine-tuning with BN in train mode re-estimates them. A tensor with zero norm has no
direction and is left unchanged (and reported).

    fastairl normrescale runs/byol_lars/last.pt --anchor runs/byol_sgd/last.pt --out analysis/rescaled
    fastairl normrescale runs/byol_lars/last.pt --factor 0.1 --out analysis/rescaled_0.1
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import file_info, prepare_out_dir, run_tool, write_summary
from .norms import named_kinds

DEFAULT_KINDS = ("conv", "bn_weight", "bn_bias")


def check_match(lars: nn.Module, anchor: nn.Module, lars_name: str, anchor_name: str) -> None:
    """Same parameter names and shapes, or one line naming the first mismatches."""
    a = {k: tuple(v.shape) for k, v in lars.named_parameters()}
    b = {k: tuple(v.shape) for k, v in anchor.named_parameters()}
    problems = ([f"{k} only in {lars_name}" for k in a if k not in b]
                + [f"{k} only in {anchor_name}" for k in b if k not in a]
                + [f"{k} {a[k]} vs {b[k]}" for k in a if k in b and a[k] != b[k]])
    if problems:
        more = f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""
        raise ValueError(f"{lars_name} and the anchor {anchor_name} do not match: {'; '.join(problems[:4])}{more}; "
                         f"the anchor must have the same architecture")


@torch.no_grad()
def normrescale(lars: nn.Module, anchor: Optional[nn.Module] = None, factor: Optional[float] = None,
                kinds=DEFAULT_KINDS) -> list[dict]:
    """Rescale the parameters of `lars` in place; one report row per parameter tensor."""
    if (anchor is None) == (factor is None):
        raise ValueError("NormRescale needs exactly one of an anchor model (--anchor) or a constant factor (--factor)")
    target = dict(anchor.named_parameters()) if anchor is not None else {}
    rows = []
    for name, kind in named_kinds(lars).items():
        w = lars.get_parameter(name)
        before = torch.linalg.vector_norm(w.double())
        row = {"name": name, "kind": kind, "shape": list(w.shape), "norm_before": before.item()}
        goal = torch.linalg.vector_norm(target[name].double()) if anchor is not None else factor * before
        row["norm_target"] = goal.item()
        if kind not in kinds:
            row["action"] = "kept (kind not selected)"
        elif before == 0:
            row["action"] = "kept (zero norm: no direction)"
        else:
            w.copy_((w.double() * (goal / before)).to(w.dtype))
            row["action"] = "rescaled"
        row["norm_after"] = torch.linalg.vector_norm(w.double()).item()
        rows.append(row)
    return rows


def kind_summary(rows: list[dict]) -> dict:
    """Per kind: total norm before / target / after and how many tensors were rescaled."""
    out = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        sel = [r for r in rows if r["kind"] == kind]
        tot = lambda key: sum(r[key] ** 2 for r in sel) ** 0.5
        out[kind] = {"tensors": len(sel), "rescaled": sum(r["action"] == "rescaled" for r in sel),
                     "total_norm_before": tot("norm_before"), "total_norm_target": tot("norm_target"),
                     "total_norm_after": tot("norm_after")}
    return out


# ------------------------------------------------------------------------------------------- output
def write_report(out: Path, rows: list[dict]) -> list[str]:
    cols = ["name", "kind", "shape", "norm_before", "norm_target", "norm_after", "action"]
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "shape": "x".join(map(str, r["shape"]))})
    lines = ["| kind | tensors | rescaled | total norm before | target | after |", "|---" * 6 + "|"]
    for kind, s in kind_summary(rows).items():
        lines.append(f"| {kind} | {s['tensors']} | {s['rescaled']} | {s['total_norm_before']:.4g} | "
                     f"{s['total_norm_target']:.4g} | {s['total_norm_after']:.4g} |")
    lines += ["", "| tensor | kind | before | target | after | action |", "|---" * 6 + "|"]
    lines += [f"| {r['name']} | {r['kind']} | {r['norm_before']:.4g} | {r['norm_target']:.4g} | "
              f"{r['norm_after']:.4g} | {r['action']} |" for r in rows]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return ["report.csv", "report.md"]


def save_rescaled(out: Path, source: str, net: nn.Module, branch: str, meta: dict) -> str:
    """A fastairl checkpoint stays one (the other tensors untouched; optimizer and RNG state
    dropped: they belong to the unscaled weights), anything else becomes a torchvision state dict."""
    from .. import checkpoint
    from .checkpoints import is_fastairl, read

    obj = read(Path(source))
    if is_fastairl(obj):
        model = dict(obj["model"])
        model.update({f"{branch}.backbone.{k}": v for k, v in net.state_dict().items()})
        state = {"model": model, "config": obj["config"], "step": obj.get("step"), "epoch": obj.get("epoch"),
                 "knn": obj.get("knn", []), "normrescale": meta}
        checkpoint.save(state, out / "normrescaled.pt")  # verified, like the trainer's
        return "normrescaled.pt"
    torch.save(net.state_dict(), out / "normrescaled_backbone.pth")
    return "normrescaled_backbone.pth"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastairl normrescale", description="NormRescale a LARS-trained backbone: "
                                "w* = ||w_anchor|| w / ||w||, or w* = factor * w; writes a checkpoint and a report.")
    p.add_argument("checkpoint", help="the LARS-trained model: fastairl checkpoint or torchvision/timm state dict")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--anchor", default=None, help="SGD-trained checkpoint whose per-tensor norms to take")
    how.add_argument("--factor", type=float, nargs="?", const=0.1, default=None,
                     help="constant factor instead of an anchor (0.1 when given without a value)")
    p.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                   help=f"comma-separated tensor kinds to rescale (default {','.join(DEFAULT_KINDS)})")
    p.add_argument("--branch", choices=["student", "teacher"], default="student")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true")
    return p


def compute(args, argv: list[str]) -> dict:
    from .checkpoints import load_backbone

    kinds = tuple(k for k in args.kinds.split(",") if k)
    bad = [k for k in kinds if k not in ("conv", "bn_weight", "bn_bias", "fc_weight", "fc_bias")]
    if bad or not kinds:
        raise ValueError(f"--kinds {args.kinds!r}: choose from conv, bn_weight, bn_bias, fc_weight, fc_bias")
    if args.anchor is None and args.factor is None:
        raise ValueError("pass --anchor SGD_CHECKPOINT (the paper's default) or --factor 0.1")
    lars = load_backbone(args.checkpoint, branch=args.branch)
    anchor = load_backbone(args.anchor, branch=args.branch) if args.anchor else None
    if anchor is not None and (anchor.arch, anchor.cifar_stem) != (lars.arch, lars.cifar_stem):
        raise ValueError(f"{args.checkpoint} is a {lars.arch} and the anchor {args.anchor} a {anchor.arch}"
                         f"{' (the stems differ)' if anchor.arch == lars.arch else ''}: NormRescale pairs "
                         f"tensors one to one, so the anchor must have the same architecture")
    if anchor is not None:
        check_match(lars.net, anchor.net, args.checkpoint, args.anchor)
    out = prepare_out_dir(args.out, args.overwrite)
    rows = normrescale(lars.net, anchor.net if anchor else None, args.factor, kinds)
    how = ({"anchor": {**anchor.source, "file": file_info(args.anchor)}} if anchor
           else {"factor": args.factor})
    meta = {"rule": "w* = ||w_anchor|| * w / ||w||" if anchor else f"w* = {args.factor} * w", "kinds": list(kinds),
            "branch": args.branch, "bn_running_stats": "unchanged (fine-tuning in train mode re-estimates them)", **how}
    ckpt = save_rescaled(out, args.checkpoint, lars.net, args.branch, meta)
    outputs = [ckpt, *write_report(out, rows)]
    return write_summary(out, "normrescale", argv, inputs={"lars": {**lars.source, "file": file_info(args.checkpoint)}},
                         **meta, results=kind_summary(rows), outputs=outputs, checkpoint=ckpt)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return run_tool(lambda: compute(args, argv), args.out, args.overwrite)
