"""L-BFGS logistic regression against scikit-learn's LogisticRegression on the same features."""
import ml_collections
import numpy as np
import torch
from sklearn import datasets, linear_model

from fpipe.evaluate import logreg


def digits():
    raw = datasets.load_digits()
    x = torch.as_tensor(raw.data, dtype=torch.float32)
    x = (x - x[:1200].mean(0)) / x[:1200].std(0).clamp_min(1e-6)
    y = torch.as_tensor(raw.target)
    return (x[:1000], y[:1000]), (x[1000:1200], y[1000:1200]), (x[1200:], y[1200:])


CFG = ml_collections.ConfigDict(dict(Cs=(0.001, 0.1, 10.0), max_iter=500, tol=1e-6, history=10, refit=True))


def test_within_half_a_point_of_sklearn_and_the_same_solution():
    (x, y), _, (tx, ty) = digits()
    for C in (0.01, 1.0):
        w, b = logreg.fit(x, y, 10, C, CFG)
        ref = linear_model.LogisticRegression(C=C, max_iter=2000, tol=1e-8).fit(x.numpy(), y.numpy())
        ours = 100 * float(((tx @ w + b).argmax(1) == ty).double().mean())
        theirs = 100 * ref.score(tx.numpy(), ty.numpy())
        assert abs(ours - theirs) <= 0.5, (C, ours, theirs)
        np.testing.assert_allclose(w.T.numpy(), ref.coef_, atol=2e-3 * np.abs(ref.coef_).max())


def test_sweep_chooses_C_on_validation_and_refits_on_train_and_val():
    train, val, test = digits()
    result = logreg.evaluate(train, val, test, 10, CFG)
    assert [s["C"] for s in result["sweep"]] == [0.001, 0.1, 10.0]
    best = max(result["sweep"], key=lambda s: s["val_top1"])
    assert result["C"] == best["C"] and result["refit"]
    x, y = torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]])
    ref = linear_model.LogisticRegression(C=result["C"], max_iter=2000, tol=1e-8).fit(x.numpy(), y.numpy())
    assert abs(result["top1"] - 100 * ref.score(test[0].numpy(), test[1].numpy())) <= 0.5
