"""`fastairl eval RECIPE [overrides]`: kNN, linear evaluation (protocols A / B, augmented or on cached
features) and full fine-tuning of a backbone from a fastairl checkpoint, a torchvision / timm state
dict, or random initialisation. Data comes through the loader seam, so every backend works.

The run directory describes itself: config.yaml (resolved), env.json, metrics.jsonl (one row per
epoch), summary.json (protocol, where the backbone came from, top-1 / top-5 or kNN accuracies).

Under `torchrun` / `accelerate launch` the augmented linear and fine-tuning protocols train data-parallel:
each process reads its shard of every global batch of eval.batch_size, and DDP averages the gradients
of the head (and, fine-tuning, of the backbone). Feature extraction (kNN, the cached-feature probe) and
the validation pass are split too: each process encodes its strided share of the images, and the
features are all-gathered in sample order (the validation counts summed). Only rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError, dump_config
from ..data.augment import linear_train_spec
from ..data.datasets import check_same_classes
from ..trainer import native_bf16, set_cpu_threads
from .features import extract, knn_accuracies
from .protocols import eval_lr, make_optimizer, peak_lr, set_lrs, topk_correct, train_head_on_features


def _run_dir(cfg: Config, run_dir: Optional[str]) -> Path:
    path = Path(run_dir) if run_dir else Path(cfg.train.out_dir) / (cfg.train.run_name or cfg.name)
    if (path / "summary.json").exists():
        raise ConfigError(f"{path} already holds a finished evaluation (summary.json); pass another "
                          f"--run-dir or delete it")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create the run directory {path}: {e.strerror}") from None
    return path


def _backbone(cfg: Config, device: torch.device):
    from ..analysis.checkpoints import RANDOM, load_backbone

    e = cfg.eval
    random = e.checkpoint == RANDOM
    bb = load_backbone(e.checkpoint, arch=cfg.model.arch if random else None,
                       cifar_stem=cfg.model.cifar_stem if random else None, branch=e.branch,
                       **({"seed": cfg.train.seed} if random else {}))
    net = bb.net.to(device)
    if cfg.model.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, bb.source


def _with_batch(cfg: Config) -> Config:
    """The config the seam sees for the labelled training loader: eval.batch_size per step."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=cfg.eval.batch_size))


def _bf16(device) -> bool:
    """Autocast to bf16 on GPUs that have it in hardware (emulated bf16, pre-Ampere, is slower than fp32)."""
    return device.type == "cuda" and native_bf16()


@torch.no_grad()
def accuracy(backbone: nn.Module, head: nn.Module, loader, device, fmt, state=None) -> dict:
    """Top-1/5 over `loader`; with `state` of several processes, each reads its share of the
    validation split and the counts are summed."""
    backbone.eval()
    hits, n = torch.zeros(2, device=device), 0
    amp = _bf16(device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True).contiguous(memory_format=fmt), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = head(backbone(x)).float()  # NxC
        hits += torch.stack(topk_correct(logits, y))
        n += y.shape[0]
    counts = torch.cat([hits, torch.tensor([float(n)], device=device)])  # top-1 hits, top-5 hits, images
    if state is not None and state.num_processes > 1:
        from accelerate.utils import reduce

        counts = reduce(counts, "sum")
    top1, top5, n = counts.tolist()
    return {"top1": 100.0 * top1 / max(n, 1), "top5": 100.0 * top5 / max(n, 1), "val_samples": int(n)}


def _ddp(module: nn.Module, state) -> nn.Module:
    """`module` wrapped in DDP (gradients averaged over the processes); itself in one process."""
    if state.num_processes == 1:
        return module
    dev = state.device
    return nn.parallel.DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)


def train_epochs(cfg: Config, backbone: nn.Module, head: nn.Module, state, fmt, log, val_loader) -> None:
    """Linear (frozen backbone, BN in eval mode) or fine-tuning (everything trains) on augmented
    single views (crop + flip) from the training split, with the protocol's lr rule; data-parallel
    over the launched processes (eval.batch_size is the global batch)."""
    from ..pipelines import build_train_loader

    from accelerate.utils import reduce

    e, finetune, device, world = cfg.eval, cfg.eval.protocol == "finetune", state.device, state.num_processes
    spec = linear_train_spec(cfg.aug)
    loader = build_train_loader(_with_batch(cfg), spec, rank=state.process_index, world_size=world, device=device)
    check_same_classes(loader.classes, val_loader.classes)
    groups = [{"params": list(head.parameters())}]
    if finetune:
        groups.append({"params": list(backbone.parameters()), "lr_mult": e.backbone_lr_mult})
    backbone.requires_grad_(finetune)
    opt = make_optimizer(e, groups)
    # DDP wraps what trains (the frozen backbone has no gradients to average); the validation pass
    # below uses the bare modules (no DDP forward hooks; it sums its counts itself)
    train_bb = _ddp(backbone, state) if finetune else backbone
    train_head = _ddp(head, state)
    spe = loader.steps_per_epoch
    amp = _bf16(device)
    for epoch in range(e.epochs):
        backbone.train(finetune)
        loader.set_epoch(epoch)
        total, n, t0 = torch.zeros((), device=device), 0, time.perf_counter()
        for i, (views, y) in enumerate(loader):
            set_lrs(opt, eval_lr(e, epoch * spe + i, spe))
            x = views[0].to(device, non_blocking=True).contiguous(memory_format=fmt)  # nx3xHxW, n = N / world
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                with torch.set_grad_enabled(finetune):
                    f = train_bb(x)  # nxF
                loss = F.cross_entropy(train_head(f.float()), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            n += y.shape[0]
        # summed over the processes: the mean loss of the epoch's steps, and the images they read
        total, images = reduce(torch.stack([total, torch.tensor(float(n), device=device)]), "sum").tolist()
        if finetune and world > 1:  # every process evaluates with rank 0's BN running statistics
            for b in backbone.buffers():
                torch.distributed.broadcast(b, 0)
        dt = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "loss": total / (spe * world),
               "lr": eval_lr(e, epoch * spe, spe), "epoch_s": dt, "images": int(images), "img_per_s": images / dt}
        if e.val_every_epochs and (epoch + 1) % e.val_every_epochs == 0 and epoch + 1 < e.epochs:
            row.update({k if k == "val_samples" else f"val_{k}": v
                        for k, v in accuracy(backbone, head, val_loader, device, fmt, state).items()})
        log(row)


def evaluate(cfg: Config, run_dir: Optional[str] = None) -> dict:
    from ..pipelines import build_eval_loader

    from accelerate import PartialState

    e = cfg.eval
    if not cfg.data.val:
        raise ConfigError("eval needs data.val (the held-out split to report on)")
    # PartialState, not Accelerator: it fixes no mixed-precision setting, so a later in-process train()
    # may still ask for bf16
    state = PartialState(cpu=not torch.cuda.is_available(),
                         timeout=timedelta(minutes=cfg.train.dist_timeout_minutes))
    device, world, main = state.device, state.num_processes, state.is_main_process
    augmented = e.protocol == "finetune" or (e.protocol == "linear" and not e.cache_features)
    if augmented and e.batch_size % world:
        raise ConfigError(f"eval.batch_size={e.batch_size} (the global batch) must be divisible by the "
                          f"{world} processes")
    if world > 1:
        set_cpu_threads(cfg, state)  # a share of the cores each; one process keeps torch's default
    torch.manual_seed(cfg.train.seed)  # the same head on every process
    out = _run_dir(cfg, run_dir)  # every process checks, so all stop together on a finished run dir
    backbone, source = _backbone(cfg, device)
    env = {"torch": torch.__version__, "device": str(device), "num_processes": world,
           "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}
    if main:
        (out / "config.yaml").write_text(dump_config(cfg))
        (out / "env.json").write_text(json.dumps(env, indent=2))
    fmt = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    metrics = open(out / "metrics.jsonl", "a") if main else None

    def log(row: dict) -> None:
        if metrics is None:
            return
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)

    t0 = time.perf_counter()
    shard = dict(rank=state.process_index, world_size=world)  # each process reads its share; extract gathers
    val = build_eval_loader(cfg, cfg.data.val, batch_size=min(256, e.batch_size), pin_memory=device.type == "cuda",
                            **shard)
    summary = {"protocol": e.protocol, "backbone": source, "epochs": e.epochs, "batch_size": e.batch_size,
               "num_processes": world, "lr": peak_lr(e), "schedule": e.schedule, "cache_features": e.cache_features}
    if not augmented:
        bank = build_eval_loader(cfg, cfg.data.train, batch_size=min(256, e.batch_size), **shard)
        check_same_classes(bank.classes, val.classes)
        knn = e.protocol == "knn"  # kNN searches each process's share of the bank: only the queries gather
        bf, by = extract(backbone, bank, device, cfg.model.channels_last, None if knn else state)
        vf, vy = extract(backbone, val, device, cfg.model.channels_last, state)
        n_bank = torch.tensor(len(by), device=device)
        if knn and world > 1:
            from accelerate.utils import reduce

            n_bank = reduce(n_bank, "sum")
        summary.update(train_samples=int(n_bank), val_samples=len(vy))
        if knn:
            top1 = knn_accuracies(bf, by, vf, vy, e.knn_k, e.knn_temperature, bank.num_classes, procs=state)
            summary["knn_top1"] = {str(k): v for k, v in top1.items()}
        else:
            head = train_head_on_features(e, bf.to(device), by.to(device), bank.num_classes, cfg.train.seed,
                                          log=lambda ep, loss: log({"epoch": ep + 1, "loss": loss}))
            logits = head(vf.to(device))
            hits = topk_correct(logits, vy.to(device))
            summary.update(top1=100.0 * float(hits[0]) / len(vy), top5=100.0 * float(hits[1]) / len(vy))
    else:
        head = nn.Linear(backbone_dim(backbone, cfg, device), val.num_classes).to(device)
        train_epochs(cfg, backbone, head, state, fmt, log, val)
        summary.update(accuracy(backbone, head, val, device, fmt, state))
    summary["time_s"] = time.perf_counter() - t0
    if main:
        metrics.close()
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"eval {e.protocol}: " + ", ".join(f"{k} {v}" for k, v in summary.items()
                                                    if k in ("top1", "top5", "knn_top1")), flush=True)
    state.wait_for_everyone()  # no process leaves while rank 0 still writes
    if world > 1:
        state.destroy_process_group()
    return summary


@torch.no_grad()
def backbone_dim(backbone: nn.Module, cfg: Config, device) -> int:
    was = backbone.training
    backbone.eval()
    d = backbone(torch.zeros(1, 3, cfg.aug.crop_size, cfg.aug.crop_size, device=device)).shape[1]
    backbone.train(was)
    return d
