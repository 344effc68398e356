"""Multinomial logistic regression by L-BFGS with a sweep of C (the CLIP / dinov2 protocol).

The objective is scikit-learn's ``LogisticRegression`` (L2 on the weights, not the bias):
``mean_i CE_i + |W|² / (2 C N)``, the same minimiser as its ``C Σ CE_i + |W|² / 2``, so C
values mean the same in both. Full batch: under torchrun each rank holds a slice of the rows
and the loss and gradients are summed over ranks, so every rank takes the same L-BFGS steps.
C is chosen on a validation split carved from train; ``refit=True`` (CLIP) fits the chosen C
again on train + val before scoring test.
"""
import torch
import torch.nn.functional as F

from fpipe.evaluate import metrics, ranks


def fit(x, y, num_classes, C, cfg, dist=None, init=None):
    """``(W D×C, b C)`` minimising the objective on all ranks' rows (``x`` is this rank's)."""
    n_total = ranks.all_sum(torch.tensor(float(len(x)), dtype=torch.float64), dist)
    d = x.shape[1]
    w = torch.zeros(d, num_classes) if init is None else init[0].clone()
    b = torch.zeros(num_classes) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    y = y.long()
    reg = 1.0 / (2.0 * float(C) * float(n_total))
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=int(cfg.max_iter), tolerance_grad=float(cfg.tol),
                            tolerance_change=1e-12, history_size=int(cfg.history), line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        data_loss = F.cross_entropy(x @ w + b, y, reduction="sum") / n_total if len(x) else (w.sum() + b.sum()) * 0
        data_loss.backward()
        loss = data_loss.detach()
        if dist is not None and dist.enabled:
            packed = ranks.all_sum(torch.cat([w.grad.reshape(-1), b.grad, loss.reshape(1)]), dist)
            w.grad.copy_(packed[:w.numel()].view_as(w))
            b.grad.copy_(packed[w.numel():-1])
            loss = packed[-1]
        with torch.no_grad():
            w.grad.add_(w, alpha=2.0 * reg)
            return loss + reg * (w * w).sum()

    opt.step(closure)
    return w.detach(), b.detach()


def evaluate(train, val, test, num_classes, cfg, dist=None) -> dict:
    """Each C of ``cfg.Cs`` fit on ``train`` (warm-started from the previous, smaller C), the
    best by val top-1 (the smallest C on ties), optionally refit on train + val, scored on test."""
    Cs = sorted(float(c) for c in cfg.Cs)
    if not Cs or Cs[0] <= 0:
        raise ValueError(f"eval.logreg.Cs={tuple(cfg.Cs)} must be positive numbers")
    rows = ranks.rows(len(train[0]), dist)
    sweep, fits, init = [], [], None
    for C in Cs:
        init = fit(train[0][rows], train[1][rows], num_classes, C, cfg, dist, init)
        w, b = init
        sweep.append({"C": C, "val_top1": metrics.from_scores(val[0] @ w + b, val[1], num_classes)["top1"]})
        fits.append(init)
    best = max(range(len(Cs)), key=lambda i: (sweep[i]["val_top1"], -i))
    w, b = fits[best]
    if cfg.refit:
        x, y = torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]])
        rows = ranks.rows(len(x), dist)
        w, b = fit(x[rows], y[rows], num_classes, Cs[best], cfg, dist, (w, b))
    result = metrics.from_scores(test[0] @ w + b, test[1], num_classes)
    return {**result, "C": Cs[best], "val_top1": sweep[best]["val_top1"], "refit": bool(cfg.refit), "sweep": sweep}
