"""Loss functions: pure, stateless, each tested against an independent formula."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo InfoNCE. q, k: NxC L2-normalised (k from the teacher, no grad); queue: KxC normalised.

    logits = [q.k+, q.queue] / tau, the positive is class 0.
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)  # Nx1
    l_neg = q @ queue.t()  # NxK
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # Nx(1+K)
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits.float(), labels)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL regression loss 2 - 2 cos(p, z), mean over the batch. p: NxC prediction, z: NxC target."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=-1)).mean()


def symmetric(loss_fn, s1: torch.Tensor, s2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, **kw):
    """L(s1, t2) + L(s2, t1): each view's student output against the other view's teacher output."""
    return loss_fn(s1, t2, **kw) + loss_fn(s2, t1, **kw)


def feature_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: per-dimension std of L2-normalised features times sqrt(C).

    ~1 for features spread over the sphere, -> 0 when the representation collapses.
    """
    zn = F.normalize(z.float(), dim=1)  # NxC
    return zn.std(dim=0).mean() * zn.shape[1] ** 0.5
