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
    return knn_accuracies(train_f, train_y, test_f, test_y, (k,), temperature, num_classes, chunk)[k]


SIM_ELEMENTS = 2 ** 26  # a query chunk's similarity matrix holds at most this many floats (256 MB)


@torch.no_grad()
def knn_accuracies(train_f, train_y, test_f, test_y, ks=(20,), temperature: float = 0.07,
                   num_classes: int | None = None, chunk: int = 1024, device=None, procs=None) -> dict[int, float]:
    """Weighted kNN top-1 in % for every k of `ks`, from one search for the max(ks) nearest.

    With `procs` (an accelerate state or Accelerator) of several processes, `train_f`/`train_y` are this
    process's share of the bank (any split, empty allowed) and `test_f`/`test_y` every query, the same
    on every process: each process searches its share only, the candidates are all-gathered and merged,
    and every process returns the same numbers. A process thus holds 1/W of the bank, on `device`
    (default: procs.device, else train_f's), as float32."""
    multi = procs is not None and procs.num_processes > 1
    device = torch.device(device) if device is not None else (procs.device if procs is not None else train_f.device)
    bank = None
    if len(train_y):  # nxF, this share: one copy on the device, normalised in place
        bank = train_f.to(device, torch.float32, copy=True)
        bank.div_(bank.norm(dim=1, keepdim=True).clamp_min(1e-12))
    bank_y = train_y.to(device)
    sizes = [len(train_y), int(train_y.max()) + 1 if len(train_y) else 0]
    if multi:
        from accelerate.utils import gather

        sizes = gather(torch.tensor([sizes], device=procs.device)).cpu()  # Wx2: share size, labels seen
        total, widest, top_label = int(sizes[:, 0].sum()), int(sizes[:, 0].max()), int(sizes[:, 1].max())
    else:
        total = widest = sizes[0]
        top_label = sizes[1]
    if total == 0 or len(test_y) == 0:
        raise ValueError(f"kNN needs a non-empty bank and queries (got {total} and {len(test_y)})")
    num_classes = num_classes or max(top_label, int(test_y.max()) + 1)
    kmax = min(max(ks), total)
    chunk = max(1, min(chunk, SIM_ELEMENTS // max(widest, 1)))  # the same on every process: same collectives
    correct = torch.zeros(len(ks), dtype=torch.long, device=device)
    for i in range(0, test_f.shape[0], chunk):
        q = F.normalize(test_f[i:i + chunk].to(device, torch.float32), dim=1)  # BxF
        w = torch.full((q.shape[0], kmax), -torch.inf, device=device)  # BxK: similarities, best first
        lab = torch.zeros((q.shape[0], kmax), dtype=torch.long, device=device)  # BxK: their labels
        if bank is not None:
            top, idx = (q @ bank.t()).topk(min(kmax, bank.shape[0]), dim=1)  # Bxk of this share
            w[:, :top.shape[1]], lab[:, :top.shape[1]] = top, bank_y[idx]
        if multi:  # every process's K candidates per query; the best K of the W*K
            w_all = gather(w.to(procs.device)).to(device).view(-1, *w.shape).permute(1, 0, 2).flatten(1)  # BxWK
            lab_all = gather(lab.to(procs.device)).to(device).view(-1, *lab.shape).permute(1, 0, 2).flatten(1)
            w, j = w_all.topk(kmax, dim=1)
            lab = lab_all.gather(1, j)
        y = test_y[i:i + chunk].to(device)
        for n, k in enumerate(ks):
            k = min(k, kmax)  # the candidates are sorted: the k nearest are the first k
            votes = torch.zeros(q.shape[0], num_classes, device=device)
            votes.scatter_add_(1, lab[:, :k], (w[:, :k] / temperature).exp())
            correct[n] += (votes.argmax(1) == y).sum()
    return {k: 100.0 * c / test_f.shape[0] for k, c in zip(ks, correct.tolist())}


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
