"""Per-sample, batched augmentation on the training device (colour jitter, grayscale, blur, solarise,
normalise) for loaders that only decode, crop and flip.

torchvision's batch transforms draw ONE set of random parameters per call, so a whole batch would get
the same jitter factors and the same coin flips; SSL needs independent draws per image. Here every
sample gets its own draws, from a `torch.Generator` seeded by (seed, epoch, step, rank, view), so the
augmentation is reproducible and a resumed run re-creates it exactly without saving generator state.

The ops follow torchvision's float-tensor functional ops (`adjust_brightness/contrast/saturation/hue`,
`rgb_to_grayscale`, `gaussian_blur` with reflect padding, `solarize`), with the parameter ranges of
`fastairl.data.augment.sample_color`. Colour jitter applies its four ops in a per-sample random order,
like torchvision's ColorJitter. Everything is branch-free (masks and `torch.where`), so there is no
host-device sync and the module can be `torch.compile`d.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augment import AugmentSpec, ViewSpec, jitter_ranges

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclass
class BatchParams:
    """The random draws for one view of a batch of N images (all tensors of length N, on the device)."""
    jitter: torch.Tensor  # N bool
    order: torch.Tensor  # Nx4 long: position -> op (0 brightness, 1 contrast, 2 saturation, 3 hue)
    factors: torch.Tensor  # Nx4 float: brightness, contrast, saturation factors, hue shift
    gray: torch.Tensor  # N bool
    blur: torch.Tensor  # N bool
    sigma: torch.Tensor  # N float
    solarize: torch.Tensor  # N bool


def sample_params(n: int, v: ViewSpec, generator: torch.Generator) -> BatchParams:
    """Independent per-sample draws with sample_color's distributions, on the generator's device."""
    dev = generator.device

    def uniform(lo: float, hi: float) -> torch.Tensor:  # N
        return torch.rand(n, generator=generator, device=dev) * (hi - lo) + lo

    def coin(p: float) -> torch.Tensor:  # N bool
        return torch.rand(n, generator=generator, device=dev) < p

    jitter = coin(v.jitter_p)
    order = torch.rand(n, 4, generator=generator, device=dev).argsort(dim=1)  # Nx4, a random permutation
    factors = torch.stack([uniform(*r) for r in jitter_ranges(v)], dim=1)  # Nx4
    gray, blur = coin(v.gray_p), coin(v.blur_p)
    sigma = uniform(*v.blur_sigma)
    return BatchParams(jitter, order, factors, gray, blur, sigma, coin(v.solarize_p))


# ------------------------------------------------------------------------------ the ops (float, [0,1])
def grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=1)  # N x H x W each
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)  # Nx1xHxW


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of each sample by shift (N, in turns), torchvision's adjust_hue on floats.

    RGB -> (h, max, max-min) and back with the closed form c = max - (max-min)·clamp(min(k, 4-k), 0, 1),
    k = (n + 6h) mod 6 for n = 5, 3, 1 (r, g, b): no sector table, no saturation division.
    """
    r, g, b = x.unbind(dim=1)  # NxHxW
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    delta = maxc - minc
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    h = torch.where(maxc == r, (g - b) / safe,
                    torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))  # sextants
    h6 = torch.where(delta == 0, torch.zeros_like(h), (h / 6.0 + shift.view(-1, 1, 1)) % 1.0) * 6.0
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n) % 6.0
        out.append(maxc - delta * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0))
    return torch.stack(out, dim=1)  # Nx3xHxW


def _where_or_index(x: torch.Tensor, mask: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:
    """x with fn(x, *args) on the samples in mask (N bool). On CUDA: computed for all, then selected
    (no host sync); on CPU: computed only on the selected samples (a sync costs nothing there)."""
    if x.device.type != "cpu":
        return torch.where(mask.view(-1, 1, 1, 1), fn(x, *args), x)
    idx = mask.nonzero().squeeze(1)  # M
    if idx.numel():
        x = x.index_copy(0, idx, fn(x.index_select(0, idx), *(a.index_select(0, idx) for a in args)))
    return x


def jitter_step(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """One position of the jitter sequence: each sample applies its own op `op` (N long; 4 = none)
    with `factor` (N, a blend ratio; 1 = identity) or, where op == 3, the hue shift `hue` (N).

    Brightness, contrast and saturation are all blends `f·x + (1-f)·ref` with a per-sample reference
    (black, the mean grey level, the grey image), so one blend serves the three of them.
    """
    g = grayscale(x)  # Nx1xHxW
    ref = torch.where((op == 1).view(-1, 1, 1, 1), g.mean(dim=(1, 2, 3), keepdim=True), g)
    ref = torch.where((op == 0).view(-1, 1, 1, 1), torch.zeros_like(ref), ref)  # Nx1xHxW
    f = torch.where(op <= 2, factor, torch.ones_like(factor)).view(-1, 1, 1, 1)
    x = torch.where(f == 1, x, (f * x + (1 - f) * ref).clamp_(0, 1))  # Nx3xHxW
    return _where_or_index(x, op == 3, adjust_hue, hue)


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """N 1-D Gaussian kernels of odd `size` (torchvision's: taps at -k/2..k/2, normalised)."""
    t = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size, device=sigma.device)  # k
    w = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)  # Nxk
    return w / w.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Separable per-sample blur with reflect padding: a grouped conv over the N*3 channels."""
    n, c, h, w = x.shape
    k = gaussian_kernels(sigma, size).repeat_interleave(c, dim=0)  # (N*3)xk
    y = F.pad(x.reshape(1, n * c, h, w), [size // 2] * 4, mode="reflect")  # 1 x N*3 x H+k-1 x W+k-1
    y = F.conv2d(y, k.view(n * c, 1, 1, size), groups=n * c)  # horizontal
    y = F.conv2d(y, k.view(n * c, 1, size, 1), groups=n * c)  # vertical
    return y.view(n, c, h, w)


# ---------------------------------------------------------------------------------------- the module
class BatchAugment(torch.nn.Module):
    """uint8 Nx3xHxW (cropped, flipped) -> float32 Nx3xHxW, jittered, grey, blurred, solarised and
    normalised per sample as one ViewSpec says."""

    def __init__(self, view: ViewSpec):
        super().__init__()
        self.view = view
        self.register_buffer("mean", torch.tensor(view.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(view.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply_params(x, sample_params(x.shape[0], self.view, generator))

    def apply_params(self, x: torch.Tensor, p: BatchParams) -> torch.Tensor:
        v = self.view
        x = x.contiguous().float().div_(255.0)  # Nx3xHxW in [0, 1]
        if v.jitter_p > 0:
            for pos in range(4):
                op = torch.where(p.jitter, p.order[:, pos], torch.full_like(p.order[:, pos], 4))  # 4: none
                factor = p.factors.gather(1, op.clamp(max=2).view(-1, 1)).squeeze(1)  # N
                factor = torch.where(op <= 2, factor, torch.ones_like(factor))
                x = jitter_step(x, op, factor, torch.where(op == 3, p.factors[:, 3], torch.zeros_like(factor)))
        if v.gray_p > 0:
            x = _where_or_index(x, p.gray, lambda y: grayscale(y).expand_as(y))
        if v.blur_p > 0:
            x = _where_or_index(x, p.blur, lambda y, sd: gaussian_blur(y, sd, v.blur_kernel), p.sigma)
        if v.solarize_p > 0:
            thr = v.solarize_threshold / 255.0
            x = torch.where(p.solarize.view(-1, 1, 1, 1) & (x >= thr), 1.0 - x, x)
        return (x - self.mean) / self.std


def batch_seed(seed: int, epoch: int, step: int, rank: int, view: int) -> int:
    """A 63-bit seed from (seed, epoch, step, rank, view): numpy's SeedSequence mixing, host-only."""
    import numpy as np

    return int(np.random.SeedSequence([seed, epoch, step, rank, view]).generate_state(2, np.uint64)[0] >> 1)


class DeviceAugLoader:
    """Wraps a loader that yields uint8 crops (`uint8_views = True`): moves each batch to `device` and
    finishes the AugmentSpec there, per sample. Keeps the seam's loader interface."""

    def __init__(self, loader, spec: AugmentSpec, device, seed: int = 0, rank: int = 0, compile: bool = False):
        self.loader, self.spec, self.device = loader, spec, torch.device(device)
        self.seed, self.rank = seed, rank
        self.augs = [BatchAugment(v).to(self.device) for v in spec.views]
        self._fns = [torch.compile(a, dynamic=False) if compile else a for a in self.augs]
        self.generator = torch.Generator(device=self.device)
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.loader.steps_per_epoch

    @property
    def num_classes(self) -> int:
        return self.loader.num_classes

    @property
    def classes(self):
        return self.loader.classes

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.loader.set_epoch(epoch, start_step)
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        nb = self.device.type == "cuda"
        for step, (views, labels) in enumerate(self.loader, start=self.start_step):
            out = []
            for k, (x, fn) in enumerate(zip(views, self._fns)):
                self.generator.manual_seed(batch_seed(self.seed, self.epoch, step, self.rank, k))
                out.append(fn(x.to(self.device, non_blocking=nb), self.generator))  # Nx3xHxW float32
            yield out, labels.to(self.device, non_blocking=nb)
