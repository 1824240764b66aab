"""Losses against independent, element-by-element formulas."""
import math

import torch
import torch.nn.functional as F

from fastairl import losses


def _infonce_by_hand(q, k, queue, tau):
    total = 0.0
    for i in range(q.shape[0]):
        pos = math.exp(float(q[i] @ k[i]) / tau)
        neg = sum(math.exp(float(q[i] @ queue[j]) / tau) for j in range(queue.shape[0]))
        total += -math.log(pos / (pos + neg))
    return total / q.shape[0]


def test_infonce_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    k = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    got = losses.infonce(q, k, queue, 0.2).item()
    assert math.isclose(got, _infonce_by_hand(q, k, queue, 0.2), rel_tol=1e-5)


def test_infonce_rewards_aligned_positives():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(4, 16, generator=g), dim=1)
    queue = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    assert losses.infonce(q, q, queue, 0.2) < losses.infonce(q, -q, queue, 0.2)


def test_byol_loss_is_two_minus_two_cosine():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    z = torch.tensor([[1.0, 0.0], [0.0, -1.0], [4.0, 3.0]])
    # cosines: 1, -1, 24/25
    expected = ((2 - 2 * 1) + (2 - 2 * -1) + (2 - 2 * 24 / 25)) / 3
    assert math.isclose(losses.byol_loss(p, z).item(), expected, rel_tol=1e-6)


def test_symmetric_sums_both_directions():
    a1, a2, b1, b2 = (torch.randn(3, 4) for _ in range(4))
    got = losses.symmetric(losses.byol_loss, a1, a2, b1, b2)
    want = losses.byol_loss(a1, b2) + losses.byol_loss(a2, b1)
    assert torch.allclose(got, want)
    assert not torch.allclose(got, 2 * losses.byol_loss(a1, b1))


def test_feature_std_detects_collapse():
    spread = torch.randn(512, 64)
    collapsed = torch.ones(512, 64) + 1e-4 * torch.randn(512, 64)
    assert losses.feature_std(spread) > 0.8
    assert losses.feature_std(collapsed) < 0.05
