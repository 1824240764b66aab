"""Evaluation protocols as small pure pieces: the learning-rate rule of linear protocols A and B, a
top-k metric, and a linear classifier trained on cached features with that rule."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def peak_lr(e) -> float:
    """lr = base_lr * batch_size / 256 (protocol A: 30 at 256; protocol B: 0.8 at 1024)."""
    return e.base_lr * e.batch_size / 256


def eval_lr(e, step: int, steps_per_epoch: int) -> float:
    """The lr at global `step` for the EvalConfig `e`: step decay (x0.1 at each milestone epoch) or
    cosine to 0 over eval.epochs, no warm-up (PAPER.md "Evaluation")."""
    if e.schedule == "step":
        epoch = step // steps_per_epoch
        return peak_lr(e) * 0.1 ** sum(epoch >= m for m in e.milestones)
    total = e.epochs * steps_per_epoch
    return peak_lr(e) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is among the top-k logits, for each k (device tensors, no sync)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # Nxk
    hit = top == labels[:, None]  # Nxk
    return [hit[:, :k].any(dim=1).sum() for k in ks]


def make_optimizer(e, params) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=peak_lr(e), momentum=e.momentum, nesterov=e.nesterov,
                           weight_decay=e.weight_decay)


def set_lrs(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)


def train_head_on_features(e, train_f: torch.Tensor, train_y: torch.Tensor, num_classes: int,
                           seed: int = 0, log=None) -> nn.Linear:
    """The protocol's linear layer on cached features (NxF): its optimiser, batch, epochs and lr rule;
    minibatches are a seeded permutation per epoch (last partial batch kept)."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(train_f.shape[1], num_classes).to(train_f.device)
    opt = make_optimizer(e, head.parameters())
    spe = max(1, -(-train_f.shape[0] // e.batch_size))
    for epoch in range(e.epochs):
        perm = torch.randperm(train_f.shape[0], generator=g).to(train_f.device)
        total = torch.zeros((), device=train_f.device)
        for i in range(spe):
            set_lrs(opt, eval_lr(e, epoch * spe + i, spe))
            b = perm[i * e.batch_size: (i + 1) * e.batch_size]
            loss = F.cross_entropy(head(train_f[b]), train_y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        if log is not None:
            log(epoch, float(total) / spe)
    return head
