"""LARS against timm and against a per-parameter reference; parameter groups; optimiser factory."""
import copy

import pytest
import torch
from torch import nn

from fastairl.config import OptimConfig
from fastairl.optim import LARS, build_optimizer, param_groups, set_lr

LR, MOM, WD, ETA = 0.5, 0.9, 1e-2, 1e-3


def _model(seed: int = 0) -> nn.Module:
    """Small net with conv / linear weights (n-d) and biases / BN affine params (1-d)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3),
    )


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[torch.Tensor]:
    """Run `steps` steps on fixed random data; return the final parameters."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _lars_groups(model: nn.Module, wd_1d: float = 0.0) -> list[dict]:
    groups = param_groups(model, WD, exclude_1d=True)
    groups[1]["weight_decay"] = wd_1d
    return groups


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_matches_timm(nesterov):
    timm_optim = pytest.importorskip("timm.optim")
    ours, theirs = _model(), _model()
    opt = LARS(_lars_groups(ours), lr=LR, momentum=MOM, trust_coef=ETA, nesterov=nesterov)
    # timm adapts only groups with wd != 0 unless always_adapt; eps=0 gives BYOL's exact ratio.
    ref_groups = [
        {"params": [p for p in theirs.parameters() if p.ndim > 1], "weight_decay": WD, "always_adapt": True},
        {"params": [p for p in theirs.parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ]
    ref = timm_optim.Lars(ref_groups, lr=LR, momentum=MOM, nesterov=nesterov, trust_coeff=ETA,
                          eps=0.0, trust_clip=False)
    for a, b in zip(_train(ours, opt, 60), _train(theirs, ref, 60)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(_model().state_dict()["0.weight"], ours.state_dict()["0.weight"])


class _ReferenceLARS:
    """Independent per-parameter loop: BYOL's LARS written out one tensor at a time."""

    def __init__(self, groups: list[dict], lr: float, momentum: float, eta: float):
        self.groups, self.lr, self.momentum, self.eta = groups, lr, momentum, eta
        self.bufs: dict[int, torch.Tensor] = {}

    def zero_grad(self) -> None:
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for g in self.groups:
            wd = g["weight_decay"]
            for p in g["params"]:
                u = p.grad + wd * p
                if not g["lars_exclude"]:
                    w_norm, g_norm = float(p.norm()), float(p.grad.norm())
                    trust = 1.0 if w_norm == 0 or g_norm == 0 else self.eta * w_norm / (g_norm + wd * w_norm)
                    u = trust * u
                v = self.bufs.get(id(p), torch.zeros_like(p)) * self.momentum + u
                self.bufs[id(p)] = v
                p -= self.lr * v


def test_lars_matches_reference_loop_with_decayed_1d_group():
    ours, theirs = _model(), _model()
    opt = LARS(_lars_groups(ours, wd_1d=3e-2), lr=LR, momentum=MOM, trust_coef=ETA)
    ref = _ReferenceLARS(_lars_groups(theirs, wd_1d=3e-2), LR, MOM, ETA)
    for a, b in zip(_train(ours, opt, 50), _train(theirs, ref, 50)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_trust_ratio_is_one_for_zero_weight():
    w = nn.Parameter(torch.zeros(3, 2))
    w.grad = torch.full((3, 2), 2.0)
    LARS([w], lr=0.1, momentum=0.0, weight_decay=WD, trust_coef=ETA).step()
    torch.testing.assert_close(w.detach(), torch.full((3, 2), -0.2))


def test_trust_ratio_is_one_for_zero_grad():
    w = nn.Parameter(torch.full((3, 2), 4.0))
    w.grad = torch.zeros(3, 2)
    LARS([w], lr=0.1, momentum=0.0, weight_decay=WD, trust_coef=ETA).step()
    torch.testing.assert_close(w.detach(), torch.full((3, 2), 4.0 * (1 - 0.1 * WD)))


def test_excluded_params_get_no_weight_decay():
    model = _model()
    opt = build_optimizer(OptimConfig(name="lars", base_lr=0.2, weight_decay=0.1), model, 256)
    before = copy.deepcopy(model.state_dict())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.2 * 0.1) if p.ndim > 1 else before[name]
        torch.testing.assert_close(p.detach(), expected, msg=name)


def test_lars_step_does_not_sync_host(monkeypatch):
    model = _model()
    opt = LARS(_lars_groups(model), lr=LR, momentum=MOM, trust_coef=ETA)
    nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 0])).backward()

    def forbidden(*_):
        raise AssertionError("host sync in LARS.step")

    for name in ("item", "tolist", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.step()


def test_param_groups_by_rank_catch_torchvision_downsample_bn():
    models = pytest.importorskip("torchvision.models")
    net = models.resnet18(weights=None)
    net.fc.weight.requires_grad_(False)
    decayed, excluded = param_groups(net, 1e-4, exclude_1d=True)
    excluded_ids = {id(p) for p in excluded["params"]}
    named = dict(net.named_parameters())
    assert id(named["layer2.0.downsample.1.weight"]) in excluded_ids
    assert id(named["layer2.0.downsample.1.bias"]) in excluded_ids
    assert id(named["layer2.0.downsample.0.weight"]) not in excluded_ids
    assert (excluded["weight_decay"], excluded["lars_exclude"]) == (0.0, True)
    assert (decayed["weight_decay"], decayed["lars_exclude"]) == (1e-4, False)
    every = [id(p) for g in (decayed, excluded) for p in g["params"]]
    trainable = [id(p) for p in net.parameters() if p.requires_grad]
    assert sorted(every) == sorted(trainable) and id(net.fc.weight) not in every


def test_param_groups_without_exclusion_decay_everything():
    model = _model()
    (group,) = param_groups(model, 1e-4, exclude_1d=False)
    assert len(group["params"]) == len(list(model.parameters())) and group["weight_decay"] == 1e-4


def test_build_sgd_scales_lr_and_decays_all_by_default():
    model = _model()
    opt = build_optimizer(OptimConfig(name="sgd", base_lr=0.03, weight_decay=1e-4), model, 1024)
    assert isinstance(opt, torch.optim.SGD)
    (group,) = opt.param_groups
    assert group["lr"] == pytest.approx(0.12) and group["weight_decay"] == 1e-4
    assert group["momentum"] == 0.9 and group["base_lr_scale"] == 1.0


def test_build_sgd_honours_exclude_1d():
    model = _model()
    opt = build_optimizer(OptimConfig(name="sgd", weight_decay=1e-4, exclude_1d=True), model, 256)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]


def test_build_lars_scales_lr_and_always_excludes_1d():
    model = _model()
    cfg = OptimConfig(name="lars", base_lr=0.2, weight_decay=1.5e-6, trust_coef=2e-3, exclude_1d=False)
    opt = build_optimizer(cfg, model, 4096)
    assert isinstance(opt, LARS)
    decayed, excluded = opt.param_groups
    assert all(g["lr"] == pytest.approx(3.2) and g["base_lr_scale"] == 1.0 for g in opt.param_groups)
    assert all(p.ndim <= 1 for p in excluded["params"]) and excluded["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and decayed["trust_coef"] == 2e-3


def test_unknown_optimizer_is_an_error():
    with pytest.raises(ValueError, match="optim.name"):
        build_optimizer(OptimConfig(name="adam"), _model(), 256)


def test_set_lr_sets_every_group_times_scale():
    opt = build_optimizer(OptimConfig(name="lars"), _model(), 256)
    opt.param_groups[1]["base_lr_scale"] = 0.5
    set_lr(opt, 0.8)
    assert [g["lr"] for g in opt.param_groups] == [0.8, 0.4]


def test_fp16_step_updates_the_loss_scale_once_and_unscales_the_probe():
    """Under fp16 the trainer prepares only the main optimizer (its wrapper calls the scaler's
    update() after step()) and steps the probe's through the scaler first: one update per training
    step, and both optimizers see gradients divided by that step's scale. A CPU GradScaler with
    exact (float32) arithmetic must then give the unscaled run's parameters."""
    import contextlib

    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from torch import nn

    from fastairl.trainer import train_step

    class Tiny(nn.Module):  # method-shaped: an SSL loss on the trunk, a probe on detached features
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.trunk, self.probe = nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, views, labels, step):
            f = self.trunk(views[0])
            return f.pow(2).mean() + nn.functional.cross_entropy(self.probe(f.detach()), labels), {}

        def update_teacher(self, momentum):
            pass

    class Acc:  # what train_step uses of accelerate's Accelerator
        device = torch.device("cpu")

        def __init__(self, scaler):
            self.scaler = scaler

        def autocast(self):
            return contextlib.nullcontext()

        def backward(self, loss):
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    Accelerator(cpu=True)  # AcceleratedOptimizer needs the accelerate state

    def run(scaler):
        m = Tiny()
        opt = torch.optim.SGD(m.trunk.parameters(), lr=0.1, momentum=0.9)
        opt = AcceleratedOptimizer(opt, scaler=scaler) if scaler is not None else opt
        probe_opt = torch.optim.SGD(m.probe.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
            train_step(m, m, opt, probe_opt, Acc(scaler), [x], y, step, 0.1, 0.99)
        return m

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    scaled, plain = run(scaler), run(None)
    assert scaler.get_scale() == 4096.0  # 4 steps, growth every 2: two doublings, not four
    for (name, a), b in zip(scaled.named_parameters(), plain.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
