"""The frozen-feature evaluation functions (fastairl/eval/features.py) against independent formulas."""
from __future__ import annotations

import math

import pytest
import torch

from fastairl.eval.features import few_label_eval, few_label_subsets, knn_accuracy, linear_probe


def _knn_by_hand(train_f, train_y, test_f, test_y, k, temperature, num_classes) -> float:
    """One test sample at a time: cosine to every training sample, the k nearest vote exp(cos / T)."""
    correct = 0
    for f, y in zip(test_f.tolist(), test_y.tolist()):
        sims = []
        for g, label in zip(train_f.tolist(), train_y.tolist()):
            dot = sum(a * b for a, b in zip(f, g))
            sims.append((dot / math.sqrt(sum(a * a for a in f) * sum(b * b for b in g)), label))
        votes = [0.0] * num_classes
        for s, label in sorted(sims, reverse=True)[:k]:
            votes[label] += math.exp(s / temperature)
        correct += max(range(num_classes), key=votes.__getitem__) == y
    return 100.0 * correct / len(test_y)


@pytest.mark.parametrize("k, temperature", [(1, 0.07), (5, 0.07), (7, 0.5)])
def test_knn_matches_the_formula(k, temperature):
    g = torch.Generator().manual_seed(k)
    centres = torch.randn(3, 6, generator=g)
    train_y, test_y = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 3, (25,), generator=g)
    train_f = centres[train_y] + 0.9 * torch.randn(40, 6, generator=g)
    test_f = centres[test_y] + 0.9 * torch.randn(25, 6, generator=g)
    got = knn_accuracy(train_f, train_y, test_f, test_y, k, temperature, num_classes=3, chunk=4)
    assert got == pytest.approx(_knn_by_hand(train_f, train_y, test_f, test_y, k, temperature, 3))
    assert 0.0 < got < 100.0  # the clusters overlap: a test that can tell right from wrong


def test_few_label_subsets_are_stratified_repeatable_and_distinct():
    labels = torch.tensor([0] * 7 + [1] * 4 + [2] * 9)[torch.randperm(20, generator=torch.Generator().manual_seed(0))]
    draws = few_label_subsets(labels, per_class=3, draws=4, seed=11)
    for idx in draws:
        assert len(set(idx.tolist())) == 9
        assert torch.bincount(labels[idx], minlength=3).tolist() == [3, 3, 3]
    assert len({tuple(d.tolist()) for d in draws}) == 4
    again = few_label_subsets(labels, per_class=3, draws=2, seed=11)
    assert all(torch.equal(a, b) for a, b in zip(again, draws))  # draw d depends only on seed + d
    with pytest.raises(ValueError, match="only 4 samples"):
        few_label_subsets(labels, per_class=5, draws=1)


def test_few_label_eval_is_the_mean_over_draws():
    g = torch.Generator().manual_seed(0)
    centres = 3.0 * torch.randn(4, 16, generator=g)
    train_y, test_y = torch.arange(200) % 4, torch.arange(80) % 4
    train_f = centres[train_y] + torch.randn(200, 16, generator=g)
    test_f = centres[test_y] + torch.randn(80, 16, generator=g)
    out = few_label_eval(train_f, train_y, test_f, test_y, per_class=2, draws=3, k=20, linear_steps=50, seed=5)
    assert out["labelled"] == 8 and out["draws"] == 3
    knn = [knn_accuracy(train_f[i], train_y[i], test_f, test_y, 8, 0.07, 4)
           for i in few_label_subsets(train_y, 2, 3, seed=5)]
    assert out["knn_top1"] == pytest.approx(sum(knn) / 3)
    assert out["knn_top1_std"] == pytest.approx(torch.tensor(knn).std(unbiased=False).item(), abs=1e-4)
    assert out["linear_top1"] > 90.0  # well-separated clusters: two labels per class suffice


def test_few_label_probe_standardises_with_all_unlabelled_features():
    """The labelled few are too few for feature statistics (a feature can be constant on them): the
    probe standardises with the whole, unlabelled training set, then fits on the labelled subset."""
    g = torch.Generator().manual_seed(1)
    train_y, test_y = torch.arange(60) % 3, torch.arange(30) % 3
    train_f, test_f = torch.randn(60, 5, generator=g) + train_y[:, None], torch.randn(30, 5, generator=g) + test_y[:, None]
    out = few_label_eval(train_f, train_y, test_f, test_y, per_class=4, draws=1, linear_steps=40, seed=3)
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    (idx,) = few_label_subsets(train_y, 4, 1, seed=3)
    ref = linear_probe((train_f[idx] - mean) / std, train_y[idx], (test_f - mean) / std, test_y, 3, epochs=40,
                       batch_size=12, seed=3, standardised=True)
    assert out["linear_top1"] == pytest.approx(ref["top1"])
