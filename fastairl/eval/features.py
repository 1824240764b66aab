"""Frozen-encoder feature extraction, kNN and a linear probe on cached features."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract(encoder: nn.Module, loader, device, channels_last: bool = False,
            procs=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (NxF, float32, CPU) and labels (N) of every batch of `loader`, BN in eval mode. With
    `procs` (an accelerate state or Accelerator) of several processes, `loader` reads this process's
    strided share and every process gets all N rows back, in sample order."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for x, y in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
        feats.append(encoder(x).float().cpu())
        labels.append(y.long().cpu())
    encoder.train(was_training)
    f = torch.cat(feats) if feats else torch.zeros(0, 0)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    if procs is not None and procs.num_processes > 1:
        f, y = gather_strided(f, procs.device), gather_strided(y, procs.device)
    return f, y


def gather_strided(part: torch.Tensor, device, chunk: int = 8192) -> torch.Tensor:
    """Process r holds rows r, r + W, r + 2W, ... of an N-row tensor (W processes; the split of
    fastairl.data.datasets.eval_indices): all N rows, in order, on every process (CPU). `part` lives on
    the CPU; it crosses `device` `chunk` rows at a time, so an ImageNet bank never sits whole on a GPU."""
    from accelerate.utils import gather

    meta = gather(torch.tensor([[part.shape[0], part.shape[1] if part.ndim > 1 else 0]], device=device))  # Wx2
    world, rows, total = meta.shape[0], int(meta[:, 0].max()), int(meta[:, 0].sum())
    tail = (int(meta[:, 1].max()),) if part.ndim > 1 else ()  # an empty part may not know F
    if total == 0:
        return torch.zeros((0, *tail), dtype=part.dtype)
    pieces = []
    for start in range(0, rows, chunk):  # the same number of collectives on every process
        length = min(chunk, rows - start)
        padded = torch.zeros((length, *tail), dtype=part.dtype)  # every process sends the same shape
        mine = part[start:start + length]
        padded[:mine.shape[0]] = mine.reshape(mine.shape[0], *tail)
        pieces.append(gather(padded.to(device)).cpu().view(world, length, *tail))  # Wxlength(xF)
    every = torch.cat(pieces, dim=1)  # WxMxF: row j of process r is row j*W + r
    return every.transpose(0, 1).reshape(world * rows, *tail)[:total]


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


PROBE_BATCH = 256  # the cached-feature probe's batch; the few-label probe's step budget counts in it


def standardise(train_f, *others):
    """Zero mean, unit variance per feature with `train_f`'s statistics, applied to every tensor given."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    return tuple((f - mean) / std for f in (train_f, *others))


def linear_probe(train_f, train_y, test_f, test_y, num_classes: int | None = None, epochs: int = 100,
                 lr: float = 0.1, weight_decay: float = 0.0, batch_size: int = PROBE_BATCH, seed: int = 0,
                 standardised: bool = False) -> dict:
    """Logistic regression on cached, standardised features (SGD momentum, cosine lr); top-1/5 in %.
    `standardised=True`: the caller already standardised both (with statistics it chose)."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    xtr, xte = (train_f, test_f) if standardised else standardise(train_f, test_f)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the head's init follows `seed`, not the caller's stream
        torch.manual_seed(seed)
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


def few_label_subsets(labels: torch.Tensor, per_class: int, draws: int, seed: int = 0) -> list[torch.Tensor]:
    """`draws` stratified index sets, each holding `per_class` random samples of every class present
    (draw d depends only on seed + d, so a longer list of draws starts with the shorter one)."""
    classes = labels.unique().tolist()
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    smallest = min(len(m) for m in members)
    if per_class > smallest:
        raise ValueError(f"{per_class} labels per class asked for, but a class has only {smallest} samples")
    out = []
    for d in range(draws):
        g = torch.Generator().manual_seed(seed + d)
        out.append(torch.cat([m[torch.randperm(len(m), generator=g)[:per_class]] for m in members]).sort().values)
    return out


def few_label_eval(train_f, train_y, test_f, test_y, per_class: int, draws: int = 5, k: int = 20,
                   temperature: float = 0.07, num_classes: int | None = None, linear_steps: int = 300,
                   seed: int = 0) -> dict:
    """kNN and linear probe that see `per_class` labelled samples per class (the semi-supervised
    protocol), mean and sample std over `draws` stratified draws. Every training feature is unlabelled
    data the encoder has seen, so standardisation uses all of them. The probe takes `linear_steps` steps
    of batches of up to PROBE_BATCH (256) labelled samples (full-batch below that), whatever the subset size."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    ztr, zte = standardise(train_f, test_f)
    knn, lin = [], []
    for d, idx in enumerate(few_label_subsets(train_y, per_class, draws, seed)):
        knn.append(knn_accuracy(train_f[idx], train_y[idx], test_f, test_y, min(k, len(idx)), temperature, num_classes))
        batch = min(PROBE_BATCH, len(idx))
        epochs = -(-linear_steps // -(-len(idx) // batch))  # linear_steps steps in all
        lin.append(linear_probe(ztr[idx], train_y[idx], zte, test_y, num_classes, epochs=epochs,
                                batch_size=batch, seed=seed + d, standardised=True)["top1"])
    knn_t, lin_t = torch.tensor(knn), torch.tensor(lin)
    spread = (lambda t: t.std().item()) if draws > 1 else (lambda t: 0.0)  # sample std over the draws
    return {"knn_top1": knn_t.mean().item(), "knn_top1_std": spread(knn_t),
            "linear_top1": lin_t.mean().item(), "linear_top1_std": spread(lin_t),
            "labelled": per_class * len(train_y.unique()), "draws": draws}
