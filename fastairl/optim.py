"""Optimisers: SGD and LARS, with parameter groups chosen by tensor rank.

The paper compares SGD (MoCo's recipe) with LARS (BYOL's recipe) on the same methods, so both are
built here from one `OptimConfig`. The learning rate is not scheduled here: the trainer calls
`set_lr(optimizer, lr_at(step, ...))` every iteration.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .schedules import scaled_lr


def param_groups(module: nn.Module, weight_decay: float, exclude_1d: bool) -> list[dict[str, Any]]:
    """Split trainable parameters into decayed weights and (optionally) excluded biases / BN params.

    Groups are chosen by rank (`p.ndim <= 1`), not by name: matching 'bn' or 'bias' in names misses
    torchvision's `downsample.1` BatchNorm. Frozen parameters (requires_grad False) are left out.
    Every group carries `weight_decay` and `lars_exclude`; empty groups are dropped.
    """
    weights: list[nn.Parameter] = []
    vectors: list[nn.Parameter] = []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        (vectors if exclude_1d and p.ndim <= 1 else weights).append(p)
    groups = [
        {"params": weights, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": vectors, "weight_decay": 0.0, "lars_exclude": True},
    ]
    return [g for g in groups if g["params"]]


def _buckets(params: list[Tensor]) -> list[list[Tensor]]:
    """Group tensors by (device, dtype): norms of one bucket can be stacked into one vector."""
    out: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for p in params:
        out.setdefault((p.device, p.dtype), []).append(p)
    return list(out.values())


def lars_update(params: list[Tensor], grads: list[Tensor], weight_decay: float,
                trust_coef: float) -> list[Tensor]:
    """Layer-wise adapted update u = trust * (g + wd w), one trust ratio per tensor.

    trust = eta ||w|| / (||g|| + wd ||w||), and 1 where either norm is 0 (a zero-initialised layer
    or a layer without gradient must still move at the global lr rather than freeze or explode).
    All norms of the bucket are stacked so the ratios are one vectorised op; nothing leaves the
    device. Returns new tensors: p.grad is left as computed by backward.
    """
    w_norm = torch.stack(torch._foreach_norm(params))  # N
    g_norm = torch.stack(torch._foreach_norm(grads))  # N
    ratio = trust_coef * w_norm / (g_norm + weight_decay * w_norm)  # N; nan/inf masked below
    trust = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))  # N
    update = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(update, list(trust.unbind(0)))
    return update


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by BYOL, multi-tensor via torch `_foreach_*` ops.

    Per parameter group: unless `lars_exclude`, u = trust * (g + wd w) (see `lars_update`);
    excluded groups (biases, BN) get plain SGD, u = g + wd w with their own (usually zero) wd.
    Then v <- momentum v + u and w <- w - lr v (Nesterov: w <- w - lr (u + momentum v)).
    Equals timm's `Lars(eps=0, trust_clip=False)` with `always_adapt` on the adapted groups.
    step() performs no host-device synchronisation.
    """

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, trust_coef: float = 1e-3, nesterov: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coef <= 0:
            raise ValueError(
                f"LARS needs lr, momentum, weight_decay >= 0 and trust_coef > 0; got lr={lr}, "
                f"momentum={momentum}, weight_decay={weight_decay}, trust_coef={trust_coef}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coef=trust_coef, nesterov=nesterov, lars_exclude=False)
        super().__init__(params, defaults)

    def _buffers(self, params: list[Tensor]) -> list[Tensor]:
        """Momentum buffers, created as zeros so the first step gives v = u like torch's SGD."""
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return [self.state[p]["momentum_buffer"] for p in params]

    def _step_bucket(self, group: dict[str, Any], params: list[Tensor]) -> None:
        """One multi-tensor update of same-device, same-dtype parameters of one group."""
        grads = [p.grad for p in params]
        wd, mom, lr = group["weight_decay"], group["momentum"], group["lr"]
        if not group["lars_exclude"]:
            update = lars_update(params, grads, wd, group["trust_coef"])
        elif wd != 0:
            update = torch._foreach_add(grads, params, alpha=wd)
        else:
            update = grads
        bufs = self._buffers(params)
        torch._foreach_mul_(bufs, mom)
        torch._foreach_add_(bufs, update)
        direction = torch._foreach_add(update, bufs, alpha=mom) if group["nesterov"] else bufs
        torch._foreach_add_(params, direction, alpha=-lr)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for bucket in _buckets(params):
                self._step_bucket(group, bucket)
        return loss


def build_optimizer(optim_cfg: Any, module: nn.Module, global_batch: int) -> torch.optim.Optimizer:
    """Build SGD or LARS for `module` at lr = base_lr * global_batch / 256.

    SGD follows `optim_cfg.exclude_1d` (the MoCo reference decays every parameter, so the default is
    False). LARS always excludes ndim <= 1 parameters (biases, BN) from both weight decay and the
    trust ratio, as BYOL does and PAPER.md specifies, whatever `exclude_1d` says.
    Every group gets `base_lr_scale` = 1.0, the factor `set_lr` multiplies the scheduled lr by.
    """
    lr = scaled_lr(optim_cfg.base_lr, global_batch)
    if optim_cfg.name == "sgd":
        groups = param_groups(module, optim_cfg.weight_decay, optim_cfg.exclude_1d)
    elif optim_cfg.name == "lars":
        groups = param_groups(module, optim_cfg.weight_decay, exclude_1d=True)
    else:
        raise ValueError(f"optim.name={optim_cfg.name!r} is unknown: use 'sgd' or 'lars'")
    if not groups:
        raise ValueError(f"{type(module).__name__} has no trainable parameters to optimise")
    for g in groups:
        g["base_lr_scale"] = 1.0
    if optim_cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=optim_cfg.momentum, weight_decay=optim_cfg.weight_decay,
                    trust_coef=optim_cfg.trust_coef, nesterov=optim_cfg.nesterov)
    # The fused kernel exists only for CUDA tensors; foreach is the fast path elsewhere.
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    kind = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum,
                           nesterov=optim_cfg.nesterov, **kind)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to `lr` times its `base_lr_scale` (1.0 when absent): one place per step."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("base_lr_scale", 1.0)
