"""Frozen-encoder feature extraction, kNN and a linear probe on cached features."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract(encoder: nn.Module, loader, device, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (NxF, float32, CPU) and labels (N) of every batch of `loader`, BN in eval mode."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for x, y in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        feats.append(encoder(x).float().cpu())
        labels.append(y)
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(train_f, train_y, test_f, test_y, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> float:
    """Weighted kNN (InstDisc): cosine similarity, votes weighted by exp(sim / T); top-1 in %."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, train_f.shape[0])
    correct = 0
    for i in range(0, test_f.shape[0], chunk):
        sim = test_f[i:i + chunk] @ train_f.t()  # BxNtrain
        w, idx = sim.topk(k, dim=1)  # Bxk
        votes = torch.zeros(sim.shape[0], num_classes)
        votes.scatter_add_(1, train_y[idx], (w / temperature).exp())
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum().item()
    return 100.0 * correct / test_f.shape[0]


def linear_probe(train_f, train_y, test_f, test_y, num_classes: int | None = None, epochs: int = 100,
                 lr: float = 0.1, weight_decay: float = 0.0, batch_size: int = 256, seed: int = 0) -> dict:
    """Logistic regression on cached, standardised features (SGD momentum, cosine lr); top-1/5 in %."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    xtr, xte = (train_f - mean) / std, (test_f - mean) / std
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * max(1, -(-xtr.shape[0] // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        perm = torch.randperm(xtr.shape[0], generator=g)
        for i in range(0, xtr.shape[0], batch_size):
            b = perm[i:i + batch_size]
            loss = F.cross_entropy(head(xtr[b]), train_y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        logits = head(xte)
        top5 = logits.topk(min(5, num_classes), dim=1).indices
        return {"top1": 100.0 * (top5[:, 0] == test_y).float().mean().item(),
                "top5": 100.0 * (top5 == test_y[:, None]).any(1).float().mean().item()}
