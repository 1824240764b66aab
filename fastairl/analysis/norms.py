"""Weight norms per layer (PAPER.md Fig. 3a): LARS-trained weights have ~10x the norm of
SGD-trained ones. One row per parameter tensor, split by what the tensor is (conv weight, BN
weight, BN bias, linear weight / bias), chosen by module type, not by name; a table (CSV and
Markdown), per-kind totals and ratios to the first checkpoint in summary.json, and a log-scale plot.

    fastairl norms runs/byol_sgd/last.pt runs/byol_lars/last.pt --labels SGD,LARS --out analysis/norms
"""
from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import torch
from torch import nn

from . import RANDOM_SEED, figure, file_info, prepare_out_dir, run_tool, try_plot, write_summary

KINDS = ("conv", "bn_weight", "bn_bias", "fc_weight", "fc_bias", "other")


def parameter_kind(module: nn.Module, param_name: str) -> str:
    """conv / bn_weight / bn_bias / fc_weight / fc_bias, by the type of the owning module."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv" if param_name == "weight" else "other"
    if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
        return "bn_weight" if param_name == "weight" else "bn_bias"
    if isinstance(module, nn.Linear):
        return "fc_weight" if param_name == "weight" else "fc_bias"
    return "other"


def named_kinds(net: nn.Module) -> dict[str, str]:
    """Parameter name -> kind, in the module's registration (= forward) order."""
    out = {}
    for mod_name, module in net.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            out[f"{mod_name}.{p_name}" if mod_name else p_name] = parameter_kind(module, p_name)
    return out


def weight_norms(net: nn.Module) -> list[dict]:
    """One row per parameter: name, kind, shape, numel and its L2 (Frobenius) norm in float64."""
    kinds = named_kinds(net)
    return [{"name": name, "kind": kinds[name], "shape": list(p.shape), "numel": p.numel(),
             "norm": torch.linalg.vector_norm(p.detach().double()).item()}
            for name, p in net.named_parameters()]


def kind_totals(rows: list[dict]) -> dict[str, dict]:
    """Per kind: tensor count, total norm sqrt(sum ||w||^2) and the median per-tensor norm."""
    out = {}
    for kind in KINDS:
        norms = [r["norm"] for r in rows if r["kind"] == kind]
        if norms:
            out[kind] = {"tensors": len(norms), "total_norm": sum(n * n for n in norms) ** 0.5,
                         "median_norm": statistics.median(norms)}
    return out


def ratios(rows: list[dict], ref: list[dict]) -> dict[str, dict]:
    """Per kind, this checkpoint's norms over the reference's: per-tensor median/min/max (when the
    tensors pair up by name) and the ratio of the total norms."""
    ref_norm = {r["name"]: r["norm"] for r in ref}
    ours, theirs = kind_totals(rows), kind_totals(ref)
    out = {}
    for kind in (k for k in KINDS if k in ours and k in theirs):
        per = [r["norm"] / ref_norm[r["name"]] for r in rows
               if r["kind"] == kind and ref_norm.get(r["name"], 0.0) > 0.0]
        out[kind] = {"total_norm_ratio": ours[kind]["total_norm"] / max(theirs[kind]["total_norm"], 1e-300)}
        if per:
            out[kind].update(median=statistics.median(per), min=min(per), max=max(per), tensors=len(per))
    return out


# ------------------------------------------------------------------------------------------- output
def write_tables(out: Path, labels: list[str], tables: list[list[dict]]) -> list[str]:
    with open(out / "norms.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["checkpoint", "name", "kind", "shape", "numel", "norm"])
        for label, rows in zip(labels, tables):
            for r in rows:
                shape = "x".join(map(str, r["shape"]))
                w.writerow([label, r["name"], r["kind"], shape, r["numel"], f"{r['norm']:.10g}"])
    (out / "norms.md").write_text(markdown(labels, tables))
    return ["norms.csv", "norms.md"]


def markdown(labels: list[str], tables: list[list[dict]]) -> str:
    """Per-kind totals, then one row per tensor with a column per checkpoint (when they pair up)."""
    lines = ["| checkpoint | " + " | ".join(f"{k} total (median)" for k in KINDS[:3]) + " |",
             "|---" * 4 + "|"]
    for label, rows in zip(labels, tables):
        t = kind_totals(rows)
        cells = [f"{t[k]['total_norm']:.4g} ({t[k]['median_norm']:.3g})" if k in t else "-" for k in KINDS[:3]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    names = [[r["name"] for r in rows] for rows in tables]
    if all(n == names[0] for n in names):
        lines += ["", "| tensor | kind | " + " | ".join(labels) + " |", "|---" * (2 + len(labels)) + "|"]
        for i, r in enumerate(tables[0]):
            lines.append(f"| {r['name']} | {r['kind']} | " + " | ".join(f"{t[i]['norm']:.4g}" for t in tables) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, labels: list[str], tables: list[list[dict]]) -> None:
    """One log-scale panel per kind, tensors in forward order on x, one line per checkpoint."""
    kinds = [k for k in KINDS if any(r["kind"] == k for rows in tables for r in rows)]
    fig = figure(figsize=(12, 3.2 * len(kinds)))
    axes = fig.subplots(len(kinds), 1, squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        for label, rows in zip(labels, tables):
            sel = [r for r in rows if r["kind"] == kind]
            ax.plot(range(len(sel)), [r["norm"] for r in sel], marker="o", ms=3, label=label)
        names = [r["name"].rsplit(".", 1)[0] for r in tables[0] if r["kind"] == kind]
        step = max(1, len(names) // 24)
        ax.set_xticks(range(0, len(names), step), names[::step], rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log", nonpositive="mask")  # an all-zero tensor (fresh BN bias) has no point
        ax.set_ylabel(f"||{kind}||")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("weight norm per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastairl norms", description="Weight norms per layer of one or more "
                                "checkpoints: table, per-kind totals, ratios to the first, log-scale plot.")
    p.add_argument("checkpoints", nargs="+", help="fastairl checkpoints, torchvision/timm state dicts, or 'random'")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--labels", default=None, help="comma-separated names, one per checkpoint (default: file names)")
    p.add_argument("--part", choices=["backbone", "student"], default="backbone",
                   help="backbone (default), or the whole student with its heads (fastairl checkpoints)")
    p.add_argument("--branch", choices=["student", "teacher"], default="student", help="which encoder (backbone part)")
    p.add_argument("--arch", default=None, help="for 'random' when no checkpoint gives it")
    p.add_argument("--seed", type=int, default=RANDOM_SEED, help="random init seed")
    p.add_argument("--overwrite", action="store_true")
    return p


def default_labels(sources: list[str]) -> list[str]:
    """parent-dir/file for checkpoints (runs/byol_sgd/last.pt -> byol_sgd/last), as given otherwise."""
    out = [s if s == "random" else f"{Path(s).parent.name}/{Path(s).stem}".lstrip("/") for s in sources]
    return [f"{label}#{i}" if out.count(label) > 1 else label for i, label in enumerate(out)]


def _modules(args) -> tuple[list[nn.Module], list[dict]]:
    from .checkpoints import load_many, load_student

    if args.part == "student":
        pairs = [load_student(s) for s in args.checkpoints]
        return [n for n, _ in pairs], [s for _, s in pairs]
    bbs = load_many(args.checkpoints, arch=args.arch, branch=args.branch, seed=args.seed)
    return [b.net for b in bbs], [b.source for b in bbs]


def compute(args, argv: list[str]) -> dict:
    labels = args.labels.split(",") if args.labels else default_labels(args.checkpoints)
    if len(labels) != len(args.checkpoints):
        raise ValueError(f"--labels has {len(labels)} names for {len(args.checkpoints)} checkpoints; give one each")
    nets, sources = _modules(args)
    out = prepare_out_dir(args.out, args.overwrite)
    tables = [weight_norms(n) for n in nets]
    outputs = write_tables(out, labels, tables)
    plotted = try_plot(plot, out / "norms.png", labels, tables)
    outputs += ["norms.png"] if plotted is True else []
    inputs = [{"label": label, **src, **({"file": file_info(s)} if s != "random" else {})}
              for label, src, s in zip(labels, sources, args.checkpoints)]
    results = {label: {"per_kind": kind_totals(rows)} for label, rows in zip(labels, tables)}
    for label, rows in zip(labels[1:], tables[1:]):
        results[label][f"ratio_to_{labels[0]}"] = ratios(rows, tables[0])
    return write_summary(out, "norms", argv, inputs=inputs, part=args.part,
                         computed="L2 norm of every parameter tensor (float64), grouped by kind; ratios to the first",
                         results=results, outputs=outputs, plot=plotted if plotted is not True else "norms.png")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return run_tool(lambda: compute(args, argv), args.out, args.overwrite)
