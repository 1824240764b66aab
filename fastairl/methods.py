"""Methods by composition: encoder + heads + loss function + EMA rule.

`Siamese` covers MoCo v2, MoCo v2+, S-MoCo v2+ and BYOL: they differ only in config keys
(loss, symmetric, predictor, queue, ema, bn). `Supervised` is the cross-entropy baseline.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import losses
from .models import FEATURE_DIMS, build_backbone, forward_in_groups, mlp


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every process along dim 0 (no gradient); identity on one process."""
    _, world = _world()
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def _step_generator(seed: int, step: int) -> torch.Generator:
    """Same stream on every process and on resume: a pure function of (seed, step)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class Siamese(nn.Module):
    def __init__(self, cfg, num_classes: int):
        super().__init__()
        m, mc = cfg.method, cfg.model
        self.loss, self.symmetric, self.tau = m.loss, m.symmetric, m.temperature
        self.bn, self.groups, self.enqueue_rule = m.bn, m.shuffle_bn_groups, m.enqueue
        self.seed = cfg.train.seed
        feat = FEATURE_DIMS[mc.arch]
        p = mc.projector
        self.student = nn.ModuleDict({
            "backbone": build_backbone(mc.arch, mc.cifar_stem),
            "projector": mlp(feat, p.hidden_dim, p.out_dim, p.bn_hidden),
        })
        if m.predictor != "none":
            q = mc.predictor
            self.student["predictor"] = mlp(p.out_dim, q.hidden_dim, p.out_dim, q.bn_hidden)
        self.teacher = copy.deepcopy(self.student)
        if m.predictor == "student":  # S-MoCo v2+ ("both") keeps a predictor on the teacher too
            del self.teacher["predictor"]
        self.teacher.requires_grad_(False)
        if self.loss == "infonce":
            self.register_buffer("queue", F.normalize(torch.randn(m.queue_size, p.out_dim), dim=1))  # KxC
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.probe = nn.Linear(feat, num_classes) if cfg.probe.online else None

    @staticmethod
    def _head(net: nn.ModuleDict, h: torch.Tensor) -> torch.Tensor:
        z = net["projector"](h)
        return net["predictor"](z) if "predictor" in net else z

    def _student(self, x: torch.Tensor):
        groups = self.groups if self.bn == "shuffle" and _world()[1] == 1 else 1
        h = forward_in_groups(self.student["backbone"], x, groups)  # NxF
        return h, self._head(self.student, h)  # NxF, NxC

    @torch.no_grad()
    def _teacher(self, x: torch.Tensor, step: int) -> torch.Tensor:
        net = lambda t: self._head(self.teacher, self.teacher["backbone"](t))
        if self.bn != "shuffle":
            return net(x)
        rank, world = _world()
        g = _step_generator(self.seed, step)
        if world == 1:  # emulate: shuffle, per-group BN statistics, unshuffle
            perm = torch.randperm(x.shape[0], generator=g).to(x.device)
            out = forward_in_groups(lambda t: net(t), x[perm], self.groups)
            return out[torch.argsort(perm)]
        xs = all_gather(x)  # (world*N)x3xHxW, then every process keys a shuffled shard
        perm = torch.randperm(xs.shape[0], generator=g).to(x.device)
        n = x.shape[0]
        k = net(xs[perm][rank * n:(rank + 1) * n])
        return all_gather(k)[torch.argsort(perm)][rank * n:(rank + 1) * n]

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, step: int):
        x1, x2 = views[0], views[1]  # Nx3xHxW each
        h1, s1 = self._student(x1)  # NxF, NxC
        t2 = self._teacher(x2, step)  # NxC
        s2 = t1 = None
        if self.symmetric:
            _, s2 = self._student(x2)
            t1 = self._teacher(x1, step)
        if self.loss == "infonce":
            s1, s2, t1, t2 = (None if t is None else F.normalize(t.float(), dim=1) for t in (s1, s2, t1, t2))
            # a copy: the enqueue below must not modify a tensor autograd saved for backward
            fn, kw = losses.infonce, {"queue": self.queue.clone(), "temperature": self.tau}
        else:
            fn, kw = losses.byol_loss, {}
        loss = losses.symmetric(fn, s1, s2, t1, t2, **kw) if self.symmetric else fn(s1, t2, **kw)
        if self.loss == "infonce":
            self._enqueue(self._pick_keys(t1, t2, step) if self.symmetric else t2)
        metrics = {"loss_ssl": loss.detach(), "feat_std": losses.feature_std(s1.detach())}
        if self.probe is not None:
            logits = self.probe(h1.detach().float())
            probe_loss = F.cross_entropy(logits, labels)
            loss = loss + probe_loss
            metrics["probe_loss"] = probe_loss.detach()
            metrics["probe_acc"] = (logits.argmax(1) == labels).float().mean()
        return loss, metrics

    def _pick_keys(self, k1: torch.Tensor, k2: torch.Tensor, step: int) -> torch.Tensor:
        if self.enqueue_rule == "both":
            return torch.cat([k1, k2])
        view = int(torch.randint(2, (1,), generator=_step_generator(self.seed + 1, step)))
        return (k1, k2)[view]

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        keys = all_gather(keys)  # (world*N)xC: every process enqueues the same keys
        size = self.queue.shape[0]
        idx = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue.index_copy_(0, idx, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """theta_T <- m theta_T + (1 - m) theta_S over parameters; BN running statistics are not
        averaged (the teacher computes its own in train mode, as the reference code)."""
        t_params, s_params = [], []
        for name, t in self.teacher.named_parameters():
            t_params.append(t)
            s_params.append(self.student.get_parameter(name))
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)

    def encoder(self) -> nn.Module:
        return self.student["backbone"]


class Supervised(nn.Module):
    def __init__(self, cfg, num_classes: int):
        super().__init__()
        self.student = nn.ModuleDict({"backbone": build_backbone(cfg.model.arch, cfg.model.cifar_stem)})
        self.student["fc"] = nn.Linear(FEATURE_DIMS[cfg.model.arch], num_classes)
        self.probe = None

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor, step: int):
        h = self.student["backbone"](views[0])  # NxF
        logits = self.student["fc"](h)  # NxClasses
        loss = F.cross_entropy(logits.float(), labels)
        return loss, {"loss_ssl": loss.detach(), "feat_std": losses.feature_std(h.detach()),
                      "probe_acc": (logits.argmax(1) == labels).float().mean()}

    def update_teacher(self, momentum: float) -> None:
        pass

    def encoder(self) -> nn.Module:
        return self.student["backbone"]


def build_method(cfg, num_classes: int) -> nn.Module:
    return Supervised(cfg, num_classes) if cfg.method.loss == "ce" else Siamese(cfg, num_classes)


def num_views(cfg) -> int:
    return 1 if cfg.method.loss == "ce" else 2
