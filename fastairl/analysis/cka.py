"""Linear CKA per layer between two models on the same images (Kornblith et al. 2019; PAPER.md Fig. 3b).

Two estimators, both accumulated batch by batch so the number of images is not bounded by memory:

* `LinearCKA` (features `pooled`: every block output averaged over space, N x C): the exact linear
  CKA of the whole image set, and optionally its debiased variant. It accumulates feature-space
  moments (sums, X^T X, Y^T Y, X^T Y and the few per-sample-norm terms the debiased form needs), so
  it is Gram-free, and centres over the WHOLE set at the end (accumulating per-batch centred
  statistics would not be the same estimator). The result equals the direct formula on all
  features at once; a fixed shift (the first batch's mean) keeps the float64 sums well conditioned.
* `MinibatchCKA` (features `flatten`: C*H*W per image, too wide for d x d moments): the minibatch
  CKA of Nguyen et al. 2021, the unbiased HSIC estimator (Song et al. 2012) on each batch's Gram
  matrices, averaged over batches. With a single batch it is the debiased CKA of that batch.

    fastairl cka runs/byol/last.pt random --data data/digits/val --out analysis/cka_vs_random
"""
from __future__ import annotations

import argparse
import csv
import math
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from . import RANDOM_SEED, figure, file_info, prepare_out_dir, run_tool, try_plot, write_summary


# ------------------------------------------------------------------------------------- estimators
def _centred_diag_product(ab, au, bw, xy, mu, nu, sa, sb, n):
    """sum_i ||x_i - mu||^2 ||y_i - nu||^2 from raw moments: ab = sum a_i b_i (a_i = ||x_i||^2,
    b_i = ||y_i||^2), au = sum a_i y_i, bw = sum b_i x_i, xy = X^T Y, sa = sum a_i, sb = sum b_i."""
    m2, v2 = mu @ mu, nu @ nu
    return (ab - 2 * (au @ nu) - 2 * (bw @ mu) + 4 * (mu @ xy @ nu)
            + v2 * sa + m2 * sb - 3 * n * m2 * v2)


def _hsic(cross_sq, diag_prod, sq_x, sq_y, n, debiased: bool):
    """n(n-3) x unbiased HSIC (debiased) or n^2 x the biased one, from centred statistics: cross_sq =
    ||Xc^T Yc||_F^2, diag_prod = sum_i ||xc_i||^2 ||yc_i||^2, sq_x = ||Xc||_F^2 (Kornblith's
    feature-space form; the common factor cancels in CKA)."""
    if not debiased:
        return cross_sq
    return cross_sq - n / (n - 2) * diag_prod + sq_x * sq_y / ((n - 1) * (n - 2))


class LinearCKA:
    """Exact linear CKA between X (N x d1) and Y (N x d2) fed in row batches; float64 moments."""

    def __init__(self):
        self.n = 0

    def _init(self, x: torch.Tensor, y: torch.Tensor) -> None:
        d1, d2 = x.shape[1], y.shape[1]
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=x.device)
        self.shift_x, self.shift_y = x.mean(0), y.mean(0)  # d1, d2
        self.sx, self.sy = z(d1), z(d2)
        self.xx, self.yy, self.xy = z(d1, d1), z(d2, d2), z(d1, d2)
        self.sa, self.sb, self.aa, self.bb, self.ab = (z(()) for _ in range(5))
        self.ax, self.by, self.ay, self.bx = z(d1), z(d2), z(d2), z(d1)

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.flatten(1).double(), y.flatten(1).double()  # Nxd1, Nxd2
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"CKA needs the same images for both models: got {x.shape[0]} and {y.shape[0]} rows")
        if self.n == 0:
            self._init(x, y)
        x, y = x - self.shift_x, y - self.shift_y  # CKA is translation invariant
        a, b = (x * x).sum(1), (y * y).sum(1)  # N, N
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xx += x.T @ x  # d1xd1
        self.yy += y.T @ y  # d2xd2
        self.xy += x.T @ y  # d1xd2
        self.sa += a.sum()
        self.sb += b.sum()
        self.aa += a @ a
        self.bb += b @ b
        self.ab += a @ b
        self.ax += a @ x  # d1
        self.by += b @ y  # d2
        self.ay += a @ y  # d2
        self.bx += b @ x  # d1

    def value(self, debiased: bool = False) -> float:
        n = self.n
        if n < (4 if debiased else 2):
            raise ValueError(f"CKA needs at least {4 if debiased else 2} images, got {n}")
        mu, nu = self.sx / n, self.sy / n
        cxy = self.xy - torch.outer(self.sx, self.sy) / n  # Xc^T Yc, d1xd2
        cxx = self.xx - torch.outer(self.sx, self.sx) / n  # d1xd1
        cyy = self.yy - torch.outer(self.sy, self.sy) / n  # d2xd2
        sq_x, sq_y = self.sa - n * (mu @ mu), self.sb - n * (nu @ nu)
        dxy = _centred_diag_product(self.ab, self.ay, self.bx, self.xy, mu, nu, self.sa, self.sb, n)
        dxx = _centred_diag_product(self.aa, self.ax, self.ax, self.xx, mu, mu, self.sa, self.sa, n)
        dyy = _centred_diag_product(self.bb, self.by, self.by, self.yy, nu, nu, self.sb, self.sb, n)
        hxy = _hsic(cxy.square().sum(), dxy, sq_x, sq_y, n, debiased)
        hxx = _hsic(cxx.square().sum(), dxx, sq_x, sq_x, n, debiased)
        hyy = _hsic(cyy.square().sum(), dyy, sq_y, sq_y, n, debiased)
        return _ratio(hxy, hxx, hyy)


def _ratio(hxy: torch.Tensor, hxx: torch.Tensor, hyy: torch.Tensor) -> float:
    denom = (hxx * hyy).clamp_min(0).sqrt().item()
    return hxy.item() / denom if denom > 0 else float("nan")  # a constant representation: undefined


def unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """HSIC_1 of Song et al. 2012 (Nguyen et al. 2021 eq. 3) of two NxN Gram matrices, N >= 4."""
    n = k.shape[0]
    k, l = k.clone(), l.clone()
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    k1, l1 = k.sum(1), l.sum(1)  # N, N
    trace = (k * l).sum()  # tr(K L) with K, L symmetric
    return (trace + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (k1 @ l1)) / (n * (n - 3))


class MinibatchCKA:
    """Minibatch linear CKA (Nguyen et al. 2021): per-batch unbiased HSIC of the Gram matrices,
    summed; independent of the feature width, so flattened block outputs fit."""

    def __init__(self):
        self.hxy = self.hxx = self.hyy = 0.0
        self.batches = self.n = self.skipped = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.flatten(1).double(), y.flatten(1).double()  # NxD1, NxD2
        if x.shape[0] < 4:  # the unbiased estimator needs 4 samples
            self.skipped += x.shape[0]
            return
        k, l = x @ x.T, y @ y.T  # NxN, NxN
        self.hxy = self.hxy + unbiased_hsic(k, l)
        self.hxx = self.hxx + unbiased_hsic(k, k)
        self.hyy = self.hyy + unbiased_hsic(l, l)
        self.batches += 1
        self.n += x.shape[0]

    def value(self, debiased: bool = True) -> float:
        if not self.batches:
            raise ValueError("minibatch CKA needs batches of at least 4 images; raise --batch-size")
        return _ratio(*(torch.as_tensor(h) for h in (self.hxy, self.hxx, self.hyy)))


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = False) -> float:
    """CKA of two full feature matrices (N x d1, N x d2): one batch of the exact estimator."""
    est = LinearCKA()
    est.update(x, y)
    return est.value(debiased)


# ----------------------------------------------------------------------------------------- layers
def layer_names(net: nn.Module, granularity: str, features: str = "pooled") -> list[str]:
    """Where the hooks go: the stem (after max-pool), every residual block (or every stage) and,
    for flattened features, the pooled output (pooled features of the last block are the same
    thing). Blocks are found by type, so any torchvision-style ResNet works."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if granularity == "stages":
        mids = [n for n, _ in net.named_children() if n.startswith("layer")]
    else:
        mids = [n for n, m in net.named_modules() if isinstance(m, (BasicBlock, Bottleneck))]
    return ["maxpool", *mids, *(["avgpool"] if features == "flatten" else [])]


class Taps:
    """Forward hooks that keep the output of each named layer for the current batch."""

    def __init__(self, net: nn.Module, names: list[str], features: str):
        self.out: dict[str, torch.Tensor] = {}
        modules = dict(net.named_modules())
        self.handles = [modules[n].register_forward_hook(self._hook(n, features)) for n in names]

    def _hook(self, name: str, features: str):
        def hook(_module, _inputs, output):
            if features == "pooled" and output.ndim == 4:
                output = output.mean((2, 3))  # NxCxHxW -> NxC
            self.out[name] = output.flatten(1)  # NxD
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def cka_per_layer(net_a: nn.Module, net_b: nn.Module, loader, layers: list[str], *, features: str = "pooled",
                  device="cpu") -> tuple[dict, int]:
    """Feed both models the same batches (BN in eval mode); one estimator per layer. Returns
    ({layer: estimator}, images seen)."""
    estimator = LinearCKA if features == "pooled" else MinibatchCKA
    nets = [net_a.to(device).eval(), net_b.to(device).eval()]
    taps = [Taps(n, layers, features) for n in nets]
    est = {name: estimator() for name in layers}
    seen = 0
    try:
        for images, _ in loader:
            images = images.to(device)  # Nx3xHxW
            for net in nets:
                net(images)
            for name in layers:
                est[name].update(taps[0].out[name], taps[1].out[name])
            seen += images.shape[0]
    finally:
        for t in taps:
            t.close()
    return est, seen


# ------------------------------------------------------------------------------------------- output
def plot(path: Path, layers: list[str], values: dict[str, list[float]], title: str) -> None:
    fig = figure(figsize=(max(6, 0.45 * len(layers)), 4))
    ax = fig.subplots()
    for label, ys in values.items():
        ax.plot(range(len(layers)), ys, marker="o", label=label)
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("linear CKA")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def analysis_config(config: Optional[dict], data: str, crop_size: Optional[int], workers: int,
                    pipeline: str = "torch"):
    """The eval loader's config: the run's own (crop size, resize, normalisation) when a fastairl
    checkpoint gives one, else the defaults; `data` read as a folder tree or a file list."""
    from ..config import Config, build_config, config_to_dict

    raw = dict(config) if config else config_to_dict(Config())
    raw["aug"] = {**raw["aug"], **({"crop_size": crop_size} if crop_size else {})}
    raw["data"] = {**raw["data"], "train": data, "val": None, "class_fraction": 1.0, "workers": workers,
                   "pipeline": pipeline, "source": "folder" if Path(data).is_dir() else "filelist"}
    return build_config(raw, origin="the analysis tool's options")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastairl cka", description="Linear CKA per layer between two models on "
                                "the same images; table, summary.json and a plot of CKA vs layer.")
    p.add_argument("model_a", help="fastairl checkpoint, torchvision/timm state dict, or 'random'")
    p.add_argument("model_b", help="same; 'random' takes the other model's architecture")
    p.add_argument("--data", default=None, help="image folder (class/img.jpg) or file list; default: the "
                   "first fastairl checkpoint's data.val")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--features", choices=["pooled", "flatten"], default="pooled",
                   help="pooled: block outputs averaged over space, exact full-set CKA (default); flatten: "
                        "C*H*W per image, minibatch CKA of Nguyen et al. 2021")
    p.add_argument("--layers", choices=["blocks", "stages"], default="blocks")
    p.add_argument("--debiased", action="store_true", help="also the debiased CKA (pooled features)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--crop-size", type=int, default=None, help="default: the run's aug.crop_size, else 224")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="loader processes")
    p.add_argument("--pipeline", choices=["torch", "dali", "ffcv"], default="torch", help="eval loader backend")
    p.add_argument("--branch", choices=["student", "teacher"], default="student")
    p.add_argument("--arch", default=None, help="for 'random' when neither model gives it")
    p.add_argument("--seed", type=int, default=RANDOM_SEED, help="random init seed")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--labels", default=None, help="'A,B' names for the two models")
    p.add_argument("--overwrite", action="store_true")
    return p


def _data_path(args, backbones) -> str:
    if args.data:
        return args.data
    for b in backbones:
        if b.config and b.config["data"].get("val"):
            return b.config["data"]["val"]
    raise ValueError("no images to compare on: pass --data (an image folder or file list); no fastairl "
                     "checkpoint given has data.val")


def compute(args, argv: list[str]) -> dict:
    from fastairl.pipelines import build_eval_loader, eval_resize

    from .checkpoints import load_many
    from .norms import default_labels

    a, b = load_many([args.model_a, args.model_b], arch=args.arch, branch=args.branch, seed=args.seed)
    layers = layer_names(a.net, args.layers, args.features)
    if layers != layer_names(b.net, args.layers, args.features):
        raise ValueError(f"the models have different blocks ({a.arch} vs {b.arch}); compare them with --layers stages")
    labels = args.labels.split(",") if args.labels else default_labels([args.model_a, args.model_b])
    if len(labels) != 2:
        raise ValueError(f"--labels needs two comma-separated names, got {args.labels!r}")
    cfg = analysis_config(a.config or b.config, _data_path(args, (a, b)), args.crop_size, args.workers,
                          args.pipeline)
    loader = build_eval_loader(cfg, cfg.data.train, max_samples=args.max_images, batch_size=args.batch_size)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = prepare_out_dir(args.out, args.overwrite)
    est, seen = cka_per_layer(a.net, b.net, loader, layers, features=args.features, device=device)
    values = {"cka": [est[n].value() for n in layers]}
    if args.debiased and args.features == "pooled":
        values["cka_debiased"] = [est[n].value(True) for n in layers]
    outputs = _write_table(out, layers, values)
    title = f"{labels[0]} vs {labels[1]}: {args.features} features, {seen} images"
    plotted = try_plot(plot, out / "cka.png", layers, values, title)
    outputs += ["cka.png"] if plotted is True else []
    inputs = [{"label": lab, **bb.source, **({"file": file_info(s)} if s != "random" else {})}
              for lab, bb, s in zip(labels, (a, b), (args.model_a, args.model_b))]
    return write_summary(
        out, "cka", argv, inputs=inputs,
        data={"path": str(Path(cfg.data.train).resolve()), "images": seen, "crop_size": cfg.aug.crop_size,
              "resize": eval_resize(cfg), "pipeline": cfg.data.pipeline},
        computed={"estimator": "exact full-set linear CKA (feature-space moments)" if args.features == "pooled"
                  else "minibatch CKA, unbiased HSIC per batch (Nguyen et al. 2021)",
                  "features": args.features, "layers": args.layers, "batch_size": args.batch_size,
                  "device": str(device), "bn": "eval mode",
                  "skipped_images": getattr(est[layers[0]], "skipped", 0)},
        results={name: {k: v[i] for k, v in values.items()} for i, name in enumerate(layers)},
        outputs=outputs, plot="cka.png" if plotted is True else plotted)


def _write_table(out: Path, layers: list[str], values: dict[str, list[float]]) -> list[str]:
    with open(out / "cka.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", *values])
        for i, name in enumerate(layers):
            w.writerow([name, *(f"{v[i]:.6f}" if not math.isnan(v[i]) else "nan" for v in values.values())])
    return ["cka.csv"]


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return run_tool(lambda: compute(args, argv), args.out, args.overwrite)
