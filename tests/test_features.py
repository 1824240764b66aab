"""The frozen-feature evaluation functions (fastairl/eval/features.py) against independent formulas."""
from __future__ import annotations

import math

import pytest
import torch

from fastairl.eval.features import few_label_eval, few_label_subsets, knn_accuracies, knn_accuracy, linear_probe


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


def _clusters(seed: int, n_train: int, n_test: int, classes: int = 3, dim: int = 6):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    train_y, test_y = torch.randint(0, classes, (n_train,), generator=g), torch.randint(0, classes, (n_test,), generator=g)
    return (centres[train_y] + 0.9 * torch.randn(n_train, dim, generator=g), train_y,
            centres[test_y] + 0.9 * torch.randn(n_test, dim, generator=g), test_y)


def test_one_knn_search_serves_every_k():
    """The max(ks) nearest, sorted, hold the k nearest for every smaller k; k above the bank size uses
    the whole bank; the query chunk is capped by the bank's width."""
    import fastairl.eval.features as features

    train_f, train_y, test_f, test_y = _clusters(0, 40, 25)
    got = knn_accuracies(train_f, train_y, test_f, test_y, (1, 5, 7, 500), 0.1, 3, chunk=4)
    for k in (1, 5, 7):
        assert got[k] == pytest.approx(_knn_by_hand(train_f, train_y, test_f, test_y, k, 0.1, 3)), k
    assert got[500] == pytest.approx(_knn_by_hand(train_f, train_y, test_f, test_y, 40, 0.1, 3))
    assert len(set(got.values())) > 1  # the ks disagree: a test that can tell them apart
    small = features.SIM_ELEMENTS
    try:
        features.SIM_ELEMENTS = 80  # two queries per chunk against 40 bank rows
        assert knn_accuracies(train_f, train_y, test_f, test_y, (1, 5, 7, 500), 0.1, 3) == got
    finally:
        features.SIM_ELEMENTS = small
    with pytest.raises(ValueError, match="non-empty bank"):
        knn_accuracies(train_f[:0], train_y[:0], test_f, test_y, (5,))


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
    assert out["knn_top1_std"] == pytest.approx(torch.tensor(knn).std().item(), abs=1e-4)  # sample std
    assert out["linear_top1"] > 90.0  # well-separated clusters: two labels per class suffice


def test_few_label_probe_steps_in_batches_of_at_most_256(monkeypatch):
    """The probe's cost per step stays that of the full-label probe's batch, whatever the subset size:
    `linear_steps` steps of batches of <= 256 labelled samples."""
    import fastairl.eval.features as features

    seen = []
    monkeypatch.setattr(features, "linear_probe", lambda *a, **kw: seen.append(kw) or {"top1": 50.0})
    y = torch.arange(2000) % 4
    f = torch.randn(2000, 3)
    for per_class, want in ((100, dict(epochs=150, batch_size=256)), (5, dict(epochs=300, batch_size=20))):
        seen.clear()
        features.few_label_eval(f, y, f[:8], y[:8], per_class=per_class, draws=1, linear_steps=300)
        assert {k: seen[0][k] for k in want} == want  # 400 labelled: 2 batches an epoch, 150 epochs


def test_few_label_probe_standardises_with_all_unlabelled_features():
    """The labelled few are too few for feature statistics (a feature can be constant on them): the
    probe standardises with the whole, unlabelled training set, then fits on the labelled subset."""
    g = torch.Generator().manual_seed(1)
    train_y, test_y = torch.arange(60) % 3, torch.arange(30) % 3
    train_f = torch.randn(60, 5, generator=g) + train_y[:, None]
    test_f = torch.randn(30, 5, generator=g) + test_y[:, None]
    out = few_label_eval(train_f, train_y, test_f, test_y, per_class=4, draws=1, linear_steps=40, seed=3)
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    (idx,) = few_label_subsets(train_y, 4, 1, seed=3)
    ref = linear_probe((train_f[idx] - mean) / std, train_y[idx], (test_f - mean) / std, test_y, 3, epochs=40,
                       batch_size=12, seed=3, standardised=True)
    assert out["linear_top1"] == pytest.approx(ref["top1"])


def test_eval_indices_split_the_subset_between_processes():
    from fastairl.data.datasets import eval_indices

    assert eval_indices(10, 4).tolist() == [0, 2, 5, 7]  # evenly spaced
    parts = [eval_indices(10, 4, r, 3).tolist() for r in range(3)]
    assert parts == [[0, 7], [2], [5]]  # strided shares of the same subset
    assert eval_indices(2, None, 2, 3).tolist() == []  # more processes than samples: an empty share
    with pytest.raises(ValueError, match="rank 3 is not in a world of 3"):
        eval_indices(10, None, 3, 3)


GATHER = """
import sys, torch
from accelerate import PartialState
from fastairl.data.datasets import eval_indices
from fastairl.eval.features import gather_strided, knn_accuracies

state = PartialState(cpu=True)
out = {}
for n in (7, 2, 1):
    idx = torch.as_tensor(eval_indices(n, None, state.process_index, state.num_processes), dtype=torch.long)
    feats = torch.arange(n * 3, dtype=torch.float32).view(n, 3)[idx] if len(idx) else torch.zeros(0, 0)
    # chunk=2: a process's share crosses in pieces (3 rows of 7 in two), the last one short
    out[n] = (gather_strided(feats, state.device, chunk=2), gather_strided(torch.arange(n)[idx], state.device))
# kNN over a bank split between the processes: shares of 14, 13, 13 rows, then of 1, 1, 0 (k > the bank)
g = torch.Generator().manual_seed(0)
bank_f, bank_y, test_f, test_y = torch.randn(40, 5, generator=g), torch.randint(0, 4, (40,), generator=g), \
    torch.randn(9, 5, generator=g), torch.randint(0, 4, (9,), generator=g)
for n in (40, 2):
    idx = torch.as_tensor(eval_indices(n, None, state.process_index, state.num_processes), dtype=torch.long)
    out[f"knn{n}"] = knn_accuracies(bank_f[:n][idx], bank_y[:n][idx], test_f, test_y, (1, 3, 20), 0.2, 4,
                                    chunk=4, procs=state)
# the kNN monitor encodes with rank 0's BN statistics, then gives each process its own back
from fastairl.trainer import _rank0_buffers
bn = torch.nn.BatchNorm1d(2)
bn.running_mean.fill_(state.process_index)
with _rank0_buffers(bn, state.num_processes):
    out["inside"] = bn.running_mean.clone()
out["after"] = bn.running_mean.clone()
torch.save(out, f"{sys.argv[1]}/rank{state.process_index}.pt")
"""


@pytest.mark.slow
def test_gather_strided_and_split_knn_agree_with_one_process(tmp_path):
    """3 gloo processes, N = 7, 2 and 1 rows: uneven shares and empty ones (without a feature width);
    the kNN over a split bank; rank 0's buffers lent to every process."""
    import sys

    from tiny_runs import run

    (tmp_path / "g.py").write_text(GATHER)
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 3,
                tmp_path / "g.py", tmp_path], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    g = torch.Generator().manual_seed(0)
    bank_f, bank_y = torch.randn(40, 5, generator=g), torch.randint(0, 4, (40,), generator=g)
    test_f, test_y = torch.randn(9, 5, generator=g), torch.randint(0, 4, (9,), generator=g)
    for r in range(3):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.equal(got.pop("inside"), torch.zeros(2)) and torch.equal(got.pop("after"), torch.full((2,), r))
        for n in (40, 2):  # the split search equals one process searching the whole bank
            want = knn_accuracies(bank_f[:n], bank_y[:n], test_f, test_y, (1, 3, 20), 0.2, 4)
            assert got.pop(f"knn{n}") == want, (r, n)
        for n, (feats, labels) in got.items():
            assert torch.equal(feats, torch.arange(n * 3, dtype=torch.float32).view(n, 3)), (r, n)
            assert torch.equal(labels, torch.arange(n)), (r, n)
