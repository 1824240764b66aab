"""Method composition: EMA rule, queue, predictor placement, shuffle-BN emulation."""
import copy

import torch

from fastairl.config import build_config
from fastairl.methods import Siamese, Supervised, build_method


def tiny_cfg(**method):
    raw = {"model": {"arch": "resnet10", "cifar_stem": True, "channels_last": False,
                     "projector": {"hidden_dim": 32, "out_dim": 16}, "predictor": {"hidden_dim": 32}},
           "method": {"queue_size": 64, **method}, "train": {"batch_size": 8}}
    return build_config(raw)


def views(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, size, size, generator=g) for _ in range(2)], torch.randint(0, 3, (n,), generator=g)


def test_teacher_update_is_ema_over_parameters_not_bn_stats():
    torch.manual_seed(0)
    m = Siamese(tiny_cfg(loss="byol"), num_classes=3)
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    t_before = copy.deepcopy(m.teacher.state_dict())
    s = m.student.state_dict()
    m.update_teacher(0.9)
    for name, t in m.teacher.state_dict().items():
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(t, t_before[name]), name  # statistics are not averaged
        else:
            assert torch.allclose(t, 0.9 * t_before[name] + 0.1 * s[name], atol=1e-6), name


def test_predictor_placement():
    assert "predictor" in Siamese(tiny_cfg(predictor="student"), 3).student
    assert "predictor" not in Siamese(tiny_cfg(predictor="student"), 3).teacher
    assert "predictor" in Siamese(tiny_cfg(predictor="both"), 3).teacher
    assert "predictor" not in Siamese(tiny_cfg(predictor="none"), 3).student


def test_teacher_gets_no_gradient_and_loss_is_finite():
    torch.manual_seed(0)
    m = Siamese(tiny_cfg(loss="infonce"), 3)
    v, y = views()
    loss, metrics = m(v, y, step=0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in m.teacher.parameters())
    assert any(p.grad is not None for p in m.student.parameters())
    assert {"loss_ssl", "feat_std", "probe_acc"} <= set(metrics)


def test_queue_receives_normalised_keys_and_wraps():
    torch.manual_seed(0)
    m = Siamese(tiny_cfg(loss="infonce", symmetric=False, queue_size=12), 3)
    assert m.queue.shape == (12, 16)
    v, y = views(n=8)
    old = m.queue.clone()
    m(v, y, step=0)
    assert int(m.queue_ptr) == 8
    assert not torch.equal(m.queue[:8], old[:8]) and torch.equal(m.queue[8:], old[8:])
    assert torch.allclose(m.queue.norm(dim=1), torch.ones(12), atol=1e-5)
    m(v, y, step=1)  # 8 more keys wrap around a 12-slot queue
    assert int(m.queue_ptr) == 4
    assert "queue" in m.state_dict()  # a registered buffer: saved with the model


def test_symmetric_enqueue_picks_one_view_deterministically():
    cfg = tiny_cfg(loss="infonce", symmetric=True, queue_size=64)
    torch.manual_seed(0)
    a = Siamese(cfg, 3)
    b = copy.deepcopy(a)
    v, y = views()
    a(v, y, step=5)
    b(v, y, step=5)
    assert torch.equal(a.queue, b.queue) and int(a.queue_ptr) == 8


def test_shuffle_bn_emulation_changes_teacher_statistics():
    torch.manual_seed(0)
    cfg_shuffle = tiny_cfg(loss="infonce", bn="shuffle", shuffle_bn_groups=2)
    m = Siamese(cfg_shuffle, 3)
    plain = copy.deepcopy(m)
    plain.bn = "plain"
    v, _ = views(n=8)
    k_shuffle = m._teacher(v[0], step=0)
    k_plain = plain._teacher(v[0], step=0)
    assert k_shuffle.shape == k_plain.shape
    assert not torch.allclose(k_shuffle, k_plain, atol=1e-4)  # not silently a no-op
    # per-sample order is restored after the shuffle: one group == plain BN
    one = copy.deepcopy(plain)
    one.bn, one.groups = "shuffle", 1
    assert torch.allclose(one._teacher(v[0], step=0), k_plain, atol=1e-5)


def test_supervised_and_builder():
    cfg = tiny_cfg(loss="ce", predictor="none")
    m = build_method(cfg, 3)
    assert isinstance(m, Supervised)
    v, y = views()
    loss, metrics = m(v[:1], y, step=0)
    assert torch.isfinite(loss) and "probe_acc" in metrics
    assert isinstance(build_method(tiny_cfg(loss="byol"), 3), Siamese)
