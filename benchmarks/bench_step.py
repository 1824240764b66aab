"""Train-step throughput: fastairl's `train_step` against a bare torch loop, then end to end on JPEGs.

For each recipe (recipes/<method>.yaml, with CPU-sized overrides) this measures, in one process:

1. synthetic data, interleaved A B A B ...: A = `fastairl.trainer.train_step` on the library's model
   and optimiser under an `accelerate.Accelerator`; B = the same step written as a plain torch loop
   (torchvision ResNet + nn.Sequential heads, teacher under no_grad, loss, backward, torch SGD (or a
   per-tensor LARS for LARS recipes), python-loop EMA). B starts from A's weights (a strict
   `load_state_dict`, which also proves the module shapes are the same) and the first-step losses of
   both are recorded, so the two loops are shown to compute the same thing.
   overhead_ratio = t_bare / t_fastairl per repeat pair (1.0: no framework overhead; 0.9: fastairl
   takes 11 % longer).
2. the torch reference pipeline (`TorchTrainLoader`) on a real-photo JPEG corpus (`make_photo_corpus`,
   ~500x375): the pipeline alone (dual-view batches, no model), then the fastairl step fed by it,
   with the time blocked on the loader reported separately (data_wait_frac = wait / total).

Warm-up steps are not counted; every number is per repeat (a block of --steps steps between two
synchronisation points), summarised as median, min and max. Nothing here asserts on speed.

    python benchmarks/bench_step.py                 # all methods, resnet18, crop 64, batch 32
    python benchmarks/bench_step.py --quick --methods byol_sgd,mocov2plus
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
ALL_METHODS = ("mocov2", "mocov2plus", "smocov2plus", "byol_sgd", "byol_lars", "supervised")

# Defaults of the full run and of --quick (< 60 s on 2 busy CPU cores, corpus build included). threads
# None = torch's choice; --quick uses 1 because OpenMP threads that outnumber the free cores spin at
# every barrier (5-10x slower steps measured on a shared 2-core machine).
FULL = dict(arch="resnet18", crop=64, batch=32, steps=10, warmup=3, repeats=3, corpus_images=500, threads=None)
QUICK = dict(arch="resnet10", crop=32, batch=16, steps=2, warmup=1, repeats=2, corpus_images=200, threads=1)


# --------------------------------------------------------------------------------------- utilities
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "repeats": values}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_info(accelerator) -> dict:
    import numpy
    import PIL

    from fastairl.trainer import environment

    env = environment(accelerator)  # python, torch, torchvision, accelerate, device, threads, git commit
    env.update(cpu_model=cpu_model(), cpu_count=os.cpu_count(), numpy=numpy.__version__, pillow=PIL.__version__,
               torch_threads=torch.get_num_threads(), torch_interop_threads=torch.get_num_interop_threads(),
               cuda_available=torch.cuda.is_available(),
               cuda_device=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               loadavg_start=os.getloadavg() if hasattr(os, "getloadavg") else None)
    return env


def method_config(method: str, args, on_cuda: bool):
    """The real recipe with the benchmark's overrides (validated like command-line overrides)."""
    from fastairl.config import load_config

    recipe = ROOT / "recipes" / f"{method}.yaml"
    if not recipe.is_file():
        sys.exit(f"--methods: {recipe} does not exist; choose from {', '.join(ALL_METHODS)}")
    ov = [f"model.arch={args.arch}", f"aug.crop_size={args.crop}", f"train.batch_size={args.batch}",
          "method.bn=plain", "data.source=synthetic", f"data.num_classes={args.classes}",
          f"data.workers={args.workers}", f"model.channels_last={str(on_cuda).lower()}",
          # quoted: YAML 1.1 reads a bare `no` as false
          "train.precision=bf16" if on_cuda else "train.precision='no'", "model.compile=false"]
    if args.hidden:
        ov += [f"model.projector.hidden_dim={args.hidden}", f"model.predictor.hidden_dim={args.hidden}"]
    if args.queue:
        ov.append(f"method.queue_size={args.queue}")
    return load_config(recipe, ov), ov


class Schedule:
    """The library's pure lr / momentum schedules over a nominal run; both loops use the same values."""

    def __init__(self, cfg, total_steps: int = 100_000, steps_per_epoch: int = 1000):
        from fastairl.schedules import scaled_lr

        self.cfg, self.total = cfg, total_steps
        self.warmup = round(cfg.optim.warmup_epochs * steps_per_epoch)
        self.peak = scaled_lr(cfg.optim.base_lr, cfg.train.batch_size)

    def __call__(self, step: int) -> tuple[float, float]:
        from fastairl.schedules import lr_at, momentum_at

        o, e = self.cfg.optim, self.cfg.method.ema
        return (lr_at(step, self.total, self.warmup, self.peak, o.schedule, o.min_lr),
                momentum_at(step, self.total, e.base, e.schedule))


# ------------------------------------------------------------------------------------------ fastairl
class FastairlStep:
    """The library path, set up as `fastairl.trainer.train` does it (same order of calls)."""

    def __init__(self, cfg, accelerator, num_classes: int):
        from fastairl.optim import build_optimizer
        from fastairl.trainer import RunLog, build_model

        self.cfg, self.accelerator, self.schedule = cfg, accelerator, Schedule(cfg)
        log = RunLog(Path("."), enabled=False, tensorboard=False)  # disabled: opens no files
        model = build_model(cfg, num_classes, accelerator, log)
        optimizer = build_optimizer(cfg.optim, model.student, cfg.train.batch_size)
        probe_opt = (torch.optim.SGD(model.probe.parameters(), lr=cfg.probe.lr, momentum=0.9)
                     if model.probe is not None else None)
        self.unwrapped = model
        # as fastairl.trainer.train: the probe's optimizer is not prepared (one scaler update per step)
        (self.model, self.optimizer), self.probe_opt = accelerator.prepare(model, optimizer), probe_opt
        self.model.train()
        self.fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        self.step_no = 0

    def __call__(self, views, labels) -> dict:
        from fastairl.trainer import train_step

        lr, mom = self.schedule(self.step_no)
        metrics = train_step(self.model, self.unwrapped, self.optimizer, self.probe_opt, self.accelerator,
                             views, labels, self.step_no, lr, mom, self.fmt)
        self.step_no += 1
        return metrics


# ---------------------------------------------------------------------------------------------- bare
def bare_backbone(arch: str, cifar_stem: bool) -> nn.Module:
    import torchvision
    from torchvision.models.resnet import BasicBlock, ResNet

    net = ResNet(BasicBlock, [1, 1, 1, 1]) if arch == "resnet10" else getattr(torchvision.models, arch)()
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def bare_mlp(d_in: int, hidden: int, d_out: int, bn: bool) -> nn.Sequential:
    layers = [nn.Linear(d_in, hidden, bias=not bn)] + ([nn.BatchNorm1d(hidden)] if bn else [])
    return nn.Sequential(*layers, nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


class BareLARS:
    """LARS as one would write it by hand: a python loop over tensors (ndim <= 1: plain momentum SGD)."""

    def __init__(self, params, momentum: float, weight_decay: float, eta: float, nesterov: bool):
        self.params = [p for p in params if p.requires_grad]
        self.bufs = [torch.zeros_like(p) for p in self.params]
        self.param_groups = [{"lr": 0.0}]
        self.mom, self.wd, self.eta, self.nesterov = momentum, weight_decay, eta, nesterov

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        lr = self.param_groups[0]["lr"]
        for p, buf in zip(self.params, self.bufs):
            if p.grad is None:
                continue
            u = p.grad
            if p.ndim > 1:
                w_n, g_n = p.norm(), u.norm()
                trust = torch.where((w_n > 0) & (g_n > 0), self.eta * w_n / (g_n + self.wd * w_n), torch.ones_like(w_n))
                u = (u + self.wd * p) * trust
            buf.mul_(self.mom).add_(u)
            p.add_(u + self.mom * buf if self.nesterov else buf, alpha=-lr)


class BareStep:
    """The same training step as a plain torch loop, with modules of the same shapes as the library's."""

    def __init__(self, cfg, num_classes: int, device: torch.device, fast: FastairlStep):
        m, mc, o = cfg.method, cfg.model, cfg.optim
        self.cfg, self.device, self.schedule = cfg, device, Schedule(cfg)
        self.ce, self.infonce, self.sym, self.tau = m.loss == "ce", m.loss == "infonce", m.symmetric, m.temperature
        feat = 512 if mc.arch in ("resnet10", "resnet18") else 2048
        p, q = mc.projector, mc.predictor
        student = nn.ModuleDict({"backbone": bare_backbone(mc.arch, mc.cifar_stem)})
        if self.ce:
            student["fc"] = nn.Linear(feat, num_classes)
        else:
            student["projector"] = bare_mlp(feat, p.hidden_dim, p.out_dim, p.bn_hidden)
            if m.predictor != "none":
                student["predictor"] = bare_mlp(p.out_dim, q.hidden_dim, p.out_dim, q.bn_hidden)
        self.student = student
        self.teacher = self.probe = self.probe_opt = self.queue = None
        lib = fast.unwrapped
        self.student.load_state_dict(lib.student.state_dict())  # strict: same module shapes
        if not self.ce:
            self.teacher = copy.deepcopy(student)
            if m.predictor == "student":
                del self.teacher["predictor"]
            self.teacher.load_state_dict(lib.teacher.state_dict())
            self.teacher.requires_grad_(False)
            if cfg.probe.online:
                self.probe = nn.Linear(feat, num_classes)
                self.probe.load_state_dict(lib.probe.state_dict())
            if self.infonce:
                self.queue = lib.queue.detach().clone()  # KxC
                self.ptr = 0
        self.fmt = torch.channels_last if mc.channels_last else torch.contiguous_format
        for net in (self.student, self.teacher, self.probe):
            if net is not None:
                net.to(device, memory_format=self.fmt).train()
        if self.queue is not None:
            self.queue = self.queue.to(device)
        if o.name == "lars":
            self.opt = BareLARS(self.student.parameters(), o.momentum, o.weight_decay, o.trust_coef, o.nesterov)
        else:
            self.opt = torch.optim.SGD(self.student.parameters(), lr=0.0, momentum=o.momentum,
                                       weight_decay=o.weight_decay, nesterov=o.nesterov)
        if self.probe is not None:
            self.probe_opt = torch.optim.SGD(self.probe.parameters(), lr=cfg.probe.lr, momentum=0.9)
        s_params = dict(self.student.named_parameters())
        self.ema_pairs = ([(t, s_params[n]) for n, t in self.teacher.named_parameters()]
                          if self.teacher is not None else [])
        self.autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda"
                         else contextlib.nullcontext)
        self.rng = random.Random(cfg.train.seed)
        self.step_no = 0

    @staticmethod
    def _head(net: nn.ModuleDict, h: torch.Tensor) -> torch.Tensor:
        z = net["projector"](h)
        return net["predictor"](z) if "predictor" in net else z

    def _loss(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.infonce:
            q, k = F.normalize(s.float(), dim=1), F.normalize(t.float(), dim=1)  # NxC
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.t()], 1) / self.tau  # Nx(1+K)
            return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        return (2 - 2 * F.cosine_similarity(s.float(), t.float(), dim=-1)).mean()

    def __call__(self, views, labels) -> torch.Tensor:
        lr, mom = self.schedule(self.step_no)
        self.opt.param_groups[0]["lr"] = lr
        x = [v.to(self.device, non_blocking=True).contiguous(memory_format=self.fmt) for v in views]
        y = labels.to(self.device, non_blocking=True)
        with self.autocast():
            if self.ce:
                loss = ssl = F.cross_entropy(self.student["fc"](self.student["backbone"](x[0])).float(), y)
            else:
                h1 = self.student["backbone"](x[0])  # NxF
                s1 = self._head(self.student, h1)  # NxC
                with torch.no_grad():
                    t2 = self._head(self.teacher, self.teacher["backbone"](x[1]))
                loss = self._loss(s1, t2)
                if self.sym:
                    s2 = self._head(self.student, self.student["backbone"](x[1]))
                    with torch.no_grad():
                        t1 = self._head(self.teacher, self.teacher["backbone"](x[0]))
                    loss = loss + self._loss(s2, t1)
                ssl = loss
                if self.probe is not None:
                    loss = loss + F.cross_entropy(self.probe(h1.detach().float()), y)
        self.opt.zero_grad(set_to_none=True)
        if self.probe_opt is not None:
            self.probe_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.probe_opt is not None:
            self.probe_opt.step()
        with torch.no_grad():
            for t, s in self.ema_pairs:
                t.mul_(mom).add_(s, alpha=1 - mom)
            if self.infonce:  # after backward: the queue can be written in place, no copy needed
                keys = F.normalize((t2 if not self.sym or self.rng.random() < 0.5 else t1).float(), dim=1)
                idx = torch.arange(self.ptr, self.ptr + keys.shape[0], device=self.device) % self.queue.shape[0]
                self.queue.index_copy_(0, idx, keys)
                self.ptr = (self.ptr + keys.shape[0]) % self.queue.shape[0]
        self.step_no += 1
        return ssl.detach()


# ------------------------------------------------------------------------------------- measurements
def timed_block(fn, n: int, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return time.perf_counter() - t0


def synthetic_pair(cfg, accelerator, device, args) -> tuple[dict, FastairlStep]:
    """fastairl vs bare on the same pre-generated batch, interleaved so machine drift cancels."""
    from fastairl.data.augment import spec_from_config
    from fastairl.methods import num_views
    from fastairl.pipelines.torch_ref import SyntheticLoader

    torch.manual_seed(cfg.train.seed)
    spec = spec_from_config(cfg.aug, num_views=num_views(cfg))
    data = SyntheticLoader(spec, cfg.train.batch_size, num_classes=cfg.data.num_classes,
                           num_samples=cfg.train.batch_size, seed=cfg.train.seed, device=device)
    views, labels = data.views, data.labels
    fast = FastairlStep(cfg, accelerator, cfg.data.num_classes)
    bare = BareStep(cfg, cfg.data.num_classes, device, fast)
    # The first step of each starts from the same weights and data: the losses must agree.
    first_fast = fast(views, labels)["loss_ssl"]
    first_bare = bare(views, labels)
    first = {"fastairl": float(first_fast), "bare": float(first_bare)}
    timed_block(lambda: fast(views, labels), args.warmup - 1, device)
    timed_block(lambda: bare(views, labels), args.warmup - 1, device)
    n_img = args.steps * cfg.train.batch_size
    t_fast, t_bare = [], []
    for _ in range(args.repeats):
        t_fast.append(timed_block(lambda: fast(views, labels), args.steps, device))
        t_bare.append(timed_block(lambda: bare(views, labels), args.steps, device))
    return {"fastairl_img_per_s": summary([n_img / t for t in t_fast]),
            "bare_img_per_s": summary([n_img / t for t in t_bare]),
            "overhead_ratio": summary([b / f for f, b in zip(t_fast, t_bare)]),
            "fastairl_step_s": summary([t / args.steps for t in t_fast]),
            "bare_step_s": summary([t / args.steps for t in t_bare]),
            "first_step_loss": first}, fast


def photo_corpus(args) -> tuple[list, list]:
    from fastairl.data.bundled import make_photo_corpus
    from fastairl.data.datasets import scan_folder

    root = Path(args.corpus) / f"photos-n{args.corpus_images}"
    t0 = time.perf_counter()
    manifest = make_photo_corpus(root, n_images=args.corpus_images, classes=10)
    print(f"corpus: {root} ({manifest['totals']['train']} JPEGs, mean "
          f"{manifest['size']['mean_width']:.0f}x{manifest['size']['mean_height']:.0f}; "
          f"ready in {time.perf_counter() - t0:.1f} s)", flush=True)
    return scan_folder(root / "train")


def real_data(cfg, fast: FastairlStep, samples, classes, device, args, pipeline_cache: dict) -> dict:
    """The pipeline alone, then the fastairl step fed by it (data wait measured apart from compute)."""
    from fastairl.data.augment import spec_from_config
    from fastairl.methods import num_views
    from fastairl.pipelines.torch_ref import TorchTrainLoader

    spec = spec_from_config(cfg.aug, num_views=num_views(cfg))
    bs, per_phase = cfg.train.batch_size, args.warmup + args.repeats * args.steps
    # One epoch covers a whole phase: epoch ends (a pipeline refill every few steps on a small corpus)
    # would otherwise dominate. Repeated files get other augmentations (the rng is per index).
    reps = math.ceil(bs * per_phase / len(samples))
    loader = TorchTrainLoader(samples * reps, classes, spec, bs, seed=cfg.train.seed, workers=args.workers,
                              pin_memory=device.type == "cuda")
    n_img = args.steps * bs
    out = {"epoch_images": len(samples) * reps, "aug_preset": cfg.aug.preset, "views": spec.num_views}
    if spec not in pipeline_cache:  # methods with the same augmentation share the pipeline number
        loader.set_epoch(0)
        batches = iter(loader)
        for _ in range(args.warmup):
            next(batches)
        times = [timed_block(lambda: next(batches), args.steps, torch.device("cpu")) for _ in range(args.repeats)]
        pipeline_cache[spec] = summary([n_img / t for t in times])
    out["pipeline_img_per_s"] = pipeline_cache[spec]
    loader.set_epoch(1)
    it = iter(loader)
    for _ in range(args.warmup):
        fast(*next(it))
    totals, waits = [], []
    for _ in range(args.repeats):
        wait = 0.0
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            tw = time.perf_counter()
            views, labels = next(it)
            wait += time.perf_counter() - tw
            fast(views, labels)
        sync(device)
        totals.append(time.perf_counter() - t0)
        waits.append(wait)
    del it, loader
    gc.collect()  # shuts the persistent workers down before the next method starts its own
    out.update(e2e_img_per_s=summary([n_img / t for t in totals]),
               data_wait_frac=summary([w / t for w, t in zip(waits, totals)]),
               e2e_data_wait_s_per_step=summary([w / args.steps for w in waits]),
               e2e_compute_s_per_step=summary([(t - w) / args.steps for w, t in zip(waits, totals)]))
    return out


# ------------------------------------------------------------------------------------------- report
def table(results: dict) -> str:
    def rng(s, fmt="{:.1f}"):
        return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"

    head = ("method", "fastairl img/s", "bare img/s", "bare/fastairl", "e2e img/s", "data wait",
            "pipeline img/s", "aug")
    rows = [head]
    for name, r in results.items():
        rows.append((name, rng(r["fastairl_img_per_s"]), rng(r["bare_img_per_s"]),
                     rng(r["overhead_ratio"], "{:.3f}"), rng(r["e2e_img_per_s"]),
                     rng(r["data_wait_frac"], "{:.2f}"), rng(r["pipeline_img_per_s"]),
                     f"{r['aug_preset']} x{r['views']}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("median (min-max) over repeats; bare/fastairl = t_bare / t_fastairl (1.0: no overhead); "
                 "data wait = time blocked on the loader / e2e time; methods with the same aug share one "
                 "pipeline measurement")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated recipe names")
    ap.add_argument("--arch", help=f"backbone (default {FULL['arch']}, --quick {QUICK['arch']})")
    ap.add_argument("--crop", type=int, help=f"crop size (default {FULL['crop']}, --quick {QUICK['crop']})")
    ap.add_argument("--batch", type=int, help=f"batch size (default {FULL['batch']}, --quick {QUICK['batch']})")
    ap.add_argument("--steps", type=int, help=f"timed steps per repeat (default {FULL['steps']})")
    ap.add_argument("--warmup", type=int, help=f"untimed steps first (default {FULL['warmup']}, min 1)")
    ap.add_argument("--repeats", type=int, help=f"timed repeats (default {FULL['repeats']})")
    ap.add_argument("--corpus-images", type=int, help=f"JPEGs in the corpus (default {FULL['corpus_images']}, "
                                                      f"--quick {QUICK['corpus_images']})")
    ap.add_argument("--hidden", type=int, default=512,
                    help="projector / predictor hidden width (0: the recipe's 4096 / 2048)")
    ap.add_argument("--queue", type=int, default=4096, help="MoCo queue size (0: the recipe's 65536)")
    ap.add_argument("--classes", type=int, default=1000, help="classes of the synthetic labels (probe / fc size)")
    ap.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                    help="loader worker processes (default: cores - 1, at most 8)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice; --quick 1)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--out", default="bench_out/step.json")
    ap.add_argument("--corpus", help="corpus cache folder (default: <folder of --out>/corpus)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in under a minute on CPU")
    args = ap.parse_args(argv)
    apply_presets(ap, args, FULL, QUICK, ("steps", "warmup", "repeats", "batch", "corpus_images"))
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.corpus is None:
        args.corpus = str(Path(args.out).parent / "corpus")
    return args


def apply_presets(ap, args, full: dict, quick: dict, positive) -> None:
    """Options left unset take the --quick or full preset's value; those in `positive` must be >= 1."""
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in positive:
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1")


def make_accelerator(args):
    """(Accelerator, on_cuda) for --device and --threads: bf16 on a GPU, fp32 on the CPU."""
    from accelerate import Accelerator

    if args.threads:
        torch.set_num_threads(args.threads)
    on_cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if on_cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available here; use --device auto or cpu")
    return Accelerator(cpu=not on_cuda, mixed_precision="bf16" if on_cuda else "no"), on_cuda


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator, on_cuda = make_accelerator(args)
    device = accelerator.device
    env = environment_info(accelerator)
    print(f"device {device} ({env['cuda_device'] or env['cpu_model']}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.workers} loader workers", flush=True)
    samples, classes = photo_corpus(args)
    results, configs, pipeline_cache = {}, {}, {}
    t_start = time.perf_counter()
    for method in args.methods:
        from fastairl.config import config_to_dict

        cfg, overrides = method_config(method, args, on_cuda)
        configs[method] = {"recipe": f"recipes/{method}.yaml", "overrides": overrides, "resolved": config_to_dict(cfg)}
        t0 = time.perf_counter()
        res, fast = synthetic_pair(cfg, accelerator, device, args)
        res.update(real_data(cfg, fast, samples, classes, device, args, pipeline_cache))
        res["optimizer"] = {"fastairl": type(fast.optimizer.optimizer).__name__,
                            "bare": "BareLARS (per-tensor loop)" if cfg.optim.name == "lars" else "torch.optim.SGD"}
        results[method] = res
        del fast
        accelerator.free_memory()  # drops accelerate's references to this method's model / optimisers
        gc.collect()
        print(f"{method}: fastairl {res['fastairl_img_per_s']['median']:.1f} img/s, bare "
              f"{res['bare_img_per_s']['median']:.1f}, e2e {res['e2e_img_per_s']['median']:.1f} "
              f"(data wait {res['data_wait_frac']['median']:.2f}), pipeline "
              f"{res['pipeline_img_per_s']['median']:.1f}  [{time.perf_counter() - t0:.0f} s]", flush=True)
    env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    params = {k: v for k, v in vars(args).items()}
    busy = torch.get_num_threads() + args.workers
    params.update(cpu_oversubscribed=busy > (os.cpu_count() or 1),  # threads + workers > cores: e2e shares cores
                  device=str(device), precision="bf16" if on_cuda else "fp32",
                  memory_format="channels_last" if on_cuda else "contiguous",
                  corpus_photo_size="~500x375 (make_photo_corpus)", wall_s=round(time.perf_counter() - t_start, 1))
    report = {"benchmark": "bench_step", "command": " ".join(["python"] + sys.argv),
              "environment": env, "params": params, "configs": configs, "results": results,
              "notes": {"overhead_ratio": "t_bare / t_fastairl per interleaved repeat pair: 1.0 = no overhead, "
                                          "<1 = fastairl slower",
                        "data_wait_frac": "time blocked on the loader / total time of the end-to-end block",
                        "pipeline_img_per_s": "TorchTrainLoader alone (views as the recipe's preset), no model"}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(results))
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
