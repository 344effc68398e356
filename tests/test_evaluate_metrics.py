"""Metrics against scikit-learn; the seeded selections (validation split, k shots); low-shot."""
import ml_collections
import numpy as np
import torch
from sklearn import metrics as skm
from sklearn import neighbors

from fpipe.evaluate import lowshot, metrics


def test_top1_top5_and_mean_per_class_equal_sklearn():
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(300, 12, generator=g), torch.randint(0, 12, (300,), generator=g)
    labels[labels == 11] = 10  # a class with no test sample does not count in the per-class mean
    got = metrics.from_scores(scores, labels, 12)
    assert abs(got["top1"] - 100 * skm.accuracy_score(labels, scores.argmax(1))) < 1e-9
    assert abs(got["top5"] - 100 * skm.top_k_accuracy_score(labels, scores, k=5, labels=range(12))) < 1e-9
    assert abs(got["mean_per_class"] - 100 * skm.balanced_accuracy_score(labels, scores.argmax(1))) < 1e-9


def test_validation_split_is_stratified_seeded_and_disjoint():
    labels = torch.arange(10).repeat_interleave(torch.tensor([50, 40, 30, 20, 10, 10, 5, 3, 2, 100]))
    train, val = metrics.stratified_split(labels, 0.2, seed=1)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(len(labels)))
    counts = torch.bincount(labels[val], minlength=10).tolist()
    assert counts == [10, 8, 6, 4, 2, 2, 1, 1, 1, 20]
    again, _ = metrics.stratified_split(labels, 0.2, seed=1)
    other, _ = metrics.stratified_split(labels, 0.2, seed=2)
    assert torch.equal(train, again) and not torch.equal(train, other)


def test_k_shots_per_class():
    labels = torch.arange(5).repeat_interleave(torch.tensor([10, 10, 10, 10, 2]))
    chosen = metrics.per_class_sample(labels, 3, seed=0)
    assert torch.bincount(labels[chosen]).tolist() == [3, 3, 3, 3, 2]
    assert not torch.equal(chosen, metrics.per_class_sample(labels, 3, seed=1))


def test_low_shot_one_nearest_neighbour_equals_sklearn_and_reports_mean_and_std():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 2
    train_y, test_y = torch.arange(4).repeat(30), torch.arange(4).repeat(25)
    train_x = centers[train_y] + torch.randn(120, 16, generator=g) * 2
    test_x = centers[test_y] + torch.randn(100, 16, generator=g) * 2
    cfg = ml_collections.ConfigDict(dict(shots=(1, 5), seeds=(0, 1, 2), classifier="knn", C=1.0, k_nn=1))
    knn_cfg = ml_collections.ConfigDict(dict(temperature=0.07))
    out = lowshot.evaluate((train_x, train_y), (test_x, test_y), 4, cfg, knn_cfg, None)
    accs = []
    for seed in (0, 1, 2):
        idx = metrics.per_class_sample(train_y, 1, seed)
        unit = lambda x: torch.nn.functional.normalize(x, dim=1).numpy()
        clf = neighbors.KNeighborsClassifier(1).fit(unit(train_x[idx]), train_y[idx].numpy())
        accs.append(100 * clf.score(unit(test_x), test_y.numpy()))
    assert abs(out["k=1"]["top1"] - np.mean(accs)) < 1e-9 and abs(out["k=1"]["top1_std"] - np.std(accs)) < 1e-9
    assert out["k=5"]["samples"] == 20 and set(out) == {"k=1", "k=5"}
