"""The per-sample batched on-device augmentation (fastairl/data/device_aug.py) against torchvision's
functional ops, sample by sample, and its probabilities measured from output pixels on real photos."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from skimage import data as skdata

from fastairl.data.augment import ViewSpec, make_spec, sample_color
from fastairl.data.device_aug import (BatchAugment, BatchParams, DeviceAugLoader, batch_seed,
                                      gaussian_blur, sample_params)

TV_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
NO_AUG = ViewSpec(crop_size=32, flip_p=0, jitter_p=0, gray_p=0, blur_p=0, solarize_p=0)


def photo_batch(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n uint8 crops (nx3xSxS) of real photographs at random places."""
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        t, l = rng.integers(0, p.shape[0] - 4 * size), rng.integers(0, p.shape[1] - 4 * size)
        out.append(torch.from_numpy(p[t: t + 4 * size: 4, l: l + 4 * size: 4].copy()).permute(2, 0, 1))
    return torch.stack(out)  # Nx3xSxS


def torchvision_reference(x: torch.Tensor, p: BatchParams, i: int, v: ViewSpec) -> torch.Tensor:
    """Sample i through torchvision's float functional ops, in the sample's own jitter order."""
    y = x[i].float() / 255
    if p.jitter[i]:
        for op in p.order[i].tolist():
            y = TV_JITTER[op](y, p.factors[i, op].item())
    if p.gray[i]:
        y = TF.rgb_to_grayscale(y, num_output_channels=3)
    if p.blur[i]:
        y = TF.gaussian_blur(y, [v.blur_kernel] * 2, [p.sigma[i].item()] * 2)
    if p.solarize[i]:
        y = TF.solarize(y, v.solarize_threshold / 255)
    return TF.normalize(y, v.mean, v.std)


# Stated tolerance: 1e-4 in normalised units (~0.006 grey levels); the ops are the same float maths.
TOL = 1e-4


@pytest.mark.parametrize("preset", ["byol_sym", "mocov2"])
def test_every_sample_equals_torchvision_with_its_own_draws(preset):
    v = make_spec(preset, crop_size=32).views[0]
    x = photo_batch(48)
    p = sample_params(48, v, torch.Generator().manual_seed(3))
    out = BatchAugment(v).apply_params(x, p)  # Nx3x32x32
    assert out.dtype == torch.float32 and out.shape == (48, 3, 32, 32)
    for i in range(48):
        torch.testing.assert_close(out[i], torchvision_reference(x, p, i, v), atol=TOL, rtol=0)
    # the draws really are per sample: several distinct op orders and factors in one batch
    assert len({tuple(o) for o in p.order[p.jitter].tolist()}) > 5
    assert p.factors[:, 0].unique().numel() == 48


@pytest.mark.parametrize("op,factor", [(0, 0.6), (0, 1.4), (1, 0.6), (1, 1.4), (2, 0.0), (2, 1.8),
                                       (3, -0.1), (3, 0.1), (3, 0.5)])
def test_each_jitter_op_alone(op, factor):
    v = make_spec("byol_sym", crop_size=32).views[0]
    x = photo_batch(8, seed=op)
    n = x.shape[0]
    factors = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(n, 1)
    factors[:, op] = factor
    order = torch.tensor([op] + [k for k in range(4) if k != op]).repeat(n, 1)
    false = torch.zeros(n, dtype=torch.bool)
    p = BatchParams(torch.ones(n, dtype=torch.bool), order, factors, false, false, torch.ones(n), false)
    out = BatchAugment(v).apply_params(x, p)
    want = torch.stack([TF.normalize(TV_JITTER[op](x[i].float() / 255, factor), v.mean, v.std) for i in range(n)])
    torch.testing.assert_close(out, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("kernel", [3, 9, 23])
def test_blur_per_sample_sigma_equals_torchvision(kernel):
    x = photo_batch(6).float() / 255
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 3.0])
    out = gaussian_blur(x, sigma, kernel)
    for i in range(6):
        want = TF.gaussian_blur(x[i], [kernel, kernel], [sigma[i].item()] * 2)
        torch.testing.assert_close(out[i], want, atol=1e-5, rtol=0)


def test_identity_spec_only_normalises():
    x = photo_batch(4)
    out = BatchAugment(NO_AUG)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, TF.normalize(x.float() / 255, NO_AUG.mean, NO_AUG.std), atol=1e-6, rtol=0)


def _binomial_ok(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("what", ["gray", "solarize", "jitter", "blur"])
def test_probabilities_measured_from_pixels(what):
    """Each op alone, with its preset probability; whether it fired is read from the output pixels."""
    n = 1200
    ps = {"gray": 0.2, "solarize": 0.2, "jitter": 0.8, "blur": 0.5}
    v = replace(NO_AUG, crop_size=16, **{f"{what}_p": ps[what]})
    x = photo_batch(n, size=16, seed=7)
    out = BatchAugment(v)(x, torch.Generator().manual_seed(11))
    plain = TF.normalize(x.float() / 255, v.mean, v.std)
    if what == "gray":
        rgb = out * torch.tensor(v.std).view(1, 3, 1, 1) + torch.tensor(v.mean).view(1, 3, 1, 1)
        fired = ((rgb[:, 0] - rgb[:, 1]).abs().amax(dim=(1, 2)) < 1e-5) & ((rgb[:, 1] - rgb[:, 2]).abs().amax(dim=(1, 2)) < 1e-5)
        already_gray = ((x[:, 0] == x[:, 1]) & (x[:, 1] == x[:, 2])).all(dim=(1, 2))
        assert not already_gray.any()
    else:
        fired = (out - plain).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert _binomial_ok(int(fired.sum()), n, ps[what]), (what, int(fired.sum()), n * ps[what])


def test_parameter_distributions_match_the_shared_sampler():
    v = make_spec("mocov2").views[0]
    n = 20000
    p = sample_params(n, v, torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    ref = [sample_color(rng, v) for _ in range(n)]
    ref_f = np.array([[c.brightness, c.contrast, c.saturation, c.hue, c.sigma] for c in ref])
    ours = torch.cat([p.factors, p.sigma[:, None]], dim=1).numpy()
    lo = np.array([1 - v.brightness, 1 - v.contrast, 1 - v.saturation, -v.hue, v.blur_sigma[0]])
    hi = np.array([1 + v.brightness, 1 + v.contrast, 1 + v.saturation, v.hue, v.blur_sigma[1]])
    assert (ours >= lo).all() and (ours <= hi).all()
    # uniform on the same interval: means and standard deviations agree with the numpy sampler's
    se = (hi - lo) / math.sqrt(12 * n)
    assert (np.abs(ours.mean(0) - ref_f.mean(0)) < 6 * se).all()
    assert np.allclose(ours.std(0), (hi - lo) / math.sqrt(12), rtol=0.03)
    # the jitter order is a uniform random permutation: each op at each position ~ 1/4
    freq = torch.stack([(p.order == k).float().mean(0) for k in range(4)])  # op x position
    assert (freq - 0.25).abs().max() < 0.02
    for name, rate in (("jitter", v.jitter_p), ("gray", v.gray_p), ("blur", v.blur_p)):
        assert _binomial_ok(int(getattr(p, name).sum()), n, rate), name


class _ListLoader:
    """A uint8 loader stand-in: fixed batches, the seam's interface."""

    def __init__(self, batches):
        self.batches, self.start = batches, 0
        self.steps_per_epoch, self.num_classes, self.classes, self.uint8_views = len(batches), 2, ["a", "b"], True

    def set_epoch(self, epoch, start_step=0):
        self.start = start_step

    def __len__(self):
        return len(self.batches) - self.start

    def __iter__(self):
        return iter(self.batches[self.start:])


def test_device_loader_is_reproducible_and_resumes_exactly():
    spec = make_spec("byol_sym", crop_size=16)
    batches = [([photo_batch(6, 16, seed=s), photo_batch(6, 16, seed=s)], torch.arange(6)) for s in range(4)]

    def run(epoch, start=0, seed=5):
        dl = DeviceAugLoader(_ListLoader(batches), spec, "cpu", seed=seed)
        dl.set_epoch(epoch, start)
        assert len(dl) == 4 - start and dl.steps_per_epoch == 4 and dl.classes == ["a", "b"]
        return [views for views, _ in dl]

    full = run(0)
    again = run(0)
    for a, b in zip(full, again):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    resumed = run(0, start=2)
    for a, b in zip(full[2:], resumed):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    # the two views of a batch (same pixels in) and another epoch get different draws
    assert not torch.equal(full[0][0], full[0][1])
    assert not torch.equal(run(1)[0][0], full[0][0])
    assert batch_seed(0, 0, 0, 0, 0) != batch_seed(0, 0, 0, 1, 0)


def test_torch_loader_on_device_reproduces_the_reference(photo_root):
    """aug.on_device only moves the photometric ops: with crop+flip only, outputs are the reference's."""
    from fastairl.data.datasets import scan_folder
    from fastairl.pipelines.torch_ref import TorchTrainLoader

    samples, classes = scan_folder(photo_root / "train")
    spec = make_spec("crop_flip", crop_size=32)
    ref = TorchTrainLoader(samples, classes, spec, 8, seed=2)
    dev = DeviceAugLoader(TorchTrainLoader(samples, classes, spec, 8, seed=2, on_device=True), spec, "cpu", seed=2)
    assert dev.loader.uint8_views
    for loader in (ref, dev):
        loader.set_epoch(1)
    (rv, _), (dv, _) = next(iter(ref)), next(iter(dev))
    for a, b in zip(rv, dv):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.cuda
def test_cuda_equals_cpu_for_the_same_draws():
    v = make_spec("byol_sym", crop_size=32).views[0]
    x = photo_batch(32)
    p = sample_params(32, v, torch.Generator().manual_seed(1))
    cpu = BatchAugment(v).apply_params(x, p)
    pc = BatchParams(*(getattr(p, f).cuda() for f in BatchParams.__dataclass_fields__))
    gpu = BatchAugment(v).cuda().apply_params(x.cuda().contiguous(memory_format=torch.channels_last), pc)
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    g = torch.Generator(device="cuda").manual_seed(0)
    assert BatchAugment(v).cuda()(x.cuda(), g).is_cuda


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["aug.on_device=true"], ["aug.engine=opencv"],
                                       ["aug.engine=opencv", "aug.on_device=true"]])
def test_trainer_runs_with_each_augmentation_engine(digits_root, tmp_path, overrides):
    import json

    from tiny_runs import losses, run, train_cmd, write_recipe

    if "aug.engine=opencv" in overrides:
        pytest.importorskip("cv2")
    recipe = write_recipe(tmp_path / "tiny.yaml", digits_root / "train")
    proc = run(train_cmd(recipe, *overrides, "train.max_steps=2", "--run-dir", tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = losses(tmp_path / "run")
    assert sorted(logged) == [1, 2] and all(math.isfinite(v) for v in logged.values())
    resolved = (tmp_path / "run" / "config.yaml").read_text()
    for ov in overrides:
        key, value = ov.split("=")
        assert f"{key.split('.')[1]}: {value}" in resolved
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
