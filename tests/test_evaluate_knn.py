"""DINO's weighted kNN against scikit-learn's KNeighborsClassifier with the same weighting."""
import ml_collections
import numpy as np
import torch
from sklearn import datasets, neighbors

from fpipe.evaluate import knn

T = 0.07


def digits_features():
    """Digits pixels through a fixed random projection and ReLU: continuous features, no ties."""
    raw = datasets.load_digits()
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.as_tensor(raw.data, dtype=torch.float32) @ torch.randn(64, 48, generator=g))
    y = torch.as_tensor(raw.target)
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def sklearn_proba(train, test, k):
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float64)
    # on unit vectors the euclidean distance d gives the cosine: sim = 1 - d^2 / 2
    clf = neighbors.KNeighborsClassifier(n_neighbors=k, algorithm="brute",
                                         weights=lambda d: np.exp((1.0 - d ** 2 / 2.0) / T))
    clf.fit(unit(train[0].numpy()), train[1].numpy())
    return clf.predict_proba(unit(test[0].numpy())), clf.predict(unit(test[0].numpy()))


def test_weighted_votes_equal_sklearn_for_several_k_from_one_search():
    train, test = digits_features()
    sims, labels = knn.neighbours(knn.normalise(train[0]), train[1], knn.normalise(test[0]), 50,
                                  query_chunk=64, bank_chunk=300)  # several chunks both ways
    for k in (1, 5, 20, 50):
        scores = knn.vote(sims, labels, k, T, 10).double()
        proba, pred = sklearn_proba(train, test, k)
        np.testing.assert_allclose((scores / scores.sum(1, keepdim=True)).numpy(), proba, atol=1e-4)
        np.testing.assert_array_equal(scores.argmax(1).numpy(), pred)


def test_evaluate_reports_sklearns_accuracy():
    train, test = digits_features()
    cfg = ml_collections.ConfigDict(dict(ks=(20, 10), temperature=T, query_chunk=100, bank_chunk=512))
    results = knn.evaluate(train, test, 10, cfg)
    assert list(results) == ["k=10", "k=20"]
    for k in (10, 20):
        _, pred = sklearn_proba(train, test, k)
        assert abs(results[f"k={k}"]["top1"] - 100 * np.mean(pred == test[1].numpy())) < 1e-9


def test_chunking_and_bank_shards_merge_to_the_exact_top_k():
    train, test = digits_features()
    bank, q = knn.normalise(train[0]), knn.normalise(test[0])
    whole = knn.neighbours(bank, train[1], q, 30, query_chunk=10_000, bank_chunk=10_000)
    halves = [knn.neighbours(bank[s], train[1][s], q, 30, bank_chunk=97) for s in (slice(0, 700), slice(700, None))]
    merged = knn._merge(torch.cat([h[0] for h in halves], 1), torch.cat([h[1] for h in halves], 1), 30)
    assert torch.equal(merged[0], whole[0]) and torch.equal(merged[1], whole[1])
    exact = (q @ bank.T).topk(30, dim=1)
    torch.testing.assert_close(whole[0], exact.values)


def test_more_neighbours_than_samples_vote_with_what_there_is():
    bank = knn.normalise(torch.eye(3))
    sims, labels = knn.neighbours(bank, torch.tensor([0, 1, 2]), bank[:1], 5)
    assert torch.isinf(sims[0, 3:]).all() and (knn.vote(sims, labels, 5, T, 3)[0].argmax() == 0)
